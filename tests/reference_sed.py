"""An independent, plain re-implementation of SeD written from the facts of docs/reference.md.

It exists only to test ``sed_discriminator`` against the paper's numerics, so it deliberately
imports NOTHING from the library and favours the obvious formula over speed:

- attention as two ``torch.einsum`` calls and an explicit softmax (no fused kernels);
- the channels-to-space step from its index formula
  ``out[b, c, h*u + uh, w*u + uw] = in[b, c*u*u + uw*u + uh, h, w]`` (one slice per (uh, uw));
- the residual-free transformer block, GroupNorm(32, eps 1e-6), LayerNorm(eps 1e-5) and a
  gated GELU with the exact erf formula;
- the patch and pixel (U-Net) discriminators with the legacy ``torch.nn.utils.spectral_norm``
  hook the authors trained with, so the state dict has their keys
  (``<conv>.weight_orig``, ``<conv>.weight_u``, ``<conv>.weight_v``) and parameter names
  (docs/reference.md section 6).

The upscale factors are fixed per level as in the reference, so it only supports inputs whose
sides are multiples of 16 with a semantic grid of side/16 (docs/reference.md section 5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm as legacy_spectral_norm

LRELU_SLOPE = 0.2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_PARAMS = 10_090_433
PIXEL_PARAMS = 10_158_417
PATCH_SN = ("conv1", "conv11", "conv2", "conv21", "conv3", "conv31")
PIXEL_SN = ("conv1", "conv2", "conv3", "conv31", "conv4", "conv21", "conv5", "conv11", "conv6", "conv7", "conv8")


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LRELU_SLOPE)


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    """GELU with the exact Gaussian CDF: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def channels_to_space(x: torch.Tensor, u: int, order: str = "reference") -> torch.Tensor:
    """Channels into space by factor ``u``, written from the index formula.

    ``order="reference"``: ``out[b, c, h*u+uh, w*u+uw] = x[b, c*u*u + uw*u + uh, h, w]`` (the paper's).
    ``order="pixel_shuffle"``: ``x[b, c*u*u + uh*u + uw, h, w]`` (torch's PixelShuffle; only used to
    show that the parity tests tell the two apart).
    """
    b, cu, h, w = x.shape
    c = cu // (u * u)
    out = x.new_zeros(b, c, h * u, w * u)
    base = torch.arange(c, device=x.device) * (u * u)
    for uh in range(u):
        for uw in range(u):
            offset = uw * u + uh if order == "reference" else uh * u + uw
            out[:, :, uh::u, uw::u] = x[:, base + offset]
    return out


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.scale = head_dim**-0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def scores(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = context.shape[1]
        q = self.to_q(x).reshape(b, n, self.heads, -1)
        k = self.to_k(context).reshape(b, m, self.heads, -1)
        sim = torch.einsum("bnhd,bmhd->bhnm", q, k) * self.scale
        sim = sim - sim.amax(dim=-1, keepdim=True)
        e = sim.exp()
        return e / e.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        m = context.shape[1]
        attn = self.scores(x, context)
        v = self.to_v(context).reshape(b, m, self.heads, -1)
        out = torch.einsum("bhnm,bmhd->bnhd", attn, v).reshape(b, n, -1)
        return self.to_out(out)


class RefGEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        half = y.shape[-1] // 2
        return y[..., :half] * gelu_exact(y[..., half:])


class RefFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(RefGEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RefBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward; pre-norm, NO residual connections."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.attn1 = RefAttention(dim, heads, head_dim)
        self.attn2 = RefAttention(dim, heads, head_dim)
        self.ff = RefFeedForward(dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        t = self.attn1(self.norm1(x))
        t = self.attn2(self.norm2(t), context)
        return self.ff(self.norm3(t))


class RefSeFB(nn.Module):
    def __init__(
        self,
        feature_channels: int,
        upscale: int,
        semantic_channels: int = 1024,
        heads: int = 1,
        head_dim: int = 64,
        last: bool = False,
        order: str = "reference",
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.upscale = upscale
        self.order = order
        self.out_channels = semantic_channels // (upscale * upscale)
        self.norm = nn.GroupNorm(32, semantic_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(semantic_channels, inner, 1)
        self.proj_context = nn.Conv2d(feature_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([RefBlock(inner, heads, head_dim)])
        self.proj_out = nn.Conv2d(inner, semantic_channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        c = self.out_channels
        self.conv_out = nn.Conv2d(c, c, 4 if last else 3, 1, 1)

    def tokens(self, s: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, hs, ws = s.shape
        q = self.proj_in(self.norm(s))
        q = q.reshape(b, q.shape[1], hs * ws).permute(0, 2, 1)  # row-major over (h, w)
        ctx = self.proj_context(f)
        ctx = ctx.reshape(b, ctx.shape[1], -1).permute(0, 2, 1)
        return q, ctx

    def cross_attention(self, s: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Probabilities of the cross-attention, (B, heads, semantic tokens, image tokens)."""
        q, ctx = self.tokens(s, f)
        block = self.transformer_blocks[0]
        t = block.attn1(block.norm1(q))
        return block.attn2.scores(block.norm2(t), ctx)

    def forward(self, s: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        b, _, hs, ws = s.shape
        q, ctx = self.tokens(s, f)
        t = self.transformer_blocks[0](q, ctx)
        t = t.permute(0, 2, 1).reshape(b, t.shape[-1], hs, ws)
        return self.conv_out(channels_to_space(self.proj_out(t), self.upscale, self.order))


class _RefSeD(nn.Module):
    """What both discriminators share: their size arguments, then the legacy spectral norm on the convs
    named in ``SPECTRAL_NORM`` once the subclass's ``build(w, cs, sefb_kwargs)`` has made (and initialised)
    the layers."""

    SPECTRAL_NORM: tuple[str, ...] = ()

    def __init__(
        self,
        width: int = 64,
        semantic_channels: int = 1024,
        heads: int = 1,
        head_dim: int = 64,
        order: str = "reference",
    ) -> None:
        super().__init__()
        sefb = dict(semantic_channels=semantic_channels, heads=heads, head_dim=head_dim, order=order)
        self.build(width, semantic_channels, sefb)
        for name in self.SPECTRAL_NORM:
            legacy_spectral_norm(getattr(self, name))


class RefSeDPatch(_RefSeD):
    """P+SeD (docs/reference.md section 3): N(0, 0.02) init of every Conv/Linear weight, zero biases."""

    SPECTRAL_NORM = PATCH_SN

    def build(self, w: int, cs: int, kw: dict) -> None:
        self.conv_first = nn.Conv2d(3, w, 4, 2, 1)
        self.conv1 = nn.Conv2d(w, 2 * w, 4, 2, 1)
        self.att1 = RefSeFB(2 * w, 4, **kw)
        self.conv11 = nn.Conv2d(2 * w + cs // 16, 2 * w, 3, 1, 1)
        self.conv2 = nn.Conv2d(2 * w, 4 * w, 4, 2, 1)
        self.att2 = RefSeFB(4 * w, 2, **kw)
        self.conv21 = nn.Conv2d(4 * w + cs // 4, 4 * w, 3, 1, 1)
        self.conv3 = nn.Conv2d(4 * w, 8 * w, 4, 1, 1)
        self.att3 = RefSeFB(8 * w, 2, last=True, **kw)
        self.conv31 = nn.Conv2d(8 * w + cs // 4, 8 * w, 3, 1, 1)
        self.conv_last = nn.Conv2d(8 * w, 1, 4, 1, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x = lrelu(self.conv_first(x))
        f = self.conv1(x)
        x = lrelu(self.conv11(torch.cat([f, self.att1(s, f)], 1)))
        f = self.conv2(x)
        x = lrelu(self.conv21(torch.cat([f, self.att2(s, f)], 1)))
        f = self.conv3(x)
        x = lrelu(self.conv31(torch.cat([f, self.att3(s, f)], 1)))
        return self.conv_last(x)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class RefSeDPixel(_RefSeD):
    """U+SeD (docs/reference.md section 4): PyTorch default init, proj_out zero."""

    SPECTRAL_NORM = PIXEL_SN

    def build(self, w: int, cs: int, kw: dict) -> None:
        self.conv0 = nn.Conv2d(3, w, 3, 1, 1)
        self.conv1 = nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False)
        self.conv2 = nn.Conv2d(2 * w, 4 * w, 4, 2, 1, bias=False)
        self.conv3 = nn.Conv2d(4 * w, 8 * w, 4, 2, 1, bias=False)
        self.att3 = RefSeFB(8 * w, 2, **kw)
        self.conv31 = nn.Conv2d(8 * w + cs // 4, 8 * w, 3, 1, 1)
        self.conv4 = nn.Conv2d(8 * w, 4 * w, 3, 1, 1, bias=False)
        self.att2 = RefSeFB(4 * w, 4, **kw)
        self.conv21 = nn.Conv2d(4 * w + cs // 16, 4 * w, 3, 1, 1)
        self.conv5 = nn.Conv2d(4 * w, 2 * w, 3, 1, 1, bias=False)
        self.att1 = RefSeFB(2 * w, 8, **kw)
        self.conv11 = nn.Conv2d(2 * w + cs // 64, 2 * w, 3, 1, 1)
        self.conv6 = nn.Conv2d(2 * w, w, 3, 1, 1, bias=False)
        self.conv7 = nn.Conv2d(w, w, 3, 1, 1, bias=False)
        self.conv8 = nn.Conv2d(w, w, 3, 1, 1, bias=False)
        self.conv9 = nn.Conv2d(w, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x0 = lrelu(self.conv0(x))
        x1 = lrelu(self.conv1(x0))
        x2 = lrelu(self.conv2(x1))
        x3 = self.conv3(x2)
        x3 = lrelu(self.conv31(torch.cat([x3, self.att3(s, x3)], 1)))
        x4 = lrelu(self.conv4(_up(x3))) + x2
        x4 = self.conv21(torch.cat([x4, self.att2(s, x4)], 1))
        x5 = lrelu(self.conv5(_up(x4))) + x1
        x5 = self.conv11(torch.cat([x5, self.att1(s, x5)], 1))
        x6 = lrelu(self.conv6(_up(x5))) + x0
        out = lrelu(self.conv7(x6))
        out = lrelu(self.conv8(out))
        return self.conv9(out)


def build_reference(variant: str, **kwargs) -> nn.Module:
    """``"patch"`` -> :class:`RefSeDPatch`, ``"pixel"`` -> :class:`RefSeDPixel`."""
    return {"patch": RefSeDPatch, "pixel": RefSeDPixel}[variant](**kwargs)


@torch.no_grad()
def perturb_(model: nn.Module, generator: torch.Generator, scale: float = 1.0) -> nn.Module:
    """Add seeded noise to every parameter so that no weight keeps a trivial value.

    Matrices get noise of std ``scale / sqrt(fan_in)``, so attention scores are O(1) and the
    softmax is far from uniform (with the paper's N(0, 0.02) init the semantic queries barely
    move the output, which would hide a broken query path from a parity test); vectors (biases,
    norm affines) get std ``0.1 * scale``. It also makes the pixel variant's zero ``proj_out``
    and the norm layers' unit/zero affine parameters non-trivial.
    """
    for p in model.parameters():
        std = scale / math.sqrt(p[0].numel()) if p.ndim >= 2 else 0.1 * scale
        p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
    return model


def legacy_to_library_name(name: str) -> str:
    """Map a reference parameter/buffer name to the library's parametrization name."""
    for old, new in (
        ("weight_orig", "parametrizations.weight.original"),
        ("weight_u", "parametrizations.weight.0._u"),
        ("weight_v", "parametrizations.weight.0._v"),
    ):
        if name.endswith("." + old):
            return name[: -len(old)] + new
    return name


@torch.no_grad()
def settle_spectral_norm_(model: nn.Module, iterations: int = 20) -> nn.Module:
    """Run ``iterations`` power iterations of every legacy spectral-norm hook (as that many
    training forwards would), so that sigma is a sensible estimate before an eval forward."""
    from torch.nn.utils.spectral_norm import SpectralNorm as LegacySpectralNorm

    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, LegacySpectralNorm):
                for _ in range(iterations):
                    setattr(module, hook.name, hook.compute_weight(module, do_power_iteration=True))
    return model
