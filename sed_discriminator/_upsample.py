"""``conv(upsample(x))`` for the pixel SeD's decoder, keeping the 4x smaller source for backward.

A convolution's backward needs its input. Saving the 2x-upsampled map costs four times the
memory of its low-resolution source, so the source is saved instead (through saved-tensor
hooks) and the bilinear upsampling is redone when backward needs it. Numbers are identical to
the plain composition, double backward included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import _compiling

__all__ = ["upsample", "conv_upsampled"]


def upsample(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Bilinear upsampling to ``size`` (equals ``scale_factor=2`` whenever the target is exactly twice as large)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _UpsampledFrom:
    """A saved upsampled map, stored as its low-resolution source and rebuilt on demand."""

    __slots__ = ("source", "size", "version")

    def __init__(self, source: torch.Tensor, size: torch.Size) -> None:
        self.source, self.size, self.version = source, size, source._version

    def rebuild(self) -> torch.Tensor:
        if self.source._version != self.version:
            raise RuntimeError(
                "A feature map that SeD needs for backward was modified in place after the forward; "
                "clone it before changing it."
            )
        return upsample(self.source, self.size)


def conv_upsampled(conv: nn.Conv2d, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """``conv(upsample(x, size))`` that saves ``x`` for backward instead of the upsampled map.

    In the pixel SeD at 512 px the three upsampled maps (224 MB) are not held for backward,
    their sources (48 MB) are. Under ``torch.compile`` (the compiler decides what to save) or
    where saved-tensor hooks are disabled, it is the plain composition.
    """
    up = upsample(x, size)
    if not torch.is_grad_enabled() or _compiling() or not _saved_tensor_hooks_enabled():
        return conv(up)
    key = (up.data_ptr(), up.shape, up.stride())

    def pack(t: torch.Tensor):
        return _UpsampledFrom(x, size) if (t.data_ptr(), t.shape, t.stride()) == key else t

    def unpack(packed):
        return packed.rebuild() if isinstance(packed, _UpsampledFrom) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return conv(up)


def _saved_tensor_hooks_enabled() -> bool:
    # Some wrappers forbid saved-tensor hooks (torch.autograd.graph.disable_saved_tensors_hooks).
    check = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    return check is None or check()
