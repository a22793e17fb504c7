"""Pictures of SeD at work: semantic maps, cross-attention heat maps and per-pixel realness.

The figure functions return a :class:`matplotlib.figure.Figure` (no pyplot, no global backend
change); :func:`save_figure` writes it as PNG. matplotlib is an optional extra:
``pip install ".[viz]"`` in a clone of the repository (``pip install "sed-discriminator[viz]"``
once released). :func:`semantic_pca` needs torch only.
The command line front end is ``python -m sed_discriminator.show``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ._checks import check_flag

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "INSTALL_HINT",
    "semantic_pca",
    "plot_semantics",
    "plot_attention",
    "plot_realness",
    "save_figure",
]

# Works before the package is on the index (from a clone) and after (by name).
INSTALL_HINT = (
    'pip install ".[viz]" in a clone of sed-discriminator, or pip install "sed-discriminator[viz]" once released'
)
RANDOM_MARK = "RANDOM WEIGHTS"


def _matplotlib() -> Any:
    """The matplotlib modules the figures need, or an ImportError that says how to install them."""
    try:
        import matplotlib.colors as colors
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as err:
        raise ImportError(
            f"sed_discriminator.visualize draws with matplotlib, which is not installed: {INSTALL_HINT} "
            "(or pip install matplotlib)."
        ) from err
    return Figure, Rectangle, colors


def _as_image(image: torch.Tensor, owner: str) -> torch.Tensor:
    """(3, H, W) or (1, 3, H, W) in [0, 1] -> (H, W, 3) float32 numpy array, for imshow."""
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"{owner} draws one image; got a batch of {image.shape[0]}: pass images[i:i+1].")
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"{owner} needs an RGB image (3, H, W) or (1, 3, H, W), got shape {tuple(image.shape)}.")
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def semantic_pca(semantic: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The first three principal components of a semantic map as RGB colours in [0, 1].

    Cells with similar semantic vectors get similar colours. The three components share one
    scale (their joint 99th percentile of absolute values maps to the ends of [0, 1], outliers
    clipped) so weak components stay near grey instead of being stretched; signs are arbitrary.

    Args:
        semantic: (C, h, w) or (1, C, h, w), C >= 3.
        size: (H, W) to enlarge to with nearest-neighbour (each grid cell stays a visible block).

    Returns:
        (3, h, w) or (3, H, W) float32 tensor.

    Example:
        >>> semantic_pca(torch.rand(64, 4, 4), size=(32, 32)).shape
        torch.Size([3, 32, 32])
    """
    if semantic.ndim == 4:
        semantic = semantic[0]
    if semantic.ndim != 3 or semantic.shape[0] < 3:
        raise ValueError(f"semantic_pca needs a (C, h, w) map with C >= 3, got shape {tuple(semantic.shape)}.")
    channels, h, w = semantic.shape
    cells = semantic.detach().double().reshape(channels, h * w).T.cpu()
    cells = cells - cells.mean(0, keepdim=True)
    if h * w < 2:
        components = torch.zeros(h * w, 3, dtype=torch.float64)
    else:
        _, _, basis = torch.linalg.svd(cells, full_matrices=False)
        components = cells @ basis[:3].T
        if components.shape[1] < 3:  # fewer cells than 3 components
            components = F.pad(components, (0, 3 - components.shape[1]))
    scale = components.abs().quantile(0.99).clamp_min(1e-12)
    rgb = (0.5 + components / (2 * scale)).clamp(0, 1)
    rgb = rgb.T.reshape(3, h, w).float()
    if size is not None:
        rgb = F.interpolate(rgb[None], size=tuple(size), mode="nearest")[0]
    return rgb


def _mark_random(fig: Figure, what: str | None) -> None:
    # A figure-level x label: constrained layout keeps room for it below every panel.
    if what:
        fig.supxlabel(
            f"{RANDOM_MARK} ({what}): this picture shows no learned behaviour",
            color="white",
            fontsize=11,
            fontweight="bold",
            bbox=dict(facecolor="#c00000", edgecolor="none", pad=4),
        )


