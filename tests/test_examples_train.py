"""examples/retrofit_esrgan.py: every discriminator, exact resume, atomic checkpoints, DDP, errors, the demo."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from examples_helpers import (  # noqa: F401  (one_thread: autouse fixture)
    EXAMPLES,
    ROOT,
    TINY_ARGS,
    assert_same,
    hr_folder,
    log_rows,
    one_thread,
    photo_crops,
    train,
    write_images,
)  # fmt: skip
from sr_kit import checkpoint as C
from sr_kit.models import DISCRIMINATORS, load_generator_weights

pytestmark = pytest.mark.filterwarnings("ignore:SemanticExtractor.*RANDOM weights:UserWarning")


# ------------------------------------------------------------------------------- smoke runs


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DISCRIMINATORS))
def test_each_discriminator_trains(tmp_path, kind, capsys):
    extra = ["--discriminator", kind, "--diagnostics-every", "1"]
    if kind == "sed-patch":  # also cover the perceptual loss, RaGAN and the EMA once
        extra += ["--perceptual-weight", "0.1", "--gan-loss", "ragan", "--ema", "0.99"]
    assert train(tmp_path, "run", *extra) == 0
    run = tmp_path / "run"
    state = C.load_checkpoint(run / "checkpoints" / C.checkpoint_name(2))
    assert state["step"] == 2 and state["config"]["discriminator"] == kind
    assert not any("extractor" in k or "trunk" in k for k in state["discriminator"])  # CLIP is never saved
    rows = log_rows(run)
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(float(r["l_d"]) > 0 and float(r["l_gan"]) > 0 for r in rows)
    diagnostics = ["sem_influence", "attn_sharpness_att1", "attn_sharpness_att2", "attn_sharpness_att3"]
    assert set(diagnostics) <= set(rows[0])  # the columns are there for every discriminator...
    for row in rows:  # ...and filled for SeD: influence >= 0 (0 for the pixel SeD at init), sharpness in [0, 1]
        values = [float(row[k]) if row[k] else None for k in diagnostics]
        if kind.startswith("sed-"):
            assert values[0] >= 0 and all(0 <= v <= 1 for v in values[1:]), row
            if kind == "sed-pixel" and row["step"] == "1":  # before D's first update: proj_out is zero
                assert values[0] == 0.0
        else:
            assert values == [None] * 4
    assert (run / "samples" / "latest.png").exists() and (run / "loss_curves.png").exists()
    generator = load_generator_weights(run / "generator_final.pth", scale=4)  # spandrel-loadable export
    assert generator(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)
    shared = load_generator_weights(run / "generator_final.safetensors", scale=4)  # the pickle-free copy
    ema_or_raw = "params_ema" if kind == "sed-patch" else "params"
    assert_same(shared.state_dict(), torch.load(run / "generator_final.pth", weights_only=True)[ema_or_raw])
    out = capsys.readouterr()
    assert "Training finished at step 2/2" in out.out and str(run / "checkpoints") in out.out
    assert ("RANDOM WEIGHTS" in out.err) == kind.startswith("sed-")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--amp", "bf16", "--channels-last"], ["--amp", "fp16"]], ids=["bf16-nhwc", "fp16"])
def test_mixed_precision_runs_and_checkpoints_its_scalers(tmp_path, flags):
    assert train(tmp_path, "run", "--discriminator", "sed-pixel", "--total-steps", "1", *flags) == 0
    state = C.load_checkpoint(tmp_path / "run" / "checkpoints" / C.checkpoint_name(1))
    assert all(torch.isfinite(v).all() for v in state["generator"].values())
    if "fp16" in flags:
        assert state["scaler"]["scale"] > 0
    assert train(tmp_path, "run", "--discriminator", "sed-pixel", "--total-steps", "2", "--resume", *flags) == 0


# ----------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_interrupt_and_resume_gives_the_same_weights_as_a_straight_run(tmp_path):
    common = ["--discriminator", "sed-patch", "--total-steps", "5", "--psnr-steps", "1", "--milestones", "3",
              "--ema", "0.9", "--workers", "1", "--perceptual-weight", "0.1", "--checkpoint-every", "2",
              "--keep-last", "5", "--deterministic"]  # fmt: skip
    assert train(tmp_path, "straight", *common) == 0

    # Stop after step 3, and lose that step's checkpoint as a kill -9 would: resume from step 2.
    assert train(tmp_path, "split", *common, "--run-steps", "3") == 0
    split = tmp_path / "split"
    assert [s for s, _ in C.list_checkpoints(split / "checkpoints")] == [2, 3]
    (split / "checkpoints" / C.checkpoint_name(3)).unlink()
    assert train(tmp_path, "split", *common, "--resume") == 0

    straight = C.load_checkpoint(tmp_path / "straight" / "checkpoints" / C.checkpoint_name(5))
    resumed = C.load_checkpoint(split / "checkpoints" / C.checkpoint_name(5))
    for key in ("generator", "discriminator", "opt_g", "opt_d", "sched_g", "sched_d", "ema", "rng", "step"):
        assert_same(straight[key], resumed[key], key)
    # Same data order and losses at every step; the log holds each step once.
    timing = ("sec_per_step", "img_per_sec")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(log_rows(tmp_path / "straight")) == strip(log_rows(split))
    assert [int(r["step"]) for r in log_rows(split)] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_failed_save_keeps_the_previous_checkpoint_and_training_resumes(tmp_path, monkeypatch, capsys):
    real_save = torch.save
    calls = []

    def fails_on_second_checkpoint(obj, handle, *args, **kwargs):
        calls.append(1)
        real_save(obj, handle, *args, **kwargs)
        if len(calls) == 2:
            handle.truncate(100)
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fails_on_second_checkpoint)
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "3", "--checkpoint-every", "1") == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "step_00000002.pt: the disk holding" in err and "is full" in err and "intact" in err
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == [C.checkpoint_name(1)]
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "3", "--resume") == 0
    assert C.load_checkpoint(folder / C.checkpoint_name(3))["step"] == 3


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_then_resume_continues(tmp_path):
    hr = hr_folder(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, str(EXAMPLES / "retrofit_esrgan.py"), "--hr-dir", str(hr), "--out", str(out), *TINY_ARGS,
           "--discriminator", "patch", "--total-steps", "100000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.csv").exists() and len(log_rows(out)) >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Received SIGINT" in stderr and "interrupted (SIGINT)" in stdout and "--resume" in stdout
    ((step, path),) = C.list_checkpoints(out / "checkpoints")
    assert C.load_checkpoint(path)["step"] == step >= 1
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", str(step + 1), "--resume") == 0
    assert [s for s, _ in C.list_checkpoints(out / "checkpoints")] == [step, step + 1]


# ------------------------------------------------------------------------------------ errors


def test_missing_and_empty_data_folders(tmp_path, capsys):
    assert train(tmp_path, "run", hr=tmp_path / "nope") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train(tmp_path, "run", hr=tmp_path / "empty") == 2
    assert "contains no image" in capsys.readouterr().err


def test_unreadable_images_are_named(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "0001.png").write_bytes(b"not an image")
    assert train(tmp_path, "run", hr=folder) == 2
    err = capsys.readouterr().err
    assert "1 unusable training image(s)" in err and "0001.png: unreadable" in err
    write_images(folder, [torch.zeros(48, 48, 3, dtype=torch.uint8).numpy()], names=["0002"])
    assert train(tmp_path, "run", hr=folder) == 2  # one good image does not make the broken one go unnoticed
    assert "0001.png" in capsys.readouterr().err


def test_run_folder_protection_and_resume_errors(tmp_path, capsys):
    assert train(tmp_path, "run", "--discriminator", "patch", "--resume") == 2
    assert "Nothing to resume" in capsys.readouterr().err
    assert train(tmp_path, "run", "--discriminator", "patch", "--total-steps", "1") == 0
    assert train(tmp_path, "run", "--discriminator", "patch") == 2
    err = capsys.readouterr().err
    assert "already holds the outputs of a run" in err and "step_00000001.pt" in err and "--overwrite" in err
    assert train(tmp_path, "run", "--discriminator", "pixel", "--resume") == 2
    assert "--discriminator 'patch' (checkpoint) vs 'pixel'" in capsys.readouterr().err


def test_missing_pretrained_weights_fail_unless_random_ones_are_allowed(tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "RN50.pt")
    assert train(tmp_path, "run", "--discriminator", "sed-pixel", "--extractor-weights", missing) == 2
    err = capsys.readouterr().err
    assert "No weight file" in err and "--allow-random-weights" in err
    vgg_missing = ["--discriminator", "pixel", "--perceptual-weight", "1", "--vgg-weights", str(tmp_path / "vgg19.pth")]
    assert train(tmp_path, "run", *vgg_missing) == 2
    assert "VGG19 weights" in capsys.readouterr().err
    assert train(tmp_path, "run", *vgg_missing, "--allow-random-weights", "--total-steps", "1") == 0
    out = capsys.readouterr()
    assert "RANDOM WEIGHTS: VGG19" in out.err and "RANDOM weights for: VGG19" in out.out


def test_bad_arguments(tmp_path, capsys):
    import retrofit_esrgan

    assert retrofit_esrgan.main(["--out", str(tmp_path / "x")]) == 2
    assert "--hr-dir" in capsys.readouterr().err
    assert train(tmp_path, "run", "--patch-size", "34") == 2
    assert "multiple of --scale" in capsys.readouterr().err


def test_demo_preset_defaults_and_overrides():
    import retrofit_esrgan

    args = retrofit_esrgan.parse_args(["--preset", "demo"])
    assert args.out == "runs/demo" and args.allow_random_weights and args.discriminator == "sed-patch"
    assert args.perceptual_weight == 0.1 and args.patch_size == 96
    args = retrofit_esrgan.parse_args(["--preset", "demo", "--patch-size", "64", "--discriminator", "sed-pixel"])
    assert args.patch_size == 64 and args.perceptual_weight == 1.0


# --------------------------------------------------------------------------- subprocess runs


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


@pytest.mark.slow
def test_demo_preset_falls_back_loudly_and_prints_its_outputs(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, str(EXAMPLES / "retrofit_esrgan.py"), "--preset", "demo", "--out", str(out),
           "--total-steps", "2", "--psnr-steps", "1", "--patch-size", "32", "--batch-size", "1", "--num-feat", "8",
           "--num-blocks", "1", "--d-width", "8", "--vgg-weights", "random", "--workers", "0", "--no-progress",
           "--sample-every", "1", "--sample-size", "48"]  # fmt: skip
    env = _env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # no CLIP weights to be had
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "RANDOM WEIGHTS: semantic extractor clip_rn50" in result.stderr
    assert "RANDOM weights for: semantic extractor clip_rn50" in result.stdout
    for name in ("checkpoints/step_00000002.pt", "samples/latest.png", "loss_curves.png", "log.csv"):
        assert (out / name).exists() and str(out / name.split("/")[0]) in result.stdout
    assert sorted(p.name for p in (out / "data" / "train").iterdir())[:2] == ["astronaut.png", "coffee.png"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_two_processes_gloo(tmp_path):
    hr = hr_folder(tmp_path, count=4)
    out = tmp_path / "ddp"

    def launch(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(EXAMPLES / "retrofit_esrgan.py"),
               "--hr-dir", str(hr), "--out", str(out), *TINY_ARGS, "--device", "cpu", "--discriminator", "sed-patch",
               "--checkpoint-every", "2", *extra]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, env=_env(GLOO_SOCKET_IFNAME="lo"), cwd=ROOT,
                              timeout=300)  # fmt: skip

    result = launch("--total-steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("[retrofit_esrgan] new run; 2 process(es)") == 1  # rank 0 alone reports and writes
    state = C.load_checkpoint(out / "checkpoints" / C.checkpoint_name(2))
    assert len(state["rng"]) == 2 and state["data"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in state["generator"])

    result = launch("--total-steps", "3", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert [int(r["step"]) for r in log_rows(out)] == [1, 2, 3]


@pytest.mark.slow
def test_minimal_loop_runs(tmp_path):
    cmd = [sys.executable, str(EXAMPLES / "minimal_loop.py"), "--random-weights", "--steps", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("step ") == 2 and "G " in result.stdout and "D " in result.stdout


def test_help_shows_each_default_once_and_what_the_demo_sets(monkeypatch):
    import retrofit_esrgan

    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside the flags checked below

    parser = retrofit_esrgan.build_parser()
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        assert action.help, action.option_strings  # --seed included
        assert formatter._expand_help(action).count("default") <= 1, action.option_strings
    assert "sets --out runs/demo, --discriminator sed-patch, --patch-size 96" in text
    assert "(each can still be given)" in text
