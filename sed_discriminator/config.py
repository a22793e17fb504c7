"""Process-wide switches: the fused attention path and the optional value checks.

The fused path runs attention through :func:`torch.nn.functional.scaled_dot_product_attention`
(FlashAttention / memory-efficient kernels on CUDA, a fused kernel on CPU). The math path
materialises the score matrix and is the exact reference. Each attention module reads the
switch once, when it is built, and keeps the answer in its ``fused_attn`` attribute.

Environment variables (read at import):

- ``SED_FUSED_ATTN``: ``1`` (default) fused path, ``0`` math path.
- ``SED_VALUE_CHECKS``: ``1`` to check that inputs are finite and inside their range
  (costs a device synchronisation per call), ``0`` (default) to skip.

Unset or empty means the default; any other value is an error at import.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "use_fused_attn",
    "set_fused_attn",
    "value_checks_enabled",
    "set_value_checks",
    "math_attention",
]

_HAS_FUSED_ATTN = hasattr(F, "scaled_dot_product_attention")


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip()
    if raw == "":  # unset, or set to nothing (``SED_VALUE_CHECKS=``): the default
        return default
    if raw not in ("0", "1"):
        raise ValueError(f"{name} must be '0' or '1', got {raw!r}; unset it or export {name}=0 or {name}=1.")
    return raw == "1"


def _as_switch(name: str, enable: object) -> bool:
    from ._checks import check_flag  # _checks imports this module

    return check_flag(enable, f"{name}(enable)")  # type: ignore[return-value]


# Resolved here, not inside traced code: torch 2.2's dynamo cannot trace a getattr on a module.
_IS_COMPILING = getattr(torch.compiler, "is_compiling", None)
if _IS_COMPILING is None:  # torch 2.2 (the floor) has dynamo's own only
    from torch._dynamo import is_compiling as _IS_COMPILING


def _compiling() -> bool:
    """True while torch.compile traces: checks that read Python state fold to a constant."""
    return bool(_IS_COMPILING())


_USE_FUSED_ATTN = _env_flag("SED_FUSED_ATTN", True)
_VALUE_CHECKS = _env_flag("SED_VALUE_CHECKS", False)


def use_fused_attn() -> bool:
    """Whether newly built attention modules take the fused path.

    Returns:
        ``True`` when ``scaled_dot_product_attention`` exists and the switch is on.
    """
    return _HAS_FUSED_ATTN and _USE_FUSED_ATTN


def set_fused_attn(enable: bool = True) -> None:
    """Turn the fused attention path on or off for modules built from now on.

    Modules that already exist keep their choice; flip theirs with ``SeD.set_fused_attn`` or
    ``SeFB.set_fused_attn``.

    Args:
        enable: ``True`` for the fused path, ``False`` for the exact math path.
    """
    global _USE_FUSED_ATTN
    enable = _as_switch("set_fused_attn", enable)
    if enable and not _HAS_FUSED_ATTN:
        raise RuntimeError(
            "This PyTorch has no torch.nn.functional.scaled_dot_product_attention; "
            "upgrade to torch>=2.2 or keep set_fused_attn(False)."
        )
    _USE_FUSED_ATTN = enable


def value_checks_enabled() -> bool:
    """Whether inputs are checked for NaN/Inf and for their value range."""
    return _VALUE_CHECKS


def set_value_checks(enable: bool = True) -> None:
    """Turn the NaN/Inf and value-range checks on or off (off by default: each costs a sync).

    Args:
        enable: ``True`` to check every input of ``SeD`` and ``SemanticExtractor``.
    """
    global _VALUE_CHECKS
    _VALUE_CHECKS = _as_switch("set_value_checks", enable)


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Restrict ``scaled_dot_product_attention`` to its math backend inside the block.

    The fused CPU, FlashAttention and memory-efficient kernels have no double backward, so
    a gradient penalty (R1) through a fused attention fails. Inside this context every
    fused call is computed by PyTorch's differentiable math backend, which supports it.
    :func:`sed_discriminator.losses.r1_penalty` uses it for you.

    Example:
        >>> with math_attention():
        ...     pass  # forward passes here support double backward
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the older switch, which also governs the CPU's fused kernel
        with torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False):
            yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield
