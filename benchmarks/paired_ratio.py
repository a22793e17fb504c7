#!/usr/bin/env python
"""Fused-versus-math time ratio of a whole SeD, measured in pairs so that machine drift cancels.

``bench_sed.py`` runs every configuration in its own process, one after the other: the right
way to measure peak memory, but on a shared or throttled machine the speed of the machine can
drift between two configurations by more than the difference being measured. This script
builds the fused model and its math-path twin (same weights) in one process and times them
alternately (A B, B A, A B, ...), so that both see the same conditions; it prints the median of
the per-pair ratios and the medians of each side. Peak memory is not measured here.

Examples::

    python benchmarks/paired_ratio.py --variant pixel --size 512 --pairs 6
    python benchmarks/paired_ratio.py --variant patch --size 256 --pairs 12
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _harness as H  # noqa: E402  (benchmarks/, next to this script)
from sed_discriminator import SeD  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=("patch", "pixel"), default="pixel")
    p.add_argument("--size", type=int, default=512, help="square patch side")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pairs", type=int, default=6, help="timed (fused, math) pairs after one warm-up each")
    p.add_argument("--layout", choices=("default", "nchw", "cl"), default="default")
    p.add_argument("--tiny", action="store_true", help="tiny widths (smoke runs, not figures)")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[SeD, SeD, torch.Tensor, torch.Tensor]:
    cfg = {"variant": args.variant, "tiny": args.tiny, "layout": args.layout, "path": "fused"}
    fused = H._build_disc(cfg, torch.device("cpu"))
    math = copy.deepcopy(fused).set_fused_attn(False)
    side = max(1, args.size // 16)
    x = torch.rand(args.batch, 3, args.size, args.size)
    semantic = torch.randn(args.batch, H._semantic_channels(cfg), side, side)
    return fused, math, x, semantic


def timed_step(model: SeD, x: torch.Tensor, semantic: torch.Tensor) -> float:
    start = time.perf_counter()
    out = model(x, semantic)
    F.binary_cross_entropy_with_logits(out, torch.ones_like(out)).backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fused, math, x, semantic = build(args)
    timed_step(fused, x, semantic)
    timed_step(math, x, semantic)
    t_fused, t_math = [], []
    for i in range(args.pairs):
        order = ((fused, t_fused), (math, t_math)) if i % 2 == 0 else ((math, t_math), (fused, t_fused))
        for model, times in order:
            times.append(timed_step(model, x, semantic))
    ratios = [f / m for f, m in zip(t_fused, t_math)]
    print(
        f"{args.variant} SeD {args.size}px batch {args.batch} ({args.layout} layout), {args.pairs} pairs: "
        f"fused {statistics.median(t_fused):.3f} s, math {statistics.median(t_math):.3f} s, "
        f"fused/math median of pair ratios {statistics.median(ratios):.3f} "
        f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
