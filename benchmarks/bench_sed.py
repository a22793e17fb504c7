#!/usr/bin/env python
"""Time and peak memory of SeD: SeFB levels, whole discriminators, a full D step, the extractor.

Every figure is the median over repeats, printed with its ratio to a baseline measured in the
same run: the same model with the math (score-matrix) attention path, fp32, eager, in the
model's default layout (channels_last for the pixel SeD, NCHW for the patch SeD).
On the CPU each configuration runs in a fresh process, so that its peak memory (``ru_maxrss``
above the resident set once the model and inputs are built) is its own; on CUDA all run in
one process and the peak is ``torch.cuda.max_memory_allocated`` per configuration.

Examples::

    python benchmarks/bench_sed.py --quick                 # about a minute on 2 CPU cores
    python benchmarks/bench_sed.py                         # the full CPU suite (~25 min on 2 cores)
    python benchmarks/bench_sed.py --suites disc --sizes 256 512
    python benchmarks/bench_sed.py --device cuda --suites gpu --batch 8   # what gpu_check.sh runs
    python benchmarks/bench_sed.py --dry-run               # list the configurations only

Results go to ``--out`` (default ``benchmarks/results/<device>``): ``results.json``,
``results.md`` (the tables) and, for the CPU ``disc`` suite, ``disc_time_vs_patch.png`` and
``disc_memory_vs_patch.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

SCRIPT = os.path.abspath(__file__)
ALL_SUITES = ("sefb", "disc", "step", "extractor")


# -- configurations -------------------------------------------------------------------------------


def _reps(size: int, quick: bool, device: str) -> dict:
    if quick:
        return {"warmup": 1, "repeats": 1}
    if device == "cuda":
        return {"warmup": 3, "repeats": 10} if size <= 256 else {"warmup": 2, "repeats": 5}
    # CPU: the 1024 math baseline of the pixel SeD takes over a minute per iteration on 2 cores.
    return {256: {"warmup": 1, "repeats": 3}, 512: {"warmup": 1, "repeats": 2}}.get(size, {"warmup": 1, "repeats": 1})


# The layout that is not the variant's default (SeD runs the pixel variant channels_last).
_OTHER_LAYOUT = {"pixel": "nchw", "patch": "cl"}


def label(cfg: dict) -> str:
    """Short human name of a configuration (the row label of the tables)."""
    parts = [cfg.get("path", "fused"), cfg.get("dtype", "fp32")]
    if cfg.get("layout") == "cl":
        parts.append("channels_last")
    elif cfg.get("layout") == "nchw":
        parts.append("NCHW")
    if cfg.get("compile"):
        parts.append("compile")
    if cfg["kind"] == "step":
        parts.append("semantics per D call" if cfg.get("semantics") == "per_call" else "semantics once")
        if cfg.get("batched"):
            parts.append("real+fake batched")
    if cfg.get("extractor_mode") == "inference":
        parts.append("inference_mode")
    if cfg["kind"] == "extractor":
        parts = [p for p in parts if p not in ("fused",)]
    if cfg.get("library"):
        parts.append(f"library from {cfg['library']}")
    return ", ".join(parts)


def _row(kind: str, group: str, baseline: bool = False, **cfg) -> dict:
    cfg = {"kind": kind, **cfg}
    return {"group": group, "baseline": baseline, "cfg": cfg}


def plan(args: argparse.Namespace) -> list[dict]:
    """The rows to measure, in order; the first row of each group is its baseline."""
    rows: list[dict] = []
    quick, dev, batch = args.quick, args.device, args.batch
    sizes = [s for s in args.sizes if not (quick and s > 256)]
    common = {"device": dev, "tiny": args.tiny, "library": args.library, "threads": args.threads}

    def add(kind, group, cfgs, size, **shared):
        for i, extra in enumerate(cfgs):
            rows.append(
                _row(kind, group, i == 0, **{"size": size, **_reps(size, quick, dev), **common, **shared, **extra})
            )

    math_fp32 = {"path": "math"}
    fused = {"path": "fused"}
    if "disc" in args.suites:
        for variant in ("pixel", "patch"):
            for size in sizes:
                if variant == "patch" and size > 512 and not args.patch_1024:
                    continue
                # The pixel SeD runs channels_last by default: its NCHW rows show what the layout buys;
                # the patch SeD runs NCHW by default: its channels_last row shows why.
                cfgs = [math_fp32, fused]
                if variant == "pixel" and not quick:
                    cfgs += [{**math_fp32, "layout": "nchw"}, {**fused, "layout": "nchw"}]
                if not quick and size <= 512:
                    if variant == "patch":
                        cfgs.append({**fused, "layout": "cl"})
                    cfgs.append({**fused, "dtype": "bf16"})
                    if size <= 256:
                        cfgs.append({**math_fp32, "dtype": "bf16"})
                    if size <= 256 and args.compile and variant == "patch":
                        cfgs.append({**fused, "compile": True})
                group = f"disc {variant} {size} b{batch}"
                add("disc", group, cfgs, size, variant=variant, batch=batch)
    if "sefb" in args.suites:
        for variant in ("pixel", "patch"):
            for level in H.SEFB_LEVELS[variant]:
                if args.levels and f"{variant}.{level}" not in args.levels:
                    continue
                for size in sizes:
                    big = size > 512
                    if quick and not (variant == "pixel" and level == "att1"):
                        continue
                    if big and not (variant == "pixel" and level == "att1"):
                        continue  # at 1024 only the level of the issue: 4096 x 262144 scores
                    cfgs = [math_fp32, fused]
                    if not quick and not big and level == "att1" and variant == "pixel":
                        cfgs += [{**fused, "dtype": "bf16"}, {**math_fp32, "dtype": "bf16"}]
                    if not quick and size <= 256 and level == "att1" and variant == "pixel" and args.compile:
                        cfgs.append({**fused, "compile": True})
                    group = f"sefb {variant}.{level} {size} b{batch}"
                    add("sefb", group, cfgs, size, variant=variant, level=level, batch=batch)
    if "step" in args.suites:
        size = args.step_size
        variants = ("patch",) if quick else ("patch", "pixel")
        for variant in variants:
            base = {"path": "math", "semantics": "per_call"}
            once = {"path": "fused", "semantics": "once"}
            cfgs = (
                [base, once]
                if quick
                else [
                    base,
                    {"path": "fused", "semantics": "per_call"},
                    once,
                    {**once, "batched": True},
                    {**once, "layout": _OTHER_LAYOUT[variant]},
                    {**once, "dtype": "bf16"},
                    {**once, "dtype": "bf16", "batched": True},
                ]
            )
            group = f"step {variant} {size} b{args.step_batch}"
            reps = {} if quick or dev == "cuda" else {"warmup": 1, "repeats": 2}
            add("step", group, cfgs, size, variant=variant, batch=args.step_batch, **reps)
    if "extractor" in args.suites:
        for size in [s for s in sizes if s <= 256]:
            cfgs = (
                [{}, {"layout": "cl"}]
                if quick
                else [
                    {},
                    {"extractor_mode": "inference"},
                    {"layout": "cl"},
                    {"dtype": "bf16"},
                    {"layout": "cl", "dtype": "bf16"},
                ]
            )
            group = f"extractor {size} b{args.extractor_batch}"
            add("extractor", group, cfgs, size, batch=args.extractor_batch)
    if "gpu" in args.suites:
        # The GPU table: a full D step (semantics, real + fake, backward, Adam) at batch 8.
        for variant in ("patch", "pixel"):
            for size in sizes:
                cfgs = [
                    {"path": "math"},
                    {"path": "fused"},
                    {"path": "fused", "layout": _OTHER_LAYOUT[variant]},
                    {"path": "fused", "dtype": "bf16"},
                    {"path": "fused", "dtype": "bf16", "layout": _OTHER_LAYOUT[variant]},
                    {"path": "fused", "dtype": "bf16", "batched": True},
                ]
                group = f"step {variant} {size} b{batch}"
                add("step", group, cfgs, size, variant=variant, batch=batch)
    return rows


# -- running ------------------------------------------------------------------------------------


def _merge(results: list[dict]) -> dict:
    """One result from several rounds of the same configuration: all repeats, median peak."""
    good = [r for r in results if "error" not in r]
    if not good:
        return results[-1]
    times = [t for r in good for t in r["times"]]
    cpu = [t for r in good for t in r["cpu_times"]]
    merged = dict(good[0])
    merged.update(
        times=times,
        cpu_times=cpu,
        time=statistics.median(times),
        cpu_time=statistics.median(cpu),
        peak=statistics.median(r["peak"] for r in good),
        peak_abs=statistics.median(r["peak_abs"] for r in good),
        first=min((r["first"] for r in good if r.get("first") is not None), default=None),
        rounds=len(good),
        load=max((r["load"] for r in good if r.get("load") is not None), default=None),
    )
    return merged


def worker_env(args: argparse.Namespace) -> dict:
    """Environment of the worker processes (CPU)."""
    env = {}
    if args.omp_passive:
        # OpenMP threads sleep instead of spinning while they wait. On a machine shared with
        # other jobs, spinning threads starve the one that holds the work, and barrier-heavy
        # kernels (the CPU flash-attention backward) slow down by 10-50x. Same for all rows.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def run(rows: list[dict], args: argparse.Namespace) -> None:
    """Measure every row; with ``--rounds R`` each group is run R times, alternating its order."""
    start = time.perf_counter()
    isolated = args.device == "cpu" and not args.in_process
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
        row["results"] = []
    done, total = 0, len(rows) * args.rounds
    for rnd in range(args.rounds):
        for members in groups.values():
            for row in members if rnd % 2 == 0 else members[::-1]:
                done += 1
                cfg = row["cfg"]
                if args.budget_s and time.perf_counter() - start > args.budget_s:
                    row["results"].append({"error": "skipped (time budget)"})
                    continue
                t0 = time.perf_counter()
                res = (
                    H.run_isolated(cfg, SCRIPT, args.timeout_s, worker_env(args)) if isolated else H.measure_safely(cfg)
                )
                row["results"].append(res)
                brief = res.get("error") or f"{res['time']:.3f} s, {res['peak'] / 2**20:.0f} MB"
                print(
                    f"[{done}/{total}] {row['group']}: {label(cfg)} -> {brief} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    for row in rows:
        row["result"] = _merge(row.pop("results"))


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or not base or math.isnan(value) or math.isnan(base):
        return None
    return value / base


def summarise(rows: list[dict]) -> None:
    """Attach ratios to the baseline of each group."""
    baselines = {r["group"]: r for r in rows if r["baseline"]}
    for r in rows:
        res, base = r.get("result", {}), baselines[r["group"]].get("result", {})
        ok = "error" not in res and "error" not in base
        r["time_ratio"] = _ratio(res.get("time"), base.get("time")) if ok else None
        r["cpu_ratio"] = _ratio(res.get("cpu_time"), base.get("cpu_time")) if ok else None
        r["mem_ratio"] = _ratio(res.get("peak"), base.get("peak")) if ok else None
        if ok and res.get("time"):
            r["throughput"] = r["cfg"].get("batch", 1) / res["time"]


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows: list[dict], device: str) -> str:
    """Markdown table of the measured rows."""
    head = (
        "| group | configuration | time (s) | x baseline | CPU time (s) | peak memory (MB) | x baseline "
        "| n | first iter. (s) | load |"
    )
    if device == "cuda":
        head = (
            "| group | configuration | time (ms) | img/s | x baseline throughput | peak above build (GB) "
            "| peak total (GB) | x baseline memory | n |"
        )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        res = r.get("result", {})
        name = label(r["cfg"]) + (" (baseline)" if r["baseline"] else "")
        if "error" in res:
            cols = head.count("|") - 3
            lines.append(f"| {r['group']} | {name} | {res['error']} |" + " |" * (cols - 1))
            continue
        n = len(res["times"])
        if device == "cuda":
            tp_ratio = None if not r["time_ratio"] else 1 / r["time_ratio"]
            lines.append(
                f"| {r['group']} | {name} | {res['time'] * 1e3:.1f} | {_fmt(r.get('throughput'), '.1f')} | "
                f"{_fmt(tp_ratio, '.2f')} | {res['peak'] / 2**30:.2f} | {res['peak_abs'] / 2**30:.2f} | "
                f"{_fmt(r['mem_ratio'], '.2f')} | {n} |"
            )
        else:
            lines.append(
                f"| {r['group']} | {name} | {res['time']:.3f} | {_fmt(r['time_ratio'], '.2f')} | "
                f"{res['cpu_time']:.2f} | {res['peak'] / 2**20:.0f} | {_fmt(r['mem_ratio'], '.2f')} | {n} | "
                f"{_fmt(res.get('first'), '.1f')} | {_fmt(res.get('load'), '.1f')} |"
            )
    return "\n".join(lines)


def _find(rows: Iterable[dict], **want) -> dict | None:
    for r in rows:
        cfg = r["cfg"]
        if cfg.get("library") or r.get("comparison"):
            continue  # before/after rows: another version of the library, or its counterpart
        if all(cfg.get(k, _DEFAULTS.get(k)) == v for k, v in want.items()) and "error" not in r.get(
            "result", {"error": 1}
        ):
            return r
    return None


_DEFAULTS = {"path": "fused", "dtype": "fp32", "layout": "default", "compile": False, "batched": False}


def targets(rows: list[dict]) -> str:
    """The CPU targets of the performance issue, checked against this run's figures."""
    out = []

    def check(name: str, value: float | None, limit: float) -> None:
        if value is None:
            out.append(f"- {name}: not measured in this run")
        else:
            verdict = "met" if value <= limit else "NOT met"
            out.append(f"- {name}: {value:.2f} (target <= {limit}) -> {verdict}")

    def disc(variant, size, **kw):
        return _find(rows, kind="disc", variant=variant, size=size, compile=False, layout="default", dtype="fp32", **kw)

    for size, mem_lim, time_lim in ((1024, 0.3, 0.55), (512, 0.7, 0.9)):
        r = disc("pixel", size, path="fused")
        check(f"pixel SeD {size}, fused vs math, peak memory ratio", r and r["mem_ratio"], mem_lim)
        check(f"pixel SeD {size}, fused vs math, time ratio", r and r["time_ratio"], time_lim)
    for size in (256, 512):
        r = disc("patch", size, path="fused")
        check(f"patch SeD {size}, fused vs math, time ratio", r and r["time_ratio"], 1.0)
    growth = []
    for path in ("fused", "math"):
        mems = {s: disc("pixel", s, path=path) for s in (256, 512, 1024)}
        mems = {s: r["result"]["peak"] for s, r in mems.items() if r}
        steps = [(a, b) for a, b in ((256, 512), (512, 1024)) if a in mems and b in mems]
        if steps:
            factors = ", ".join(f"{a}->{b}: x{mems[b] / mems[a]:.2f}" for a, b in steps)
            growth.append(f"- pixel SeD peak memory growth, {path} path (area grows x4 per step): {factors}")
    return "\n".join(out + growth)


