"""The verdicts of ``gpu_check.py``: issue 18's goals as PASS / FAIL / NOT RUN, from the stage JSON files.

Pure JSON processing (no torch), so a summary can be rebuilt from a copied results folder with
``python benchmarks/gpu_check.py --summary-only --out FOLDER``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

STAGE_NAMES = ("env", "tests", "sdpa", "dstep", "official", "extractors", "compile")
# "At least as fast" allows this much timing noise; "faster" and "no slower" are read the same way
# where stated below. Stated in every verdict that uses it.
NOISE = 0.03
MEMORY_LIMIT_GB = 40.0
SPEEDUP_TARGET = 3.0


def load_stages(out: Path) -> dict[str, dict]:
    stages = {}
    for name in STAGE_NAMES:
        path = out / f"{name}.json"
        if path.is_file():
            try:
                stages[name] = json.loads(path.read_text())
            except ValueError as err:
                stages[name] = {"stage": name, "status": "unreadable", "notes": [f"{path.name}: {err}"], "rows": []}
    return stages


def _rows(stages: dict, name: str) -> list[dict]:
    return stages.get(name, {}).get("rows", [])


def _pick(rows: list[dict], **want: Any) -> list[dict]:
    defaults = {"impl": "ours", "path": "fused", "compile": False}
    out = []
    for r in rows:
        cfg = r.get("cfg", {})
        if all(cfg.get(k, defaults.get(k)) == v for k, v in want.items()):
            out.append(r)
    return out


def _why_missing(stages: dict, name: str) -> str:
    stage = stages.get(name)
    if stage is None:
        return f"the {name} stage did not run"
    notes = "; ".join(stage.get("notes", []))
    return f"the {name} stage is {stage.get('status')}" + (f" ({notes})" if notes else "")


def _goal(gid: str, text: str, verdict: str, value: float | None, detail: str) -> dict:
    return {"id": gid, "goal": text, "verdict": verdict, "value": value, "detail": detail}


def goal_speed_vs_authors(stages: dict) -> dict:
    text = f"pixel SeD bf16 D step >= {SPEEDUP_TARGET:g}x faster than the authors' fp32 at 512x8"
    authors = ours = []
    for name in ("official", "dstep"):  # prefer the rows measured next to the authors'
        rows = _rows(stages, name)
        authors = authors or _pick(rows, impl="official", variant="pixel", role=512, dtype="fp32")
        found = [r for r in _pick(rows, variant="pixel", role=512, dtype="bf16") if "ms" in r]
        ours = ours or found
    timed = [r for r in authors if "ms" in r]
    if not timed:
        reason = authors[0]["error"] if authors else _why_missing(stages, "official")
        return _goal("G1", text, "NOT RUN", None, f"no timing of the authors' pixel SeD at 512x8: {reason}")
    if not ours:
        return _goal("G1", text, "FAIL", None, "the authors' code ran, our pixel bf16 rows at 512x8 did not")
    best = min(ours, key=lambda r: r["ms"])
    speedup = timed[0]["ms"] / best["ms"]
    verdict = "PASS" if speedup >= SPEEDUP_TARGET else "FAIL"
    detail = f"x{speedup:.2f}: {best['label']} {best['ms']:.1f} ms vs {timed[0]['label']} {timed[0]['ms']:.1f} ms"
    others = [f"{r['label']} x{timed[0]['ms'] / r['ms']:.2f}" for r in ours if r is not best]
    if others:
        detail += "; other rows: " + ", ".join(others)
    return _goal("G1", text, verdict, speedup, detail)


def goal_memory_1024(stages: dict) -> dict:
    text = f"pixel SeD D step at 1024x8 (bf16, fused) peak < {MEMORY_LIMIT_GB:g} GB"
    rows = _pick(_rows(stages, "dstep"), variant="pixel", role=1024, path="fused", dtype="bf16")
    if not rows:
        return _goal("G2", text, "NOT RUN", None, _why_missing(stages, "dstep"))
    measured = [r for r in rows if "peak_abs_gb" in r]
    if not measured:
        errors = {r["error"] for r in rows}
        verdict = "NOT RUN" if all(e.startswith("skipped") for e in errors) else "FAIL"
        return _goal("G2", text, verdict, None, "; ".join(f"{r['label']}: {r['error']}" for r in rows))
    best = min(measured, key=lambda r: r["peak_abs_gb"])
    verdict = "PASS" if best["peak_abs_gb"] < MEMORY_LIMIT_GB else "FAIL"
    shown = _pick(_rows(stages, "dstep"), variant="pixel", role=1024, path="fused")
    detail = ", ".join(
        f"{r['label']}: " + (f"{r['peak_abs_gb']:.1f} GB" if "peak_abs_gb" in r else r["error"]) for r in shown
    )
    lowest = f"lowest {best['peak_abs_gb']:.1f} GB ({best['label']}); {detail}"
    return _goal("G2", text, verdict, best["peak_abs_gb"], lowest)


def goal_fused_vs_math(stages: dict) -> dict:
    text = (
        f"fused attention path at least as fast as the math path at 256 (within {NOISE:.0%} timing noise) "
        "and faster at 512 and 1024 (NCHW, fp32 and bf16)"
    )
    rows = _rows(stages, "dstep")
    pairs, failures, checked = [], [], 0
    for r in _pick(rows, path="math", layout="nchw"):
        c = r["cfg"]
        fused = _pick(rows, path="fused", variant=c["variant"], role=c["role"], dtype=c["dtype"], layout="nchw")
        if not fused:
            continue
        f = fused[0]
        name = f"{c['variant']} {c['role']} {c['dtype']}"
        if "ms" not in f:
            if not f["error"].startswith("skipped"):
                failures.append(f"{name}: fused {f['error']}")
                checked += 1
            continue
        if "ms" not in r:
            if r["error"].startswith("skipped"):
                continue
            pairs.append(f"{name}: math {r['error']}, fused {f['ms']:.0f} ms")
            checked += 1
            continue
        ratio = f["ms"] / r["ms"]
        limit = 1 + NOISE if c["role"] == 256 else 1.0
        pairs.append(f"{name}: fused/math x{ratio:.2f}")
        checked += 1
        if ratio > limit:
            failures.append(f"{name}: x{ratio:.2f} (limit {limit:.2f})")
    if not checked:
        return _goal("G3", text, "NOT RUN", None, "no fused/math pair measured: " + _why_missing(stages, "dstep"))
    verdict = "FAIL" if failures else "PASS"
    detail = ("; ".join(failures) + " | all: " if failures else "") + "; ".join(pairs)
    return _goal("G3", text, verdict, None, detail)


def _same_but_compile(a: dict, b: dict) -> bool:
    own = ("compile", "compile_backend", "warmup")
    return {k: v for k, v in a.items() if k not in own} == {k: v for k, v in b.items() if k not in own}


def goal_compile(stages: dict) -> dict:
    text = f"torch.compile D step no slower than eager (within {NOISE:.0%} timing noise)"
    rows = _rows(stages, "compile")
    results, failures, checked = [], [], 0
    for eager in _pick(rows, compile=False):
        c = eager["cfg"]
        compiled = [r for r in rows if r.get("cfg", {}).get("compile") and _same_but_compile(r["cfg"], c)]
        if not compiled or "ms" not in eager:
            continue
        r = compiled[0]
        name = f"{c['variant']} {c['role']} {c['dtype']} {c.get('layout')}"
        checked += 1
        if "ms" not in r:
            failures.append(f"{name}: compiled {r['error']}")
            continue
        ratio = r["ms"] / eager["ms"]
        first = f", first step {r['first_s']:.0f} s" if r.get("first_s") is not None else ""
        results.append(f"{name}: compiled/eager x{ratio:.2f} ({r['ms']:.1f} vs {eager['ms']:.1f} ms{first})")
        if ratio > 1 + NOISE:
            failures.append(f"{name}: x{ratio:.2f}")
    if not checked:
        return _goal("G4", text, "NOT RUN", None, "no eager/compiled pair measured: " + _why_missing(stages, "compile"))
    verdict = "FAIL" if failures else "PASS"
    return _goal("G4", text, verdict, None, ("; ".join(failures) + " | all: " if failures else "") + "; ".join(results))


def layout_advice(stages: dict) -> dict:
    """channels_last / NCHW time ratio of the fused rows per variant, and what CHANNELS_LAST_DEFAULT should say."""
    rows = _rows(stages, "dstep")
    advice = {}
    for variant in ("pixel", "patch"):
        ratios, mem = [], []
        for cl in _pick(rows, variant=variant, path="fused", layout="cl"):
            c = cl["cfg"]
            nchw = _pick(rows, variant=variant, path="fused", layout="nchw", role=c["role"], dtype=c["dtype"])
            if nchw and "ms" in cl and "ms" in nchw[0]:
                ratios.append(cl["ms"] / nchw[0]["ms"])
                mem.append(cl["peak_abs_gb"] / nchw[0]["peak_abs_gb"])
        if not ratios:
            advice[variant] = {"pairs": 0, "advice": "not measured"}
            continue
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        if geo < 1 - NOISE:
            choice = "channels_last"
        elif geo > 1 + NOISE:
            choice = "NCHW"
        else:
            choice = f"NCHW (within {NOISE:.0%}: keep the reference's layout)"
        advice[variant] = {
            "pairs": len(ratios),
            "time_ratio_geomean": geo,
            "time_ratios": ratios,
            "memory_ratios": mem,
            "advice": choice,
        }
    return advice


def _tests_line(stages: dict) -> str:
    t = stages.get("tests")
    if t is None:
        return "CUDA tests: not run"
    c = t.get("counts", {})
    line = (
        f"CUDA tests ({t.get('status')}): {c.get('passed', 0)} passed, {c.get('failed', 0)} failed, "
        f"{c.get('errors', 0)} errors, {c.get('skipped', 0)} skipped"
    )
    for f in t.get("failed", [])[:8]:
        line += f"\n  FAILED {f}"
    return line


def _sdpa_lines(stages: dict) -> list[str]:
    lines = []
    for r in _rows(stages, "sdpa"):
        forced = ", ".join(
            f"{b.split('_')[0].lower()} " + (f"{v['ms']:.1f} ms err {v['rel_err_out']:.1e}" if v["ok"] else "refused")
            for b, v in r.get("forced", {}).items()
        )
        lines.append(f"  {r['label']}: default -> {'/'.join(r.get('default_backend') or ['?'])}; forced: {forced}")
    return lines


def _row_line(r: dict) -> str:
    if "ms" not in r:
        return f"  {r['label']}: {r.get('error')}"
    first = f", first {r['first_s']:.1f} s" if r.get("first_s") is not None else ""
    return f"  {r['label']}: {r['ms']:.1f} ms, peak {r['peak_abs_gb']:.2f} GB (above build {r['peak_gb']:.2f}){first}"


def build(out: Path, run: dict | None = None) -> dict:
    stages = load_stages(out)
    modes = sorted({s.get("mode", "?") for s in stages.values()})
    summary = {
        "dry_run": "dry" in modes,
        "modes": modes,
        "run": run or {},
        "env": stages.get("env", {}).get("env", {}),
        "stages": {
            n: {
                "status": s.get("status"),
                "rows": len(s.get("rows", [])),
                "notes": s.get("notes", []),
                "started": s.get("started"),
            }
            for n, s in stages.items()
        },
        "goals": [
            goal_speed_vs_authors(stages),
            goal_memory_1024(stages),
            goal_fused_vs_math(stages),
            goal_compile(stages),
        ],
        "channels_last_advice": layout_advice(stages),
        "tests": {k: stages.get("tests", {}).get(k) for k in ("status", "counts", "failed")},
    }
    summary["text"] = text(summary, stages)
    return summary


def text(summary: dict, stages: dict) -> str:
    env = summary["env"]
    lines = ["=================== sed-discriminator GPU check (issue 18) ==================="]
    if summary["dry_run"]:
        lines.append("DRY RUN: tiny sizes, one repeat; the code paths only. THESE ARE NOT FIGURES.")
    if len(summary["modes"]) > 1:
        lines.append(f"NOTE: the stage files come from runs of different modes: {summary['modes']}")
    lines.append(
        f"device: {env.get('gpu', env.get('cpu', '?'))}; torch {env.get('torch', '?')}, "
        f"CUDA {env.get('cuda')}, "
        f"cuDNN {env.get('cudnn')}; TF32 matmul {env.get('matmul_allow_tf32')}, TF32 cuDNN "
        f"{env.get('cudnn_allow_tf32')}; sed_discriminator {env.get('sed_discriminator', '?')}"
    )
    run = summary.get("run", {})
    for name, s in run.get("stages", {}).items():
        lines.append(f"stage {name}: {s.get('status')} in {s.get('wall_s', 0):.0f} s")
    lines.append("")
    lines.append("Goals:")
    for g in summary["goals"]:
        dry = " (dry run: not a figure)" if summary["dry_run"] else ""
        lines.append(f"  {g['verdict']:7s} {g['id']} {g['goal']}{dry}")
        lines.append(f"          {g['detail']}")
    lines.append("")
    lines.append("CHANNELS_LAST_DEFAULT for CUDA (fused rows, channels_last/NCHW time, geometric mean):")
    for variant, a in summary["channels_last_advice"].items():
        geo = f"x{a['time_ratio_geomean']:.2f} over {a['pairs']} pairs -> " if a["pairs"] else ""
        lines.append(f"  {variant}: {geo}{a['advice']}")
    lines.append("")
    lines.append(_tests_line(stages))
    sdpa = _sdpa_lines(stages)
    if sdpa:
        title = "SDPA backends (SeFB forward + backward; err: max abs error / output scale vs fp32 math, TF32 off):"
        lines += ["", title]
        lines += sdpa
    for name, title in (
        ("dstep", "D step (real + fake, backward, Adam; semantics given)"),
        ("official", "Authors' discriminators beside ours (same D step)"),
        ("compile", "Eager vs torch.compile"),
    ):
        rows = _rows(stages, name)
        notes = stages.get(name, {}).get("notes", [])
        if rows or notes:
            lines += ["", f"{title}:"] + [f"  note: {n}" for n in notes] + [_row_line(r) for r in rows]
    ext = _rows(stages, "extractors")
    if ext:
        lines += ["", "Extractor forward (bf16, random weights):"]
        for r in ext:
            if "ms" in r:
                peak = f", peak {r['peak_gb']:.2f} GB" if "peak_gb" in r else ""
                lines.append(
                    f"  {r['label']}: {r['ms']:.1f} ms{peak}, {r['channels']} ch on "
                    f"{'x'.join(map(str, r['grid']))} ({r['params_m']:.0f} M params)"
                )
            else:
                lines.append(f"  {r['label']}: {r.get('error')}")
    return "\n".join(lines)


def write(out: Path, run: dict | None = None) -> dict:
    summary = build(out, run)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.txt").write_text(summary["text"] + "\n")
    return summary
