"""examples/sr_kit/checkpoint.py: atomic writes, keep-last-K, choosing what to resume, RNG states."""

from __future__ import annotations

import os

import pytest
import torch
from examples_helpers import lock_held_elsewhere, one_thread  # noqa: F401  (examples/ on sys.path; autouse fixture)
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
    with pytest.raises(C.DiskFullError, match=r"the disk holding .* is full .*No space left.*intact"):
        C.atomic_save(_state(2), path)
    monkeypatch.undo()
    assert C.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_real_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / C.checkpoint_name(1)
    C.atomic_save(_state(1), path)
    monkeypatch.setattr(C, "open", lambda tmp, mode: open("/dev/full", mode), raising=False)  # every write: ENOSPC
    with pytest.raises(C.DiskFullError, match=r"step_00000001\.pt: the disk holding .* is full"):
        C.atomic_save(_state(2), path)
    monkeypatch.undo()
    assert C.load_checkpoint(path)["step"] == 1


def test_torch_writer_error_is_reported_as_a_full_disk_only_when_space_ran_out(tmp_path, monkeypatch):
    lost_errno = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(lost_errno))
    monkeypatch.setattr(C, "_free_bytes", lambda folder: 4096)
    with pytest.raises(C.DiskFullError, match="is full"):
        C.atomic_save(_state(1), tmp_path / "a.pt")
    monkeypatch.setattr(C, "_free_bytes", lambda folder: 10 << 30)
    with pytest.raises(RuntimeError, match="unexpected pos") as caught:
        C.atomic_save(_state(1), tmp_path / "a.pt")
    assert not isinstance(caught.value, C.DiskFullError)
    assert list(tmp_path.iterdir()) == []


def _damage(path, how):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    if how == "flip64":
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    else:
        data[middle - 2048 : middle + 2048] = bytes(4096)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip64", "zero4k"])
def test_damaged_checkpoint_fails_its_checksum_and_resume_takes_the_previous_one(tmp_path, how):
    for step in (1, 2):
        C.atomic_save({**_state(step), "weights": torch.rand(64, 64)}, tmp_path / C.checkpoint_name(step))
    newest = tmp_path / C.checkpoint_name(2)
    _damage(newest, how)
    if how == "flip64":  # torch.load alone reads the damaged weights without a word
        assert torch.load(newest, weights_only=True)["step"] == 2
    with pytest.raises(C.CheckpointError, match=r"step_00000002\.pt' is damaged: entry .* does not match its CRC-32"):
        C.load_checkpoint(newest)
    with pytest.warns(UserWarning, match=r"(?s)step_00000002\.pt' is damaged.*Resuming from .*step_00000001\.pt"):
        path, state = C.find_resumable(tmp_path)
    assert state["step"] == 1 and path.name == C.checkpoint_name(1)


def test_stale_temporaries_are_removed(tmp_path):
    names = [f".{C.checkpoint_name(3)}.tmp-123", f".log.csv.tmp-{os.getpid()}", ".latest.png.tmp-7"]
    for name in names + [".notes.txt.tmp-1", ".latest.png.tmp"]:  # not the script's temporaries: kept
        (tmp_path / name).write_bytes(b"left by a kill -9")
    C.atomic_save(_state(1), tmp_path / C.checkpoint_name(1))
    removed = C.remove_stale_temporaries([tmp_path, tmp_path / "missing"])
    assert sorted(p.name for p in removed) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".latest.png.tmp", ".notes.txt.tmp-1", C.checkpoint_name(1)]


def test_run_lock_admits_one_run_per_folder(tmp_path):
    with lock_held_elsewhere(tmp_path) as holder:
        with pytest.raises(C.RunFolderBusy, match=rf"Another run is writing to .*PID {holder.pid} on"):
            C.RunLock(tmp_path)
    with C.RunLock(tmp_path) as again:  # the holder has ended: the next run gets it
        assert again.held


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
    with pytest.warns(UserWarning, match=r"(?s)step_00000010\.pt'.* truncated.*Resuming from .*step_00000005\.pt"):
        path, state = C.find_resumable(tmp_path)
    assert state["step"] == 5


def test_resume_errors_name_the_folder_and_files(tmp_path):
    with pytest.raises(C.CheckpointError, match=r"Nothing to resume.*--resume PATH"):
        C.find_resumable(tmp_path)
    (tmp_path / C.checkpoint_name(3)).write_bytes(b"garbage")
    with pytest.raises(C.CheckpointError, match=r"(?s)No checkpoint could be loaded.*step_00000003\.pt' is "):
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
    torch.manual_seed(3)
    C.atomic_save({"format": C.FORMAT, "rng": C.rng_state()}, tmp_path / "r.pt")
    expected = torch.rand(2)
    torch.manual_seed(9)
    C.set_rng_state(C.load_checkpoint(tmp_path / "r.pt")["rng"])
    assert torch.equal(torch.rand(2), expected)
