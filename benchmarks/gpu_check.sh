#!/usr/bin/env bash
# GPU check of sed-discriminator (issue 18): CUDA tests, SDPA backends, D-step time and peak memory
# (patch and pixel, 256x16 / 512x8 / 1024x8, fp32 / bf16, NCHW / channels_last, fused / math, eager /
# compile), the authors' discriminators side by side, every extractor preset in bf16; verdicts on
# the goals in summary.txt / summary.json.
#
# Runs on the machine's image as it is: no install step, no network; this checkout is put on
# PYTHONPATH. Results go to $OUT (else runs/gpu_check). Arguments go to benchmarks/gpu_check.py:
#   bash benchmarks/gpu_check.sh              # everything, ends within ~7.5 minutes
#   bash benchmarks/gpu_check.sh --quick      # the goal rows only, ~3 minutes (a rerun)
#   bash benchmarks/gpu_check.sh --stages compile extractors
#   bash benchmarks/gpu_check.sh --dry-run    # tiny sizes on the CPU: the code paths, no figures
# The authors' code is used when third_party/sed_official/ holds their models/sed.py and
# models/module_attention.py (see benchmarks/_official.py); otherwise that stage is skipped.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
