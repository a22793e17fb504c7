"""Pictures of a training run: the LR | SR | HR sample grid and the loss curves (PNG files)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import save_image, to_uint8


def sample_grid(rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], gap: int = 4) -> np.ndarray:
    """One row per sample: LR (bicubic-upsampled to the HR size) | SR | HR, on a white background.

    Args:
        rows: ``(lr, sr, hr)`` tensors (3, h, w) / (3, H, W) / (3, H, W) in [0, 1].
        gap: white pixels between tiles.

    Returns:
        An (H_total, W_total, 3) uint8 image.
    """
    tiles = []
    for lr, sr, hr in rows:
        up = F.interpolate(lr[None].float(), size=hr.shape[-2:], mode="bicubic", align_corners=False)[0]
        tiles.append([to_uint8(t) for t in (up, sr, hr)])
    height = sum(row[0].shape[0] for row in tiles) + gap * (len(tiles) + 1)
    width = max(sum(t.shape[1] for t in row) + gap * 4 for row in tiles)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    y = gap
    for row in tiles:
        x = gap
        for tile in row:
            canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
            x += tile.shape[1] + gap
        y += row[0].shape[0] + gap
    return canvas


def save_sample_grid(rows: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], path: str | os.PathLike) -> Path:
    """Write :func:`sample_grid` to ``path`` (PNG), through a temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    save_image(sample_grid(rows), tmp)
    os.replace(tmp, path)
    return path


def _read_log(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            for key, value in row.items():
                if key == "step" or value in ("", None):
                    continue
                try:
                    series.setdefault(key, []).append((step, float(value)))
                except ValueError:
                    continue
    return series


_PANELS = (
    ("Generator losses (weighted)", ("l_g_total", "l_pix", "l_percep", "l_gan"), True),
    ("Discriminator", ("l_d", "d_real", "d_fake"), False),
    ("Validation PSNR (Y) [dB]", ("val_psnr",), False),
)


def plot_losses(log_csv: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """Plot the curves of ``log.csv`` into ``path`` (PNG); ``None`` when the log has no row yet."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    log_csv, path = Path(log_csv), Path(path)
    if not log_csv.exists():
        return None
    series = _read_log(log_csv)
    if not series:
        return None
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(5 * len(_PANELS), 3.6))
    for ax, (title, keys, log_scale) in zip(axes, _PANELS):
        drawn = False
        for key in keys:
            points = series.get(key)
            if not points:
                continue
            steps, values = zip(*points)
            finite = [v for v in values if math.isfinite(v) and (v > 0 or not log_scale)]
            if not finite:
                continue
            ax.plot(steps, values, label=key, marker="." if len(points) < 30 else None)
            drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
            if log_scale:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
