"""Input validation shared by the discriminator and the extractor: each error says how to fix it."""

from __future__ import annotations

import torch

from .config import value_checks_enabled


def check_image(
    x: torch.Tensor,
    *,
    owner: str,
    channels: int,
    min_size: int = 1,
    value_range: tuple[float, float] | None = None,
) -> None:
    """Raise ``ValueError`` unless ``x`` is a float (B, channels, H, W) batch of at least ``min_size`` px.

    With value checks on (:func:`~sed_discriminator.set_value_checks`), also rejects NaN/Inf and,
    when ``value_range`` is given, values outside it.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner} expects a torch.Tensor image batch, got {type(x).__name__}.")
    if x.ndim != 4:
        hint = " Add the batch dimension with x.unsqueeze(0)." if x.ndim == 3 else ""
        raise ValueError(
            f"{owner} expects an image batch of shape (B, {channels}, H, W), "
            f"got a {x.ndim}-D tensor of shape {tuple(x.shape)}.{hint}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{owner} expects a floating-point image with values in [0, 1], got dtype {x.dtype}. "
            "Convert it with x.float() / 255."
        )
    if x.shape[1] != channels:
        hint = {1: "Repeat a grayscale image with x.expand(-1, 3, -1, -1).", 4: "Drop the alpha channel: x[:, :3]."}
        raise ValueError(
            f"{owner} expects {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)}). "
            + (hint.get(x.shape[1], "") if channels == 3 else "")
        )
    height, width = x.shape[-2:]
    if height < min_size or width < min_size:
        raise ValueError(
            f"{owner} needs images of at least {min_size}x{min_size} pixels, got {height}x{width}. "
            f"Use training patches of {min_size} px or more per side."
        )
    if value_checks_enabled() and x.numel():
        low, high = value_range if value_range is not None else (None, None)
        _check_values(x, owner=owner, what="image", low=low, high=high)


def check_features(x: torch.Tensor, *, owner: str, channels: int) -> None:
    """Raise ``ValueError`` unless ``x`` is a float (B, channels, H, W) feature map."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner} expects image features as a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 4 or not x.is_floating_point() or x.shape[1] != channels:
        raise ValueError(
            f"{owner} was built for image features of shape (B, {channels}, H, W), float; got shape "
            f"{tuple(x.shape)} and dtype {x.dtype}. The call is block(features, semantic): features first."
        )


def check_same_dtype(weight: torch.Tensor, *, owner: str, **inputs: torch.Tensor | None) -> None:
    """Raise ``ValueError`` when an input's dtype differs from the weights' outside autocast.

    PyTorch's own message ("Input type (c10::Half) and bias type (float) should be the same")
    comes from deep inside a layer; this one names the input and the three ways out.
    """
    for name, t in inputs.items():
        if t is None or t.dtype == weight.dtype or _autocast_enabled(t.device.type):
            continue
        raise ValueError(
            f"{owner}'s weights are {weight.dtype} but its {name.replace('_', ' ')} is {t.dtype}. Convert the input "
            f"with .to({weight.dtype}), the model with .to({t.dtype}), or run the forward under "
            f"torch.autocast({t.device.type!r}) for mixed precision."
        )


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type without autocast (meta)
        return False


def check_semantic(semantic: torch.Tensor, *, owner: str, channels: int, batch: int, values: bool = True) -> None:
    """Raise ``ValueError`` unless ``semantic`` is a float (batch, channels, h, w) map.

    ``values=False`` skips the optional NaN/Inf check (callers whose caller checked already).
    """
    if not isinstance(semantic, torch.Tensor):
        raise TypeError(
            f"{owner} expects the semantic map as a torch.Tensor, got {type(semantic).__name__}. "
            "Compute it with SemanticExtractor()(hr_images)."
        )
    if semantic.ndim != 4:
        raise ValueError(
            f"{owner} expects a semantic map of shape (B, {channels}, h, w), "
            f"got a {semantic.ndim}-D tensor of shape {tuple(semantic.shape)}."
        )
    if not semantic.is_floating_point():
        raise ValueError(f"{owner} expects a floating-point semantic map, got dtype {semantic.dtype}.")
    if semantic.shape[1] != channels:
        raise ValueError(
            f"{owner} was built with semantic_channels={channels} but the semantic map has "
            f"{semantic.shape[1]} channels (shape {tuple(semantic.shape)}). Build it with "
            f"semantic_channels={semantic.shape[1]} or use the extractor it was designed for."
        )
    if semantic.shape[0] != batch:
        raise ValueError(
            f"{owner} got an image batch of {batch} but a semantic batch of {semantic.shape[0]}. "
            "Compute the semantics from the HR batch that matches these images."
        )
    if values and value_checks_enabled() and semantic.numel():
        _check_values(semantic, owner=owner, what="semantic map")


def _check_values(x: torch.Tensor, *, owner: str, what: str, low: float | None = None, high: float | None = None) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{owner} got NaN or Inf values in its {what}; check the upstream computation.")
    if low is None or high is None:
        return
    lo, hi = x.min().item(), x.max().item()
    tolerance = 1e-3
    if lo < low - tolerance or hi > high + tolerance:
        raise ValueError(
            f"{owner} expects {what} values in [{low:g}, {high:g}], got [{lo:.4g}, {hi:.4g}]. "
            "Scale [0, 255] images by 1/255 and [-1, 1] images with (x + 1) / 2."
        )
