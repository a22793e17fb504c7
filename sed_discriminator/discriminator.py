"""SeD, the semantic-aware discriminator, in its patch (PatchGAN) and pixel (U-Net) variants.

Module names equal those of the authors' code, so their checkpoints load through
:func:`load_official_weights` and give the same outputs.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_image, check_semantic
from .attention import Attention
from .sefb import SeFB
from .spectral_norm import remap_legacy_spectral_norm_keys, spectral_norm

__all__ = ["SeD", "VARIANTS", "MIN_INPUT_SIZE", "load_official_weights"]

VARIANTS = ("patch", "pixel")
MIN_INPUT_SIZE = 32
_LRELU_SLOPE = 0.2

# Upscale factor of each SeFB (feature grid / semantic grid at a 256 px input).
_UPSCALE = {"patch": {"att1": 4, "att2": 2, "att3": 2}, "pixel": {"att1": 8, "att2": 4, "att3": 2}}


def _lrelu_(x: torch.Tensor) -> torch.Tensor:
    """LReLU in place, for tensors nothing else reads: a convolution's fresh output.

    A convolution's backward needs its input and weight, never its output, and the in-place
    LReLU's backward reads its own result (valid for a positive slope, double backward
    included), so the pre-activation tensor need not be kept: one activation less per layer
    in memory, and one allocation less per layer (which on CPU also means fewer page faults).
    """
    return F.leaky_relu(x, _LRELU_SLOPE, inplace=True)


def _conv(c_in: int, c_out: int, kernel: int, stride: int, padding: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias)


def _upsample(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    # Equals scale_factor=2 whenever the skip is exactly twice as large (all even sizes).
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
        return _upsample(self.source, self.size)


def _conv_upsampled(conv: nn.Conv2d, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """``conv(upsample(x))`` that saves ``x`` for backward instead of the 4x larger upsampled map.

    The convolution's backward needs its input; the bilinear upsampling is redone from ``x``
    when that happens (in grad mode under ``create_graph``, so double backward works). Same
    numbers as the plain composition, for one extra upsampling per backward: in the pixel SeD
    at 512 px the three upsampled maps (224 MB) are not held for backward, their sources (48 MB) are.
    """
    up = _upsample(x, size)
    if not torch.is_grad_enabled() or _compiling() or not _saved_tensor_hooks_enabled():
        return conv(up)
    key = (up.data_ptr(), up.shape, up.stride())

    def pack(t: torch.Tensor):
        return _UpsampledFrom(x, size) if (t.data_ptr(), t.shape, t.stride()) == key else t

    def unpack(packed):
        return packed.rebuild() if isinstance(packed, _UpsampledFrom) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return conv(up)


def _compiling() -> bool:
    # Under torch.compile the compiler decides what to save and what to recompute.
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


def _saved_tensor_hooks_enabled() -> bool:
    # Some wrappers forbid saved-tensor hooks (torch.autograd.graph.disable_saved_tensors_hooks).
    check = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    return check is None or check()


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
        semantic_channels: channels of the semantic map (1024 for CLIP RN50 layer3).
        heads: attention heads of each SeFB.
        head_dim: width of each attention head.
        semantic_fusion: ``False`` builds the same network without SeFBs (the P / U baselines);
            ``forward`` then ignores ``semantic``.
        channels_last: run the convolutions on ``torch.channels_last`` feature maps (the weights
            and the state dict keep the default layout; inputs may have any layout). ``None``
            picks what measured faster on the CPU: ``True`` for ``"pixel"``, ``False`` for
            ``"patch"``. Outputs agree with the other layout to float rounding (about 1e-6).

    Shape:
        - x: (B, in_channels, H, W) with H, W >= 32, float (values in [0, 1] in the paper's recipe)
        - semantic: (B, semantic_channels, hs, ws)
        - output: patch (B, 1, H/8 - 2, W/8 - 2) for sides that are multiples of 8; pixel (B, 1, H, W)

    Example:
        >>> d = SeD("patch")
        >>> d(torch.rand(2, 3, 256, 256), torch.rand(2, 1024, 16, 16)).shape
        torch.Size([2, 1, 30, 30])
    """

    def __init__(
        self,
        variant: str = "patch",
        in_channels: int = 3,
        width: int = 64,
        semantic_channels: int = 1024,
        heads: int = 1,
        head_dim: int = 64,
        semantic_fusion: bool = True,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"Unknown SeD variant {variant!r}; choose one of {VARIANTS}.")
        for arg, value in (("in_channels", in_channels), ("width", width), ("heads", heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive integer, got {value!r}.")
        self.variant = variant
        self.in_channels = in_channels
        self.semantic_channels = semantic_channels
        self.semantic_fusion = semantic_fusion
        self.width = width
        self.heads = heads
        self.head_dim = head_dim
        self.channels_last = variant == "pixel" if channels_last is None else bool(channels_last)
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
            self.semantic_channels,
            self.heads,
            self.head_dim,
            conv_out_kernel,
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
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused_attn = bool(enable)
        return self

    def sefb_blocks(self) -> dict[str, SeFB]:
        """The SeFBs by name (``att1``, ``att2``, ``att3``); empty without semantic fusion."""
        return {name: block for name, block in self.named_children() if isinstance(block, SeFB)}

    # -- forward --------------------------------------------------------------------------------

    def _fuse(self, name: str, semantic: torch.Tensor | None, features: torch.Tensor, maps: dict | None) -> torch.Tensor:
        block = getattr(self, name)
        if block is None:
            return features
        if maps is None:
            return torch.cat([features, block(semantic, features)], dim=1)
        fused, maps[name] = block(semantic, features, return_attention=True)
        return torch.cat([features, fused], dim=1)

    # Every activation below follows a convolution whose output nothing else reads, so it runs
    # in place (see _lrelu_): same numbers, less memory. Forward hooks on these convolutions
    # therefore see their output after the activation.
    def _forward_patch(self, x: torch.Tensor, s: torch.Tensor | None, maps: dict | None) -> torch.Tensor:
        x = _lrelu_(self.conv_first(x))
        x = _lrelu_(self.conv11(self._fuse("att1", s, self.conv1(x), maps)))
        x = _lrelu_(self.conv21(self._fuse("att2", s, self.conv2(x), maps)))
        x = _lrelu_(self.conv31(self._fuse("att3", s, self.conv3(x), maps)))
        return self.conv_last(x)

    def _forward_pixel(self, x: torch.Tensor, s: torch.Tensor | None, maps: dict | None) -> torch.Tensor:
        x0 = _lrelu_(self.conv0(x))
        x1 = _lrelu_(self.conv1(x0))
        x2 = _lrelu_(self.conv2(x1))
        x3 = _lrelu_(self.conv31(self._fuse("att3", s, self.conv3(x2), maps)))
        x4 = _lrelu_(_conv_upsampled(self.conv4, x3, x2.shape[-2:])) + x2
        x4 = self.conv21(self._fuse("att2", s, x4, maps))
        x5 = _lrelu_(_conv_upsampled(self.conv5, x4, x1.shape[-2:])) + x1
        x5 = self.conv11(self._fuse("att1", s, x5, maps))
        x6 = _lrelu_(_conv_upsampled(self.conv6, x5, x0.shape[-2:])) + x0
        out = _lrelu_(self.conv7(x6))
        out = _lrelu_(self.conv8(out))
        return self.conv9(out)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        # Every convolution follows the layout of its input, so converting the image suffices.
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _check(self, x: torch.Tensor, semantic: torch.Tensor | None) -> None:
        check_image(x, owner="SeD", channels=self.in_channels, min_size=MIN_INPUT_SIZE)
        if self.semantic_fusion:
            check_semantic(semantic, owner="SeD", channels=self.semantic_channels, batch=x.shape[0])

    def forward(self, x: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for real/fake.

        Args:
            x: images (B, C, H, W), float, H and W >= 32.
            semantic: semantic map of the HR images (B, semantic_channels, hs, ws), e.g. from
                :class:`~sed_discriminator.SemanticExtractor`. Not needed without semantic fusion.

        Returns:
            Patch logits (B, 1, h, w) or per-pixel logits (B, 1, H, W).
        """
        self._check(x, semantic)
        forward = self._forward_patch if self.variant == "patch" else self._forward_pixel
        return forward(self._layout(x), semantic, None)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, semantic: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-attention probabilities of every SeFB, for visualisation (math path, no grad).

        Returns:
            ``{name: (B, heads, semantic tokens, image tokens)}`` for ``att1``..``att3``.
        """
        self._check(x, semantic)
        maps: dict[str, torch.Tensor] = {}
        forward = self._forward_patch if self.variant == "patch" else self._forward_pixel
        forward(self._layout(x), semantic, maps)
        return maps

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, semantic_channels={self.semantic_channels}, "
            f"semantic_fusion={self.semantic_fusion}, channels_last={self.channels_last}"
        )

    # -- pickling -----------------------------------------------------------------------------
    # torch refuses to pickle parametrized modules (the spectral-norm convs), so a pickle holds
    # the constructor arguments, the state dict and the per-module flags, and is rebuilt from them.
    # Forward/backward hooks are not pickled. deepcopy keeps its usual attribute-by-attribute copy.

    def __reduce__(self):
        config = dict(
            variant=self.variant,
            in_channels=self.in_channels,
            width=self.width,
            semantic_channels=self.semantic_channels,
            heads=self.heads,
            head_dim=self.head_dim,
            semantic_fusion=self.semantic_fusion,
            channels_last=self.channels_last,
        )
        flags = dict(
            training=[m.training for m in self.modules()],
            fused_attn=[m.fused_attn for m in self.modules() if isinstance(m, Attention)],
            requires_grad=[p.requires_grad for p in self.parameters()],
        )
        extra = {k: v for k, v in self.__dict__.items() if k not in _MODULE_ATTRS}
        return _unpickle_sed, (type(self), config, self.state_dict(), flags, extra)

    def __deepcopy__(self, memo: dict) -> SeD:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone


_MODULE_ATTRS = frozenset(nn.Module().__dict__)


def _unpickle_sed(cls: type, config: dict, state: dict, flags: dict, extra: dict) -> SeD:
    model = cls.__new__(cls)
    with torch.random.fork_rng(devices=[]):  # rebuilding must not consume the caller's random stream
        SeD.__init__(model, **config)
    model.load_state_dict(state, strict=True)
    for module, mode in zip(model.modules(), flags["training"]):
        module.training = mode
    for module, fused in zip((m for m in model.modules() if isinstance(m, Attention)), flags["fused_attn"]):
        module.fused_attn = fused
    for param, requires_grad in zip(model.parameters(), flags["requires_grad"]):
        param.requires_grad_(requires_grad)
    model.__dict__.update(extra)
    return model


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_official_weights(model: SeD, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> SeD:
    """Load a checkpoint saved by the authors' code (or by this library) into ``model``, strictly.

    Strips ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile) prefixes,
    unwraps ``{"params": ...}``/``{"state_dict": ...}`` containers and renames the legacy
    spectral-norm keys (``weight_orig``, ``weight_u``, ``weight_v``) to this library's
    parametrization keys.

    Args:
        model: an :class:`SeD` of the checkpoint's variant and sizes.
        source: a checkpoint path (read with ``weights_only=True``) or a state dict.

    Returns:
        ``model``, with the weights loaded.

    Example:
        >>> d = load_official_weights(SeD("patch"), "sed_patch.pth")  # doctest: +SKIP
    """
    if isinstance(source, (str, os.PathLike)):
        from .extractor import read_state_dict

        state: Mapping[str, torch.Tensor] = read_state_dict(source)
    elif isinstance(source, Mapping):
        state = source
        for wrapper in ("state_dict", "params_ema", "params"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    else:
        raise TypeError(f"source must be a path or a state dict, got {type(source).__name__}.")
    state = remap_legacy_spectral_norm_keys(_strip_prefixes(state))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        guess = "patch" if any(k.startswith("conv_first.") for k in state) else "pixel" if any(k.startswith("conv9.") for k in state) else None
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
