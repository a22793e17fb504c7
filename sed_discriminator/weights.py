"""Loading discriminator checkpoints: the authors' files and this library's, strictly."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ._state import read_state_dict, unwrap_state_dict
from .discriminator import SeD
from .spectral_norm import remap_legacy_spectral_norm_keys

__all__ = ["load_official_weights"]


def _guess_variant(state: Mapping[str, torch.Tensor]) -> str | None:
    if any(k.startswith("conv_first.") for k in state):
        return "patch"
    if any(k.startswith("conv9.") for k in state):
        return "pixel"
    return None


def load_official_weights(model: SeD, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> SeD:
    """Load a checkpoint saved by the authors' code (or by this library) into ``model``, strictly.

    Unwraps ``{"params": ...}`` / ``{"params_ema": ...}`` / ``{"state_dict": ...}`` / ``{"model": ...}``
    containers, strips ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile)
    prefixes and renames the legacy spectral-norm keys (``weight_orig``, ``weight_u``,
    ``weight_v``) to this library's parametrization keys. A file is read with
    ``weights_only=True``; an empty, truncated, damaged or non-checkpoint file is a ``ValueError``
    naming it.

    Args:
        model: an :class:`~sed_discriminator.SeD` of the checkpoint's variant and sizes.
        source: a checkpoint path or a state dict.

    Returns:
        ``model``, with the weights loaded.

    Example:
        >>> state = SeD("patch").state_dict()  # stands in for torch.load("sed_patch.pth")
        >>> d = load_official_weights(SeD("patch"), state)
    """
    if isinstance(source, (str, os.PathLike)):
        state = unwrap_state_dict(read_state_dict(source), source=os.fspath(source))
    elif isinstance(source, Mapping):
        state = unwrap_state_dict(source)
    else:
        raise TypeError(f"source must be a path or a state dict, got {type(source).__name__}.")
    state = remap_legacy_spectral_norm_keys(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        guess = _guess_variant(state)
        hint = f" The checkpoint looks like the {guess!r} variant; the model is {model.variant!r}." if guess and guess != model.variant else ""
        raise ValueError(
            f"Checkpoint does not match SeD({model.variant!r}): {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}).{hint} Build the model with the "
            "checkpoint's variant, width and semantic_channels."
        )
    shape_errors = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if shape_errors:
        k = shape_errors[0]
        raise ValueError(
            f"Checkpoint tensor {k} has shape {tuple(state[k].shape)} but the model expects "
            f"{tuple(expected[k].shape)} ({len(shape_errors)} such keys); match width, heads, head_dim and semantic_channels."
        )
    model.load_state_dict(state, strict=True)
    return model
