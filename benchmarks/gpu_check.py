#!/usr/bin/env python
"""GPU check of sed-discriminator (issue 18): one command, every figure, verdicts on the goals.

Runs on a machine image as it is (torch, timm, einops, safetensors, numpy, pytest; no install step,
no network, no matplotlib): ``bash benchmarks/gpu_check.sh`` sets ``PYTHONPATH`` to this checkout and
calls this script. Stages, in order, each in its own process with its own time limit, each writing
``<stage>.json`` under the output folder as every measurement finishes (a timeout loses nothing):

- ``env``: GPU, driver, torch / CUDA / cuDNN versions, TF32 switches;
- ``sdpa``: which SDPA backend the fused path runs (profiler), and each backend (flash,
  memory-efficient, cuDNN, math) forced in turn: accepted or not, time, error against fp32 math;
- ``dstep``: our D step (real + fake calls, BCE, backward, Adam; semantics given) for patch and
  pixel at 256 x 16, 512 x 8, 1024 x 8: fused/math x fp32/bf16 autocast x NCHW/channels_last, time
  and peak memory (``torch.cuda.max_memory_allocated``, reset per row; out of memory is a row);
- ``official``: the authors' ``SeD_P`` / ``SeD_U`` (fp32, their code, from ``third_party/sed_official``;
  skipped with a note when absent) beside ours, same D step;
- ``tests``: ``pytest -m cuda tests/test_perf_cuda.py`` (JUnit XML parsed into ``tests.json``);
- ``extractors``: every extractor preset's forward at 256 x 16 in bf16 (random weights);
- ``compile``: eager against ``torch.compile``, bf16 at 256 x 16, paired.

Then ``summary.json`` and ``summary.txt`` (printed last): the goals as PASS / FAIL / NOT RUN and
the CUDA ``CHANNELS_LAST_DEFAULT`` the measurement supports. A total time budget (``--budget-s``)
skips the stages that no longer fit, with a note.

Examples::

    bash benchmarks/gpu_check.sh                        # all stages, about 7 minutes (budget 450 s)
    bash benchmarks/gpu_check.sh --quick                # the goal rows only, about 3 minutes (a rerun)
    bash benchmarks/gpu_check.sh --stages compile extractors --budget-s 200
    bash benchmarks/gpu_check.sh --dry-run              # tiny sizes, on the CPU, in about a minute
    python benchmarks/gpu_check.py --summary-only --out FOLDER   # verdicts again from saved JSON

Output folder: ``--out``, else ``$OUT``, else ``runs/gpu_check`` (ignored by git).
``--dry-run`` runs on the CPU, and ``SED_GPU_CHECK_DEVICE=cpu`` means ``--dry-run``;
``SED_GPU_CHECK_DEVICE=cuda ... --dry-run`` runs the tiny plan on a GPU (a smoke test there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _gpu_summary  # noqa: E402  (benchmarks/, next to this script; no torch)

STAGE_ORDER = ("env", "sdpa", "dstep", "official", "tests", "extractors", "compile")
DEFAULT_STAGES = {
    "full": STAGE_ORDER,
    "quick": ("env", "sdpa", "dstep", "official", "compile"),
    "dry": STAGE_ORDER,
}
DEFAULT_BUDGET_S = {"full": 450.0, "quick": 180.0, "dry": 600.0}
# Upper bound of each stage (the budget left may be less); what a stage is expected to need on an H100/H200.
STAGE_CAP_S = {
    "full": {"env": 60, "sdpa": 60, "dstep": 210, "official": 90, "tests": 150, "extractors": 90, "compile": 180},
    "quick": {"env": 60, "sdpa": 40, "dstep": 60, "official": 40, "tests": 150, "extractors": 90, "compile": 100},
    "dry": {"env": 120, "sdpa": 120, "dstep": 300, "official": 200, "tests": 200, "extractors": 120, "compile": 200},
}
MIN_STAGE_S = 15.0  # a stage is not started with less time left than this


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--stages",
        nargs="+",
        choices=STAGE_ORDER,
        default=None,
        help="stages to run, in the order given (default: all; --quick: env sdpa dstep official compile)",
    )
    p.add_argument("--quick", action="store_true", help="the rows the goals need only: about 3 minutes, for a rerun")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, one repeat: every code path in about a minute")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="total seconds; stages that no longer fit are skipped (default: 450 full, 180 quick)",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else runs/gpu_check)")
    p.add_argument("--summary-only", action="store_true", help="measure nothing: rebuild the summary from --out")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage in this process
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _device_and_mode(args: argparse.Namespace) -> tuple[str, str]:
    """``--dry-run`` runs on the CPU unless ``SED_GPU_CHECK_DEVICE=cuda``; ``SED_GPU_CHECK_DEVICE=cpu`` means dry."""
    device = os.environ.get("SED_GPU_CHECK_DEVICE", "").strip() or ("cpu" if args.dry_run else "cuda")
    if device not in ("cuda", "cpu"):
        raise SystemExit(f"SED_GPU_CHECK_DEVICE must be 'cuda' or 'cpu', got {device!r}.")
    if args.dry_run or device == "cpu":
        return device, "dry"
    return device, "quick" if args.quick else "full"


class Tee:
    """Print and append to the run's log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.start = time.time()

    def __call__(self, text: str, stamp: bool = True) -> None:
        line = f"[gpu_check +{time.time() - self.start:4.0f}s] {text}" if stamp else text
        with self.lock:
            print(line, flush=True)
            with self.path.open("a") as fh:
                fh.write(line + "\n")


