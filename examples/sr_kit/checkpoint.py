"""One-file training checkpoints: written atomically, CRC-verified on load, the last K kept, RNG states included.

A checkpoint is a dict of tensors and plain containers (``torch.save``; read back with
``weights_only=True``), written to a temporary file, fsynced and renamed over its name: a crash
or a full disk leaves the previous checkpoints untouched. Damage is found by the CRC-32 of the
archive's records (the library's reader) and is an error naming the file.
:class:`RunLock` admits one run per folder, so every temporary file found there is a leftover.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import socket
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from sed_discriminator.weights import read_checkpoint, torch_is_patched

FORMAT = "sed-esrgan-checkpoint/1"
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """No usable checkpoint (the message says which files were tried and why they failed)."""


class DiskFullError(CheckpointError):
    """A save failed because the disk (or the quota) is full; the previous file is intact."""


class RunFolderBusy(RuntimeError):
    """Another process holds the lock of the run folder."""


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


DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)  # no space, quota, file size
_LOW_SPACE = 1 << 20  # bytes: what is left when a write stopped for want of space


def _free_bytes(folder: Path) -> int | None:
    try:
        usage = os.statvfs(folder)
    except (AttributeError, OSError):  # no statvfs on Windows
        return None
    return usage.f_bavail * usage.f_frsize


def _disk_full(err: BaseException, folder: Path) -> bool:
    # torch's archive writer can replace the ENOSPC of a failed write by "unexpected pos": the free space tells then.
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return True
        cause = cause.__cause__ or cause.__context__
    free = _free_bytes(folder) if "unexpected pos" in str(err) else None
    return free is not None and free < _LOW_SPACE


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """``write(handle)`` into a temporary file beside ``path``, fsync, rename over ``path``.

    If anything fails (an exception, a full disk, a signal) the temporary file is removed and
    ``path`` keeps its previous content (or stays absent).

    Raises:
        DiskFullError: the disk or the quota is full (the message says the earlier files are intact).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as err:
        full = _disk_full(err, path.parent)  # before the unlink gives the space back
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(f"Cannot write {path}: the disk holding {path.parent} is full ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else 'No space left on device'}). Nothing was "
                                "replaced: the files already there are intact. Free some space (or raise the quota), "
                                "then run again (training: --resume).") from err  # fmt: skip
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """``rows`` as CSV with a header (keys outside ``columns`` ignored) through :func:`atomic_write`."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, lambda handle: handle.write(text.getvalue().encode()))


# The temporary files of atomic_write for what the training script writes (".step_00000002.pt.tmp-PID").
_TEMPORARY = re.compile(
    r"^\.(step_\d+\.pt|generator_final\.(pth|safetensors)|log\.csv|config\.json|(loss_curves|latest|step_\d+)\.png)"
    r"\.tmp-\d+$"
)


def remove_stale_temporaries(folders: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the temporary files that interrupted writes left in ``folders`` (not recursive); returns them.

    Call it only while holding the folder's :class:`RunLock`: then no other process writes there.
    """
    removed = []
    for folder in map(Path, folders):
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            if _TEMPORARY.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


class RunLock:
    """Exclusive POSIX lock on ``folder/.lock`` while a run writes into ``folder``; ``held`` says whether it is.

    The lock belongs to this process (forked DataLoader workers do not inherit it) and ends with
    it however it ends. Where the file system has no locks, a warning says so and ``held`` is false.

    Raises:
        RunFolderBusy: another process holds it (the message names its PID and host).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.held = False
        self._handle = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # Windows
            self._unsupported("this platform has no fcntl locks")
            return
        try:
            fcntl.lockf(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):  # e.g. a network file system without locks
                self._unsupported(f"{type(err).__name__}: {err}")
                return
            self._handle.seek(0)
            owner = self._handle.read().strip() or "unknown"
            self._handle.close()
            raise RunFolderBusy(f"Another run is writing to {str(self.path.parent)!r} (lock {self.path.name} held by "
                                f"{owner}). Wait for it to end or stop it, or choose another --out: two runs in one "
                                "folder overwrite each other.") from None  # fmt: skip
        self.held = True
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        self._handle.flush()

    def _unsupported(self, reason: str) -> None:
        warnings.warn(f"Cannot lock {self.path} ({reason}): a second run started into the same folder would not be "
                      "detected.", UserWarning, stacklevel=3)  # fmt: skip

    def release(self) -> None:
        """Unlock (the file stays: deleting it would let two processes lock different files)."""
        if not self._handle.closed:
            self._handle.close()  # closing the descriptor releases the lock
        self.held = False

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints in ``folder``, oldest first (temporary files are ignored)."""
    paths = Path(folder).iterdir() if Path(folder).is_dir() else ()
    return sorted((int(m.group(1)), path) for path in paths if (m := _NAME.match(path.name)))


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints of ``folder``; returns the deleted paths."""
    doomed = [path for _, path in list_checkpoints(folder)[:-keep]] if keep > 0 else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint of this script; :class:`CheckpointError` names what is wrong with the file.

    The library's reader checks the archive's CRC-32s first (``torch.load`` never does), then loads
    tensors and plain containers only (``weights_only``). On torch < 2.10, where that has known
    escapes, the script's own files are trusted: it reads them there as it wrote them.
    """
    try:
        state = read_checkpoint(path, trust_pickle=not torch_is_patched())
    except (OSError, ValueError) as err:
        raise CheckpointError(str(err)) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this script (format {FORMAT}).")
    return state


def find_resumable(folder: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """``(path, state)`` of the newest checkpoint of ``folder`` that loads (newer broken ones: a warning)."""
    candidates = list_checkpoints(folder)
    if not candidates:
        raise CheckpointError(f"Nothing to resume: no step_*.pt checkpoint in {str(folder)!r}. Check --out, or pass "
                              "the file with --resume PATH (or start again: --overwrite instead of "
                              "--resume).")  # fmt: skip
    failures = []
    for _, path in reversed(candidates):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            failures.append(str(err))
            continue
        if failures:
            warnings.warn("Skipped unreadable newer checkpoint(s):\n  " + "\n  ".join(failures)
                          + f"\nResuming from {path}.", UserWarning, stacklevel=2)  # fmt: skip
        return path, state
    raise CheckpointError("No checkpoint could be loaded:\n  " + "\n  ".join(failures))


# ----------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """torch's CPU and CUDA RNG states. Python's and numpy's global RNGs are not saved: the data draws from
    generators seeded per sample (:mod:`.data`), and nothing else in the main process draws from them."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where CUDA is in use)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
