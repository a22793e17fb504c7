"""Data for x-scale SR: HR folders (LR made on the fly, MATLAB-exact), evaluation pairs, and a resumable order.

Randomness never comes from worker processes: :class:`SampleStream` yields one key
``(index, epoch, position)`` per sample, whose crop and flips are drawn from a generator seeded
with ``(seed, epoch, position)``. What a run sees is a function of the seed and the samples
consumed: the worker count does not change it, and a resumed run continues the stream exactly.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoint import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")

SampleKey = tuple[int, int, int]  # (dataset index, epoch, position in the epoch)


class DataError(ValueError):
    """A problem with the user's data that they can fix (message says how)."""


# --------------------------------------------------------------------------------------- files


def _is_image(path: Path) -> bool:
    # Hidden files are skipped: macOS's "._name.png" resource forks, half-written ".name.tmp-PID.png".
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: str | os.PathLike, what: str = "image folder", *, recursive: bool = True) -> list[Path]:
    """Image files in ``folder`` (and its subfolders when ``recursive``), sorted by path; hidden files are skipped.

    Evaluation lists one level only, so that a pack holding ``HR/`` and ``LR_bicubic/X4/`` never
    mixes LR images into the HR set; the :class:`DataError` of an empty level shows where images are.
    """
    root = Path(folder)
    if not root.exists():
        raise DataError(f"The {what} {str(root)!r} does not exist. Check the path (it is relative to {os.getcwd()!r}).")
    if not root.is_dir():
        raise DataError(f"The {what} {str(root)!r} is a file, not a folder of images.")
    files = sorted(p for p in (root.rglob("*") if recursive else root.iterdir()) if _is_image(p))
    if not files:
        nested = sorted(p.relative_to(root).as_posix() for p in root.rglob("[!.]*") if p.is_file())[:5]
        found = f" It holds {nested} ..." if nested else " It is empty."
        level = "" if recursive else " at its top level (subfolders are not read: pass the one with the images)"
        raise DataError(f"The {what} {str(root)!r} contains no image ({', '.join(IMAGE_EXTENSIONS)}){level}.{found}")
    return files


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array (grey, palette and RGBA converted; 16-bit and float images refused).

    Raises:
        DataError: the file cannot be decoded or has an unsupported sample format; the message names it.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "F" or img.mode.startswith("I"):  # PIL's RGB conversion would clip them, not scale them
                kind = "floating-point" if img.mode == "F" else "16/32-bit integer"
                raise ValueError(f"{kind} images are not supported (mode {img.mode}); save it with 8 bits per sample")
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except Exception as err:  # PIL raises many types for broken files
        raise DataError(f"Cannot read image {str(path)!r}: {type(err).__name__}: {err}") from err


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the file header (fast: nothing is decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
            img.verify()
    except Exception as err:
        raise DataError(f"Cannot read image {str(path)!r}: {type(err).__name__}: {err}") from err
    return height, width


def save_image(array: np.ndarray, path: str | os.PathLike | BinaryIO, format: str | None = None) -> None:
    """Write an (H, W, 3) uint8 array as an image file (format from the suffix unless given)."""
    from PIL import Image

    Image.fromarray(array).save(path, format=format)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255.0)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounded."""
    return tensor.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def fingerprint(paths: Sequence[Path]) -> str:
    """Short hash of the file names, stored in checkpoints to notice a changed dataset on resume."""
    return hashlib.sha1("\n".join(p.name for p in paths).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------- degradation


def bicubic_downsample(hr: torch.Tensor, scale: int, quantize: bool = True) -> torch.Tensor:
    """LR of (…, 3, H, W) images in [0, 1] (cropped to multiples of ``scale``) by MATLAB imresize's bicubic, float32.

    The benchmarks' LR files were made so (:func:`matlab_imresize`). torch's ``F.interpolate(antialias=True)``
    has the same kernel but truncates it at the image border, where it differs by up to 12 levels
    (docs/training.md). ``quantize`` rounds to 8-bit levels, as stored LR files are.

    Example:
        >>> bicubic_downsample(torch.full((3, 8, 12), 0.5), 4).shape
        torch.Size([3, 2, 3])
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"The scale must be a positive integer, got {scale!r}.")
    h, w = hr.shape[-2] // scale, hr.shape[-1] // scale
    if h == 0 or w == 0:
        raise ValueError(f"An image of {hr.shape[-1]}x{hr.shape[-2]} px is smaller than the scale x{scale}.")
    lr = matlab_imresize(hr[..., : h * scale, : w * scale], (h, w), quantize=quantize)
    return lr if quantize else lr.clamp_(0, 1)


