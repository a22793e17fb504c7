"""Cost of semantic_diagnostics as a fraction of a discriminator training step (same run, same batch).

Usage: python benchmarks/bench_diagnostics.py [--variant pixel] [--size 128] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from sed_discriminator import SeD, discriminator_loss
from sed_discriminator.diagnostics import semantic_diagnostics


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="pixel", choices=("pixel", "patch"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    d = SeD(args.variant)
    opt = torch.optim.Adam(d.parameters(), 1e-4)
    hr, sr = torch.rand(2, args.batch, 3, args.size, args.size)
    s = torch.randn(args.batch, 1024, args.size // 16, args.size // 16)

    def d_step() -> None:
        opt.zero_grad()
        discriminator_loss(d(sr, s), real_logits=d(hr, s)).backward()
        opt.step()

    step = median_seconds(d_step, args.repeats)
    diag = median_seconds(lambda: semantic_diagnostics(d, sr, s), args.repeats)
    print(f"{args.variant} {args.size}px batch {args.batch}: diagnostics / D step = {diag / step:.2f}")


if __name__ == "__main__":
    main()