def _hide_ticks(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def plot_semantics(
    image: torch.Tensor, semantic: torch.Tensor, *, extractor_name: str = "extractor", random_weights: str | None = None
) -> Figure:
    """An image beside its semantic map, the map's first three principal components as colours.

    Args:
        image: (3, H, W) or (1, 3, H, W) in [0, 1].
        semantic: its semantic map, (C, h, w) or (1, C, h, w).
        extractor_name: named in the title.
        random_weights: what has random weights (e.g. ``"extractor"``); puts a RANDOM WEIGHTS mark on the figure.

    Returns:
        The figure.
    """
    Figure, _, _ = _matplotlib()
    img = _as_image(image, "plot_semantics")
    sem = semantic[0] if semantic.ndim == 4 else semantic
    channels, gh, gw = sem.shape
    rgb = semantic_pca(sem, size=tuple(img.shape[:2])).permute(1, 2, 0).numpy()
    fig = Figure(figsize=(10, 4.6 * img.shape[0] / img.shape[1] + 1.8), layout="constrained")
    axes = fig.subplots(1, 2)
    axes[0].imshow(img)
    axes[0].set_title(f"Input image ({img.shape[0]} x {img.shape[1]} px)")
    axes[1].imshow(rgb)
    axes[1].set_title(f"Semantic map: {gh} x {gw} cells, {channels} channels\nRGB = first 3 principal components")
    for ax in axes:
        _hide_ticks(ax)
    axes[1].set_xlabel("similar colour = similar semantics (colours are relative to this image)")
    fig.suptitle(f"What {extractor_name} sees: the semantics SeD is conditioned on", fontsize=13)
    _mark_random(fig, random_weights)
    return fig


def _cell_of(point: tuple[float, float], grid: tuple[int, int]) -> tuple[int, int]:
    """Grid cell (row, column) containing a point given as fractions (y, x) of the image height and width."""
    return tuple(min(g - 1, max(0, int(p * g))) for p, g in zip(point, grid))  # type: ignore[return-value]


def plot_attention(
    image: torch.Tensor,
    grids: dict[str, torch.Tensor],
    *,
    points: Sequence[tuple[float, float]] = ((0.3, 0.5), (0.7, 0.3), (0.5, 0.8)),
    random_weights: str | None = None,
) -> Figure:
    """For each SeFB, where chosen semantic cells look in the image: cross-attention heat maps over it.

    Each row is a SeFB, each column the semantic cell that contains a chosen point (drawn as a
    box). The heat map is the cell's attention over the image features (mean over heads),
    enlarged to the image, shown as probability x number of image tokens: 1 everywhere means
    uniform attention (the cell ignores what is where), large values mark where it looks.

    Args:
        image: (3, H, W) or (1, 3, H, W) in [0, 1].
        grids: :func:`~sed_discriminator.diagnostics.attention_grids` of this image (batch of one).
        points: (y, x) fractions of the image height and width selecting the semantic cells.
        random_weights: what has random weights; puts a RANDOM WEIGHTS mark on the figure.

    Returns:
        The figure.
    """
    Figure, Rectangle, colors = _matplotlib()
    img = _as_image(image, "plot_attention")
    height, width = img.shape[:2]
    if not points:
        raise ValueError("plot_attention needs at least one point (y, x) in [0, 1] to choose a semantic cell.")
    for y, x in points:
        if not (0 <= y <= 1 and 0 <= x <= 1):
            raise ValueError(f"points are (y, x) fractions of the image size in [0, 1], got {(y, x)}.")
    names = sorted(grids)
    heat: dict[tuple[str, int], torch.Tensor] = {}
    boxes: dict[tuple[str, int], tuple[float, float, float, float]] = {}
    for name in names:
        g = grids[name][0].float().mean(0)  # (gh, gw, H', W'), heads averaged
        gh, gw, fh, fw = g.shape
        for k, point in enumerate(points):
            i, j = _cell_of(point, (gh, gw))
            m = g[i, j] * (fh * fw)
            heat[name, k] = F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False)[
                0, 0
            ]
            boxes[name, k] = (j * width / gw, i * height / gh, width / gw, height / gh)
    top = max(2.0, max(float(m.max()) for m in heat.values()))
    norm = colors.Normalize(vmin=0.0, vmax=top)
    panel = 3.2 * height / width + 0.3
    fig = Figure(figsize=(3.2 * len(points) + 1.4, panel * len(names) + 1.2), layout="constrained")
    axes = fig.subplots(len(names), len(points), squeeze=False)
    shown = None
    for r, name in enumerate(names):
        for k, point in enumerate(points):
            ax = axes[r][k]
            ax.imshow(img.mean(-1), cmap="gray", vmin=0, vmax=1)
            shown = ax.imshow(heat[name, k].numpy(), cmap="inferno", norm=norm, alpha=0.6)
            x0, y0, bw, bh = boxes[name, k]
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), bw, bh, fill=False, edgecolor="cyan", linewidth=2))
            _hide_ticks(ax)
            if r == 0:
                ax.set_title(f"cell at (y, x) = ({point[0]:.2f}, {point[1]:.2f})", fontsize=10)
            if k == 0:
                gh, gw, fh, fw = grids[name].shape[2:]
                ax.set_ylabel(f"{name}: {gh}x{gw} cells\nover {fh}x{fw} features", fontsize=10)
    fig.colorbar(shown, ax=axes, shrink=0.8, label="attention x image tokens (1 = uniform)")
    fig.suptitle(
        "Where each semantic cell (cyan box) looks in the image, per SeFB\n(an even tint: uniform attention)",
        fontsize=12,
    )
    _mark_random(fig, random_weights)
    return fig


