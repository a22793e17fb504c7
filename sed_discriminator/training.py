"""Plugging SeD into training loops: a one-object helper and a single-tensor adapter.

- :class:`SeDAdversary` owns an SeD and a frozen :class:`SemanticExtractor`, computes the HR
  semantics once per step and returns the generator and discriminator losses.
- :class:`ConditionedSeD` is an SeD whose ``forward`` takes the image alone, for trainers
  (BasicSR, neosr, traiNNer-redux) that call ``net_d(x)``: set the HR batch once per step
  with ``set_condition(gt)``.

In both the extractor is held outside the module tree: it is not in ``parameters()`` or
``state_dict()``, so optimizers, ``requires_grad`` toggles and checkpoints see the
discriminator alone; ``.to()``/``.cuda()`` still move it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .discriminator import SeD
from .extractor import SemanticExtractor
from .losses import LOSS_KINDS, discriminator_loss, generator_loss, r1_penalty

__all__ = ["SeDAdversary", "ConditionedSeD", "frozen_parameters"]


def _make_extractor(extractor: SemanticExtractor | str, pretrained: Any) -> SemanticExtractor:
    if isinstance(extractor, SemanticExtractor):
        return extractor
    if isinstance(extractor, str):
        return SemanticExtractor(extractor, pretrained=pretrained)
    raise TypeError(f"extractor must be a SemanticExtractor or a preset name, got {type(extractor).__name__}.")


class _HoldsExtractor(nn.Module):
    """Keeps ``self.extractor`` out of the module tree while ``.to()``/``.cuda()``/``.float()`` still reach it."""

    extractor: SemanticExtractor

    def _attach_extractor(self, extractor: SemanticExtractor) -> None:
        self.__dict__["extractor"] = extractor

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        self.extractor._apply(fn, recurse)
        return self


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Compute no gradient for ``module``'s parameters inside the block; restore them afterwards.

    The generator step of a GAN loop needs the gradient of D's output with respect to the
    generated image, not to D's weights. Parameters the user had frozen stay frozen, and the
    flags are restored even when the block raises.

    Example:
        >>> d = SeD("patch")
        >>> with frozen_parameters(d):
        ...     loss = generator_loss(d(sr, semantic))  # doctest: +SKIP
        >>> loss.backward()  # gradients reach the generator only  # doctest: +SKIP
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class SeDAdversary(_HoldsExtractor):
    """The adversary of a GAN-SR loop: an SeD, its frozen extractor and the adversarial losses.

    The semantics of an HR batch are computed once and reused by every call with the same HR
    tensor (the paper uses the HR semantics for all three discriminator calls of a step).

    Args:
        discriminator: an :class:`SeD` (or a DDP-wrapped one, or any module called as
            ``d(x, semantic)``), or a variant name (``"patch"``/``"pixel"``) to build one.
        extractor: a :class:`SemanticExtractor` or a preset name.
        pretrained: weights of the extractor when it is built from a name.
        loss: adversarial loss kind, one of :data:`~sed_discriminator.losses.LOSS_KINDS`.
        weight: factor on the generator's adversarial loss (0.01 in the paper's recipe).
        batch_real_fake: ``False`` (default, the reference) calls the discriminator twice in
            :meth:`discriminator_loss`, on the real and on the fake batch. ``True`` makes one
            call on both batches concatenated (fewer, larger kernels: faster on GPUs at small
            batches). The logits are the same in eval mode; in training mode a spectral-norm
            discriminator runs one power iteration per call, so one call does one iteration per
            step instead of two and both halves use the same normalised weights (the reference
            normalises the fake call with weights one iteration further on). Training then
            follows a slightly different trajectory, not an equivalent one. It also holds the
            activations of both batches at once (same total as two calls before backward).

    Example:
        >>> adversary = SeDAdversary("patch", pretrained=None)  # doctest: +SKIP
        >>> g_loss = adversary.generator_loss(sr, hr)  # doctest: +SKIP
        >>> d_loss = adversary.discriminator_loss(sr, hr)  # doctest: +SKIP
    """

    def __init__(
        self,
        discriminator: nn.Module | str = "patch",
        extractor: SemanticExtractor | str = "clip_rn50",
        *,
        pretrained: Any = "openai",
        loss: str = "vanilla",
        weight: float = 1.0,
        batch_real_fake: bool = False,
    ) -> None:
        super().__init__()
        if loss not in LOSS_KINDS:
            raise ValueError(f"Unknown GAN loss kind {loss!r}; choose one of {LOSS_KINDS}.")
        ext = _make_extractor(extractor, pretrained)
        if isinstance(discriminator, str):
            discriminator = SeD(discriminator, semantic_channels=ext.channels)
        self.discriminator = discriminator
        self._attach_extractor(ext)
        self.loss = loss
        self.weight = weight
        self.batch_real_fake = bool(batch_real_fake)
        self._cache: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def semantics(self, hr: torch.Tensor) -> torch.Tensor:
        """Semantic map of ``hr``, computed once per HR tensor (recomputed if it is modified in place)."""
        cache = self._cache
        if cache is not None and cache[0] is hr and cache[1] == hr._version:
            return cache[2]
        semantic = self.extractor(hr)
        self._cache = (hr, hr._version, semantic)
        return semantic

    def generator_loss(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """Weighted adversarial loss of the generator for super-resolved ``sr`` against ``hr``.

        The discriminator's parameters get no gradient from it (they are frozen during the call).
        """
        semantic = self.semantics(hr)
        with frozen_parameters(self.discriminator):
            fake = self.discriminator(sr, semantic)
            real = None
            if self.loss == "ragan":
                with torch.no_grad():
                    real = self.discriminator(hr, semantic)
        return generator_loss(fake, real, self.loss, self.weight)

    def discriminator_loss(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """Adversarial loss of the discriminator on real ``hr`` and (detached) fake ``sr``.

        With ``batch_real_fake`` the two batches go through the discriminator in one call (see
        the class docstring for how that differs in training mode); batches of different shapes
        cannot be concatenated and take two calls.
        """
        semantic = self.semantics(hr)
        if self.batch_real_fake and hr.shape == sr.shape:
            both = self.discriminator(torch.cat([hr, sr.detach()]), torch.cat([semantic, semantic]))
            real, fake = both.split(hr.shape[0])
        else:
            real = self.discriminator(hr, semantic)
            fake = self.discriminator(sr.detach(), semantic)
        return discriminator_loss(real, fake, self.loss)

    def r1_penalty(self, hr: torch.Tensor) -> torch.Tensor:
        """R1 penalty on the real batch, see :func:`~sed_discriminator.losses.r1_penalty`."""
        return r1_penalty(self.discriminator, hr, self.semantics(hr))

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both losses at once: ``(generator_loss, discriminator_loss)``."""
        return self.generator_loss(sr, hr), self.discriminator_loss(sr, hr)

    def extra_repr(self) -> str:
        batched = ", batch_real_fake=True" if self.batch_real_fake else ""
        return f"loss={self.loss!r}, weight={self.weight}{batched}, extractor={self.extractor.preset.name!r}"


