"""SeFB, the semantic-aware fusion block of SeD (Li et al., CVPR 2024, arXiv 2402.19387).

Semantic tokens are the queries, image-feature tokens are the keys and values. The fused
tokens are projected back to the semantic width, rearranged from channels into space by the
block's upscale factor and refined by ``conv_out``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ._checks import check_features, check_flag, check_same_dtype, check_semantic
from ._deprecation import keyword_only_since, warn_deprecated
from .attention import Attention, TransformerBlock

__all__ = ["SeFB", "channels_to_space", "semantic_grid_size"]

GROUP_NORM_GROUPS = 32


@keyword_only_since("0.3", "channels_last")
def channels_to_space(x: torch.Tensor, factor: int, *, channels_last: bool = False) -> torch.Tensor:
    """Move channel sub-indices into space in the reference's ``(c, uw, uh)`` order.

    ``out[b, c, h*u + uh, w*u + uw] = x[b, c*u*u + uw*u + uh, h, w]``. This is NOT
    :func:`torch.nn.functional.pixel_shuffle`, whose channel order is ``(c, uh, uw)``.

    Args:
        x: tensor of shape (B, C*u*u, h, w), in either memory layout.
        factor: the upscale factor u.
        channels_last: lay the result out as ``torch.channels_last`` (same values, one copy either way);
            keyword-only (0.2's positional form still works, with a ``DeprecationWarning``).

    Returns:
        Tensor of shape (B, C, h*u, w*u).

    Example:
        >>> channels_to_space(torch.rand(2, 64, 4, 4), 4).shape
        torch.Size([2, 4, 16, 16])
    """
    _check_positive_ints("channels_to_space", factor=factor)
    check_flag(channels_last, "channels_to_space(channels_last)")
    if x.shape[1] % (factor * factor):
        raise ValueError(f"channels_to_space needs channels divisible by {factor}^2, got {x.shape[1]}.")
    if channels_last:
        return rearrange(x, "b (c uw uh) h w -> b (h uh) (w uw) c", uw=factor, uh=factor).permute(0, 3, 1, 2)
    return rearrange(x, "b (c uw uh) h w -> b c (h uh) (w uw)", uw=factor, uh=factor)


def _check_positive_ints(owner: str, **values: object) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}.")


def semantic_grid_size(feature_size: tuple[int, int], upscale: int, shrink: int = 0) -> tuple[int, int]:
    """Semantic grid a SeFB needs so that its output covers a feature map of ``feature_size``.

    After channels-to-space the map is ``grid * upscale`` pixels; ``conv_out`` then removes
    ``shrink`` pixels (1 for the 4x4 ``conv_out``). The grid is the smallest that covers the
    feature map; the excess at the bottom/right edge is cropped.

    Args:
        feature_size: (H', W') of the image features.
        upscale: the block's upscale factor u.
        shrink: pixels removed by ``conv_out``.

    Returns:
        (gh, gw) = (ceil((H' + shrink) / u), ceil((W' + shrink) / u)).
    """
    return tuple(math.ceil((s + shrink) / upscale) for s in feature_size)  # type: ignore[return-value]


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C) tokens, row-major over (H, W): a view in either memory layout."""
    return rearrange(x, "b c h w -> b (h w) c")


def _resample(semantic: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(semantic.shape[-2:]) == tuple(size):
        return semantic
    return F.interpolate(semantic, size=size, mode="bilinear", align_corners=False, antialias=True)


class SeFB(nn.Module):
    """Semantic-aware fusion block.

    Data flow (reference numerics): ``s -> GroupNorm(32) -> proj_in`` gives semantic tokens,
    ``f -> proj_context`` gives image tokens; a residual-free transformer block runs
    self-attention on the semantic tokens, cross-attention to the image tokens and a gated
    GELU feed-forward; ``proj_out`` restores ``semantic_channels``, :func:`channels_to_space`
    upsamples by ``upscale`` and ``conv_out`` refines.

    A semantic map whose grid does not match :func:`semantic_grid_size` is resampled
    bilinearly (antialiased) to it first, and the output is cropped to the feature size. For
    the paper's setting (sides that are multiples of 16, semantics of the same image) neither
    step happens.

    Args:
        feature_channels: channels Cf of the image features.
        upscale: factor u between the feature grid and the semantic grid.
        semantic_channels: channels Cs of the semantic map (1024 for CLIP RN50 layer3); a multiple
            of 32 (GroupNorm groups) and of ``upscale ** 2``.
        heads: attention heads.
        head_dim: width of each head.
        conv_out_kernel: 3 (keeps the size) or 4 (shrinks by one pixel, the patch D's last level).

    Shape:
        - features: (B, Cf, H', W')
        - semantic: (B, Cs, hs, ws), any grid size
        - output: (B, Cs / u^2, H', W')

    Example:
        >>> block = SeFB(feature_channels=128, upscale=4)
        >>> block(torch.rand(2, 128, 64, 64), torch.rand(2, 1024, 16, 16)).shape
        torch.Size([2, 64, 64, 64])
    """

    def __init__(
        self,
        feature_channels: int,
        upscale: int,
        *,
        semantic_channels: int = 1024,
        heads: int = 1,
        head_dim: int = 64,
        conv_out_kernel: int = 3,
    ) -> None:
        super().__init__()
        _check_positive_ints(
            "SeFB",
            feature_channels=feature_channels,
            upscale=upscale,
            semantic_channels=semantic_channels,
            heads=heads,
            head_dim=head_dim,
        )
        step = math.lcm(GROUP_NORM_GROUPS, upscale * upscale)
        if semantic_channels % step:
            low = max(step, semantic_channels // step * step)
            raise ValueError(
                f"semantic_channels={semantic_channels} does not fit SeFB(upscale={upscale}): it must be a multiple "
                f"of {step} (GroupNorm's {GROUP_NORM_GROUPS} groups and upscale^2={upscale * upscale}), "
                f"e.g. {low} or {low + step}."
            )
        if conv_out_kernel not in (3, 4):
            raise ValueError(f"conv_out_kernel must be 3 or 4, got {conv_out_kernel}.")
        inner = heads * head_dim
        out_channels = semantic_channels // (upscale * upscale)
        self.upscale = upscale
        self.shrink = conv_out_kernel - 3
        self.feature_channels = feature_channels
        self.semantic_channels = semantic_channels
        self.out_channels = out_channels
        self.norm = nn.GroupNorm(GROUP_NORM_GROUPS, semantic_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(semantic_channels, inner, 1)
        self.proj_context = nn.Conv2d(feature_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim)])
        self.proj_out = nn.Conv2d(inner, semantic_channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.conv_out = nn.Conv2d(out_channels, out_channels, conv_out_kernel, 1, 1)

    def set_fused_attn(self, enable: bool) -> SeFB:
        """Choose the fused (``True``) or math (``False``) attention path for this block."""
        check_flag(enable, "set_fused_attn(enable)")
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused_attn = enable
        return self

    def forward(
        self, features: torch.Tensor, semantic: torch.Tensor, *, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Fuse semantics into image features.

        Args:
            features: image features (B, Cf, H', W').
            semantic: semantic map (B, Cs, hs, ws) of the same batch.
            return_attention: deprecated (it changed the return type): use :meth:`forward_with_attention`.
        """
        if check_flag(return_attention, "SeFB.forward(return_attention)"):
            warn_deprecated(
                "SeFB.forward(..., return_attention=True) is deprecated since 0.3 and will be removed in the next "
                "release: call block.forward_with_attention(features, semantic), which returns (output, attention)."
            )
            return self.forward_with_attention(features, semantic)
        return self._fuse(features, semantic, with_attention=False)[0]

    def forward_with_attention(
        self, features: torch.Tensor, semantic: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` that also returns the cross-attention probabilities (computed on the math path).

        Returns:
            ``(output, attention)``: the fused features (B, Cs / u^2, H', W') and the probabilities
            (B, heads, gh*gw, H'*W') of each semantic token over the image tokens.
        """
        out, attn = self._fuse(features, semantic, with_attention=True)
        return out, attn  # type: ignore[return-value]

    def _fuse(
        self, features: torch.Tensor, semantic: torch.Tensor, *, with_attention: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_features(features, owner="SeFB", channels=self.feature_channels)
        check_semantic(
            semantic, owner="SeFB", channels=self.semantic_channels, batch=features.shape[0], check_finite=False
        )
        check_same_dtype(self.proj_context.weight, owner="SeFB", features=features, semantic_map=semantic)
        height, width = features.shape[-2:]
        grid = semantic_grid_size((height, width), self.upscale, self.shrink)
        # NCHW: a channels_last map (e.g. timm's ConvNeXt output) crashes GroupNorm's backward on torch 2.2's CPU.
        s = _resample(semantic, grid).contiguous()
        q = _to_tokens(self.proj_in(self.norm(s)))
        context = _to_tokens(self.proj_context(features))
        block_out = self.transformer_blocks[0](q, context, return_attention=with_attention)
        t, attn = block_out if with_attention else (block_out, None)
        t = rearrange(t, "b (h w) c -> b c h w", h=grid[0], w=grid[1])
        t = channels_to_space(self.proj_out(t), self.upscale, channels_last=_is_channels_last(features))
        out = self.conv_out(t)
        if out.shape[-2:] != (height, width):
            out = out[..., :height, :width]
        return out, attn