def matlab_resize_weights(in_len: int, out_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(out_len, in_len) float64 matrix of MATLAB's ``imresize(..., "bicubic")`` along one axis.

    BasicSR's ``calculate_weights_indices`` (Keys' cubic, widened by the scale when downsampling),
    taken in float64 and as one matrix with the symmetric border folded in.
    """
    from basicsr.utils.matlab_functions import cubic

    s = out_len / in_len
    i = torch.arange(1, out_len + 1, dtype=torch.float64)
    centre = i / s + 0.5 * (1 - 1 / s)
    width = 4.0 / s if s < 1 else 4.0
    left = torch.floor(centre - width / 2)
    taps = int(math.ceil(width)) + 2
    index = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]
    distance = centre[:, None] - index
    weights = s * cubic(s * distance) if s < 1 else cubic(distance)
    weights = weights / weights.sum(dim=1, keepdim=True)
    mirror = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])
    index = mirror[(index.long() - 1) % (2 * in_len)]
    matrix = torch.zeros(out_len, in_len, dtype=torch.float64)
    matrix.scatter_add_(1, index, weights)
    return matrix.to(device)


def matlab_imresize(x: torch.Tensor, size: tuple[int, int], *, quantize: bool = False) -> torch.Tensor:
    """Resize (…, H, W) images in [0, 1] to ``size`` as MATLAB's ``imresize(x, size, "bicubic")`` does.

    Not BasicSR's ``imresize``: it computes in float32 and loops over rows in Python; float32 rounds
    some 8-bit levels wrong (tests/test_examples_data.py shows one). Here 8-bit images are taken at
    their exact levels, weights and sums are float64, and ``quantize`` rounds half away from zero
    to [0, 255] as MATLAB does for uint8. Returns float32, not clamped without ``quantize``.
    """
    rows = matlab_resize_weights(x.shape[-2], size[0], x.device)
    cols = matlab_resize_weights(x.shape[-1], size[1], x.device)
    levels = x.double() * 255
    nearest = levels.round()
    if levels.numel() and (levels - nearest).abs().max() <= 1e-3:
        levels = nearest
    out = torch.einsum("ih,...hw,jw->...ij", rows, levels, cols)
    if quantize:
        return torch.floor(out.clamp_(0, 255) + 0.5).float().div_(255)
    return (out / 255).float()


def augment(tensors: Sequence[torch.Tensor], rng: np.random.Generator) -> list[torch.Tensor]:
    """BasicSR's ``augment`` (the same random h-flip, v-flip, transposition on each image) on tensors.

    Not BasicSR's own: it draws from the global ``random`` module; this one from the sample's generator.
    """
    hflip, vflip, transpose = rng.random(3) < 0.5
    dims = [d for d, flip in ((-1, hflip), (-2, vflip)) if flip]
    flipped = [t.flip(dims) if dims else t for t in tensors]
    return [(t.transpose(-1, -2) if transpose else t).contiguous() for t in flipped]


# ------------------------------------------------------------------------------------ datasets


class SRTrainDataset(Dataset):
    """Random (LR, HR) training crops of HR files, the LR made on the fly (MATLAB-exact by default).

    No paired LR folder: :func:`bicubic_downsample` reproduces the benchmarks' bicubic LR files
    (docs/training.md), so a paired folder would hold the same data.
    Indexed by the keys of :class:`SampleStream` (a plain int ``i``: position ``i`` of epoch 0).
    Unreadable or too small files are a :class:`DataError` naming them, before any training.

    Args:
        hr_paths: HR image files; ``patch_size``: HR crop size (a multiple of ``scale``).
        augment: random flips and transpositions; ``cache``: keep decoded images in memory.
    """

    def __init__(
        self, hr_paths: Sequence[Path], patch_size: int, scale: int, seed: int = 0, augment: bool = True,
        cache: bool = False,
    ) -> None:  # fmt: skip
        if patch_size % scale:
            raise DataError(f"--patch-size {patch_size} must be a multiple of --scale {scale}.")
        self.patch_size, self.scale, self.seed, self.augment, self.cache = patch_size, scale, seed, augment, cache
        self._cache: dict[Path, np.ndarray] = {}
        self.hr_paths, bad = list(hr_paths), []
        for path in self.hr_paths:
            try:
                h, w = image_size(path)
            except DataError as err:
                bad.append(f"{path}: unreadable ({type(err.__cause__).__name__})")
                continue
            bad += [f"{path}: {w}x{h} px, smaller than the patch"] if min(h, w) < patch_size else []
        if bad:
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise DataError(f"{len(bad)} unusable training image(s): fix or remove them (or lower --patch-size, now "
                            f"{patch_size} px):\n  " + "\n  ".join(bad[:20]) + more)  # fmt: skip

    def __len__(self) -> int:
        return len(self.hr_paths)

    def __getitem__(self, key: SampleKey | int) -> tuple[torch.Tensor, torch.Tensor]:
        # Crops start on multiples of the scale, and the crop is downsampled with a margin of
        # two LR pixels (the bicubic support) or up to the image border: the LR crop then
        # equals the same crop of the whole image's LR, with no artefact at the crop border.
        index, epoch, position = key if isinstance(key, tuple) else (key, 0, key)
        rng = np.random.default_rng([self.seed, epoch, position])
        path = self.hr_paths[index]
        hr = self._cache.get(path)
        if hr is None:
            hr = read_image(path)
            self._cache.update({path: hr} if self.cache else {})
        s, p = self.scale, self.patch_size
        height, width = (hr.shape[0] // s) * s, (hr.shape[1] // s) * s
        top = s * int(rng.integers(0, (height - p) // s + 1))
        left = s * int(rng.integers(0, (width - p) // s + 1))
        y0, x0 = max(0, top - 2 * s), max(0, left - 2 * s)
        region = to_tensor(hr[y0 : min(height, top + p + 2 * s), x0 : min(width, left + p + 2 * s)])
        lr = bicubic_downsample(region, s)
        ly, lx = (top - y0) // s, (left - x0) // s
        hr_crop = region[:, top - y0 : top - y0 + p, left - x0 : left - x0 + p]
        pair = [lr[:, ly : ly + p // s, lx : lx + p // s], hr_crop]
        return tuple(augment(pair, rng) if self.augment else (t.contiguous() for t in pair))


# ------------------------------------------------------------------------------- sample order


class SampleStream(Sampler[SampleKey]):
    """Endless, seeded, resumable order of samples, sharded over distributed ranks.

    Epoch ``e`` is a permutation drawn from ``(seed, e)``, padded to a multiple of ``world_size`` by its
    head; rank ``r`` takes every ``world_size``-th sample from position ``r``. ``start`` skips that many
    samples of this rank's stream (resume).
    """

    def __init__(self, num_items: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if num_items < 1:
            raise DataError("The dataset is empty.")
        self.num_items, self.seed, self.rank, self.world_size = num_items, seed, rank, world_size
        self.start, self.per_rank = start, math.ceil(num_items / world_size)

    def __iter__(self) -> Iterator[SampleKey]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.num_items)
            order = np.resize(order, self.per_rank * self.world_size)  # padded with its head
            for local in range(offset, self.per_rank):
                position = local * self.world_size + self.rank
                yield int(order[position]), epoch, position
            epoch, offset = epoch + 1, 0


def _leave_stop_signals_to_the_parent() -> None:
    # SIGINT is ignored. SIGTERM is ignored too, except from the parent: the DataLoader ends a
    # worker that does not stop by itself with SIGTERM, and a worker deaf to it would make the
    # main process wait for it forever at exit. Where the sender cannot be known, it is ignored.
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not (hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")):  # not Linux
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask

    def wait_for_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)  # what torch's own worker handler does for its parent's SIGTERM

    threading.Thread(target=wait_for_sigterm, name="sigterm-from-parent", daemon=True).start()


def seed_worker(worker_id: int) -> None:
    """DataLoader worker set-up: stop signals left to the main process, one intra-op thread (torch itself seeds
    each worker's python, numpy and torch RNGs).

    SLURM, ``kill -TERM -PGID`` and Ctrl-C signal the whole process group; a worker killed by it
    would make the main process fail without its checkpoint. So workers ignore SIGINT and any
    SIGTERM but their parent's (the DataLoader's way to end them), and exit when the parent dies.
    """
    _leave_stop_signals_to_the_parent()
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, stream: SampleStream, batch_size: int, workers: int,
                pin_memory: bool = False) -> DataLoader:  # fmt: skip
    """An endless DataLoader over ``stream``; its own generator seeds the workers (the global RNG is untouched)."""
    generator = torch.Generator().manual_seed(stream.seed * 1_000_003 + stream.start)
    init = seed_worker if workers else None
    return DataLoader(dataset, generator=generator, batch_size=batch_size, sampler=stream, num_workers=workers,
                      pin_memory=pin_memory, worker_init_fn=init, drop_last=True)  # fmt: skip


# ------------------------------------------------------------------------------- demo photos

# Colour photos bundled with scikit-image (no download needed); two are held out for the samples.
DEMO_TRAIN = ("astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle")
DEMO_VAL = ("chelsea", "rocket")


def _skimage_photo(name: str) -> np.ndarray:
    from skimage import data

    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def export_demo_photos(root: str | os.PathLike) -> tuple[Path, Path]:
    """Write the scikit-image photos as PNG into ``root/train`` and ``root/val`` (reused when there); returns both.

    Other images are removed from folders this function made (marked ``.sed-demo-photos``) and a
    :class:`DataError` in folders it did not make (nothing is deleted there).
    """
    root = Path(root)
    mark = root / ".sed-demo-photos"
    ours = mark.exists() or not any((root / sub).exists() for sub in ("train", "val"))
    root.mkdir(parents=True, exist_ok=True)
    if ours:
        mark.touch()
    folders = []
    for sub, names in (("train", DEMO_TRAIN), ("val", DEMO_VAL)):
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        foreign = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem not in names)
        if foreign and not ours:
            names = ", ".join(p.name for p in foreign[:5])
            raise DataError(f"{str(folder)!r} holds images the demo did not write ({names}); the demo trains on its "
                            "own photos only. Move them away, or pass another --out.")  # fmt: skip
        for stale in foreign:
            stale.unlink()
        for name in names:
            if not (folder / f"{name}.png").exists():
                atomic_write(folder / f"{name}.png", partial(save_image, _skimage_photo(name), format="PNG"))
        folders.append(folder)
    return folders[0], folders[1]


def center_crops(
    paths: Sequence[Path], size: int, scale: int, count: int, *, min_side: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed (LR, HR) pairs for the sample grid: the centre ``size`` px crop of the first ``count`` images.

    Raises:
        DataError: an image is unreadable or smaller than ``min_side`` px (all such images are named).
    """
    images = {path: read_image(path) for path in list(paths)[:count]}
    small = [f"{path} ({a.shape[1]}x{a.shape[0]} px)" for path, a in images.items() if min(a.shape[:2]) < min_side]
    if small:
        raise DataError(f"Validation image(s) too small for x{scale} samples (at least {min_side}x{min_side} px: PSNR "
                        f"ignores a {scale} px border): {', '.join(small)}. Remove them from --val-dir or pass another "
                        "--val-dir.")  # fmt: skip
    pairs = []
    for image in images.values():
        side = min((size // scale) * scale, *((n // scale) * scale for n in image.shape[:2]))
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        hr = to_tensor(image[top : top + side, left : left + side])
        pairs.append((bicubic_downsample(hr, scale), hr))
    return pairs
