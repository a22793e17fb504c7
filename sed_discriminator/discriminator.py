"""SeD, the semantic-aware discriminator, in its patch (PatchGAN) and pixel (U-Net) variants.

Module names equal those of the authors' code, so their checkpoints load through
:func:`~sed_discriminator.load_official_weights` and give the same outputs.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import RANGE_CHECK_CALLS, check_flag, check_image, check_input_range, check_same_dtype, check_semantic
from ._pickling import reduce_module
from ._state import check_finite
from ._upsample import conv_upsampled
from .attention import Attention
from .sefb import GROUP_NORM_GROUPS, SeFB
from .spectral_norm import (
    check_spectral_norm_vectors,
    power_iteration_paused,
    rename_legacy_spectral_norm_keys_,
    spectral_norm,
)

__all__ = ["SeD", "VARIANTS", "MIN_INPUT_SIZE", "CHANNELS_LAST_DEFAULT", "semantic_channel_step"]

VARIANTS = ("patch", "pixel")
MIN_INPUT_SIZE = 32
_LRELU_SLOPE = 0.2

# Upscale factor of each SeFB (feature grid / semantic grid at a 256 px input).
_UPSCALE = {"patch": {"att1": 4, "att2": 2, "att3": 2}, "pixel": {"att1": 8, "att2": 4, "att3": 2}}

# Layout of the convolutions for channels_last=None, per (device type, variant), as measured
# (docs/benchmarks.md). Device types not listed (CUDA included: not measured yet) use NCHW,
# the reference's layout.
CHANNELS_LAST_DEFAULT = {("cpu", "pixel"): True, ("cpu", "patch"): False}


def semantic_channel_step(variant: str) -> int:
    """The semantic channel counts ``SeD(variant)`` accepts are the multiples of this number.

    Each SeFB needs ``semantic_channels`` divisible by GroupNorm's 32 groups and by its upscale
    factor squared (patch: 4, 2, 2; pixel: 8, 4, 2), so patch takes multiples of 32, pixel of 64.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown SeD variant {variant!r}; choose one of {VARIANTS}.")
    return math.lcm(GROUP_NORM_GROUPS, *(u * u for u in _UPSCALE[variant].values()))


def _lrelu_(x: torch.Tensor) -> torch.Tensor:
    """LReLU in place, for tensors nothing else reads: a convolution's fresh output.

    A convolution's backward needs its input and weight, never its output, and the in-place
    LReLU's backward reads its own result (valid for a positive slope, double backward
    included), so the pre-activation tensor need not be kept: one activation less per layer.
    """
    return F.leaky_relu(x, _LRELU_SLOPE, inplace=True)