def gpu_targets(rows: list[dict]) -> str:
    """The GPU targets of the performance issue (an H100 in the issue), from the gpu suite."""
    out = []
    for variant in ("patch", "pixel"):
        group = [
            r
            for r in rows
            if r["cfg"]["kind"] == "step"
            and r["cfg"]["variant"] == variant
            and r["cfg"]["size"] == 256
            and "error" not in r.get("result", {"error": 1})
        ]
        bf16 = [r for r in group if r["cfg"].get("dtype") == "bf16" and r.get("time_ratio")]
        if not bf16:
            out.append(f"- {variant} D step at 256, bf16 vs fp32 math throughput: not measured")
            continue
        best = min(bf16, key=lambda r: r["time_ratio"])
        speedup = 1 / best["time_ratio"]
        verdict = "met" if speedup >= 3 else "NOT met"
        out.append(
            f"- {variant} D step at 256, best bf16 ({label(best['cfg'])}) vs fp32 math: "
            f"x{speedup:.2f} throughput (target >= 3) -> {verdict}"
        )
    for r in rows:
        cfg = r["cfg"]
        if cfg["kind"] == "step" and cfg["variant"] == "pixel" and cfg["size"] == 1024 and cfg.get("path") == "fused":
            res = r.get("result", {})
            if "error" in res:
                out.append(f"- pixel D step at 1024, batch {cfg['batch']}, {label(cfg)}: {res['error']}")
                continue
            gb = res["peak_abs"] / 2**30
            verdict = "met" if gb < 40 else "NOT met"
            out.append(
                f"- pixel D step at 1024, batch {cfg['batch']}, {label(cfg)}: peak {gb:.1f} GB "
                f"(target < 40 GB) -> {verdict}"
            )
    return "\n".join(out)


