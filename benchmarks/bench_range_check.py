"""Cost of the default input-range check (one fused min/max and a synchronisation) against the forwards it guards.

The check runs on the first calls of each SeD and SemanticExtractor (see ``RANGE_CHECK_CALLS``
in ``sed_discriminator/_checks.py``). Timed alternately in one process, so machine drift
cancels out of the ratios; prints the median time per call and check / forward.

    python benchmarks/bench_range_check.py                 # paper sizes: 256 px, batch 4, CPU
    python benchmarks/bench_range_check.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import sed_discriminator as sd
from sed_discriminator._checks import check_input_range


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = sd.SemanticExtractor("clip_rn50", pretrained=None).to(device)
    sed = sd.SeD("patch").to(device).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    semantic = extractor(x)

    class Probe:  # a fresh holder per call: the check always runs
        pass

    cases = {
        "range check": lambda: check_input_range(Probe(), x, owner="bench", value_range=(0.0, 1.0)),
        "SeD patch forward (no grad)": lambda: sed._run(x, semantic, None),
        "SeD patch forward + backward": lambda: sed._run(x, semantic, None).sum().backward(),
        "extractor forward": lambda: extractor(x),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(args.repeats + 1):
        for name, fn in cases.items():
            with torch.no_grad() if "no grad" in name or "extractor" in name else torch.enable_grad():
                elapsed = _timed(fn, device)
            if repeat:  # the first round warms up
                times[name].append(elapsed)
    check = statistics.median(times["range check"])
    print(f"{args.batch}x3x{args.size}x{args.size} on {device} (torch {torch.__version__}), median of {args.repeats}")
    for name, samples in times.items():
        median = statistics.median(samples)
        ratio = "" if name == "range check" else f"   check / this = {check / median:.2e}"
        print(f"{name:32s} {median * 1e3:10.3f} ms{ratio}")


if __name__ == "__main__":
    main()
