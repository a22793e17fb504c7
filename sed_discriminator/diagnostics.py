"""Is the semantic path of SeD awake? Two numbers to log while training, and attention maps with their grids.

At the paper's initialisation the pixel SeD's SeFBs output a constant (their ``proj_out`` is
zero), so its logits do not depend on the semantics at all; training has to wake that path up.
These functions measure it on any batch:

- :func:`semantic_influence`: how far the logits move when every image is judged with another
  image's semantics, relative to the logits' own spread (0: semantics ignored);
- :func:`attention_sharpness`: per SeFB, how focused the cross-attention from semantic cells to
  image tokens is (0: uniform, 1: every cell looks at one token);
- :func:`semantic_diagnostics`: both in two forwards, as the flat dict a trainer logs;
- :func:`attention_grids`: the cross-attention maps shaped (B, heads, gh, gw, H', W').

All of them run without gradients and compute what eval mode would compute, without touching
the module: no ``training`` flag changes (not even for the duration of the call, so a thread
training the same module is unaffected), spectral-norm vectors stay as they are (see
:func:`~sed_discriminator.spectral_norm.power_iteration_paused`). They accept an :class:`SeD`,
a :class:`~sed_discriminator.ConditionedSeD` (``semantic=None`` uses its stored condition) and
such a module wrapped by DistributedDataParallel, DataParallel or ``torch.compile`` (the inner
module runs eagerly). Ambient autocast applies; the statistics are computed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .discriminator import SeD
from .sefb import semantic_grid_size

__all__ = ["semantic_influence", "attention_sharpness", "semantic_diagnostics", "attention_grids", "SEFB_NAMES"]

SEFB_NAMES = ("att1", "att2", "att3")
_EPS = 1e-8  # keeps the influence finite when every logit is equal (then any change at all is large)


def _unwrap(discriminator: nn.Module, owner: str) -> SeD:
    """The SeD inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    d = discriminator
    for _ in range(8):  # wrappers nest (a compiled DDP model), never this deep
        inner = getattr(d, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(d, "module", None) if not isinstance(d, SeD) else None
        if not isinstance(inner, nn.Module):
            break
        d = inner
    if not isinstance(d, SeD):
        raise TypeError(
            f"{owner} needs an SeD or ConditionedSeD (optionally wrapped by DDP, DataParallel or torch.compile), "
            f"got {type(discriminator).__name__}."
        )
    if not d.semantic_fusion:
        raise ValueError(
            f"{owner}: this SeD was built with semantic_fusion=False, so it has no semantic path to measure; "
            "skip the semantic diagnostics for it."
        )
    return d


def _semantic(d: SeD, images: torch.Tensor, semantic: torch.Tensor | None, owner: str) -> torch.Tensor:
    if semantic is not None:
        return semantic
    resolve = getattr(d, "_semantic_for", None)  # ConditionedSeD: the stored condition
    if resolve is None:
        raise ValueError(
            f"{owner}: pass semantic=, the semantic map of the HR images (e.g. SemanticExtractor(...)(hr)); "
            "only a ConditionedSeD with a stored condition (set_condition(hr)) can leave it out."
        )
    with torch.no_grad():
        return resolve(images)


def _check_batch(images: torch.Tensor, owner: str) -> None:
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[0] < 2:
        raise ValueError(
            f"{owner} needs a batch of at least 2 images: it judges each image with the semantics of another image "
            f"of the same batch (rolled by one), and a batch of {images.shape[0]} has no other image. "
            "Pass two or more images (e.g. the whole training batch)."
        )


def _influence(logits: torch.Tensor, swapped: torch.Tensor) -> float:
    logits, swapped = logits.double(), swapped.double()
    change = (swapped - logits).abs().mean()
    spread = logits.std(correction=0)
    return float(change / (spread + _EPS))


def _sharpness(probabilities: torch.Tensor) -> float:
    p = probabilities.double()
    tokens = p.shape[-1]
    if tokens < 2:
        raise ValueError("attention_sharpness needs at least 2 image tokens per SeFB; use a larger image.")
    p = p / p.sum(-1, keepdim=True)  # reduced-precision probabilities may not sum to exactly 1
    entropy = -torch.special.xlogy(p, p).sum(-1).mean()
    return float(min(1.0, max(0.0, 1.0 - entropy.item() / math.log(tokens))))


def semantic_influence(discriminator: nn.Module, images: torch.Tensor, semantic: torch.Tensor | None = None) -> float:
    """How much the discriminator's logits depend on the semantics, relative to their spread.

    Each image is judged once with its own semantic map and once with the map of the next image
    of the batch (``semantic.roll(1, dim=0)``)::

        influence = mean |D(x, roll(s)) - D(x, s)| / (std(D(x, s)) + 1e-8)

    mean and std run over every logit of the batch (std of the population). 0 means the
    semantics have no effect: exactly so for the pixel SeD at the paper's initialisation. A
    value of 1 means swapping the semantics moves a logit by as much as the logits differ across
    the batch and its positions. Images whose semantic maps are identical contribute 0.

    Args:
        discriminator: an SeD or ConditionedSeD, optionally wrapped (DDP, DataParallel, ``torch.compile``).
        images: (B, C, H, W) with B >= 2, e.g. the generator's output.
        semantic: (B, Cs, hs, ws) semantic map of the HR images; ``None`` for a ConditionedSeD's stored condition.

    Returns:
        The influence, >= 0.

    Example:
        >>> d = SeD("pixel", width=8, semantic_channels=64, head_dim=8)
        >>> semantic_influence(d, torch.rand(2, 3, 32, 32), torch.rand(2, 64, 2, 2))  # paper init: none
        0.0
    """
    owner = "semantic_influence"
    d = _unwrap(discriminator, owner)
    _check_batch(images, owner)
    s = _semantic(d, images, semantic, owner)
    logits, _ = d._inspect(images, s)
    swapped, _ = d._inspect(images, s.roll(1, dims=0))  # same (math) attention path: rounding cancels
    return _influence(logits, swapped)


def attention_sharpness(
    discriminator: nn.Module, images: torch.Tensor, semantic: torch.Tensor | None = None
) -> dict[str, float]:
    """How focused each SeFB's cross-attention is: 0 uniform, 1 one-hot.

    For every semantic cell (query) the attention is a distribution p over the N image tokens
    of its level; with the entropy H(p) = -sum p log p, averaged over images, heads and cells::

        sharpness = 1 - mean H(p) / log N

    Args:
        discriminator: an SeD or ConditionedSeD, optionally wrapped.
        images: (B, C, H, W).
        semantic: (B, Cs, hs, ws); ``None`` for a ConditionedSeD's stored condition.

    Returns:
        ``{"att1": ..., "att2": ..., "att3": ...}``, each in [0, 1].

    Example:
        >>> d = SeD("patch", width=8, semantic_channels=64, head_dim=8)
        >>> sorted(attention_sharpness(d, torch.rand(1, 3, 32, 32), torch.rand(1, 64, 2, 2)))
        ['att1', 'att2', 'att3']
    """
    owner = "attention_sharpness"
    d = _unwrap(discriminator, owner)
    _, maps = d._inspect(images, _semantic(d, images, semantic, owner))
    return {name: _sharpness(maps[name]) for name in SEFB_NAMES}


def semantic_diagnostics(
    discriminator: nn.Module, images: torch.Tensor, semantic: torch.Tensor | None = None
) -> dict[str, float]:
    """:func:`semantic_influence` and :func:`attention_sharpness` in two forwards, as a flat dict to log.

    Args:
        discriminator: an SeD or ConditionedSeD, optionally wrapped.
        images: (B, C, H, W) with B >= 2.
        semantic: (B, Cs, hs, ws); ``None`` for a ConditionedSeD's stored condition.

    Returns:
        ``{"sem_influence", "attn_sharpness_att1", "attn_sharpness_att2", "attn_sharpness_att3"}``.

    Example:
        >>> d = SeD("pixel", width=8, semantic_channels=64, head_dim=8)
        >>> stats = semantic_diagnostics(d, torch.rand(2, 3, 32, 32), torch.rand(2, 64, 2, 2))
        >>> list(stats), stats["sem_influence"]
        (['sem_influence', 'attn_sharpness_att1', 'attn_sharpness_att2', 'attn_sharpness_att3'], 0.0)
    """
    owner = "semantic_diagnostics"
    d = _unwrap(discriminator, owner)
    _check_batch(images, owner)
    s = _semantic(d, images, semantic, owner)
    logits, maps = d._inspect(images, s)
    swapped, _ = d._inspect(images, s.roll(1, dims=0))
    stats = {"sem_influence": _influence(logits, swapped)}
    stats.update({f"attn_sharpness_{name}": _sharpness(maps[name]) for name in SEFB_NAMES})
    return stats


def _conv_size(conv: nn.Conv2d, size: tuple[int, int]) -> tuple[int, int]:
    return tuple(  # type: ignore[return-value]
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(size, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    )


def _feature_sizes(d: SeD, size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """(H', W') of the image features each SeFB sees: the encoder's strided convolutions set them."""
    if d.variant == "patch":
        s1 = _conv_size(d.conv1, _conv_size(d.conv_first, size))
        s2 = _conv_size(d.conv2, s1)
        return {"att1": s1, "att2": s2, "att3": _conv_size(d.conv3, s2)}
    s1 = _conv_size(d.conv1, _conv_size(d.conv0, size))
    s2 = _conv_size(d.conv2, s1)
    return {"att1": s1, "att2": s2, "att3": _conv_size(d.conv3, s2)}  # the decoder upsamples back to s2, s1


def attention_grids(
    discriminator: nn.Module, images: torch.Tensor, semantic: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Cross-attention probabilities of every SeFB with their grids: where each semantic cell looks.

    ``maps[name][b, h, i, j]`` is an (H', W') heat map over the image features of that level
    (summing to 1) for semantic cell (i, j) of the block's (gh, gw) grid; cell (i, j) covers the
    image region ``i * H / gh .. (i + 1) * H / gh`` (likewise for columns), approximately.

    Args:
        discriminator: an SeD or ConditionedSeD, optionally wrapped.
        images: (B, C, H, W).
        semantic: (B, Cs, hs, ws); ``None`` for a ConditionedSeD's stored condition.

    Returns:
        ``{name: (B, heads, gh, gw, H', W')}`` for ``att1``..``att3``.

    Example:
        >>> d = SeD("pixel", width=8, semantic_channels=64, head_dim=8)
        >>> maps = attention_grids(d, torch.rand(1, 3, 64, 48), torch.rand(1, 64, 4, 3))
        >>> tuple(maps["att1"].shape)  # 4x3 semantic cells x a 32x24 feature map
        (1, 1, 4, 3, 32, 24)
    """
    owner = "attention_grids"
    d = _unwrap(discriminator, owner)
    _, maps = d._inspect(images, _semantic(d, images, semantic, owner))
    sizes = _feature_sizes(d, tuple(images.shape[-2:]))
    grids = {}
    for name, block in d.sefb_blocks().items():
        features = sizes[name]
        grid = semantic_grid_size(features, block.upscale, block.shrink)
        attn = maps[name]
        if attn.shape[-2:] != (grid[0] * grid[1], features[0] * features[1]):  # the architecture changed under us
            raise RuntimeError(f"attention_grids: {name} has {tuple(attn.shape)} maps, not {grid} x {features}.")
        grids[name] = attn.unflatten(-1, features).unflatten(2, grid)
    return grids
