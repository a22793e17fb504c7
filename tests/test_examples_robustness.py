"""examples/retrofit_esrgan.py under attack: signals to the process group, damaged files, reused folders, bad inputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from examples_helpers import (  # noqa: F401  (one_thread: autouse fixture)
    EXAMPLES,
    ROOT,
    TINY_ARGS,
    assert_same,
    hr_folder,
    lock_held_elsewhere,
    log_rows,
    one_thread,
    train,
    write_images,
)
from sr_kit import checkpoint as C
from sr_kit import data as D

pytestmark = pytest.mark.filterwarnings("ignore:SemanticExtractor.*RANDOM weights:UserWarning")

# The model and optimiser states of a checkpoint (the config differs when --total-steps does).
STATE_KEYS = ("generator", "discriminator", "opt_g", "opt_d", "sched_g", "sched_d", "scaler", "rng", "step")


def _assert_same_checkpoint(path_a, path_b):
    a, b = C.load_checkpoint(path_a), C.load_checkpoint(path_b)
    for key in STATE_KEYS:
        assert_same(a[key], b[key], key)


def _ckpt(tmp_path, run, step):
    return tmp_path / run / "checkpoints" / C.checkpoint_name(step)


# ---------------------------------------------------------------------- 1. SIGTERM to the group


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_bit_for_bit(tmp_path):
    hr = hr_folder(tmp_path)
    out = tmp_path / "run"
    args = list(TINY_ARGS)
    args[args.index("--workers") + 1] = "2"  # real worker processes, in the signalled group
    cmd = [sys.executable, str(EXAMPLES / "retrofit_esrgan.py"), "--hr-dir", str(hr), "--out", str(out), *args,
           "--discriminator", "patch", "--total-steps", "100000"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 240  # a loaded 2-core machine: wait for progress, not for a fixed time
        while time.time() < deadline and proc.poll() is None:
            if (out / "log.csv").exists() and len(log_rows(out)) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGTERM)  # what SLURM and `kill -TERM -PGID` do: workers get it too
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Received SIGTERM: saving a checkpoint" in stderr and "killed by signal" not in stderr
    assert "interrupted (SIGTERM)" in stdout and "--resume" in stdout
    ((step, path),) = C.list_checkpoints(out / "checkpoints")
    assert C.load_checkpoint(path)["step"] == step >= 2

    # The resumed run (in-process, no workers: the data does not depend on them) matches a straight run.
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", str(step + 1), "--resume") == 0
    assert train(tmp_path, "straight", "--discriminator", "patch", "--total-steps", str(step + 1)) == 0
    _assert_same_checkpoint(_ckpt(tmp_path, "run", step + 1), _ckpt(tmp_path, "straight", step + 1))


class _Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return os.getpid()


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="the sender of a signal is known on Linux only")
def test_a_worker_ignores_sigterm_from_others_but_not_from_its_parent():
    loader = torch.utils.data.DataLoader(_Pids(), batch_size=1, num_workers=1, worker_init_fn=D.seed_worker)
    batches = iter(loader)
    pid = int(next(batches))
    subprocess.run(["kill", "-TERM", str(pid)], check=True)  # like SLURM's: another process sends it
    subprocess.run(["kill", "-INT", str(pid)], check=True)
    assert int(next(batches)) == pid  # still serving
    os.kill(pid, signal.SIGTERM)  # the DataLoader's way to end a worker that does not stop
    deadline = time.time() + 60
    while time.time() < deadline and os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}") or "Z" in _state(pid)  # gone (or a zombie until reaped)
    del batches


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# ------------------------------------------------------------------- 2, 3. folders of earlier runs


def test_earlier_run_outputs_without_checkpoints_are_an_error_unless_overwrite(tmp_path, capsys):
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "1") == 0
    run = tmp_path / "run"
    for path in C.list_checkpoints(run / "checkpoints"):
        path[1].unlink()
    log_before = (run / "log.csv").read_bytes()
    final_before = (run / "generator_final.pth").read_bytes()
    capsys.readouterr()
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "1") == 2
    err = capsys.readouterr().err
    assert "already holds the outputs of a run" in err
    assert all(name in err for name in ("log.csv", "generator_final.pth", "config.json", "--overwrite", "--resume"))
    assert (run / "log.csv").read_bytes() == log_before and (run / "generator_final.pth").read_bytes() == final_before

    (run / "notes.txt").write_text("mine")  # not a run output: --overwrite leaves it alone
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "1", "--overwrite") == 0
    assert "--overwrite: deleted" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "mine" and len(log_rows(run)) == 1


def test_the_same_command_twice_into_one_folder_is_refused_the_second_time(tmp_path, capsys):
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "1") == 0
    checkpoint = _ckpt(tmp_path, "run", 1).read_bytes()
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "1") == 2
    assert "already holds the outputs of a run" in capsys.readouterr().err
    assert _ckpt(tmp_path, "run", 1).read_bytes() == checkpoint


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, capsys):
    with lock_held_elsewhere(tmp_path / "run") as holder:
        assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "1") == 2
    assert f"Another run is writing to {str(tmp_path / 'run')!r} (lock .lock held by PID {holder.pid}" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run" / "log.csv").exists()


def test_demo_preset_never_deletes_an_existing_run(tmp_path, capsys):
    import retrofit_esrgan

    assert not retrofit_esrgan.parse_args(["--preset", "demo"]).overwrite
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "1") == 0
    run = tmp_path / "run"
    before = sorted(p.name for p in run.rglob("*"))
    capsys.readouterr()
    assert retrofit_esrgan.main(["--preset", "demo", "--out", str(run)]) == 2
    assert "already holds the outputs of a run" in capsys.readouterr().err
    assert sorted(p.name for p in run.rglob("*")) == before  # no checkpoint deleted, no demo photo written


def test_demo_photos_are_not_mixed_with_images_the_demo_did_not_write(tmp_path):
    write_images(tmp_path / "data" / "train", [np.zeros((8, 8, 3), np.uint8)], names=["holiday"])
    with pytest.raises(D.DataError, match=r"holiday\.png"):
        D.export_demo_photos(tmp_path / "data")
    assert (tmp_path / "data" / "train" / "holiday.png").exists()


# ---------------------------------------------------------------------- 4. damaged checkpoints


def test_resume_skips_a_damaged_checkpoint_with_a_warning_naming_it(tmp_path):
    assert train(tmp_path, "run", "--discriminator", "patch", "--checkpoint-every", "1", "--keep-last", "5") == 0
    newest = _ckpt(tmp_path, "run", 2)
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"(?s)step_00000002\.pt' is damaged.*Resuming from .*step_00000001\.pt"):
        assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "3", "--resume") == 0
    assert train(tmp_path, "straight", "--discriminator", "patch", "--total-steps", "3") == 0
    _assert_same_checkpoint(_ckpt(tmp_path, "run", 3), _ckpt(tmp_path, "straight", 3))


# ----------------------------------------------------------------- 5. errors in the middle of a run


@pytest.mark.slow
def test_an_image_that_stops_decoding_saves_the_steps_done_then_reports_it(tmp_path, monkeypatch, capsys):
    real_getitem = D.SRTrainDataset.__getitem__
    calls = []

    def breaks_at_step_4(self, key):
        calls.append(key)
        if len(calls) == 7:  # the first sample of step 4 (batch 2)
            raise D.DataError("Cannot read image 'hr/img01.png': OSError: image file is truncated")
        return real_getitem(self, key)

    monkeypatch.setattr(D.SRTrainDataset, "__getitem__", breaks_at_step_4)
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "6") == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "error: Cannot read image 'hr/img01.png': OSError: image file is truncated" in err
    assert "saving a checkpoint of step 3" in err and "--resume" in err
    assert [s for s, _ in C.list_checkpoints(tmp_path / "run" / "checkpoints")] == [3]
    assert train(tmp_path, "straight", "--discriminator", "patch", "--total-steps", "3") == 0
    _assert_same_checkpoint(_ckpt(tmp_path, "run", 3), _ckpt(tmp_path, "straight", 3))


@pytest.mark.slow
def test_an_error_inside_a_step_saves_the_state_before_that_step(tmp_path, monkeypatch, capsys):
    import retrofit_esrgan

    real_loss = retrofit_esrgan.discriminator_loss
    calls = []

    def fails_in_step_3(*args, **kwargs):  # after G's backward and D's forwards moved the spectral-norm vectors
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(retrofit_esrgan, "discriminator_loss", fails_in_step_3)
    with pytest.raises(RuntimeError, match=r"^CUDA out of memory \(simulated\)$"):  # the original error, unchanged
        train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "5")
    monkeypatch.undo()
    assert "saving a checkpoint of step 2" in capsys.readouterr().err
    assert train(tmp_path, "straight", "--discriminator", "patch", "--total-steps", "2") == 0
    _assert_same_checkpoint(_ckpt(tmp_path, "run", 2), _ckpt(tmp_path, "straight", 2))


def test_an_error_before_the_first_step_saves_nothing(tmp_path, monkeypatch):
    import retrofit_esrgan

    monkeypatch.setattr(retrofit_esrgan, "generator_loss", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        train(tmp_path, "run", "--discriminator", "patch")
    assert C.list_checkpoints(tmp_path / "run" / "checkpoints") == []


# --------------------------------------------------------------------- 6. leftovers of killed writes


def test_temporary_files_of_killed_writes_are_removed_at_start(tmp_path, capsys):
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "1") == 0
    folder = tmp_path / "run" / "checkpoints"
    leftovers = [folder / f".{C.checkpoint_name(2)}.tmp-{os.getpid()}", folder / f".{C.checkpoint_name(3)}.tmp-1",
                 tmp_path / "run" / ".log.csv.tmp-1"]  # fmt: skip
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "2", "--resume") == 0
    assert "Removed 3 temporary file(s) left by an interrupted run" in capsys.readouterr().err
    assert not any(path.exists() for path in leftovers)


# --------------------------------------------------------------------------- 9. 16-bit images


def test_16_bit_images_are_refused_by_name_not_clipped(tmp_path):
    from PIL import Image

    Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16)).save(tmp_path / "dark16.png")
    assert Image.open(tmp_path / "dark16.png").mode.startswith("I")  # PIL's RGB conversion would clip it
    with pytest.raises(D.DataError, match=r"dark16\.png.*16/32-bit integer images are not supported .*8 bits"):
        D.read_image(tmp_path / "dark16.png")


def test_float_images_are_refused_by_name(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(D.DataError, match=r"float\.tif.*floating-point images are not supported"):
        D.read_image(tmp_path / "float.tif")


# ---------------------------------------------------------- 10. architecture flags on --resume


@pytest.mark.parametrize(("flag", "value"), [("--num-feat", "16"), ("--num-blocks", "2"), ("--d-width", "16")])
def test_resume_with_another_architecture_names_the_flag_and_both_values(tmp_path, capsys, flag, value):
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "1") == 0
    given = TINY_ARGS[TINY_ARGS.index(flag) + 1]
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "2", "--resume", flag, value) == 2
    assert f"{flag} {given} (checkpoint) vs {value} (command line)" in capsys.readouterr().err
    assert [s for s, _ in C.list_checkpoints(tmp_path / "run" / "checkpoints")] == [1]


# ------------------------------------------------------------------------------ weight files


@pytest.mark.parametrize("content", [b"", b"these are not weights\n", "truncated"], ids=["empty", "text", "truncated"])
@pytest.mark.parametrize("random_allowed", [False, True], ids=["strict", "random-allowed"])
def test_broken_weight_files_are_named_whatever_allow_random_says(tmp_path, capsys, content, random_allowed):
    if content == "truncated":
        buffer = tmp_path / "full.pt"
        torch.save({"conv.weight": torch.zeros(64, 64)}, buffer)
        content = buffer.read_bytes()[:5000]
    extra = ["--allow-random-weights"] if random_allowed else []
    bad = tmp_path / "RN50.pt"
    bad.write_bytes(content)
    assert train(tmp_path, "run", "--discriminator", "sed-patch", "--extractor-weights", str(bad), *extra) == 2
    err = capsys.readouterr().err
    assert f"--extractor-weights {str(bad)!r} cannot be loaded" in err and "Download the file again" in err
    assert ("it is empty" in err) == (content == b"") and "Traceback" not in err
    vgg = tmp_path / "vgg19.pth"
    vgg.write_bytes(content)
    args = ["--discriminator", "pixel", "--perceptual-weight", "1", "--vgg-weights", str(vgg), *extra]
    assert train(tmp_path, "run", *args) == 2
    err = capsys.readouterr().err
    assert f"--vgg-weights {str(vgg)!r} cannot be loaded as VGG19 weights" in err and "RANDOM WEIGHTS" not in err


def test_a_sound_file_the_trust_rule_refuses_is_not_called_damaged(tmp_path, capsys):
    with warnings.catch_warnings():  # torch.jit is deprecated; OpenAI's RN50.pt is such an archive
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 1)), tmp_path / "RN50.pt")
    args = ["--discriminator", "sed-patch", "--extractor-weights", str(tmp_path / "RN50.pt"), "--allow-random-weights"]
    assert train(tmp_path, "run", *args) == 2
    err = capsys.readouterr().err
    assert "TorchScript" in err and "On this command line: add --trust-pickle." in err
    assert "Download the file again" not in err and "RANDOM WEIGHTS" not in err


def test_damaged_vgg_archive_is_caught_by_its_checksum(tmp_path):
    from sr_kit import models as M

    features, _ = M.load_vgg19_features("random")
    path = tmp_path / "vgg19.pth"
    torch.save(features.state_dict(), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(M.DamagedWeights, match=r"(?s)vgg19\.pth.*CRC-32"):
        M.load_vgg19_features(str(path), allow_random=True)


def test_missing_extractor_weights_fall_back_like_missing_vgg_weights(tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "RN50.pt")
    args = ["--discriminator", "sed-patch", "--extractor-weights", missing, "--allow-random-weights",
            "--total-steps", "1"]  # fmt: skip
    assert train(tmp_path, "run", *args) == 0
    out = capsys.readouterr()
    assert "RANDOM WEIGHTS: semantic extractor" in out.err and "RANDOM weights for: semantic extractor" in out.out


# ------------------------------------------------------------------------- validation images


@pytest.mark.parametrize("side", [10, 3])
def test_too_small_validation_image_is_named_at_start(tmp_path, capsys, side):
    val = tmp_path / "val"
    write_images(val, [np.full((side, side, 3), 128, np.uint8)], names=["tiny"])
    assert train(tmp_path, "run", "--discriminator", "patch", "--val-dir", str(val)) == 2
    err = capsys.readouterr().err
    assert f"tiny.png ({side}x{side} px)" in err and "at least 12x12 px" in err
    assert not (tmp_path / "run" / "log.csv").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_too_small_sample_size_is_a_usage_error(tmp_path, capsys):
    assert train(tmp_path, "run", "--sample-size", "8") == 2
    assert "--sample-size 8 is too small for x4" in capsys.readouterr().err


def test_an_error_from_a_worker_is_reported_with_its_own_message():
    import retrofit_esrgan
    from torch._utils import ExceptionWrapper  # how the DataLoader carries a worker's exception

    try:
        raise D.DataError("Cannot read image 'hr/img01.png': OSError: image file is truncated")
    except D.DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(D.DataError) as caught:
        wrapped.reraise()
    assert "Original Traceback" in str(caught.value)
    assert retrofit_esrgan._user_message(caught.value) == (
        "Cannot read image 'hr/img01.png': OSError: image file is truncated"
    )


def test_a_full_disk_outside_a_checkpoint_save_is_reported_as_such(tmp_path, monkeypatch, capsys):
    import retrofit_esrgan

    def full(self, row):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(retrofit_esrgan.CsvLog, "append", full)
    assert train(tmp_path, "run", "--discriminator", "patch") == 2
    err = capsys.readouterr().err
    assert "error: the disk holding --out" in err and "is full" in err and "Traceback" not in err
