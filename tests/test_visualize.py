"""sed_discriminator.visualize and the ``python -m sed_discriminator.show`` command line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import tiny_preset

pytest.importorskip("matplotlib")
pytest.importorskip("skimage")

import matplotlib.image  # noqa: E402

from sed_discriminator import SeD, visualize  # noqa: E402
from sed_discriminator.show import main  # noqa: E402

PRESET = "_viz_tiny"
TINY_ARGS = ["--extractor", PRESET, "--pretrained", "none", "--size", "64"]
D_ARGS = ["--width", "8"]


@pytest.fixture(autouse=True, scope="module")
def _tiny_preset() -> Iterator[None]:
    with tiny_preset(PRESET):
        yield


def red_mark_pixels(path: Path) -> int:
    """Pixels of the RANDOM WEIGHTS box's colour (#c00000) in the bottom strip of the figure, where the mark goes."""
    rgb = torch.from_numpy(matplotlib.image.imread(path)[..., :3].copy())
    rgb = rgb[-rgb.shape[0] // 10 :]
    target = torch.tensor([0xC0, 0, 0]) / 255
    return int(((rgb - target).abs().max(-1).values < 0.02).sum())


def run_cli(*args: str) -> None:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert main(list(args)) == 0


@pytest.mark.parametrize(
    "command",
    [["semantics", "--demo", "chelsea"], ["attention", "--demo", "coffee", *D_ARGS], ["realness", *D_ARGS]],
    ids=["semantics", "attention", "realness"],
)
def test_cli_writes_a_non_constant_png_marked_random(tmp_path: Path, command: list[str]) -> None:
    out = tmp_path / "figs" / f"{command[0]}.png"
    run_cli(*command, *TINY_ARGS, "--out", str(out))
    pixels = matplotlib.image.imread(out)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert float(pixels[..., :3].std()) > 0.05
    assert red_mark_pixels(out) > 500


def test_cli_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "sem.png"
    run_cli("semantics", *TINY_ARGS, "--out", str(out))
    first = out.read_bytes()
    with pytest.raises(SystemExit, match="exists; pass --overwrite to replace it"):
        main(["semantics", *TINY_ARGS, "--demo", "coffee", "--out", str(out)])
    assert out.read_bytes() == first
    run_cli("semantics", *TINY_ARGS, "--demo", "coffee", "--out", str(out), "--overwrite")
    assert out.read_bytes() != first


def test_realness_from_a_basicsr_style_net_d_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "net_d_1000.pth"
    torch.save({"params": SeD("pixel", width=8, semantic_channels=64).state_dict()}, ckpt)
    out = tmp_path / "real.png"
    trust = ["--trust-pickle"]  # the test wrote the file (torch < 2.10 refuses .pth files otherwise)
    run_cli("realness", *TINY_ARGS, *D_ARGS, "--checkpoint", str(ckpt), *trust, "--out", str(out))
    assert matplotlib.image.imread(out)[..., :3].std() > 0.05
    torch.save({"params": SeD("patch", width=8, semantic_channels=64).state_dict()}, ckpt)
    with pytest.raises(ValueError, match="looks like the 'patch' variant; the model is 'pixel'"):
        run_cli("realness", *TINY_ARGS, *D_ARGS, "--checkpoint", str(ckpt), *trust, "--out", str(tmp_path / "r2.png"))


def test_user_images_and_bad_arguments(tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    matplotlib.image.imsave(image, torch.rand(40, 56, 3).numpy())
    out = tmp_path / "sem.png"
    run_cli("semantics", *TINY_ARGS, "--image", str(image), "--out", str(out))
    assert out.exists()
    with pytest.raises(SystemExit, match="--out must end in .png"):
        main(["semantics", *TINY_ARGS, "--out", str(tmp_path / "x.jpg")])
    with pytest.raises(SystemExit, match="--points takes 'y,x' fractions"):
        run_cli("attention", *TINY_ARGS, *D_ARGS, "--points", "0.5", "--out", str(tmp_path / "a.png"))
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(ValueError, match="Cannot read image .*broken.png"):
        main(["semantics", *TINY_ARGS, "--image", str(tmp_path / "broken.png"), "--out", str(tmp_path / "b.png")])


def test_no_mark_without_random_weights(tmp_path: Path) -> None:
    fig = visualize.plot_semantics(torch.rand(3, 64, 64), torch.randn(64, 4, 4), random_weights=None)
    out = Path(visualize.save_figure(fig, tmp_path / "plain.png"))
    assert red_mark_pixels(out) == 0


def test_clear_error_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    hint = r'pip install "\.\[viz\]" in a clone of sed-discriminator, or pip install "sed-discriminator\[viz\]" once'
    with pytest.raises(ImportError, match=r"draws with matplotlib, which is not installed: " + hint):
        visualize.plot_semantics(torch.rand(3, 64, 64), torch.randn(64, 4, 4))
    with pytest.raises(ImportError, match=hint):
        main(["semantics", *TINY_ARGS, "--out", str(tmp_path / "s.png")])  # before any model is built
    assert not (tmp_path / "s.png").exists()


def test_semantic_pca_colours_follow_the_semantics() -> None:
    semantic = torch.zeros(8, 4, 6)
    semantic[:, :, :3] = torch.randn(8, 1, 1)  # left half: one semantic vector, right half: another
    semantic[:, :, 3:] = torch.randn(8, 1, 1)
    semantic += 1e-3 * torch.randn_like(semantic)
    rgb = visualize.semantic_pca(semantic)
    assert rgb.shape == (3, 4, 6) and 0 <= rgb.min() and rgb.max() <= 1
    left, right = rgb[:, :, :3], rgb[:, :, 3:]
    spread = max(left.std(dim=(1, 2)).max(), right.std(dim=(1, 2)).max())
    assert (left.mean((1, 2)) - right.mean((1, 2))).abs().max() > 10 * spread


def test_module_runs_from_the_command_line() -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run(
        [sys.executable, "-m", "sed_discriminator.show", "--help"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert all(cmd in done.stdout for cmd in ("semantics", "attention", "realness"))