def _run_process(cmd: list[str], timeout: float, say: Tee, log_path: Path) -> tuple[str, int | None]:
    """Run ``cmd`` with its output teed; on timeout kill its process group. Returns (status, exit code)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )

        def pump() -> None:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                say("    " + line.rstrip(), stamp=False)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
            status = "done" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and anything it started
            rc = proc.wait()
            status = f"timed out after {timeout:.0f} s (killed; its JSON keeps what was measured)"
        reader.join(timeout=10)
    return status, rc


def _tests_stage(out: Path, mode: str, timeout: float, say: Tee) -> str:
    """``pytest -m cuda tests/test_perf_cuda.py``, its JUnit XML parsed into ``tests.json``."""
    import xml.etree.ElementTree as ET

    xml_path = out / "pytest_cuda.xml"
    xml_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "cuda",
        "tests/test_perf_cuda.py",
        "-p",
        "no:cacheprovider",
        "-rA",
        "-s",
        f"--junitxml={xml_path}",
    ]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    status, rc = _run_process(cmd, timeout, say, out / "pytest_cuda.log")
    data: dict = {
        "stage": "tests",
        "mode": mode,
        "started": started,
        "status": status,
        "returncode": rc,
        "command": " ".join(cmd[1:]),
        "rows": [],
        "notes": [],
        "counts": {},
        "failed": [],
    }
    if rc in (0, 1) and xml_path.is_file():  # pytest: 0 all passed, 1 some failed
        data["status"] = "done"
    if xml_path.is_file():
        root = ET.parse(xml_path).getroot()
        counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name')}"
            outcome, message = "passed", ""
            for tag, key in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
                node = case.find(tag)
                if node is not None:
                    outcome, message = key, (node.get("message") or "").splitlines()[0:1]
                    message = message[0][:200] if message else ""
                    break
            counts[outcome] += 1
            data["rows"].append(
                {"label": name, "outcome": outcome, "message": message, "time_s": float(case.get("time") or 0)}
            )
            if outcome in ("failed", "errors"):
                data["failed"].append(f"{name}: {message}")
        data["counts"] = counts
    else:
        data["notes"].append("no JUnit XML: pytest did not finish; see pytest_cuda.log")
    (out / "tests.json").write_text(json.dumps(data, indent=1))
    return data["status"]


def run_all(args: argparse.Namespace) -> int:
    device, mode = _device_and_mode(args)
    out = (args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    say = Tee(out / "gpu_check.log")
    if args.summary_only:
        print(_gpu_summary.write(out, _load_run(out))["text"])
        return 0
    if mode != "dry":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(
                "No CUDA device is visible to torch. For a smoke run of every stage on the CPU, run "
                "with --dry-run (or SED_GPU_CHECK_DEVICE=cpu)."
            )
    stages = list(args.stages or DEFAULT_STAGES[mode])
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[mode]
    caps = STAGE_CAP_S[mode]
    start = time.time()
    run = _load_run(out)
    run.update(
        mode=mode,
        device=device,
        budget_s=budget,
        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=sys.argv[1:],
        out=str(out),
    )
    run.setdefault("stages", {})
    say(f"mode {mode} on {device}, stages {' '.join(stages)}, budget {budget:.0f} s, output {out}")
    for stage in stages:
        left = budget - (time.time() - start)
        if left < MIN_STAGE_S:
            run["stages"][stage] = {
                "status": f"skipped: time budget ({max(left, 0):.0f} s left of {budget:.0f})",
                "wall_s": 0.0,
            }
            _mark_skipped(out, stage, mode, run["stages"][stage]["status"])
            say(f"stage {stage}: skipped (time budget)")
            continue
        limit = min(caps[stage], left)
        say(f"stage {stage}: start (limit {limit:.0f} s)")
        t0 = time.time()
        if stage == "tests":
            status = _tests_stage(out, mode, limit, say)
        else:
            # The stage stops starting rows a little before its limit, so it ends on its own.
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--stage",
                stage,
                "--mode",
                mode,
                "--device",
                device,
                "--out",
                str(out),
                "--deadline",
                str(time.time() + limit - 5),
            ]
            status, _ = _run_process(cmd, limit, say, out / f"{stage}.log")
            status = _stage_status(out, stage, status)
        run["stages"][stage] = {"status": status, "wall_s": time.time() - t0, "limit_s": limit}
        say(f"stage {stage}: {status} ({time.time() - t0:.0f} s)")
        run["wall_s"] = time.time() - start
        (out / "run.json").write_text(json.dumps(run, indent=1))
        _gpu_summary.write(out, run)
    run["wall_s"] = time.time() - start
    (out / "run.json").write_text(json.dumps(run, indent=1))
    summary = _gpu_summary.write(out, run)
    say("\n" + summary["text"] + f"\n\ntotal {run['wall_s']:.0f} s; files in {out}", stamp=False)
    return 0


def _load_run(out: Path) -> dict:
    try:
        return json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def _stage_status(out: Path, stage: str, process_status: str) -> str:
    """The process's status, unless the stage's own JSON says more (skipped, error)."""
    try:
        data = json.loads((out / f"{stage}.json").read_text())
    except (OSError, ValueError):
        return process_status + " (no stage JSON)"
    if process_status == "done":
        return data.get("status", "done")
    data["status"] = process_status  # killed or crashed: the JSON still says "running"
    (out / f"{stage}.json").write_text(json.dumps(data, indent=1))
    return process_status


def _mark_skipped(out: Path, stage: str, mode: str, why: str) -> None:
    path = out / ("tests.json" if stage == "tests" else f"{stage}.json")
    path.write_text(json.dumps({"stage": stage, "mode": mode, "status": "skipped", "rows": [], "notes": [why]}))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage:
        import _gpu_stages

        ctx = _gpu_stages.Context(args.out, args.mode, args.device, args.deadline or time.time() + 600)
        return _gpu_stages.run_stage(args.stage, ctx)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
