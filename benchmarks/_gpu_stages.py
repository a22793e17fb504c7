"""The measuring stages of ``gpu_check.py``; each runs in its own process and writes ``<stage>.json`` as it goes.

A stage's JSON is rewritten (atomically) after every measurement, so a stage killed by its time limit
keeps what it measured. Every stage has three plans: ``full`` (the figures of issue 18), ``quick``
(the rows the goals need, for a rerun) and ``dry`` (tiny sizes, one repeat: the code paths only,
on the CPU in seconds; never figures).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _official  # noqa: E402

import _harness as H  # noqa: E402

# Nominal (size, batch) of the issue -> what each plan runs. Rows keep the nominal size as ``role``.
ROLES = (512, 256, 1024)  # measured in this order (1024, the slowest, last; its goal rows go first)
SHAPES = {
    "full": {256: (256, 16), 512: (512, 8), 1024: (1024, 8)},
    "quick": {256: (256, 16), 512: (512, 8), 1024: (1024, 8)},
    "dry": {256: (32, 2), 512: (48, 2), 1024: (64, 2)},
}
LAYOUT_NAMES = {"nchw": "NCHW", "cl": "channels_last", "default": "default"}
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Context:
    """What every stage needs: plan, device, output folder and the deadline it must finish by."""

    def __init__(self, out: Path, mode: str, device: str, deadline: float) -> None:
        self.out, self.mode, self.device, self.deadline = out, mode, device, deadline
        # A row is started only with this much time left (a 1024 px fp32 row takes ~10 s on a GPU).
        self.min_row_s = 0.0 if mode == "dry" else 12.0

    @property
    def tiny(self) -> bool:
        return self.mode == "dry"

    def time_left(self) -> float:
        return self.deadline - time.time()

    def shape(self, role: int) -> tuple[int, int]:
        return SHAPES[self.mode][role]

    def reps(self, role: int) -> dict:
        if self.mode == "dry":
            return {"warmup": 0, "repeats": 1}
        reps = {256: {"warmup": 2, "repeats": 5}, 512: {"warmup": 2, "repeats": 4}}
        return reps.get(role, {"warmup": 1, "repeats": 3})


class StageLog:
    """The JSON file of one stage: header, rows, notes; saved after every change."""

    def __init__(self, ctx: Context, stage: str) -> None:
        self.path = ctx.out / f"{stage}.json"
        self.data: dict[str, Any] = {
            "stage": stage,
            "status": "running",
            "mode": ctx.mode,
            "device": ctx.device,
            "started": now_iso(),
            "rows": [],
            "notes": [],
        }
        self.save()

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.data["notes"].append(text)
        self.save()

    def finish(self, status: str = "done", **extra: Any) -> None:
        self.data.update(status=status, finished=now_iso(), **extra)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)  # a kill mid-write leaves the previous complete file


def describe(cfg: dict) -> str:
    """Row label: ``ours pixel 512x8 fused bf16 NCHW``."""
    impl = "authors'" if cfg.get("impl") == "official" else "ours"
    parts = [impl, cfg["variant"], f"{cfg['role']}x{cfg['batch']}"]
    if cfg.get("impl") != "official":
        parts.append(cfg.get("path", "fused"))
    parts += [cfg.get("dtype", "fp32"), LAYOUT_NAMES[cfg.get("layout", "default")]]
    if cfg.get("compile"):
        parts.append(f"compile({cfg.get('compile_backend', 'inductor')})")
    return " ".join(parts)


def _flatten(result: dict) -> dict:
    if "error" in result:
        return {"error": result["error"]}
    return {
        "ms": 1e3 * result["time"],
        "times_ms": [1e3 * t for t in result["times"]],
        "first_s": result.get("first"),
        "peak_gb": result["peak"] / 2**30,
        "peak_abs_gb": result["peak_abs"] / 2**30,
        "peak_method": result["peak_method"],
        "n": len(result["times"]),
    }


def measure_rows(ctx: Context, log: StageLog, cfgs: list[dict]) -> None:
    """Measure each configuration (in this process), one row each; out of time: the rest are skipped."""
    for cfg in cfgs:
        cfg = {"device": ctx.device, "tiny": ctx.tiny, **cfg}
        name = describe(cfg)
        if ctx.time_left() < ctx.min_row_s:
            log.add({"label": name, "cfg": cfg, "error": "skipped (time budget)"})
            print(f"  {name}: skipped (time budget)", flush=True)
            continue
        t0 = time.time()
        row = {"label": name, "cfg": cfg, **_flatten(H.measure_safely(cfg))}
        row["wall_s"] = time.time() - t0
        log.add(row)
        shown = row.get("error") or f"{row['ms']:.1f} ms, peak {row['peak_abs_gb']:.2f} GB"
        print(f"  {name}: {shown} ({row['wall_s']:.0f} s)", flush=True)


# -- env -----------------------------------------------------------------------------------------------


def stage_env(ctx: Context, log: StageLog) -> None:
    import torch

    import sed_discriminator

    info: dict[str, Any] = H.machine_description()
    info.update(
        sed_discriminator=getattr(sed_discriminator, "__version__", "?"),
        sed_discriminator_path=os.path.dirname(sed_discriminator.__file__),
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        pytorch_cuda_alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        python_executable=sys.executable,
        platform=platform.platform(),
    )
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gb=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            gpu_count=torch.cuda.device_count(),
        )
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        info["nvidia_smi"] = f"not available ({type(err).__name__})"
    reason = _official.missing_reason()
    commit = _official.official_dir() / "COMMIT"
    commit_id = commit.read_text().strip() if commit.is_file() else "?"
    info["official_code"] = reason or f"{_official.official_dir()} (commit {commit_id})"
    try:
        versions = {}
        for mod in ("timm", "einops", "safetensors", "numpy", "pytest"):
            versions[mod] = getattr(__import__(mod), "__version__", "?")
        info["versions"] = versions
    except ImportError as err:
        info["versions_error"] = str(err)
    log.data["env"] = info
    log.add({"label": "environment", **{k: info[k] for k in ("torch", "python") if k in info}})
    print(json.dumps(info, default=str), flush=True)


# -- sdpa: which backend runs, and does each agree with the math reference ----------------------------------


def _sdpa_case(ctx: Context, variant: str, level: str):
    """A SeFB level of a real SeD (weights perturbed so attention reaches the output) and its inputs."""
    import torch

    size, _ = ctx.shape(256)
    batch = 2 if ctx.tiny else 4
    cfg = {"variant": variant, "tiny": ctx.tiny, "layout": "nchw", "level": level}
    disc = H._build_disc(cfg, torch.device(ctx.device))
    block = disc.sefb_blocks()[level]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # proj_out starts at zero in the pixel SeD: the attention would not reach the output
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device) * (0.02 if p.ndim > 1 else 0.1))
    side = H._Runner._feature_side(cfg, disc, size)
    feats = torch.randn(batch, block.proj_context.in_channels, side, side, generator=gen).to(ctx.device)
    sem = torch.randn(batch, H._semantic_channels(cfg), size // 16, size // 16, generator=gen).to(ctx.device)
    return block, feats, sem


def _run_block(block, feats, sem, dtype: str, backend: str | None, device: str):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = feats.detach().requires_grad_(True)
    restrict = sdpa_kernel([getattr(SDPBackend, backend)]) if backend else contextlib.nullcontext()
    with restrict, H._autocast({"dtype": dtype}, torch.device(device)):
        out = block(x, sem)
    grad = torch.ones_like(out) / out.numel()
    out.backward(grad)
    return out.detach().float(), x.grad.detach().float()


def _attention_ops(fn, device: str) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        H._sync(__import__("torch").device(device))
    return sorted({e.name for e in prof.events() if "attention" in e.name.lower()})


def backend_names(ops: list[str]) -> list[str]:
    """SDPA backends named by profiler op names (aten ops and kernels)."""
    found = []
    for key, name in (("flash", "flash"), ("efficient", "memory-efficient"), ("cudnn", "cuDNN"), ("math", "math")):
        if any(key in op.lower() for op in ops):
            found.append(name)
    return found


def _rel_err(a, b) -> float:
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def stage_sdpa(ctx: Context, log: StageLog) -> None:
    import torch

    cases = [("pixel", "att1"), ("pixel", "att2"), ("pixel", "att3"), ("patch", "att1")]
    if ctx.mode != "full":
        cases = cases[:1]
    reps = 1 if ctx.tiny else 5
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for variant, level in cases:
        if ctx.time_left() < 5:
            log.note(f"{variant}.{level}: skipped (time budget)")
            continue
        block, feats, sem = _sdpa_case(ctx, variant, level)
        shape = {"features": list(feats.shape), "semantic": list(sem.shape)}
        # The reference: SDPA's math backend in float32 with TF32 off.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            ref_out, ref_grad = _run_block(block, feats, sem, "fp32", "MATH", ctx.device)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for dtype in ("fp32", "bf16"):
            ops = _attention_ops(functools.partial(_run_block, block, feats, sem, dtype, None, ctx.device), ctx.device)
            row: dict[str, Any] = {
                "label": f"{variant}.{level} {dtype}",
                "variant": variant,
                "level": level,
                "dtype": dtype,
                **shape,
                "default_ops": ops,
                "default_backend": backend_names(ops),
                "forced": {},
            }
            for backend in SDPA_BACKENDS:
                try:
                    _run_block(block, feats, sem, dtype, backend, ctx.device)  # warm-up, and does it accept the inputs
                    times = []
                    for _ in range(reps):
                        H._sync(torch.device(ctx.device))
                        t0 = time.perf_counter()
                        out, grad = _run_block(block, feats, sem, dtype, backend, ctx.device)
                        H._sync(torch.device(ctx.device))
                        times.append(time.perf_counter() - t0)
                    row["forced"][backend] = {
                        "ok": True,
                        "ms": 1e3 * statistics.median(times),
                        "rel_err_out": _rel_err(out, ref_out),
                        "rel_err_grad": _rel_err(grad, ref_grad),
                    }
                except RuntimeError as err:
                    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    row["forced"][backend] = {"ok": False, "error": first[:300]}
            log.add(row)
            accepted = [b for b, r in row["forced"].items() if r["ok"]]
            print(
                f"  {row['label']}: default runs {row['default_backend'] or ops}; accepted when forced: {accepted}",
                flush=True,
            )
        if ctx.device == "cuda":
            torch.cuda.empty_cache()


# -- dstep: our D step, the matrix --------------------------------------------------------------------


def _dstep_cfg(ctx: Context, role: int, variant: str, **extra: Any) -> dict:
    size, batch = ctx.shape(role)
    return {"kind": "dstep", "variant": variant, "role": role, "size": size, "batch": batch, **ctx.reps(role), **extra}


def dstep_plan(ctx: Context) -> list[dict]:
    if ctx.mode == "dry":  # one row per code path the full plan takes, and the rows each goal reads
        return [
            _dstep_cfg(ctx, 256, "pixel", path="fused", dtype="bf16", layout="nchw"),
            _dstep_cfg(ctx, 256, "pixel", path="fused", dtype="bf16", layout="cl"),
            _dstep_cfg(ctx, 256, "pixel", path="math", dtype="bf16", layout="nchw"),
            _dstep_cfg(ctx, 512, "patch", path="fused", dtype="fp32", layout="nchw"),
            _dstep_cfg(ctx, 512, "patch", path="math", dtype="fp32", layout="nchw"),
            _dstep_cfg(ctx, 1024, "pixel", path="fused", dtype="bf16", layout="cl"),
        ]
    if ctx.mode == "quick":
        return [
            _dstep_cfg(ctx, 512, "pixel", path="fused", dtype="bf16", layout="nchw"),
            _dstep_cfg(ctx, 512, "pixel", path="fused", dtype="bf16", layout="cl"),
            _dstep_cfg(ctx, 512, "pixel", path="math", dtype="bf16", layout="nchw"),
            _dstep_cfg(ctx, 1024, "pixel", path="fused", dtype="bf16", layout="nchw"),
            _dstep_cfg(ctx, 1024, "pixel", path="fused", dtype="bf16", layout="cl"),
        ]
    # The rows goals G1 and G2 read come first, so that a stage cut short by its time limit still has them.
    rows = [
        _dstep_cfg(ctx, role, "pixel", path="fused", dtype="bf16", layout=layout)
        for role in (512, 1024)
        for layout in ("nchw", "cl")
    ]
    for role in ROLES:
        for variant in ("pixel", "patch"):
            for path, dtype, layout in (
                ("fused", "bf16", "nchw"), ("fused", "bf16", "cl"), ("fused", "fp32", "nchw"), ("fused", "fp32", "cl"),
                ("math", "bf16", "nchw"), ("math", "fp32", "nchw"),
            ):  # fmt: skip
                cfg = _dstep_cfg(ctx, role, variant, path=path, dtype=dtype, layout=layout)
                if cfg not in rows:
                    rows.append(cfg)
    return rows


def stage_dstep(ctx: Context, log: StageLog) -> None:
    log.data["definition"] = (
        "one discriminator step with the semantics given: real and fake calls on a batch each, "
        "BCE loss, backward, Adam step; peak = torch.cuda.max_memory_allocated (reset per row), "
        "peak_abs includes weights, gradients and Adam state"
    )
    measure_rows(ctx, log, dstep_plan(ctx))


# -- official: the authors' discriminators beside ours -------------------------------------------------------


def official_plan(ctx: Context) -> list[dict]:
    ours = {"impl": "ours", "path": "fused"}
    if ctx.mode == "quick":
        return [
            _dstep_cfg(ctx, 512, "pixel", impl="official", dtype="fp32", layout="nchw"),
            _dstep_cfg(ctx, 512, "pixel", **ours, dtype="bf16", layout="nchw"),
            _dstep_cfg(ctx, 512, "pixel", **ours, dtype="bf16", layout="cl"),
        ]
    if ctx.mode == "dry":
        return [
            _dstep_cfg(ctx, 512, "pixel", impl="official", dtype="fp32", layout="nchw"),
            _dstep_cfg(ctx, 512, "pixel", **ours, dtype="bf16", layout="nchw"),
            _dstep_cfg(ctx, 256, "patch", impl="official", dtype="fp32", layout="nchw"),
        ]
    roles = (512, 256, 1024)
    rows = []
    for role in roles:
        for variant in ("pixel", "patch"):
            rows.append(_dstep_cfg(ctx, role, variant, impl="official", dtype="fp32", layout="nchw"))
            rows.append(_dstep_cfg(ctx, role, variant, **ours, dtype="fp32", layout="nchw"))
            rows.append(_dstep_cfg(ctx, role, variant, **ours, dtype="bf16", layout="nchw"))
            if role == 512 and variant == "pixel":
                rows.append(_dstep_cfg(ctx, role, variant, **ours, dtype="bf16", layout="cl"))
    return rows


def stage_official(ctx: Context, log: StageLog) -> None:
    reason = _official.missing_reason()
    if reason:
        log.note("skipped: " + reason)
        log.finish("skipped")
        return
    try:
        _official.load_official()
    except Exception as err:  # noqa: BLE001  (their code: whatever stops its import is recorded, not raised)
        log.note(f"skipped: the authors' code does not import: {type(err).__name__}: {err}")
        log.finish("skipped")
        return
    commit = _official.official_dir() / "COMMIT"
    log.data["official_commit"] = commit.read_text().strip() if commit.is_file() else None
    if ctx.tiny:
        log.note("dry run: the authors' widths are fixed, so their rows are full width at tiny sizes, ours tiny")
    log.data["definition"] = "as the dstep stage; the authors' SeD_P / SeD_U in fp32 (their code), ours next to them"
    measure_rows(ctx, log, official_plan(ctx))


# -- extractors -----------------------------------------------------------------------------------------


def stage_extractors(ctx: Context, log: StageLog) -> None:
    import torch

    import sed_discriminator as sd

    size, batch = ctx.shape(256)
    names = list(sd.list_extractors())
    log.data["definition"] = (
        f"forward of each preset at {batch} x {size} px, random weights (pretrained=None), "
        "weights and input cast to bfloat16, inference mode; peak above the built model"
    )
    if ctx.tiny:
        log.note("dry run: timm's tiny test ViT stands in for the presets: " + ", ".join(names))
        from sed_discriminator.extractor import ExtractorPreset, register_extractor

        tiny = ExtractorPreset(name="_gpu_check_tiny", model="test_vit", layer=5, channels=64, stride=16)
        register_extractor(tiny, overwrite=True)
        names = [tiny.name]
    device = torch.device(ctx.device)
    repeats = 1 if ctx.tiny else 5
    for name in names:
        if ctx.time_left() < ctx.min_row_s:
            log.add({"label": name, "error": "skipped (time budget)"})
            continue
        row: dict[str, Any] = {"label": name, "batch": batch, "size": size, "dtype": "bf16"}
        try:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random weights are what is meant here
                model = sd.SemanticExtractor(name, pretrained=None).to(device, dtype=torch.bfloat16).eval()
            row["build_s"] = time.perf_counter() - t0
            row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
            x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
            H._sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            with torch.inference_mode():
                out = model(x)
                H._sync(device)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    model(x)
                    H._sync(device)
                    times.append(time.perf_counter() - t0)
            row.update(
                ms=1e3 * statistics.median(times), n=len(times), channels=out.shape[1], grid=list(out.shape[-2:])
            )
            if device.type == "cuda":
                row["peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            del model, x, out
        except Exception as err:  # noqa: BLE001  (one preset failing must not hide the others)
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        log.add(row)
        print(f"  {name}: {row['error'] if 'error' in row else format(row['ms'], '.1f') + ' ms'}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


# -- compile: eager against torch.compile, paired ----------------------------------------------------------


def _faster_layout(ctx: Context, variant: str) -> str:
    """The layout the dstep stage measured faster for fused bf16 at 256 (NCHW when unknown)."""
    try:
        rows = json.loads((ctx.out / "dstep.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return "nchw"
    times = {}
    for r in rows:
        c = r.get("cfg", {})
        key = (c.get("variant"), c.get("role"), c.get("path"), c.get("dtype"))
        if key == (variant, 256, "fused", "bf16") and "ms" in r:
            times[c.get("layout")] = r["ms"]
    return min(times, key=times.get) if {"nchw", "cl"} <= set(times) else "nchw"


def stage_compile(ctx: Context, log: StageLog) -> None:
    backend = "eager" if ctx.tiny else "inductor"
    if ctx.tiny:
        log.note("dry run: torch.compile with backend='eager' (Dynamo only, no Inductor code generation)")
    variants = ("pixel", "patch") if ctx.mode == "full" else ("pixel",)
    cfgs = []
    for variant in variants:
        layout = _faster_layout(ctx, variant)
        base = _dstep_cfg(ctx, 256, variant, path="fused", dtype="bf16", layout=layout)
        # At least one warm-up for the compiled row: its first call compiles (reported as first_s).
        cfgs += [base, {**base, "compile": True, "compile_backend": backend, "warmup": max(1, base["warmup"])}]
    log.data["definition"] = "as the dstep stage; first_s of a compiled row includes compilation"
    measure_rows(ctx, log, cfgs)


STAGES = {
    "env": stage_env,
    "sdpa": stage_sdpa,
    "dstep": stage_dstep,
    "official": stage_official,
    "extractors": stage_extractors,
    "compile": stage_compile,
}


def run_stage(name: str, ctx: Context) -> int:
    """Run one stage in this process; its JSON says ``done``, ``skipped`` or ``error``."""
    log = StageLog(ctx, name)
    if ctx.tiny and ctx.device == "cpu":
        import torch

        torch.set_num_threads(1)  # a smoke run on a shared CPU: no threads spinning at barriers
    try:
        STAGES[name](ctx, log)
    except Exception as err:  # noqa: BLE001  (recorded in the stage JSON, exit code 1)
        import traceback

        traceback.print_exc()
        log.note(f"stage failed: {type(err).__name__}: {err}")
        log.finish("error")
        return 1
    if log.data["status"] == "running":
        log.finish("done")
    return 0
