"""Shared pieces of the tests of examples/: import path, tiny images and tiny training runs."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run faster on one thread, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Seconds-sized networks and patches; random CLIP / VGG weights (tests never download).
TINY_ARGS = [
    "--patch-size", "32", "--batch-size", "2", "--num-feat", "8", "--num-blocks", "1", "--d-width", "8",
    "--workers", "0", "--extractor-weights", "random", "--vgg-weights", "random", "--perceptual-weight", "0",
    "--sample-size", "32", "--num-samples", "1", "--sample-every", "0", "--log-every", "1",
    "--checkpoint-every", "100", "--no-progress", "--cache-images", "--total-steps", "2",
]  # fmt: skip


def log_rows(run: Path) -> list[dict[str, str]]:
    """The rows of ``run/log.csv``."""
    with open(run / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same(a, b, path=""):
    """Exact equality of two nested checkpoint structures (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensor {path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys of {path} differ"
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"length of {path} differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def photo_crops(count: int = 4, size: int = 48) -> list[np.ndarray]:
    """``count`` different (size, size, 3) uint8 crops of scikit-image's astronaut photo."""
    from skimage import data

    image = data.astronaut()
    step = (image.shape[0] - size) // max(1, count)
    return [np.ascontiguousarray(image[i * step : i * step + size, i * step : i * step + size]) for i in range(count)]


def write_images(folder: Path, images: list[np.ndarray], names: list[str] | None = None) -> list[Path]:
    """Save ``images`` as PNG files in ``folder`` (``img00.png``, ... unless ``names`` are given)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{names[i] if names else f'img{i:02d}'}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def hr_folder(tmp_path: Path, count: int = 4, size: int = 48) -> Path:
    """``tmp_path/hr`` with ``count`` photo crops (made on the first call of a test, reused after)."""
    folder = tmp_path / "hr"
    if not folder.exists():
        write_images(folder, photo_crops(count, size))
    return folder


def train(tmp_path: Path, out: str, *extra: str, hr: Path | None = None) -> int:
    """Run retrofit_esrgan.main in this process with the tiny settings; returns its exit status."""
    import retrofit_esrgan

    hr = hr or hr_folder(tmp_path)
    return retrofit_esrgan.main(["--hr-dir", str(hr), "--out", str(tmp_path / out), *TINY_ARGS, *extra])


@contextmanager
def lock_held_elsewhere(folder: Path) -> Iterator[subprocess.Popen]:
    """Another process holds the :class:`~sr_kit.checkpoint.RunLock` of ``folder`` inside the block."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from sr_kit.checkpoint import RunLock; "
            "lock = RunLock(sys.argv[2]); print('locked', flush=True); sys.stdin.read()")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(EXAMPLES), str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.stdin.close()  # the holder exits, and its lock with it
        proc.wait(timeout=60)
