"""Adversarial losses for GAN super-resolution, as functions and as modules.

Kinds (``kind=``):

- ``"vanilla"``: binary cross-entropy with logits (the paper's choice).
- ``"lsgan"``: least squares, targets 1 (real) and 0 (fake).
- ``"hinge"``: hinge loss for D, ``-mean(fake)`` for G.
- ``"ragan"``: relativistic average GAN of ESRGAN: each logit is compared with the mean
  logit of the other batch (mean over every element), with BCE.

Every loss is a mean over all elements; D losses add the real and fake terms (for ``ragan``
they are averaged, as in ESRGAN). ``weight`` multiplies the result. Half-precision logits
(float16, bfloat16, e.g. from a discriminator under autocast) are computed in float32, for
every kind, and the loss is float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import math_attention

__all__ = [
    "LOSS_KINDS",
    "generator_loss",
    "discriminator_loss",
    "GeneratorLoss",
    "DiscriminatorLoss",
    "r1_penalty",
]

LOSS_KINDS = ("vanilla", "lsgan", "hinge", "ragan")


def _check_kind(kind: str) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"Unknown GAN loss kind {kind!r}; choose one of {LOSS_KINDS}.")


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _needs_real(kind: str, real_logits: torch.Tensor | None) -> torch.Tensor:
    if real_logits is None:
        raise ValueError(f"The {kind!r} generator loss needs real_logits, the discriminator's output on real images.")
    return real_logits


def _check_weight(owner: str, weight: object) -> None:
    if isinstance(weight, torch.Tensor) and weight.numel() == 1 and weight.is_floating_point():
        return
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(
            f"{owner}: weight must be a number (e.g. weight=0.01), got {weight!r} ({type(weight).__name__})."
        )


def _as_float32(t: torch.Tensor | None) -> torch.Tensor | None:
    # Squares, means and hinges in bfloat16 lose the third digit (1.4766 for 1.4811); BCE already upcasts.
    return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t


def _check_logits(owner: str, **logits: torch.Tensor | None) -> None:
    # The mean over no element is NaN: an empty batch would train on NaN without a word.
    for name, t in logits.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{owner}: {name} must be a tensor of logits, got {type(t).__name__}.")
        if not t.is_floating_point():
            raise ValueError(
                f"{owner}: {name} must be floating-point logits (the discriminator's raw output), got dtype "
                f"{t.dtype}. Pass the discriminator's output itself, not labels or predictions."
            )
        if t.numel() == 0:
            raise ValueError(
                f"{owner}: {name} is empty (shape {tuple(t.shape)}), so the loss would be NaN. "
                "Skip steps whose batch has no images (e.g. DataLoader(drop_last=True))."
            )


def generator_loss(
    fake_logits: torch.Tensor, *, real_logits: torch.Tensor | None = None, kind: str = "vanilla", weight: float = 1.0
) -> torch.Tensor:
    """Adversarial loss of the generator.

    Args:
        fake_logits: D's logits on generated images (with gradient to the generator).
        real_logits: D's logits on real images; needed by ``"ragan"`` only (detached here).
        kind: one of :data:`LOSS_KINDS`.
        weight: factor on the loss (0.01 in the paper's recipe).

    Returns:
        A scalar tensor.

    Example:
        >>> round(generator_loss(torch.zeros(2, 1, 30, 30)).item(), 4)  # BCE of logit 0: log 2
        0.6931
    """
    _check_kind(kind)
    _check_weight("generator_loss", weight)
    _check_logits("generator_loss", fake_logits=fake_logits, real_logits=real_logits)
    fake_logits, real_logits = _as_float32(fake_logits), _as_float32(real_logits)
    if kind == "vanilla":
        loss = _bce(fake_logits, 1.0)
    elif kind == "lsgan":
        loss = (fake_logits - 1).pow(2).mean()
    elif kind == "hinge":
        loss = -fake_logits.mean()
    else:
        real = _needs_real(kind, real_logits).detach()
        loss = 0.5 * (_bce(real - fake_logits.mean(), 0.0) + _bce(fake_logits - real.mean(), 1.0))
    return loss * weight


def discriminator_loss(
    fake_logits: torch.Tensor, *, real_logits: torch.Tensor, kind: str = "vanilla", weight: float = 1.0
) -> torch.Tensor:
    """Adversarial loss of the discriminator.

    The logits being judged come first, the real ones by keyword, as everywhere in this library
    (0.1 took ``(real, fake)`` positionally; that call now fails instead of training D backwards).

    Args:
        fake_logits: D's logits on generated images (detach the generator's output first).
        real_logits: D's logits on real images.
        kind: one of :data:`LOSS_KINDS`.
        weight: factor on the loss (1 in the paper's recipe: the GAN weight applies to G only).

    Returns:
        A scalar tensor: the real term plus the fake term (their mean for ``"ragan"``).

    Example:
        >>> fake, real = torch.full((2, 1, 30, 30), -3.0), torch.full((2, 1, 30, 30), 3.0)
        >>> discriminator_loss(fake, real_logits=real) < discriminator_loss(real, real_logits=fake)
        tensor(True)
    """
    _check_kind(kind)
    _check_weight("discriminator_loss", weight)
    _check_logits("discriminator_loss", fake_logits=fake_logits, real_logits=real_logits)
    fake_logits, real_logits = _as_float32(fake_logits), _as_float32(real_logits)
    if kind == "vanilla":
        loss = _bce(real_logits, 1.0) + _bce(fake_logits, 0.0)
    elif kind == "lsgan":
        loss = (real_logits - 1).pow(2).mean() + fake_logits.pow(2).mean()
    elif kind == "hinge":
        loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    else:
        loss = 0.5 * (
            _bce(real_logits - fake_logits.detach().mean(), 1.0) + _bce(fake_logits - real_logits.detach().mean(), 0.0)
        )
    return loss * weight


class _AdversarialLoss(nn.Module):
    """The loss modules' shared state: a validated ``kind`` and ``weight``."""

    def __init__(self, kind: str = "vanilla", *, weight: float = 1.0) -> None:
        super().__init__()
        _check_kind(kind)
        _check_weight(type(self).__name__, weight)
        self.kind = kind
        self.weight = weight

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, weight={self.weight}"


class GeneratorLoss(_AdversarialLoss):
    """Module form of :func:`generator_loss`.

    Args:
        kind: one of :data:`LOSS_KINDS`.
        weight: factor on the loss.

    Shape:
        - fake_logits, real_logits: any shape, the same for both
        - output: scalar
    """

    def forward(self, fake_logits: torch.Tensor, *, real_logits: torch.Tensor | None = None) -> torch.Tensor:
        return generator_loss(fake_logits, real_logits=real_logits, kind=self.kind, weight=self.weight)


class DiscriminatorLoss(_AdversarialLoss):
    """Module form of :func:`discriminator_loss`.

    Args:
        kind: one of :data:`LOSS_KINDS`.
        weight: factor on the loss.
    """

    def forward(self, fake_logits: torch.Tensor, *, real_logits: torch.Tensor) -> torch.Tensor:
        return discriminator_loss(fake_logits, real_logits=real_logits, kind=self.kind, weight=self.weight)


def r1_penalty(discriminator: Callable[..., torch.Tensor], real: torch.Tensor, *args: object) -> torch.Tensor:
    """R1 gradient penalty: mean over the batch of ``||d D(real) / d real||^2``.

    The forward runs inside :func:`~sed_discriminator.math_attention`, because fused attention
    kernels have no double backward; the result is differentiable w.r.t. D's parameters.
    Multiply by ``gamma / 2`` yourself.

    Args:
        discriminator: called as ``discriminator(real, *args)``, e.g. an SeD and its semantic map.
        real: real images (B, C, H, W); a detached copy that requires grad is used.
        *args: further arguments of the discriminator (the semantic map for SeD).

    Returns:
        A scalar tensor.
    """
    if not isinstance(real, torch.Tensor) or real.ndim == 0 or real.shape[0] == 0:
        shape = tuple(real.shape) if isinstance(real, torch.Tensor) else type(real).__name__
        raise ValueError(
            f"r1_penalty needs a non-empty batch of real images, got {shape}; the penalty of no image is NaN."
        )
    real = (real.clone() if real.is_inference() else real.detach()).requires_grad_(True)
    with math_attention():
        logits = discriminator(real, *args)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
