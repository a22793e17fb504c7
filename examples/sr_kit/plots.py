"""Pictures of a training run: the labelled LR | SR | HR (| realness) sample grid and the curves of log.csv (PNG)."""

from __future__ import annotations

import csv
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import atomic_write


def _save(fig, path: str | os.PathLike) -> Path:
    # A bare Figure (not pyplot's): no backend is chosen or switched, and nothing is left open.
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))


def save_sample_grid(rows: Sequence[tuple[torch.Tensor, ...]], path: str | os.PathLike, *, step: int, scale: int,
                     psnrs: Sequence[float], random_weights: Sequence[str] = ()) -> Path:  # fmt: skip
    """One row per sample: LR (bicubic-upsampled) | SR | HR, and D's realness map when a row has a fourth tensor.

    Args:
        rows: ``(lr, sr, hr)`` or ``(lr, sr, hr, realness)``: (3, h, w), (3, H, W), (3, H, W) in [0, 1]
            and (H, W) probabilities that each SR pixel is real.
        step: training step (in the title); ``psnrs``: PSNR (Y) of each SR image.
        random_weights: what ran on random weights (a red RANDOM WEIGHTS mark names them).
    """
    from matplotlib.figure import Figure

    cols = max(len(row) for row in rows)
    height, width = rows[0][2].shape[-2:]
    size = max(1.6, width / 100)
    fig = Figure(figsize=(cols * size, len(rows) * size * height / width + 0.9))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    titles = [f"LR (bicubic x{scale})", "SR", "HR (ground truth)", "D: is SR real? (1 = yes)"]
    for r, row in enumerate(rows):
        lr, sr, hr = row[:3]
        up = F.interpolate(lr[None].float(), size=hr.shape[-2:], mode="bicubic", align_corners=False)[0].clamp(0, 1)
        for c, tile in enumerate((up, sr, hr)):
            axes[r, c].imshow(tile.permute(1, 2, 0).numpy())
        axes[r, 1].set_xlabel(f"PSNR (Y) {psnrs[r]:.2f} dB", fontsize=8)
        if len(row) > 3:
            shown = axes[r, 3].imshow(row[3].numpy(), cmap="RdYlGn", vmin=0, vmax=1)
            fig.colorbar(shown, ax=axes[r, 3], fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
        for c in range(cols):
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=9)
    fig.suptitle(f"Samples at step {step} (EMA weights when --ema is on)", fontsize=10)
    if random_weights:
        mark = textwrap.fill("RANDOM WEIGHTS: " + ", ".join(random_weights) + " (a smoke run, not a result)", 60)
        fig.text(0.5, 0.005, mark, ha="center", va="bottom", color="white", backgroundcolor="red", fontsize=8,
                 weight="bold")  # fmt: skip
    fig.tight_layout(rect=(0, 0.03 * (mark.count("\n") + 2) if random_weights else 0, 1, 1))
    return _save(fig, path)


def read_log(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value), ...]}`` of the numeric cells of log.csv."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            for key, value in row.items():
                try:
                    series.setdefault(key, []).append((step, float(value)))
                except (TypeError, ValueError):  # empty cells, the phase column
                    continue
    return series


# (title, columns, y axis); columns drawn with their own style where the meaning differs (d_real vs d_fake).
_PANELS = (
    ("Generator losses (weighted)", ("l_g_total", "l_pix", "l_percep", "l_gan"), "loss (log scale)"),
    ("Discriminator loss", ("l_d",), "loss"),
    ("D's mean probability 'real'", ("d_real", "d_fake"), "probability"),
    ("Validation PSNR (Y)", ("val_psnr",), "dB"),
    ("SeD: semantic influence", ("sem_influence",), "relative logit change"),
    ("SeD: cross-attention sharpness", ("attn_sharpness_att1", "attn_sharpness_att2", "attn_sharpness_att3"),
     "0 uniform, 1 one-hot"),
)  # fmt: skip
_STYLES = {"d_real": dict(color="tab:green", label="d_real (HR judged real)"),
           "d_fake": dict(color="tab:red", linestyle="--", label="d_fake (SR judged real)")}  # fmt: skip


def plot_losses(log_csv: str | os.PathLike, path: str | os.PathLike, *, psnr_steps: int = 0) -> Path | None:
    """Plot log.csv into ``path`` (PNG): one x range for all panels, the end of the PSNR phase marked."""
    if not Path(log_csv).exists():
        return None
    series = read_log(log_csv)
    if not series.get("l_pix"):
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 7.5))
    axes = fig.subplots(2, 3, sharex=True)
    first = min(s for points in series.values() for s, _ in points)
    last = max(s for points in series.values() for s, _ in points)
    for ax, (title, keys, unit) in zip(axes.flat, _PANELS):
        log_scale = "log scale" in unit
        for key in keys:
            points = [(s, v) for s, v in series.get(key, []) if math.isfinite(v) and (v > 0 or not log_scale)]
            if points:
                steps, values = zip(*points)
                style = _STYLES.get(key, dict(label=key))
                ax.plot(steps, values, marker="." if len(points) < 30 else None, **style)
        if ax.lines:
            ax.legend(fontsize=8)
            ax.set_yscale("log" if log_scale else "linear")
        else:
            ax.text(0.5, 0.5, "not logged (yet)", ha="center", va="center", transform=ax.transAxes, color="grey")
        if unit == "probability":
            ax.set_ylim(-0.02, 1.02)
        if psnr_steps > 0:
            ax.axvline(psnr_steps, color="grey", linestyle=":", linewidth=1)
            ax.text(psnr_steps, 0.98, " end of PSNR phase", transform=ax.get_xaxis_transform(), fontsize=7,
                    color="grey", va="top")  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes[0, 0].set_xlim(min(first, psnr_steps or first) - 0.5, last + 0.5)
    fig.tight_layout()
    return _save(fig, path)
