"""Forward cost of every semantic extractor preset, next to the hand-written CLIP RN50 trunk of 0.1.

Each (extractor, dtype) runs in a fresh child process, so peak memory is that configuration's
own: on the CPU the peak resident set size above the process's size after its imports (the
weights plus the largest activations), on CUDA ``torch.cuda.max_memory_allocated``. Time is
the median over ``--repeats`` forwards after one warm-up. ``bf16`` casts the (frozen)
extractor and its input to bfloat16. Weights are random: the cost does not depend on them.

Usage:
    python benchmarks/bench_extractors.py                      # all presets, 256 px, batch 8, fp32 + bf16
    python benchmarks/bench_extractors.py --quick              # batch 2, 128 px, one repeat
    python benchmarks/bench_extractors.py --device cuda --out benchmarks/results/cuda

The table is printed and, with ``--out``, written to ``extractors.md`` / ``extractors.json`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

LEGACY = "legacy_clip_rn50"
DTYPES = ("fp32", "bf16")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _legacy_trunk():
    """The 0.1 release's hand-written CLIP RN50 trunk (stem + layer1..3, open_clip's Bottleneck) and normalisation."""
    import torch
    from open_clip.modified_resnet import Bottleneck
    from torch import nn

    class LegacyCLIPTrunk(nn.Module):
        def __init__(self, layers=(3, 4, 6), width=64) -> None:
            super().__init__()
            half = width // 2
            self.conv1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(half)
            self.act1 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(half, half, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(half)
            self.act2 = nn.ReLU(inplace=True)
            self.conv3 = nn.Conv2d(half, width, 3, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(width)
            self.act3 = nn.ReLU(inplace=True)
            self.avgpool = nn.AvgPool2d(2)
            inplanes, stages = width, []
            for i, blocks in enumerate(layers):
                planes = width * 2**i
                stage = [Bottleneck(inplanes, planes, 1 if i == 0 else 2)]
                inplanes = planes * Bottleneck.expansion
                stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
                stages.append(nn.Sequential(*stage))
            self.layer1, self.layer2, self.layer3 = stages
            self.register_buffer("mean", torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1))
            self.eval().requires_grad_(False)

        @torch.no_grad()
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (x - self.mean) / self.std
            x = self.act1(self.bn1(self.conv1(x)))
            x = self.act2(self.bn2(self.conv2(x)))
            x = self.avgpool(self.act3(self.bn3(self.conv3(x))))
            return self.layer3(self.layer2(self.layer1(x)))

    return LegacyCLIPTrunk()


def _build(name: str, weights: str | None, device, dtype):
    import sed_discriminator as sd

    # Extractors load the random weights the parent saved, as pretrained weights load: no full
    # model is ever built, so the memory peak is the trunk's weights plus the forward's own.
    model = _legacy_trunk() if name == LEGACY else sd.SemanticExtractor(name, pretrained=weights)
    return model.to(device=device, dtype=dtype)


def child(args: argparse.Namespace) -> None:
    """Measure one (extractor, dtype) and print one JSON line.

    ``--mode memory``: one forward of the extractor alone, its peak memory. ``--mode time``: the
    extractor and the 0.1 trunk in one process, forwards alternating (so that load from other
    processes hits both alike), median times and their ratio.
    """
    import timm  # noqa: F401  (imported before the baseline, as every configuration needs it)
    import torch

    import sed_discriminator  # noqa: F401

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    baseline = _rss_mb()
    torch.manual_seed(0)
    model = _build(args.name, args.weights, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    x = torch.rand(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    row = dict(name=args.name, dtype=args.dtype, params_m=params / 1e6, threads=torch.get_num_threads())
    with torch.inference_mode():
        if args.mode == "memory":
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base_alloc = torch.cuda.memory_allocated()
            out = model(x)
            sync()
            if device.type == "cuda":
                row["peak_mb"] = (torch.cuda.max_memory_allocated() - base_alloc + params * x.element_size()) / 2**20
            else:
                row["peak_mb"] = _peak_rss_mb() - baseline
            row.update(channels=out.shape[1], grid=list(out.shape[-2:]))
        else:
            models = (
                {"self": model}
                if args.name == LEGACY
                else {"self": model, "legacy": _build(LEGACY, None, device, dtype)}
            )
            times: dict[str, list[float]] = {k: [] for k in models}
            for m in models.values():
                m(x)  # warm-up
            sync()
            for r in range(args.repeats):
                for key in list(models) if r % 2 == 0 else list(models)[::-1]:
                    start = time.perf_counter()
                    models[key](x)
                    sync()
                    times[key].append(time.perf_counter() - start)
            row["ms"] = 1000 * statistics.median(times["self"])
            row["legacy_ms"] = 1000 * statistics.median(times.get("legacy", times["self"]))
    print(json.dumps(row), flush=True)


def save_random_weights(name: str, path: Path) -> None:
    """Write a random-weight trunk of ``name`` to ``path`` (run in its own process)."""
    from safetensors.torch import save_file

    import sed_discriminator as sd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trunk = sd.SemanticExtractor(name, pretrained=None).trunk
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(path))


def run_one(name: str, dtype: str, args: argparse.Namespace, timeout: float, weights: Path | None) -> dict:
    """Memory child, then time child, of one (extractor, dtype): one merged row."""
    row: dict = dict(name=name, dtype=dtype)
    deadline = time.perf_counter() + timeout
    for mode in ("memory", "time"):
        cmd = [sys.executable, __file__, "--child", name, "--child-dtype", dtype, "--mode", mode,
               "--device", args.device, "--batch", str(args.batch), "--size", str(args.size),
               "--repeats", str(args.repeats)]  # fmt: skip
        if weights is not None:
            cmd += ["--weights", str(weights)]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=max(deadline - time.perf_counter(), 1))
        except subprocess.TimeoutExpired:
            return row | dict(error=f"{mode}: timed out")
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode or not lines:
            return row | dict(error=f"{mode}: " + (result.stderr.strip().splitlines() or ["no output"])[-1][:120])
        row.update(json.loads(lines[-1]))
    return row


def table(rows: list[dict], args: argparse.Namespace, dtypes: list[str]) -> str:
    by = {(r["name"], r["dtype"]): r for r in rows}
    names = list(dict.fromkeys(r["name"] for r in rows))
    header = ["extractor", "channels", "grid", "params (M)"]
    for dtype in dtypes:
        header += [f"{dtype} ms", f"{dtype} peak MB", f"{dtype} time / 0.1", f"{dtype} memory / 0.1"]
    lines = [
        f"Forward of each extractor, batch {args.batch} x {args.size}x{args.size}, device {args.device}, "
        f"median of {args.repeats} after a warm-up. `time / 0.1`: ratio to the 0.1 hand-written CLIP RN50 "
        "trunk timed in the same process, forwards alternating; `memory / 0.1`: ratio of peak memory (weights "
        "+ forward, each measured alone in a fresh process) to the 0.1 trunk's.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name in names:
        first = next((by[(name, d)] for d in dtypes if (name, d) in by and "error" not in by[(name, d)]), None)
        cells = [f"`{name}`" + (" (0.1)" if name == LEGACY else "")]
        cells += (
            [str(first["channels"]), "x".join(map(str, first["grid"])), f"{first['params_m']:.1f}"]
            if first
            else ["-"] * 3
        )
        for dtype in dtypes:
            row, ref = by.get((name, dtype), {}), by.get((LEGACY, dtype), {})
            if "ms" not in row:
                cells += [row.get("error", "not run"), "", "", ""]
                continue
            cells += [f"{row['ms']:.0f}", f"{row['peak_mb']:.0f}", f"{row['ms'] / row['legacy_ms']:.2f}"]
            cells += [f"{row['peak_mb'] / ref['peak_mb']:.2f}" if "peak_mb" in ref else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--extractors", nargs="+", default=None, help="presets (default: all) or timm:NAME")
    parser.add_argument("--quick", action="store_true", help="batch 2, 128 px, one repeat")
    parser.add_argument("--budget-s", type=float, default=3000, help="skip what is left after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="folder for extractors.md and extractors.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="time", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--save-weights", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.size, args.repeats = 2, 128, 1
    if args.child and args.save_weights:
        save_random_weights(args.child, Path(args.save_weights))
        return
    if args.child:
        args.name, args.dtype = args.child, args.child_dtype
        child(args)
        return
    import sed_discriminator as sd

    names = [LEGACY, *(args.extractors or sd.list_extractors())]
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="bench_extractors_") as tmp:
        for name in names:
            weights = None
            if name != LEGACY:
                weights = Path(tmp) / f"{name.replace(':', '_')}.safetensors"
                subprocess.run([sys.executable, __file__, "--child", name, "--save-weights", str(weights)], check=True)
            for dtype in args.dtypes:
                left = args.budget_s - (time.perf_counter() - start)
                row = (
                    run_one(name, dtype, args, max(left, 1), weights)
                    if left > 0
                    else dict(name=name, dtype=dtype, error="budget")
                )
                rows.append(row)
                shown = f"{row['ms']:.0f} ms, peak {row['peak_mb']:.0f} MB" if "ms" in row else row["error"]
                print(f"[{time.perf_counter() - start:6.0f}s] {name} {dtype}: {shown}", flush=True)
            if weights is not None:
                weights.unlink(missing_ok=True)
    text = table(rows, args, args.dtypes)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "extractors.md").write_text(text + "\n")
        (args.out / "extractors.json").write_text(
            json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows), indent=1)
        )


if __name__ == "__main__":
    main()