class ConditionedSeD(_HoldsExtractor, SeD):
    """An SeD called with the image alone, for trainers that call ``net_d(x)``.

    Its parameters and state dict are exactly those of :class:`SeD` (official weights load
    with :func:`~sed_discriminator.load_official_weights`); the extractor is not among them.

    Args:
        variant: ``"patch"`` or ``"pixel"``.
        extractor: a :class:`SemanticExtractor` or a preset name.
        pretrained: weights of the extractor when it is built from a name.
        semantic_source: ``"condition"`` (the paper: semantics of the HR batch given to
            :meth:`set_condition`) or ``"input"`` (semantics of whatever image is passed).
        **kwargs: further :class:`SeD` arguments (width, heads, head_dim, semantic_fusion).

    Example:
        >>> net_d = ConditionedSeD("patch", pretrained=None)  # doctest: +SKIP
        >>> net_d.set_condition(gt)  # once per step, before the D calls  # doctest: +SKIP
        >>> net_d(output).shape  # doctest: +SKIP
        torch.Size([8, 1, 30, 30])
    """

    def __init__(
        self,
        variant: str = "patch",
        extractor: SemanticExtractor | str = "clip_rn50",
        pretrained: Any = "openai",
        *,
        semantic_source: str = "condition",
        **kwargs: Any,
    ) -> None:
        if semantic_source not in ("condition", "input"):
            raise ValueError(f"semantic_source must be 'condition' or 'input', got {semantic_source!r}.")
        ext = _make_extractor(extractor, pretrained)
        kwargs.setdefault("semantic_channels", ext.channels)
        SeD.__init__(self, variant, **kwargs)
        self._attach_extractor(ext)
        self.semantic_source = semantic_source
        self._condition: torch.Tensor | None = None

    def set_condition(self, hr: torch.Tensor) -> torch.Tensor:
        """Compute and keep the semantics of the HR batch used by the following ``forward`` calls."""
        self._condition = self.extractor(hr)
        return self._condition

    def clear_condition(self) -> None:
        """Forget the stored semantics (frees their memory)."""
        self._condition = None

    def forward(self, x: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Logits for ``x``; ``semantic`` overrides the stored condition when given."""
        if semantic is None and self.semantic_fusion:
            if self.semantic_source == "input":
                semantic = self.extractor(x)
            elif self._condition is None:
                raise RuntimeError(
                    "ConditionedSeD has no condition: call net_d.set_condition(gt) with the HR batch "
                    "before the discriminator calls of each step (or build it with semantic_source='input')."
                )
            else:
                semantic = self._condition
        return SeD.forward(self, x, semantic)
