"""Weight files: the library's safe reader (``read_checkpoint`` / ``read_state_dict``), discriminator checkpoints
(the authors' files and this library's, strictly) and saving safetensors."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import torch
from torch import nn

from ._checks import check_flag
from ._state import UntrustedFileError, read_checkpoint, read_state_dict, torch_is_patched, unwrap_state_dict
from .discriminator import SeD
from .spectral_norm import remap_legacy_spectral_norm_keys

__all__ = [
    "UntrustedFileError",
    "load_official_weights",
    "read_checkpoint",
    "read_state_dict",
    "save_safetensors",
    "torch_is_patched",
    "unwrap_state_dict",
]


def _guess_variant(state: Mapping[str, torch.Tensor]) -> str | None:
    if any(k.startswith("conv_first.") for k in state):
        return "patch"
    if any(k.startswith("conv9.") for k in state):
        return "pixel"
    return None


def load_official_weights(
    model: SeD, source: str | os.PathLike | Mapping[str, torch.Tensor], *, trust_pickle: bool = False
) -> SeD:
    """Load a checkpoint saved by the authors' code (or by this library) into ``model``, strictly.

    Unwraps ``{"params": ...}`` / ``{"params_ema": ...}`` / ``{"state_dict": ...}`` / ``{"model": ...}``
    containers, strips ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile)
    prefixes and renames the legacy spectral-norm keys (``weight_orig``, ``weight_u``,
    ``weight_v``) to this library's parametrization keys. Weights with NaN/Inf values, all-zero
    spectral-norm vectors or a conv given both legacy and new keys are refused. A file is read
    by the library's one reader: ``.safetensors`` always; a pickle-based ``.pth``/``.pt`` with
    ``torch.load(weights_only=True)``, on torch < 2.10 (known escapes that can run code) only
    with ``trust_pickle=True``. An empty, truncated, damaged or non-checkpoint file is a
    ``ValueError`` naming it.

    Args:
        model: an :class:`~sed_discriminator.SeD` of the checkpoint's variant and sizes.
        source: a checkpoint path or a state dict.
        trust_pickle: you trust the file (you made it, or it is the authors' release): read a
            pickle-based file also on torch < 2.10. Or convert it once with
            ``python -m sed_discriminator.convert``.

    Returns:
        ``model``, with the weights loaded.

    Example:
        >>> state = SeD("patch").state_dict()  # stands in for the authors' sed_patch.pth
        >>> d = load_official_weights(SeD("patch"), state)
    """
    check_flag(trust_pickle, "trust_pickle")
    if isinstance(source, (str, os.PathLike)):
        state = read_state_dict(source, trust_pickle=trust_pickle)
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
        hint = (
            f" The checkpoint looks like the {guess!r} variant; the model is {model.variant!r}."
            if guess and guess != model.variant
            else ""
        )
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
            f"{tuple(expected[k].shape)} ({len(shape_errors)} such keys); "
            "match width, heads, head_dim and semantic_channels."
        )
    model.load_state_dict(state, strict=True)  # refuses NaN/Inf and zeroed vectors before anything is copied
    return model


def save_safetensors(
    source: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write a module's (or a state dict's) tensors as a ``.safetensors`` file, atomically: the format to share.

    A safetensors file holds only tensors and a JSON header, so reading it can never run code
    (unlike ``torch.save`` files on torch < 2.10). DistributedDataParallel / ``torch.compile``
    wrappers are looked through; shared tensors are copied; the file appears complete or not at
    all (written beside it, then renamed).

    Args:
        source: an ``nn.Module`` (its ``state_dict()``) or a ``{name: tensor}`` mapping.
        path: the file to write; its folder must exist.
        overwrite: replace an existing file instead of raising.
        metadata: string pairs stored in the header (e.g. ``{"variant": "patch"}``).

    Returns:
        The path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        ValueError: ``source`` holds something other than tensors.

    Example:
        >>> import tempfile, os
        >>> path = save_safetensors(SeD("patch", width=8, semantic_channels=64, head_dim=8),
        ...                         os.path.join(tempfile.mkdtemp(), "net_d.safetensors"))
        >>> d = load_official_weights(SeD("patch", width=8, semantic_channels=64, head_dim=8), path)
    """
    from safetensors.torch import save_file

    check_flag(overwrite, "overwrite")
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists already; pass overwrite=True (--overwrite) to replace it.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"The folder of {path!r} does not exist; create it first.")
    state = source.state_dict() if isinstance(source, nn.Module) else source
    tensors = unwrap_state_dict(state, source="the weights to save")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}  # clone: no shared storage
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
