"""einops rearranges of SeFB against the hand-written permute/reshape they replaced, timed alternately.

Each pair runs in the same process, alternating, so machine drift cancels out of the ratio.
The hand-written versions live only here, as the baseline. Prints the median time per call
(forward + backward through the rearrange) and the ratio einops / hand-written.

    python benchmarks/bench_rearrange.py            # paper sizes of the pixel SeD's att1 level
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sed_discriminator.attention import Attention
from sed_discriminator.sefb import _to_tokens, channels_to_space


def manual_channels_to_space(x: torch.Tensor, factor: int, channels_last: bool) -> torch.Tensor:
    b, c, h, w = x.shape
    c_out = c // (factor * factor)
    x = x.reshape(b, c_out, factor, factor, h, w)
    if channels_last:
        return x.permute(0, 4, 3, 5, 2, 1).reshape(b, h * factor, w * factor, c_out).permute(0, 3, 1, 2)
    return x.permute(0, 1, 4, 3, 5, 2).reshape(b, c_out, h * factor, w * factor)


def manual_to_tokens(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    return x.flatten(2).transpose(1, 2)


def manual_split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


def timed(fn, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_(True)
    start = time.perf_counter()
    fn(x).float().sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the steadiest timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch
    attention = Attention(64, heads=1, head_dim=64)
    cases = {
        # proj_out output of the pixel SeD's att1 at 256 px: 1024 channels on a 16x16 grid, u = 8
        "channels_to_space NCHW": (
            lambda x: channels_to_space(x, 8, channels_last=False),
            lambda x: manual_channels_to_space(x, 8, False),
            torch.randn(b, 1024, 16, 16),
        ),
        "channels_to_space -> channels_last": (
            lambda x: channels_to_space(x, 8, channels_last=True),
            lambda x: manual_channels_to_space(x, 8, True),
            torch.randn(b, 1024, 16, 16),
        ),
        "tokens of NCHW features": (_to_tokens, manual_to_tokens, torch.randn(b, 64, 128, 128)),
        "tokens of channels_last features": (
            _to_tokens,
            manual_to_tokens,
            torch.randn(b, 64, 128, 128).contiguous(memory_format=torch.channels_last),
        ),
        "split heads": (attention._split_heads, lambda t: manual_split_heads(t, 1), torch.randn(b, 16384, 64)),
    }
    print(f"{'rearrange':36s} {'einops ms':>10s} {'manual ms':>10s} {'ratio':>7s}")
    for name, (ours, manual, x) in cases.items():
        torch.testing.assert_close(ours(x), manual(x), atol=0, rtol=0)
        assert ours(x).stride() == manual(x).stride(), name  # same layout, so no later copy differs
        t_ours, t_manual = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(ours, x))
            t_manual.append(timed(manual, x))
        a, m = statistics.median(t_ours), statistics.median(t_manual)
        print(f"{name:36s} {a * 1e3:10.3f} {m * 1e3:10.3f} {a / m:7.2f}")


if __name__ == "__main__":
    main()
