"""Measurement machinery shared by the benchmark scripts (not a test module).

A *configuration* is a plain dict (JSON-serialisable) that says what to build and run:

- ``kind``: ``"disc"`` (a whole SeD, forward + backward), ``"sefb"`` (one SeFB level, forward +
  backward), ``"step"`` (a full discriminator step through :class:`SeDAdversary`: semantics,
  real and fake calls, backward, Adam step), ``"dstep"`` (the discriminator's share of that step
  with the semantics given: real and fake calls, BCE loss, backward, Adam step; ``impl``
  ``"ours"`` or ``"official"``, the authors' code from ``benchmarks/_official.py``) or
  ``"extractor"`` (the frozen extractor's forward).
- ``variant``, ``size`` (square patch side), ``batch``, ``level`` (SeFB name), ``path``
  (``"fused"``/``"math"``), ``dtype`` (``"fp32"``/``"bf16"``/``"fp16"``: autocast), ``layout``
  (``"default"``: the model's own choice, channels_last for the pixel SeD; ``"nchw"``/``"cl"``:
  ``SeD(channels_last=False/True)``, and for the extractor ``.to(memory_format=...)``),
  ``compile`` (``torch.compile`` or eager; ``compile_backend`` picks its backend, default inductor),
  ``device``, ``warmup``, ``repeats``, ``tiny`` (small widths for smoke runs) and per-kind
  options (``semantics``, ``extractor_mode``, ``batched`` for ``"step"``).

:func:`measure` runs one configuration in the current process and returns its timings and
peak memory. :func:`run_isolated` runs it in a fresh interpreter, which is how CPU peak memory
is measured: the high-water mark of the resident set (``ru_maxrss``) of a process that ran
only this configuration, minus its resident set once the model and inputs were built.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

WORKER_FLAG = "--worker"
RESULT_PREFIX = "BENCH_RESULT "

# The SeFB levels of each variant (the blocks are taken from a real SeD, init included).
SEFB_LEVELS = {"patch": ("att1", "att2", "att3"), "pixel": ("att1", "att2", "att3")}


# -- process-level measurements ------------------------------------------------------------------


def current_rss_bytes() -> int | None:
    """Resident set size of this process now (Linux ``/proc``), or ``None`` where unavailable."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def max_rss_bytes() -> int:
    """High-water mark of the resident set of this process (``ru_maxrss``), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_seconds() -> float:
    """User + system CPU time consumed by this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_description() -> dict[str, Any]:
    """CPU model, core count, memory and library versions, for the report header."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            kb = int(fh.readline().split()[1])
            info["memory_gb"] = round(kb / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


# -- building what a configuration asks for ------------------------------------------------------


def _model_kwargs(cfg: dict) -> dict:
    if cfg.get("tiny"):
        return dict(width=8, semantic_channels=64, head_dim=8)
    return {}


def _semantic_channels(cfg: dict) -> int:
    if cfg.get("impl") == "official":
        return 1024  # the authors' widths are fixed: no tiny version
    return 64 if cfg.get("tiny") else 1024


def _autocast(cfg: dict, device: Any) -> contextlib.AbstractContextManager:
    import torch

    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.get("dtype", "fp32")]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _layout(cfg: dict) -> Any:
    import torch

    return torch.channels_last if cfg.get("layout", "default") == "cl" else torch.contiguous_format


def _build_disc(cfg: dict, device: Any):
    import torch

    from sed_discriminator import SeD

    torch.manual_seed(0)
    layout = cfg.get("layout", "default")
    kwargs = _model_kwargs(cfg)
    if layout != "default":
        kwargs["channels_last"] = layout == "cl"
    try:
        model = SeD(cfg["variant"], **kwargs)
    except TypeError:  # a library from before the channels_last argument (--library runs)
        kwargs.pop("channels_last", None)
        model = SeD(cfg["variant"], **kwargs).to(memory_format=_layout(cfg))
    model.to(device).train().set_fused_attn(cfg.get("path", "fused") == "fused")
    return model


def _build_official(cfg: dict, device: Any):
    import torch
    from _official import build_official

    torch.manual_seed(0)
    model = build_official(cfg["variant"]).to(device).train()
    if cfg.get("layout") == "cl":
        model = model.to(memory_format=torch.channels_last)
    return model


def _runs_channels_last(model: Any) -> bool:
    return bool(getattr(model, "channels_last", False))


def _build_extractor(cfg: dict, device: Any):
    from sed_discriminator import SemanticExtractor
    from sed_discriminator.extractor import ExtractorPreset, register_extractor

    name = "clip_rn50"
    if cfg.get("tiny"):
        # timm's tiny test ViT (64 channels at stride 16), so smoke runs do not build a ResNet-50.
        name = "_bench_tiny"
        register_extractor(
            ExtractorPreset(name=name, model="test_vit", layer=5, channels=64, stride=16),
            overwrite=True,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the numbers are what is measured, not the semantics
        return SemanticExtractor(name, pretrained=None).to(device, memory_format=_layout(cfg))


# -- one configuration -------------------------------------------------------------------------


class _Runner:
    """Holds the objects of one configuration and runs one timed iteration with ``step()``."""

    def __init__(self, cfg: dict, device: Any) -> None:
        import torch

        self.cfg = cfg
        self.device = device
        kind = cfg["kind"]
        batch, size = cfg.get("batch", 1), cfg.get("size", 256)
        gen = torch.Generator().manual_seed(1)
        mf = _layout(cfg)

        def image(n: int = batch) -> torch.Tensor:  # the discriminators convert the layout themselves
            return torch.rand(n, 3, size, size, generator=gen).to(device).contiguous(memory_format=mf)

        sem_side = max(1, size // 16)
        semantic = torch.randn(batch, _semantic_channels(cfg), sem_side, sem_side, generator=gen).to(device)
        if kind == "disc":
            self.model = _build_disc(cfg, device)
            self.x, self.semantic = image(), semantic
            self.fn = self._disc
            self.params = list(self.model.parameters())
        elif kind == "sefb":
            disc = _build_disc(cfg, device)
            block = disc.sefb_blocks()[cfg["level"]]
            side = self._feature_side(cfg, disc, size)
            channels = block.proj_context.in_channels
            self.model = block
            # A SeFB sees the features in the layout its discriminator runs in.
            mf = torch.channels_last if _runs_channels_last(disc) else mf
            self.features = (
                torch.randn(batch, channels, side, side, generator=gen).to(device).contiguous(memory_format=mf)
            )
            self.semantic = semantic
            self.grad = None
            self.fn = self._sefb
            self.params = list(block.parameters())
            del disc
        elif kind == "step":
            from sed_discriminator import SeDAdversary

            disc = _build_disc(cfg, device)
            ext = _build_extractor(cfg, device)
            self.adv = SeDAdversary(disc, extractor=ext, batch_real_fake=bool(cfg.get("batched", False)))
            self.model = disc
            self.hr, self.sr = image(), image()
            self.opt = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.9, 0.99))
            self.fn = self._step
            self.params = []
            if cfg.get("extractor_mode") == "inference":
                self._wrap_inference(ext)
        elif kind == "dstep":
            official = cfg.get("impl", "ours") == "official"
            self.model = _build_official(cfg, device) if official else _build_disc(cfg, device)
            self.real, self.fake, self.semantic = image(), image(), semantic
            self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4, betas=(0.9, 0.99))
            self.fn = self._dstep
            self.params = []
        elif kind == "extractor":
            self.model = _build_extractor(cfg, device)
            self.x = image()
            self.fn = self._extract
            self.params = []
            if cfg.get("extractor_mode") == "inference":
                self._wrap_inference(self.model)
        else:
            raise ValueError(f"unknown benchmark kind {kind!r}")
        self.compiled = None
        if cfg.get("compile"):
            target = self.adv.discriminator if kind == "step" else self.model
            compiled = torch.compile(target, backend=cfg.get("compile_backend", "inductor"))
            if kind == "step":
                self.adv.discriminator = compiled
            else:
                self.compiled = compiled

    @staticmethod
    def _feature_side(cfg: dict, disc: Any, size: int) -> int:
        level = cfg["level"]
        if cfg["variant"] == "pixel":
            return {"att3": size // 8, "att2": size // 4, "att1": size // 2}[level]
        return {"att1": size // 4, "att2": size // 8, "att3": size // 8 - 1}[level]

    @staticmethod
    def _wrap_inference(extractor: Any) -> None:
        import torch

        plain = extractor.forward

        def forward(x):  # inference tensors cannot be saved for backward: hand back a normal copy
            with torch.inference_mode():
                out = plain(x)
            return out.clone()

        extractor.forward = forward

    def _call(self, *args):
        return (self.model if self.compiled is None else self.compiled)(*args)

    def _disc(self) -> None:
        import torch
        import torch.nn.functional as F

        for p in self.params:
            p.grad = None
        with _autocast(self.cfg, self.device):
            out = self._call(self.x, self.semantic)
            loss = F.binary_cross_entropy_with_logits(out.float(), torch.ones_like(out, dtype=torch.float32))
        loss.backward()

    def _sefb(self) -> None:
        import torch

        for p in self.params:
            p.grad = None
        features = self.features.detach().requires_grad_(True)
        with _autocast(self.cfg, self.device):
            out = self._call(features, self.semantic)
        if self.grad is None or self.grad.shape != out.shape or self.grad.dtype != out.dtype:
            self.grad = torch.randn_like(out)
        out.backward(self.grad)

    def _dstep(self) -> None:
        import torch
        import torch.nn.functional as F

        self.opt.zero_grad(set_to_none=True)
        with _autocast(self.cfg, self.device):
            real = self._call(self.real, self.semantic).float()
            fake = self._call(self.fake, self.semantic).float()
            loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            loss = loss + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        loss.backward()
        self.opt.step()

    def _step(self) -> None:
        from sed_discriminator import discriminator_loss

        adv, cfg = self.adv, self.cfg
        hr = self.hr.clone()  # a new HR batch every step: the semantics are computed afresh
        self.opt.zero_grad(set_to_none=True)
        with _autocast(cfg, self.device):
            if cfg.get("semantics", "once") == "per_call":
                # What a loop without the helper's cache does: the extractor once per D call.
                real = adv.discriminator(hr, adv.extractor(hr))
                fake = adv.discriminator(self.sr.detach(), adv.extractor(hr))
                loss = discriminator_loss(fake.float(), real_logits=real.float(), kind=adv.loss)
            else:
                loss = adv.discriminator_loss(self.sr, hr).float()
        loss.backward()
        self.opt.step()

    def _extract(self) -> None:
        with _autocast(self.cfg, self.device):
            self._call(self.x)

    def step(self) -> None:
        self.fn()


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: dict) -> dict:
    """Run one configuration in this process; return timings (s) and peak memory (bytes).

    Returns a dict with ``times`` and ``cpu_times`` (one per timed repeat), ``time`` (median of
    ``times``), ``first`` (the first, untimed warm-up iteration, compile included), ``peak``
    (peak memory above the state after building, bytes) and ``peak_method``.
    """
    import torch

    if cfg.get("library"):
        sys.path.insert(0, cfg["library"])
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = torch.device(cfg.get("device", "cpu"))
    runner = _Runner(cfg, device)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = current_rss_bytes()
        if base is None:
            base = max_rss_bytes()
    first = None
    for i in range(int(cfg.get("warmup", 1))):
        t0 = time.perf_counter()
        runner.step()
        _sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    times, cpu_times = [], []
    for _ in range(int(cfg.get("repeats", 3))):
        c0, t0 = cpu_seconds(), time.perf_counter()
        runner.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(cpu_seconds() - c0)
    if device.type == "cuda":
        peak_abs = torch.cuda.max_memory_allocated(device)
        peak = peak_abs - base
        method = "torch.cuda.max_memory_allocated"
    else:
        peak_abs = max_rss_bytes()
        peak = peak_abs - base
        method = "ru_maxrss - rss after build"
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    return {
        "load": load,
        "times": times,
        "cpu_times": cpu_times,
        "time": statistics.median(times) if times else math.nan,
        "cpu_time": statistics.median(cpu_times) if cpu_times else math.nan,
        "first": first,
        "peak": peak,
        "peak_abs": peak_abs,
        "peak_method": method,
    }


def measure_safely(cfg: dict) -> dict:
    """:func:`measure`, turning an out-of-memory error into ``{"error": "OOM"}``."""
    import torch

    try:
        return measure(cfg)
    except torch.OutOfMemoryError:
        return {"error": "OOM"}
    except RuntimeError as err:  # compile failures and the like: record, do not abort the suite
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    finally:
        import gc

        gc.collect()  # drop what a failed configuration left behind before the next one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_isolated(cfg: dict, script: str, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run one configuration in a fresh Python process (``script --worker <json>``).

    ``env`` adds environment variables for that process (e.g. ``OMP_WAIT_POLICY``).
    """
    cmd = [sys.executable, script, WORKER_FLAG, json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    if proc.returncode in (-9, 137):
        return {"error": "killed (out of memory?)"}
    return {"error": f"exit {proc.returncode}: {' | '.join(tail)[:300]}"}


def worker_main(payload: str) -> None:
    """Entry point of the fresh process: measure, print one result line."""
    cfg = json.loads(payload)
    result = measure_safely(cfg)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
