"""examples/sr_kit/checkpoint.py: atomic writes, keep-last-K, choosing what to resume, RNG states."""

from __future__ import annotations

import random

from examples_helpers import one_thread  # noqa: F401  (examples/ on sys.path; autouse fixture)
import numpy as np
import pytest
import torch
from sr_kit import checkpoint as C


def _state(step: int) -> dict:
    return {"format": C.FORMAT, "step": step, "weights": torch.full((64, 64), float(step))}


def test_failure_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / C.checkpoint_name(1)
    C.atomic_save(_state(1), path)
    real_save = torch.save

    def dies_half_way(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(handle.tell() // 2)  # half of the bytes are on disk...
        raise OSError(28, "No space left on device")  # ...when the disk fills up

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        C.atomic_save(_state(2), path)
    monkeypatch.undo()
    assert C.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind


def test_interrupted_save_under_a_new_name_is_invisible(tmp_path, monkeypatch):
    C.atomic_save(_state(1), tmp_path / C.checkpoint_name(1))
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        C.atomic_save(_state(2), tmp_path / C.checkpoint_name(2))
    monkeypatch.undo()
    path, state = C.find_resumable(tmp_path)
    assert state["step"] == 1 and path.name == C.checkpoint_name(1)


def test_resume_skips_a_broken_newest_checkpoint_loudly(tmp_path):
    C.atomic_save(_state(5), tmp_path / C.checkpoint_name(5))
    (tmp_path / C.checkpoint_name(10)).write_bytes(b"PK\x03\x04 truncated by a non-atomic writer")
    (tmp_path / f".{C.checkpoint_name(15)}.tmp-123").write_bytes(b"left by a kill -9")
    with pytest.warns(UserWarning, match=r"(?s)step_00000010\.pt cannot be read.*Resuming from .*step_00000005\.pt"):
        path, state = C.find_resumable(tmp_path)
    assert state["step"] == 5


def test_resume_errors_name_the_folder_and_files(tmp_path):
    with pytest.raises(C.CheckpointError, match=r"Nothing to resume.*--resume PATH"):
        C.find_resumable(tmp_path)
    (tmp_path / C.checkpoint_name(3)).write_bytes(b"garbage")
    with pytest.raises(C.CheckpointError, match=r"(?s)No checkpoint could be loaded.*step_00000003\.pt cannot be read"):
        C.find_resumable(tmp_path)
    torch.save({"params": {}}, tmp_path / "other.pt")
    with pytest.raises(C.CheckpointError, match="not a training checkpoint"):
        C.load_checkpoint(tmp_path / "other.pt")


def test_keep_last_k(tmp_path):
    for step in (100, 200, 300, 400):
        C.atomic_save(_state(step), tmp_path / C.checkpoint_name(step))
    deleted = C.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == [C.checkpoint_name(100), C.checkpoint_name(200)]
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [300, 400]


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    C.atomic_save({"format": C.FORMAT, "rng": C.rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    C.set_rng_state(C.load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