def plots(rows: list[dict], out_dir: str, machine: dict) -> list[str]:
    """Time and peak memory versus patch side of the whole discriminators (CPU disc suite)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    series = [
        ("math, fp32 (baseline)", {"path": "math"}, "C3", "o-"),
        ("fused, fp32", {"path": "fused"}, "C0", "s-"),
        ("math, fp32, NCHW", {"path": "math", "layout": "nchw"}, "C3", "o:"),
        ("fused, fp32, NCHW", {"path": "fused", "layout": "nchw"}, "C0", "s:"),
        ("fused, fp32, channels_last", {"path": "fused", "layout": "cl"}, "C2", "^--"),
        ("fused, bf16", {"path": "fused", "dtype": "bf16"}, "C1", "d:"),
    ]
    written = []
    for metric, ylabel, scale, fname in (
        ("time", "forward + backward time (s, median)", 1.0, "disc_time_vs_patch.png"),
        ("peak", "peak memory above build (GB)", 2**-30, "disc_memory_vs_patch.png"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        any_data = False
        for ax, variant in zip(axes, ("pixel", "patch")):
            for name, want, color, style in series:
                pts = []
                for r in rows:
                    cfg = r["cfg"]
                    if cfg["kind"] != "disc" or cfg["variant"] != variant or cfg.get("compile") or cfg.get("library"):
                        continue
                    if r.get("comparison"):
                        continue
                    if all(cfg.get(k, _DEFAULTS[k]) == v for k, v in {**_DEFAULTS, **want}.items() if k != "compile"):
                        res = r.get("result", {})
                        if "error" not in res:
                            pts.append((cfg["size"], res[metric] * scale))
                pts.sort()
                if pts:
                    any_data = True
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=name)
            if metric == "peak":
                ref = [
                    r
                    for r in rows
                    if r["cfg"]["kind"] == "disc"
                    and r["cfg"]["variant"] == variant
                    and not r["cfg"].get("library")
                    and not r.get("comparison")
                    and r["cfg"].get("path") == "fused"
                    and r["cfg"].get("dtype", "fp32") == "fp32"
                    and r["cfg"].get("layout", "default") == "default"
                    and not r["cfg"].get("compile")
                    and "error" not in r.get("result", {})
                ]
                if len(ref) >= 2:
                    s0 = min(ref, key=lambda r: r["cfg"]["size"])
                    sizes = sorted(r["cfg"]["size"] for r in ref)
                    m0 = s0["result"]["peak"] * scale
                    ax.plot(
                        sizes,
                        [m0 * (s / sizes[0]) ** 2 for s in sizes],
                        "k:",
                        lw=1,
                        label="grows with area (fused, from smallest)",
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            sides = sorted(
                {r["cfg"]["size"] for r in rows if r["cfg"]["kind"] == "disc" and r["cfg"]["variant"] == variant}
            )
            sides = sides or sorted({r["cfg"]["size"] for r in rows if r["cfg"]["kind"] == "disc"})
            ax.set_xticks(sides, [str(v) for v in sides])
            ax.set_xlim(sides[0] / 1.3, sides[-1] * 1.3)
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            lo, hi = ax.get_ylim()
            few = hi / lo < 20  # less than ~a decade: label the minor ticks too
            ax.yaxis.set_minor_formatter(
                matplotlib.ticker.FuncFormatter(lambda v, _, few=few: f"{v:.3g}" if few else "")
            )
            ax.set_xlabel("patch side (px)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{variant} SeD, batch {rows[0]['cfg'].get('batch', 1)}, forward + backward")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        if not any_data:
            plt.close(fig)
            continue
        cpu = machine.get("gpu") or f"{machine.get('cpu', 'CPU')}, {machine.get('threads')} threads"
        fig.suptitle(f"SeD on {cpu}, torch {machine.get('torch')}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--suites",
        nargs="+",
        default=None,
        choices=(*ALL_SUITES, "gpu"),
        help="what to measure (default: all CPU suites; 'gpu' is the table of gpu_check.sh)",
    )
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512, 1024], help="square patch sides")
    p.add_argument("--batch", type=int, default=1, help="batch of the disc and sefb suites (and gpu)")
    p.add_argument(
        "--levels",
        nargs="+",
        default=None,
        metavar="VARIANT.LEVEL",
        help="SeFB levels of the sefb suite, e.g. pixel.att1 (default: all)",
    )
    p.add_argument("--step-size", type=int, default=256, help="patch side of the step suite")
    p.add_argument("--step-batch", type=int, default=2, help="batch of the step suite")
    p.add_argument("--extractor-batch", type=int, default=4, help="batch of the extractor suite")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="256 px only, one repeat: about a minute on 2 CPU cores")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    p.add_argument("--patch-1024", action="store_true", help="also run the patch SeD at 1024")
    p.add_argument("--tiny", action="store_true", help="tiny widths (smoke runs, not figures)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per configuration")
    p.add_argument("--library", default=None, help="import sed_discriminator from this directory (before/after runs)")
    p.add_argument(
        "--omp-passive",
        action="store_true",
        help="run the CPU workers with OMP_WAIT_POLICY=PASSIVE (robust on a shared, busy machine)",
    )
    p.add_argument("--rounds", type=int, default=1, help="run each group this many times, alternating its order")
    p.add_argument("--in-process", action="store_true", help="run every configuration in this process")
    p.add_argument("--budget-s", type=float, default=None, help="skip remaining configurations after this many seconds")
    p.add_argument("--timeout-s", type=float, default=1800, help="per-configuration timeout (CPU, isolated)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/<device>[-quick])")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="do not write PNG plots")
    p.add_argument("--dry-run", action="store_true", help="print the configurations and exit")
    p.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="FILE",
        help="do not measure: rebuild tables and plots from earlier results.json files (merged)",
    )
    args = p.parse_args(argv)
    if args.suites is None:
        args.suites = ["gpu"] if args.device.startswith("cuda") else list(ALL_SUITES)
    if args.device.startswith("cuda"):
        args.device = "cuda"
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == H.WORKER_FLAG:
        H.worker_main(sys.argv[2])
        return 0
    args = parse_args(argv)
    if args.from_json:
        return report_from_json(args)
    rows = plan(args)
    if args.dry_run:
        for r in rows:
            print(f"{r['group']}: {label(r['cfg'])}{' (baseline)' if r['baseline'] else ''}")
        print(f"{len(rows)} configurations")
        return 0
    if args.library:
        sys.path.insert(0, args.library)
    machine = H.machine_description()
    print("machine:", json.dumps(machine), flush=True)
    t0 = time.perf_counter()
    run(rows, args)
    summarise(rows)
    wall = time.perf_counter() - t0
    md = [
        f"Machine: {json.dumps(machine)}",
        f"Worker environment: {json.dumps(worker_env(args)) if args.device == 'cpu' else 'n/a'}; "
        f"torch threads: {args.threads or 'default'}.",
        f"Total wall time: {wall / 60:.1f} min. Medians over n repeats after warm-up; ratios against the "
        "first row (baseline) of each group, measured in this run.",
        "",
        table(rows, args.device),
    ]
    if args.device == "cpu":
        md += ["", "Targets of the performance issue (CPU):", targets(rows)]
    elif "gpu" in args.suites:
        md += ["", "Targets of the performance issue (GPU):", gpu_targets(rows)]
    text = "\n".join(md)
    print("\n" + text, flush=True)
    out_dir = args.out or os.path.join(
        os.path.dirname(SCRIPT), "results", args.device + ("-quick" if args.quick else "")
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump({"machine": machine, "args": vars(args), "wall_s": wall, "rows": rows}, fh, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write(text + "\n")
    written = plots(rows, out_dir, machine) if args.plots and args.device == "cpu" and "disc" in args.suites else []
    print(f"\nwrote {out_dir}/results.json, results.md" + "".join(f", {os.path.basename(w)}" for w in written))
    return 0


def report_from_json(args: argparse.Namespace) -> int:
    """Tables and plots from saved results (several files are concatenated, in order)."""
    rows, machine, wall = [], {}, 0.0
    for path in args.from_json:
        with open(path) as fh:
            data = json.load(fh)
        machine = machine or data["machine"]
        wall += data.get("wall_s", 0.0)
        rows += data["rows"]
    summarise(rows)
    device = "cuda" if any(r["cfg"].get("device") == "cuda" for r in rows) else "cpu"
    text = "\n".join(
        [
            f"Machine: {json.dumps(machine)}",
            f"Measurement wall time: {wall / 60:.1f} min.",
            "",
            table(rows, device),
            "",
            "Targets of the performance issue:",
            targets(rows) if device == "cpu" else gpu_targets(rows),
        ]
    )
    print(text)
    out_dir = args.out or os.path.dirname(os.path.abspath(args.from_json[0]))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write(text + "\n")
    if args.plots and device == "cpu":
        for path in plots(rows, out_dir, machine):
            print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