def _as_range(input_range: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise ValueError(f"input_range must be (low, high), two numbers, got {input_range!r}.") from None
    if not high > low:
        raise ValueError(f"input_range must be (low, high) with high > low, got {tuple(input_range)}.")
    return low, high


def _conv(c_in: int, c_out: int, kernel: int, stride: int, padding: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias)


class SeD(nn.Module):
    """Semantic-aware discriminator (Li et al., CVPR 2024, arXiv 2402.19387).

    The defaults reproduce the paper: ``SeD("patch")`` has 10,090,433 parameters and maps a
    256 px image to (B, 1, 30, 30) logits; ``SeD("pixel")`` has 10,158,417 and gives (B, 1, 256, 256).

    Beyond the reference, any image of at least 32 px per side works (square or not, any
    parity) and the semantic map may have any grid size: each SeFB resamples it to the grid
    its level needs (see :func:`~sed_discriminator.sefb.semantic_grid_size`).

    Args:
        variant: ``"patch"`` (PatchGAN, P+SeD) or ``"pixel"`` (U-Net, U+SeD).
        in_channels: image channels.
        width: base width (64 in the paper); the levels use 1, 2, 4 and 8 times it.
        semantic_channels: channels of the semantic map (1024 for CLIP RN50 layer3); a multiple
            of :func:`semantic_channel_step` (32 for patch, 64 for pixel).
        heads: attention heads of each SeFB.
        head_dim: width of each attention head.
        semantic_fusion: ``False`` builds the same network without SeFBs (this library's
            baselines without semantics); ``forward`` then ignores ``semantic``.
        channels_last: run the convolutions on ``torch.channels_last`` feature maps (weights and
            state dict keep the default layout; inputs may have any layout). ``None`` picks the
            layout measured faster for the input's device type (:data:`CHANNELS_LAST_DEFAULT`:
            on the CPU channels_last for ``"pixel"``, NCHW for ``"patch"``; NCHW on devices not
            measured yet, CUDA included). Outputs agree across layouts to float rounding.
        input_range: value range of the images you pass, ``(0, 1)`` as in the paper; other ranges
            (e.g. ``(-1, 1)``) are mapped to [0, 1] first, so the weights mean the same. The first
            calls check that the images lie in it (see "Input range" in docs/api.md).

    Shape:
        - x: (B, in_channels, H, W) with H, W >= 32, float (values in [0, 1] in the paper's recipe)
        - semantic: (B, semantic_channels, hs, ws)
        - output: patch (B, 1, H/8 - 2, W/8 - 2) for sides that are multiples of 8; pixel (B, 1, H, W)

    Example:
        >>> d = SeD("patch")
        >>> d(torch.rand(2, 3, 256, 256), torch.rand(2, 1024, 16, 16)).shape
        torch.Size([2, 1, 30, 30])
    """

    # Instance attributes a pickle leaves out (with the value they get back): a rebuilt model
    # range-checks its first calls again.
    _TRANSIENT: dict = {"_range_checks_left": RANGE_CHECK_CALLS}

    def __init__(
        self,
        variant: str = "patch",
        *,
        in_channels: int = 3,
        width: int = 64,
        semantic_channels: int = 1024,
        heads: int = 1,
        head_dim: int = 64,
        semantic_fusion: bool = True,
        channels_last: bool | None = None,
        input_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"Unknown SeD variant {variant!r}; choose one of {VARIANTS}.")
        sizes = (
            ("in_channels", in_channels),
            ("width", width),
            ("semantic_channels", semantic_channels),
            ("heads", heads),
            ("head_dim", head_dim),
        )
        for arg, value in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive integer, got {value!r}.")
        check_flag(semantic_fusion, "semantic_fusion")
        check_flag(channels_last, "channels_last", none_ok=True)
        self.input_range = _as_range(input_range)
        step = semantic_channel_step(variant)
        if semantic_fusion and semantic_channels % step:
            low = max(step, semantic_channels // step * step)
            raise ValueError(
                f"semantic_channels={semantic_channels} does not fit SeD({variant!r}): its SeFBs need a multiple "
                f"of {step} (GroupNorm's {GROUP_NORM_GROUPS} groups and upscale factors "
                f"{sorted(set(_UPSCALE[variant].values()))} squared), e.g. {low} or {low + step}. "
                "Project the semantic map to such a width with a 1x1 convolution, or use another extractor."
            )
        self.variant = variant
        self.in_channels = in_channels
        self.semantic_channels = semantic_channels
        self.semantic_fusion = semantic_fusion
        self.width = width
        self.heads = heads
        self.head_dim = head_dim
        self.channels_last = channels_last
        sn_names = self._build_patch(width) if variant == "patch" else self._build_pixel(width)
        if variant == "patch":
            self._init_normal()
        for name in sn_names:
            spectral_norm(getattr(self, name))

    # -- construction -------------------------------------------------------------------------

    def _attention(self, name: str, feature_channels: int, conv_out_kernel: int = 3) -> int:
        """Build SeFB ``name`` (or nothing without fusion); return the channels it adds."""
        if not self.semantic_fusion:
            setattr(self, name, None)
            return 0
        block = SeFB(
            feature_channels,
            _UPSCALE[self.variant][name],
            semantic_channels=self.semantic_channels,
            heads=self.heads,
            head_dim=self.head_dim,
            conv_out_kernel=conv_out_kernel,
        )
        setattr(self, name, block)
        return block.out_channels

    def _build_patch(self, w: int) -> list[str]:
        self.conv_first = _conv(self.in_channels, w, 4, 2, 1)
        self.conv1 = _conv(w, 2 * w, 4, 2, 1)
        extra = self._attention("att1", 2 * w)
        self.conv11 = _conv(2 * w + extra, 2 * w, 3, 1, 1)
        self.conv2 = _conv(2 * w, 4 * w, 4, 2, 1)
        extra = self._attention("att2", 4 * w)
        self.conv21 = _conv(4 * w + extra, 4 * w, 3, 1, 1)
        self.conv3 = _conv(4 * w, 8 * w, 4, 1, 1)
        extra = self._attention("att3", 8 * w, conv_out_kernel=4)
        self.conv31 = _conv(8 * w + extra, 8 * w, 3, 1, 1)
        self.conv_last = _conv(8 * w, 1, 4, 1, 1)
        return ["conv1", "conv11", "conv2", "conv21", "conv3", "conv31"]

    def _build_pixel(self, w: int) -> list[str]:
        self.conv0 = _conv(self.in_channels, w, 3, 1, 1)
        self.conv1 = _conv(w, 2 * w, 4, 2, 1, bias=False)
        self.conv2 = _conv(2 * w, 4 * w, 4, 2, 1, bias=False)
        self.conv3 = _conv(4 * w, 8 * w, 4, 2, 1, bias=False)
        extra = self._attention("att3", 8 * w)
        self.conv31 = _conv(8 * w + extra, 8 * w, 3, 1, 1)
        self.conv4 = _conv(8 * w, 4 * w, 3, 1, 1, bias=False)
        extra = self._attention("att2", 4 * w)
        self.conv21 = _conv(4 * w + extra, 4 * w, 3, 1, 1)
        self.conv5 = _conv(4 * w, 2 * w, 3, 1, 1, bias=False)
        extra = self._attention("att1", 2 * w)
        self.conv11 = _conv(2 * w + extra, 2 * w, 3, 1, 1)
        self.conv6 = _conv(2 * w, w, 3, 1, 1, bias=False)
        self.conv7 = _conv(w, w, 3, 1, 1, bias=False)
        self.conv8 = _conv(w, w, 3, 1, 1, bias=False)
        self.conv9 = _conv(w, 1, 3, 1, 1)
        return ["conv1", "conv2", "conv3", "conv31", "conv4", "conv21", "conv5", "conv11", "conv6", "conv7", "conv8"]

    def _init_normal(self) -> None:
        # The reference's init for the patch variant: N(0, 0.02) weights and zero biases for
        # every Conv and Linear, SeFB internals included; norm layers keep their defaults.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # -- public helpers -----------------------------------------------------------------------

    def set_fused_attn(self, enable: bool) -> SeD:
        """Choose the fused (``True``) or exact math (``False``) attention path for every SeFB."""
        check_flag(enable, "set_fused_attn(enable)")
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused_attn = enable
        return self

    def sefb_blocks(self) -> dict[str, SeFB]:
        """The SeFBs by name (``att1``, ``att2``, ``att3``); empty without semantic fusion."""
        return {name: block for name, block in self.named_children() if isinstance(block, SeFB)}

    def uses_channels_last(self, device: torch.device | str) -> bool:
        """Whether the convolutions run channels_last for inputs on ``device`` (resolves ``channels_last=None``)."""
        if self.channels_last is not None:
            return self.channels_last
        return CHANNELS_LAST_DEFAULT.get((torch.device(device).type, self.variant), False)

    # -- forward --------------------------------------------------------------------------------

    def _fuse(
        self, name: str, features: torch.Tensor, semantic: torch.Tensor | None, maps: dict | None
    ) -> torch.Tensor:
        block = getattr(self, name)
        if block is None:
            return features
        if maps is None:
            return torch.cat([features, block(features, semantic)], dim=1)
        fused, maps[name] = block.forward_with_attention(features, semantic)
        return torch.cat([features, fused], dim=1)

    # Every activation below follows a convolution whose output nothing else reads, so it runs
    # in place (see _lrelu_): same numbers, less memory. Forward hooks on these convolutions
    # therefore see their output after the activation.
    def _forward_patch(self, x: torch.Tensor, s: torch.Tensor | None, maps: dict | None) -> torch.Tensor:
        x = _lrelu_(self.conv_first(x))
        x = _lrelu_(self.conv11(self._fuse("att1", self.conv1(x), s, maps)))
        x = _lrelu_(self.conv21(self._fuse("att2", self.conv2(x), s, maps)))
        x = _lrelu_(self.conv31(self._fuse("att3", self.conv3(x), s, maps)))
        return self.conv_last(x)

    def _forward_pixel(self, x: torch.Tensor, s: torch.Tensor | None, maps: dict | None) -> torch.Tensor:
        x0 = _lrelu_(self.conv0(x))
        x1 = _lrelu_(self.conv1(x0))
        x2 = _lrelu_(self.conv2(x1))
        x3 = _lrelu_(self.conv31(self._fuse("att3", self.conv3(x2), s, maps)))
        x4 = _lrelu_(conv_upsampled(self.conv4, x3, x2.shape[-2:])) + x2
        x4 = self.conv21(self._fuse("att2", x4, s, maps))
        x5 = _lrelu_(conv_upsampled(self.conv5, x4, x1.shape[-2:])) + x1
        x5 = self.conv11(self._fuse("att1", x5, s, maps))
        x6 = _lrelu_(conv_upsampled(self.conv6, x5, x0.shape[-2:])) + x0
        out = _lrelu_(self.conv7(x6))
        out = _lrelu_(self.conv8(out))
        return self.conv9(out)

    def _run(self, x: torch.Tensor, semantic: torch.Tensor | None, maps: dict | None) -> torch.Tensor:
        check_image(x, owner="SeD", channels=self.in_channels, min_size=MIN_INPUT_SIZE)
        check_input_range(self, x, owner="SeD", value_range=self.input_range, judges_fakes=True)
        if self.semantic_fusion:
            check_semantic(semantic, owner="SeD", channels=self.semantic_channels, batch=x.shape[0])
        else:
            semantic = None
        first = self.conv_first if self.variant == "patch" else self.conv0
        check_same_dtype(first.weight, owner="SeD", image=x, semantic_map=semantic)
        low, high = self.input_range
        if (low, high) != (0.0, 1.0):
            x = (x - low) / (high - low)
        if self.uses_channels_last(x.device):
            # Every convolution follows the layout of its input, so converting the image suffices.
            x = x.contiguous(memory_format=torch.channels_last)
        forward = self._forward_patch if self.variant == "patch" else self._forward_pixel
        return forward(x, semantic, maps)

    def forward(self, x: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for real/fake.

        Args:
            x: images (B, C, H, W), float, H and W >= 32, in the model's dtype (or under autocast).
            semantic: semantic map of the HR images (B, semantic_channels, hs, ws), e.g. from
                :class:`~sed_discriminator.SemanticExtractor`. Not needed without semantic fusion.

        Returns:
            Patch logits (B, 1, h, w) or per-pixel logits (B, 1, H, W).
        """
        return self._run(x, semantic, None)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, semantic: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-attention probabilities of every SeFB, for visualisation (math path, no grad).

        The forward computes what eval mode would (spectral-norm power iteration paused on this
        thread, see :func:`~sed_discriminator.spectral_norm.power_iteration_paused`) without
        changing any ``training`` flag, so a thread training this module meanwhile is unaffected.
        :func:`sed_discriminator.diagnostics.attention_grids` gives the same maps with their grids.

        Returns:
            ``{name: (B, heads, semantic tokens, image tokens)}`` for ``att1``..``att3``.
        """
        return self._inspect(x, semantic)[1]

    def _inspect(self, x: torch.Tensor, semantic: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and cross-attention maps as in eval mode, leaving every flag and buffer as it is."""
        maps: dict[str, torch.Tensor] = {}
        with torch.no_grad(), power_iteration_paused():
            logits = self._run(x, semantic, maps)
        return logits, maps

    def extra_repr(self) -> str:
        layout = "auto" if self.channels_last is None else self.channels_last
        in_range = "" if self.input_range == (0.0, 1.0) else f", input_range={self.input_range}"
        return (
            f"variant={self.variant!r}, semantic_channels={self.semantic_channels}, "
            f"semantic_fusion={self.semantic_fusion}, channels_last={layout}{in_range}"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # The authors' checkpoints carry the legacy spectral-norm keys (weight_orig/_u/_v). This runs
        # before the children load, on the dict they load from: renaming in place lets load_state_dict
        # (and a trainer's own loader) read them, strictly. Weights that would give NaN logits are refused.
        rename_legacy_spectral_norm_keys_(state_dict, prefix)
        mine = {k: v for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
        check_finite(mine, source=f"The state dict loaded into SeD({self.variant!r})")
        check_spectral_norm_vectors(mine, source=f"The state dict loaded into SeD({self.variant!r})")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _config(self) -> dict:
        """The constructor arguments that rebuild this network (used by pickling)."""
        return dict(
            variant=self.variant,
            in_channels=self.in_channels,
            width=self.width,
            semantic_channels=self.semantic_channels,
            heads=self.heads,
            head_dim=self.head_dim,
            semantic_fusion=self.semantic_fusion,
            channels_last=self.channels_last,
            input_range=self.input_range,
        )

    def __reduce__(self):
        return reduce_module(self, SeD.__init__, self._config())

    def __deepcopy__(self, memo: dict) -> SeD:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo) if key not in self._TRANSIENT else self._TRANSIENT[key]
        return clone
