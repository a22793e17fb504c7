"""One-file training checkpoints: written atomically, the last K kept, RNG states included.

A checkpoint is a dict saved with :func:`torch.save` and read back with ``weights_only=True``
(so only tensors and plain Python containers are stored: the numpy RNG state is converted).
The writer puts it in a temporary file of the same folder, flushes and fsyncs it, then
renames it over the final name (atomic on POSIX and Windows) and fsyncs the folder: a crash
or a full disk during the save leaves the previous checkpoints untouched.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "sed-esrgan-checkpoint/1"
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """No usable checkpoint (the message says which files were tried and why they failed)."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file, fsync and rename.

    If anything fails (an exception during pickling, a full disk, a signal) the temporary file
    is removed and ``path`` keeps its previous content (or stays absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints in ``folder``, oldest first (temporary files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints of ``folder``; returns the deleted paths."""
    if keep < 1:
        return []
    doomed = [path for _, path in list_checkpoints(folder)[:-keep]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`atomic_save` (``weights_only=True``).

    Raises:
        CheckpointError: the file is unreadable, truncated, or not a checkpoint of this script.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
        first_line = next((line for line in lines if line.startswith("WeightsUnpickler error")), lines[0])[:200]
        reason = f"{type(err).__name__}: {first_line}"
        raise CheckpointError(f"{path} cannot be read, it is truncated or damaged ({reason}).") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this script (format {FORMAT}).")
    return state


def find_resumable(folder: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of ``folder`` that loads; broken newer ones are reported, not used.

    Raises:
        CheckpointError: no checkpoint in ``folder``, or none of them loads.
    """
    candidates = list_checkpoints(folder)
    if not candidates:
        raise CheckpointError(
            f"Nothing to resume: no step_*.pt checkpoint in {str(folder)!r}. "
            "Check --out, or pass the file with --resume PATH."
        )
    failures = []
    for _, path in reversed(candidates):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            failures.append(str(err))
            continue
        if failures:
            warnings.warn(
                "Skipped unreadable newer checkpoint(s):\n  " + "\n  ".join(failures) + f"\nResuming from {path}.",
                UserWarning,
                stacklevel=2,
            )
        return path, state
    raise CheckpointError("No checkpoint could be loaded:\n  " + "\n  ".join(failures))


# ----------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and CUDA, in a ``weights_only``-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where CUDA is in use)."""
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
