"""Attention, gated-GELU feed-forward and the residual-free transformer block used by SeFB.

Parameter names follow the authors' code (``to_q``, ``to_k``, ``to_v``, ``to_out.0``,
``ff.net.0.proj``, ``ff.net.2``, ``norm1..3``) so their checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.jit import Final

from ._checks import check_flag
from ._deprecation import keyword_only_since
from .config import use_fused_attn

__all__ = ["Attention", "FeedForward", "TransformerBlock", "math_attention_scores"]


def math_attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention probabilities, computed in float32 when the inputs are reduced precision.

    Args:
        q: queries, shape (B, heads, Nq, D).
        k: keys, shape (B, heads, Nk, D).
        scale: factor applied to the dot products.

    Returns:
        Probabilities of shape (B, heads, Nq, Nk), in the dtype of ``q``.
    """
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()  # upcast reduced precision only: float64 must stay float64
    return scores.softmax(dim=-1).to(q.dtype)


class Attention(nn.Module):
    """Multi-head attention with bias-free projections (self-attention when ``context`` is None).

    Args:
        dim: width of the query tokens.
        heads: number of heads.
        head_dim: width of each head; scores are scaled by ``head_dim ** -0.5``.
        context_dim: width of the context tokens (defaults to ``dim``).
        dropout: dropout after the output projection (0 in the paper).

    Shape:
        - x: (B, Nq, dim)
        - context: (B, Nk, context_dim)
        - output: (B, Nq, dim)
    """

    fused_attn: Final[bool]

    def __init__(
        self,
        dim: int,
        heads: int = 1,
        head_dim: int = 64,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        context_dim = dim if context_dim is None else context_dim
        self.heads = heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.fused_attn = use_fused_attn()
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "b n (h d) -> b h n d", h=self.heads)

    @keyword_only_since("0.3", "return_attention")
    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, *, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend from ``x`` to ``context`` (or to ``x`` itself).

        Args:
            x: query tokens.
            context: key/value tokens; ``None`` for self-attention.
            return_attention: also return the probabilities (always computed on the math path).

        Returns:
            The attended tokens, and with ``return_attention`` the (B, heads, Nq, Nk) probabilities.
        """
        check_flag(return_attention, "Attention.forward(return_attention)")
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        attn = None
        if self.fused_attn and not return_attention:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = math_attention_scores(q, k, self.scale)
            out = torch.matmul(attn, v)
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        return (out, attn) if return_attention else out


class GEGLU(nn.Module):
    """Linear projection to twice the width, split in halves (a, g), returning a * GELU(g)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Gated-GELU feed-forward: GEGLU(dim -> mult*dim), Dropout, Linear(mult*dim -> dim).

    Args:
        dim: token width.
        mult: hidden expansion factor (4 in the paper).
        dropout: dropout between the two projections.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = dim * mult
        self.net = nn.Sequential(GEGLU(dim, hidden), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, each pre-normed, with NO residuals.

    This is the block of the paper's reference: ``t = attn1(norm1(x))``,
    ``t = attn2(norm2(t), context)``, ``t = ff(norm3(t))``.

    Args:
        dim: token width (``heads * head_dim`` in SeFB).
        heads: attention heads.
        head_dim: width of each head.
        context_dim: width of the context (image) tokens.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.attn1 = Attention(dim, heads, head_dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.ff = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    @keyword_only_since("0.3", "return_attention")
    def forward(
        self, x: torch.Tensor, context: torch.Tensor, *, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the block; with ``return_attention`` also return the cross-attention probabilities."""
        t = self.attn1(self.norm1(x))
        cross = self.attn2(self.norm2(t), context, return_attention=return_attention)
        t, attn = cross if return_attention else (cross, None)
        t = self.ff(self.norm3(t))
        return (t, attn) if return_attention else t