def plot_realness(
    sr: torch.Tensor,
    hr: torch.Tensor,
    sr_logits: torch.Tensor,
    hr_logits: torch.Tensor,
    *,
    sr_label: str = "SR",
    random_weights: str | None = None,
) -> Figure:
    """The discriminator's per-pixel verdict on an SR image beside its HR image: where it thinks it is fake.

    Logits are drawn on one symmetric colour scale for both images: blue where D judges the
    region real (logit > 0), red where it judges it fake. Patch logits are enlarged to the
    image (each cell then stands for a patch of its receptive field).

    Args:
        sr: (3, H, W) or (1, 3, H, W) in [0, 1].
        hr: the matching HR image, same shape.
        sr_logits: D's logits on ``sr``, (1, 1, h, w) or (h, w).
        hr_logits: D's logits on ``hr``.
        sr_label: what ``sr`` is (named in the titles).
        random_weights: what has random weights; puts a RANDOM WEIGHTS mark on the figure.

    Returns:
        The figure.
    """
    Figure, _, colors = _matplotlib()
    sr_img, hr_img = _as_image(sr, "plot_realness"), _as_image(hr, "plot_realness")
    if sr_img.shape != hr_img.shape:
        raise ValueError(f"plot_realness needs SR and HR of one size, got {tuple(sr.shape)} and {tuple(hr.shape)}.")
    size = tuple(sr_img.shape[:2])

    def enlarge(logits: torch.Tensor) -> torch.Tensor:
        m = logits.detach().float().cpu().reshape(1, 1, *logits.shape[-2:])
        return F.interpolate(m, size=size, mode="nearest")[0, 0]

    maps = [enlarge(sr_logits), enlarge(hr_logits)]
    bound = max(1e-6, max(float(m.abs().max()) for m in maps))
    norm = colors.TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)
    fig = Figure(figsize=(11, 2 * 4.6 * size[0] / size[1] + 1.6), layout="constrained")
    axes = fig.subplots(2, 2)
    axes[0][0].imshow(sr_img)
    axes[0][0].set_title(f"{sr_label}: judged by D")
    axes[0][1].imshow(hr_img)
    axes[0][1].set_title("HR: its semantics condition D")
    shown = None
    for ax, m, img, label in ((axes[1][0], maps[0], sr_img, "SR"), (axes[1][1], maps[1], hr_img, "HR")):
        ax.imshow(img.mean(-1), cmap="gray", vmin=0, vmax=1)
        shown = ax.imshow(m.numpy(), cmap="RdBu", norm=norm, alpha=0.75)
        ax.set_title(f"D's verdict on the {label} image (mean logit {float(m.mean()):+.3f})")
    for row in axes:
        for ax in row:
            _hide_ticks(ax)
    fig.colorbar(shown, ax=axes, shrink=0.5, label="D logit (blue > 0: real, red < 0: fake)")
    fig.suptitle("Where the discriminator thinks the image is fake", fontsize=13)
    _mark_random(fig, random_weights)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, overwrite: bool = False, dpi: int = 100) -> str:
    """Write ``fig`` as PNG; an existing file is kept unless ``overwrite``.

    Returns:
        The path written.
    """
    check_flag(overwrite, "overwrite")
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"Figures are written as PNG: give a path ending in .png, got {path!r}.")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite on the command line) to replace it.")
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
