#!/usr/bin/env bash
# GPU check of sed-discriminator, for one fresh Linux machine with one CUDA GPU (an H100 in
# the issue). Run from anywhere:  bash benchmarks/gpu_check.sh
#
#  1. installs the package (pip install -e .) without touching a preinstalled torch;
#  2. runs the CUDA-only tests (pytest -m cuda tests/test_perf_cuda.py): the fused path runs a
#     FlashAttention / memory-efficient kernel under bf16/fp16 and matches the math path, AMP
#     with GradScaler stays finite, R1 works with the fused path on;
#  3. benchmarks a full discriminator step (semantics, real + fake, backward, Adam) at batch 8
#     on 256/512/1024 patches: math fp32 (baseline) vs fused fp32 vs fused bf16 (each in the
#     variant's default layout and the other one; + real/fake batched), both variants;
#  3b. times the semantic extractors' forward (fp32, bf16) next to 0.1's CLIP RN50 trunk;
#  4. prints one table (tests + benchmark + targets) and writes it, with the logs and the JSON,
#     to $OUT (when set) or benchmarks/results/cuda.
# Everything is bounded so that the whole script ends within 8 minutes.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results/cuda}
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
: > "$LOG"
say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# -- 1. install -------------------------------------------------------------------------------
say "python: $($PY --version 2>&1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" || true
PIP="$PY -m pip install --quiet --disable-pip-version-check --timeout 20 --retries 1"
if ! $PY -c "import torch" >/dev/null 2>&1; then
    say "torch is missing: installing it (the default wheel)"
    timeout 240 $PIP torch >>"$LOG" 2>&1 || say "WARNING: could not install torch"
fi
TORCH_VERSION=$($PY -c "import torch; print(torch.__version__)" 2>/dev/null || echo "")
say "torch $TORCH_VERSION, cuda available: $($PY -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)"
CONSTRAINTS=$(mktemp)
[ -n "$TORCH_VERSION" ] && echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
# The package itself without dependencies, then whatever dependency is missing, with torch
# pinned to the installed build so that pip never replaces it.
timeout 120 $PIP --no-deps -e . >>"$LOG" 2>&1 || say "WARNING: pip install -e . failed (offline build backend?); using PYTHONPATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MISSING=""
for spec in "torchvision:torchvision" "timm:timm" "open_clip:open_clip_torch" "einops:einops" \
            "safetensors:safetensors" "pytest:pytest"; do
    mod=${spec%%:*}; pkg=${spec#*:}
    $PY -c "import $mod" >/dev/null 2>&1 || MISSING="$MISSING $pkg"
done
if [ -n "$MISSING" ]; then
    say "installing missing dependencies:$MISSING"
    timeout 180 $PIP -c "$CONSTRAINTS" $MISSING >>"$LOG" 2>&1 || say "WARNING: could not install:$MISSING"
fi
rm -f "$CONSTRAINTS"
if ! $PY -c "import sed_discriminator, torch; assert torch.cuda.is_available()" >>"$LOG" 2>&1; then
    say "ERROR: sed_discriminator or CUDA is not usable here; see $LOG"
    exit 1
fi

# -- 2. CUDA-only tests -----------------------------------------------------------------------
say "CUDA tests (pytest -m cuda)"
timeout 150 $PY -m pytest -q -m cuda tests/test_perf_cuda.py -p no:cacheprovider -rA -s \
    >"$DEST/pytest_cuda.log" 2>&1
TEST_RC=$?
TEST_LINE=$(grep -E "(passed|failed|error|skipped)" "$DEST/pytest_cuda.log" | tail -n 1)
[ $TEST_RC -eq 124 ] && TEST_LINE="timed out after 150 s"
say "tests: ${TEST_LINE:-no summary} (exit $TEST_RC)"
grep -E "SDPA ops that ran" "$DEST/pytest_cuda.log" | tee -a "$LOG" || true

# -- 3. benchmark -----------------------------------------------------------------------------
ELAPSED=$(( $(date +%s) - START ))
BUDGET=$(( 420 - 120 - ELAPSED ))    # leave ~1 min for the report and 2 min for the extractor benchmark
[ $BUDGET -lt 60 ] && BUDGET=60
say "benchmark, batch 8, 256/512/1024, budget ${BUDGET}s"
timeout $(( BUDGET + 30 )) $PY benchmarks/bench_sed.py --device cuda --suites gpu --batch 8 \
    --sizes 256 512 1024 --budget-s "$BUDGET" --out "$DEST" >"$DEST/bench.log" 2>&1
BENCH_RC=$?
say "benchmark exit $BENCH_RC"

# -- 3b. semantic extractors: forward at batch 8 x 256, fp32 / bf16, next to the 0.1 CLIP trunk --
say "extractor benchmark (clip_rn50, clip_convnext_base, dinov2_vitb14), budget 100s"
timeout 120 $PY benchmarks/bench_extractors.py --device cuda --batch 8 --size 256 --repeats 5 \
    --extractors clip_rn50 clip_convnext_base dinov2_vitb14 --budget-s 100 --out "$DEST" \
    >"$DEST/bench_extractors.log" 2>&1
say "extractor benchmark exit $?"

# -- 4. one table -----------------------------------------------------------------------------
{
    echo
    echo "=================== sed-discriminator GPU check ==================="
    echo "GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
    echo "torch: $TORCH_VERSION"
    echo "CUDA tests: ${TEST_LINE:-no summary} (exit $TEST_RC)"
    if [ -f "$DEST/results.md" ]; then
        cat "$DEST/results.md"
    else
        echo "benchmark produced no table; last lines of its log:"
        tail -n 20 "$DEST/bench.log"
    fi
    [ -f "$DEST/extractors.md" ] && { echo; cat "$DEST/extractors.md"; }
    echo "total time: $(( $(date +%s) - START )) s"
} | tee "$DEST/gpu_check_summary.md"
[ $TEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ]
