"""Plugging SeD into training loops: a one-object helper and a single-tensor adapter.

- :class:`SeDAdversary` owns an SeD and a frozen :class:`SemanticExtractor`, computes the HR
  semantics once per step and returns the generator and discriminator losses.
- :class:`ConditionedSeD` is an SeD whose ``forward`` takes the image alone, for trainers
  (BasicSR, neosr, traiNNer-redux) that call ``net_d(x)``: set the HR batch once per step
  with ``set_condition(gt)``.

In both the extractor is held outside the module tree: it is not in ``parameters()`` or
``state_dict()``, so optimizers, ``requires_grad`` toggles and checkpoints see the
discriminator alone; ``.to()``/``.cuda()`` still move it. Dtype conversions (``.half()``,
``.double()``, ``.to(dtype)``) do not reach it: the extractor may be shared and keeps its
precision; its semantic maps are cast to the discriminator's dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._checks import check_flag
from .diagnostics import semantic_diagnostics
from .discriminator import SeD
from .extractor import SemanticExtractor
from .losses import LOSS_KINDS, _check_weight, discriminator_loss, generator_loss, r1_penalty

__all__ = ["SeDAdversary", "ConditionedSeD", "frozen_parameters", "set_condition"]


def _make_extractor(
    extractor: SemanticExtractor | str, pretrained: Any, input_range: tuple[float, float] | None = None
) -> SemanticExtractor:
    if isinstance(extractor, SemanticExtractor):
        return extractor
    if isinstance(extractor, str):
        if input_range is None:
            return SemanticExtractor(extractor, pretrained=pretrained)
        return SemanticExtractor(extractor, pretrained=pretrained, input_range=input_range)
    raise TypeError(f"extractor must be a SemanticExtractor or a preset name, got {type(extractor).__name__}.")


def _check_same_range(owner: str, discriminator: nn.Module, extractor: SemanticExtractor) -> None:
    d_range = getattr(discriminator, "input_range", None)
    if d_range is not None and tuple(d_range) != tuple(extractor.input_range):
        raise ValueError(
            f"{owner}: the discriminator takes images in input_range={tuple(d_range)} but the extractor in "
            f"input_range={tuple(extractor.input_range)}; both see the same images. Give both the range your images "
            f"are in (or pass input_range= to {owner} with the names of the discriminator and extractor)."
        )


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel and ``torch.compile`` wrappers."""
    for _ in range(8):  # wrappers nest a few levels at most
        inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            wrapped = isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel))
            inner = module.module if wrapped else None
        if inner is None:
            return module
        module = inner
    return module


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _as_dtype(semantic: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return semantic if dtype is None or semantic.dtype == dtype else semantic.to(dtype)


def set_condition(net_d: nn.Module, hr: torch.Tensor) -> torch.Tensor | None:
    """``net_d.set_condition(hr)`` through DistributedDataParallel, DataParallel and ``torch.compile`` wrappers.

    ``ddp_net_d.set_condition(gt)`` raises PyTorch's own ``AttributeError`` (a wrapper does not
    forward methods); this function finds the :class:`ConditionedSeD` inside, as
    ``ddp_net_d.module.set_condition(gt)`` does by hand.

    Example:
        >>> net_d = ConditionedSeD("patch", pretrained=None, width=8, head_dim=8)  # random weights: a smoke test
        >>> wrapped = torch.compile(net_d)  # or DistributedDataParallel(net_d)
        >>> set_condition(wrapped, torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 1024, 4, 4])
    """
    inner = _unwrap(net_d)
    if not isinstance(inner, ConditionedSeD):
        raise TypeError(f"set_condition needs a ConditionedSeD (possibly wrapped), got {type(inner).__name__}.")
    return inner.set_condition(hr)


def _check_channels(owner: str, semantic_channels: int, extractor: SemanticExtractor) -> None:
    if semantic_channels != extractor.channels:
        raise ValueError(
            f"{owner}: the discriminator takes semantic_channels={semantic_channels} but extractor "
            f"{extractor.preset.name!r} gives {extractor.channels}. Leave semantic_channels out to size the "
            f"discriminator from the extractor, or build it with semantic_channels={extractor.channels}."
        )


class _HoldsExtractor(nn.Module):
    """Keeps ``self.extractor`` out of the module tree while ``.to()``/``.cuda()``/``.float()`` still reach it."""

    extractor: SemanticExtractor | None

    def _attach_extractor(self, extractor: SemanticExtractor | None) -> None:
        self.__dict__["extractor"] = extractor

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        if self.extractor is not None:
            # A probe of the extractor's dtype tells a dtype conversion (.half(), .double(), .to(dtype)),
            # which must not change the caller's (maybe shared) extractor, from a move, which must.
            probe = self.extractor.mean
            moved = fn(torch.empty(0, dtype=probe.dtype, device=probe.device))
            if moved.dtype == probe.dtype:
                self.extractor._apply(fn, recurse)
            elif moved.device != probe.device:
                self.extractor.to(moved.device)
        return self


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Compute no gradient for ``module``'s parameters inside the block; restore them afterwards.

    The generator step of a GAN loop needs the gradient of D's output with respect to the
    generated image, not to D's weights. Parameters the user had frozen stay frozen, and the
    flags are restored even when the block raises.

    Example:
        >>> d = SeD("patch", width=8, semantic_channels=64, head_dim=8)
        >>> sr = torch.rand(2, 3, 64, 64, requires_grad=True)  # stands in for generator(lr)
        >>> with frozen_parameters(d):
        ...     loss = generator_loss(d(sr, torch.rand(2, 64, 4, 4)))
        >>> loss.backward()  # gradients reach the generator only
        >>> sr.grad is not None, d.conv1.parametrizations.weight.original.grad is None
        (True, True)
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _autograd_ready(x: torch.Tensor) -> torch.Tensor:
    # A batch made under torch.inference_mode() cannot be saved for D's backward; a clone can.
    return (
        x.clone() if isinstance(x, torch.Tensor) and x.is_inference() and not torch.is_inference_mode_enabled() else x
    )


def _check_same_size(call: str, sr: object, hr: object) -> None:
    """SR and HR must have one spatial size: an SR of another scale would be judged against the wrong semantics."""
    if isinstance(sr, torch.Tensor) and isinstance(hr, torch.Tensor) and sr.shape[-2:] != hr.shape[-2:]:
        raise ValueError(
            f"{call}(sr, hr): sr is {tuple(sr.shape[-2:])} (H, W) but hr is {tuple(hr.shape[-2:])}; the generator's "
            "output must have the HR size. Check the scale factor of the generator against the data (x2 output "
            "with x4 HR?), or crop both to the same patch."
        )


def _same_batch(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` holds exactly the images of ``a`` (compared by value: immune to ``.data`` and numpy edits)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


@dataclass
class _CachedSemantics:
    hr: torch.Tensor  # a private copy of the HR batch the semantics were computed from
    semantic: torch.Tensor
    used_by: set[str] = field(default_factory=set)


class SeDAdversary(_HoldsExtractor):
    """The adversary of a GAN-SR loop: an SeD, its frozen extractor and the adversarial losses.

    The semantics of an HR batch are computed once per step and reused by the three
    discriminator calls of the paper's recipe (fake for G; real and detached fake for D). They
    are reused only for an HR batch equal in value to the one they were computed from, and
    dropped once both :meth:`generator_loss` and :meth:`discriminator_loss` have used them, so
    nothing of a step stays alive into the next one.

    Weights: ``weight`` multiplies the generator's adversarial loss only (the paper: 0.01, next
    to L1 at 1.0 and the perceptual loss at 0.1 or 1.0); the discriminator's loss is unweighted.

    Args:
        discriminator: an :class:`SeD` (or a DDP-wrapped one, or any module called as
            ``d(x, semantic)``), or a variant name (``"patch"``/``"pixel"``) to build one sized
            for the extractor.
        extractor: a :class:`SemanticExtractor` or a preset name.
        pretrained: weights of the extractor when it is built from a name.
        loss: adversarial loss kind, one of :data:`~sed_discriminator.losses.LOSS_KINDS`.
        weight: factor on the generator's adversarial loss (0.01, the paper's).
        batch_real_fake: ``False`` (default, the reference) calls the discriminator twice in
            :meth:`discriminator_loss`, on the real and on the fake batch. ``True`` makes one
            call on both batches concatenated (fewer, larger kernels: faster on GPUs at small
            batches). The logits are the same in eval mode; in training mode a spectral-norm
            discriminator runs one power iteration per call, so one call does one iteration per
            step instead of two and both halves use the same normalised weights (the reference
            normalises the fake call with weights one iteration further on). Training then
            follows a slightly different trajectory, not an equivalent one. It also holds the
            activations of both batches at once (same total as two calls before backward).
            Real and fake batches must have the same shape.
        input_range: value range of the images, for the discriminator and extractor built from
            names (``None``: [0, 1], or the range of the given objects, which must agree).

    Swapped arguments: :meth:`generator_loss` and :meth:`discriminator_loss` take ``(sr, hr)``.
    A call that gets ``(hr, sr)`` raises a ``ValueError`` when it can tell: in
    :meth:`generator_loss` when ``hr`` carries a gradient and ``sr`` does not (the generator's
    output always does in a G step), and in either method when ``sr`` holds the HR batch of the
    step's earlier call (the semantics cache keeps it: caught in the call that swaps, or in the
    next call when the earlier one did). Not caught: a step whose only call is a swapped
    :meth:`discriminator_loss` with a detached ``sr``.

    Example:
        >>> adversary = SeDAdversary("patch", pretrained=None)  # random CLIP weights: a smoke test only
        >>> sr, hr = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
        >>> g_loss = adversary.generator_loss(sr, hr)  # 0.01 * BCE(D(sr), real)
        >>> d_loss = adversary.discriminator_loss(sr, hr)  # BCE(D(hr), real) + BCE(D(sr), fake)
        >>> g_loss.shape, d_loss.shape
        (torch.Size([]), torch.Size([]))
    """

    def __init__(
        self,
        discriminator: nn.Module | str = "patch",
        *,
        extractor: SemanticExtractor | str = "clip_rn50",
        pretrained: Any = "default",
        loss: str = "vanilla",
        weight: float = 0.01,
        batch_real_fake: bool = False,
        input_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if loss not in LOSS_KINDS:
            raise ValueError(f"Unknown GAN loss kind {loss!r}; choose one of {LOSS_KINDS}.")
        _check_weight("SeDAdversary", weight)
        check_flag(batch_real_fake, "batch_real_fake")
        ext = _make_extractor(extractor, pretrained, input_range)
        if isinstance(discriminator, str):
            discriminator = SeD(discriminator, semantic_channels=ext.channels, input_range=ext.input_range)
        bare = _unwrap(discriminator)
        if getattr(bare, "semantic_fusion", False):
            _check_channels("SeDAdversary", bare.semantic_channels, ext)
        if input_range is not None and tuple(float(v) for v in input_range) != ext.input_range:
            raise ValueError(
                f"SeDAdversary(input_range={tuple(input_range)}) but the given extractor takes input_range="
                f"{ext.input_range}. Build the extractor with input_range={tuple(input_range)}."
            )
        _check_same_range("SeDAdversary", bare, ext)
        self.discriminator = discriminator
        self._attach_extractor(ext)
        self.loss = loss
        self.weight = weight
        self.batch_real_fake = batch_real_fake
        self._cache: _CachedSemantics | None = None

    def semantics(self, hr: torch.Tensor) -> torch.Tensor:
        """Semantic map of ``hr``; computed once for a batch of these values until the step is over."""
        return self._semantics(hr)

    def _semantics(self, hr: torch.Tensor, sr: torch.Tensor | None = None, call: str = "") -> torch.Tensor:
        if sr is not None:
            _check_same_size(f"SeDAdversary.{call}", sr, hr)
        cache = self._cache
        if cache is not None:
            if _same_batch(cache.hr, hr):
                return cache.semantic
            if sr is not None and isinstance(sr, torch.Tensor) and _same_batch(cache.hr, sr):
                raise ValueError(
                    f"SeDAdversary.{call}(sr, hr): sr holds the HR batch of this step's earlier call, so sr and hr "
                    "are swapped in this call or in the earlier one. Both methods take (sr, hr): the generator's "
                    "output first, the HR batch second."
                )
        semantic = _as_dtype(self.extractor(hr), _float_dtype(self.discriminator))
        self._cache = _CachedSemantics(hr.detach().clone(), semantic)
        return semantic

    def clear_cache(self) -> None:
        """Drop the HR batch and semantics kept for the current step."""
        self._cache = None

    def _used(self, by: str) -> None:
        if self._cache is not None:
            self._cache.used_by.add(by)
            if self._cache.used_by >= {"generator", "discriminator"}:
                self._cache = None

    def generator_loss(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """Weighted adversarial loss of the generator for super-resolved ``sr`` against ``hr``.

        The discriminator's parameters get no gradient from it (they are frozen during the call).
        """
        if isinstance(sr, torch.Tensor) and isinstance(hr, torch.Tensor) and hr.requires_grad and not sr.requires_grad:
            raise ValueError(
                "SeDAdversary.generator_loss(sr, hr): hr carries a gradient and sr does not, so the arguments look "
                "swapped. Pass the generator's output (which carries its gradient) first and the HR batch second."
            )
        semantic = self._semantics(hr, sr, "generator_loss")
        hr = _autograd_ready(hr)
        with frozen_parameters(self.discriminator):
            fake = self.discriminator(sr, semantic)
            real = None
            if self.loss == "ragan":
                with torch.no_grad():
                    real = self.discriminator(hr, semantic)
        self._used("generator")
        return generator_loss(fake, real_logits=real, kind=self.loss, weight=self.weight)

    def discriminator_loss(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """Adversarial loss of the discriminator on real ``hr`` and (detached) fake ``sr``.

        With ``batch_real_fake`` the two batches go through the discriminator in one call (see
        the class docstring for how that differs in training mode).
        """
        semantic = self._semantics(hr, sr, "discriminator_loss")
        sr, hr = _autograd_ready(sr), _autograd_ready(hr)
        if self.batch_real_fake:
            if hr.shape != sr.shape:
                raise ValueError(
                    f"batch_real_fake=True concatenates the real and fake batches, which needs equal shapes; got "
                    f"hr {tuple(hr.shape)} and sr {tuple(sr.shape)}. Build SeDAdversary(batch_real_fake=False)."
                )
            both = self.discriminator(torch.cat([hr, sr.detach()]), torch.cat([semantic, semantic]))
            real, fake = both.split(hr.shape[0])
        else:
            real = self.discriminator(hr, semantic)
            fake = self.discriminator(sr.detach(), semantic)
        self._used("discriminator")
        return discriminator_loss(fake, real_logits=real, kind=self.loss)

    def r1_penalty(self, hr: torch.Tensor) -> torch.Tensor:
        """R1 penalty on the real batch, see :func:`~sed_discriminator.losses.r1_penalty`.

        It reuses the step's semantics when called before :meth:`discriminator_loss` ends the
        step (after it, they are computed again).
        """
        return r1_penalty(self.discriminator, _autograd_ready(hr), self.semantics(hr))

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both losses at once: ``(generator_loss, discriminator_loss)``."""
        return self.generator_loss(sr, hr), self.discriminator_loss(sr, hr)

    @torch.no_grad()
    def diagnostics(self, sr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
        """How much the semantics steer the discriminator on this step's fakes (for logging every N steps).

        :func:`~sed_discriminator.diagnostics.semantic_diagnostics` of ``sr`` judged with the
        semantics of ``hr`` (those of the step's cache when it holds this batch; otherwise computed
        without being cached). Two eval-like discriminator forwards without gradients: training
        flags, spectral-norm vectors and the step's cache stay as they are.

        Returns:
            ``{"sem_influence", "attn_sharpness_att1", "attn_sharpness_att2", "attn_sharpness_att3"}``.
        """
        _check_same_size("SeDAdversary.diagnostics", sr, hr)
        cache = self._cache
        semantic = cache.semantic if cache is not None and _same_batch(cache.hr, hr) else self.extractor(hr)
        return semantic_diagnostics(self.discriminator, sr.detach(), semantic)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # a step's HR batch and semantics are not part of the model
        return state

    def extra_repr(self) -> str:
        batched = ", batch_real_fake=True" if self.batch_real_fake else ""
        return f"loss={self.loss!r}, weight={self.weight}{batched}, extractor={self.extractor.preset.name!r}"


class ConditionedSeD(_HoldsExtractor, SeD):
    """An SeD called with the image alone, for trainers that call ``net_d(x)``.

    Its parameters and state dict are exactly those of :class:`SeD` (official weights load
    with :func:`~sed_discriminator.load_official_weights`); the extractor is not among them,
    and a pickle (``torch.save(net_d)``) keeps how to rebuild the extractor, not its weights
    nor the condition.

    The rule of the condition: call :meth:`set_condition` with the step's HR batch before the
    step's discriminator calls (or wrap them in ``with net_d.condition(gt):``). A condition is
    valid until the discriminator's weights change (an optimizer step, ``load_state_dict``) or
    a new one is set; a forward with a stale condition, or with a batch of another size, raises
    instead of reusing the previous step's semantics. Under ``torch.compile`` the staleness check
    runs eagerly, outside the graph (a graph break at the start of ``forward``, so
    ``fullgraph=True`` refuses this module: compile an :class:`SeD` and pass the semantics).
    Wrapped in DistributedDataParallel, call ``net_d.module.set_condition(gt)`` or
    :func:`sed_discriminator.training.set_condition` (``net_d.set_condition`` does not reach
    through a wrapper).

    Args:
        variant: ``"patch"`` or ``"pixel"``.
        extractor: a :class:`SemanticExtractor` or a preset name; not built when
            ``semantic_fusion=False``.
        pretrained: weights of the extractor when it is built from a name.
        semantic_source: ``"condition"`` (the paper: semantics of the HR batch given to
            :meth:`set_condition`) or ``"input"`` (semantics of whatever image is passed).
        **kwargs: further :class:`SeD` keyword arguments (width, heads, head_dim, semantic_fusion,
            channels_last, input_range); ``semantic_channels`` and ``input_range`` default to the
            extractor's (an extractor built from a name gets ``input_range`` too).

    Example:
        >>> net_d = ConditionedSeD("patch", pretrained=None)  # random CLIP weights: a smoke test only
        >>> gt, output = torch.rand(2, 3, 256, 256), torch.rand(2, 3, 256, 256)
        >>> with net_d.condition(gt):  # or net_d.set_condition(gt) once per step, before the D calls
        ...     net_d(output).shape
        torch.Size([2, 1, 30, 30])
    """

    _TRANSIENT = {**SeD._TRANSIENT, "_condition": None, "_condition_stamp": None, "_condition_size": None}

    def __init__(
        self,
        variant: str = "patch",
        *,
        extractor: SemanticExtractor | str = "clip_rn50",
        pretrained: Any = "default",
        semantic_source: str = "condition",
        **kwargs: Any,
    ) -> None:
        if semantic_source not in ("condition", "input"):
            raise ValueError(f"semantic_source must be 'condition' or 'input', got {semantic_source!r}.")
        in_range = kwargs.get("input_range")
        ext = _make_extractor(extractor, pretrained, in_range) if kwargs.get("semantic_fusion", True) else None
        if ext is not None:
            if "semantic_channels" in kwargs:
                _check_channels("ConditionedSeD", kwargs["semantic_channels"], ext)
            kwargs["semantic_channels"] = ext.channels
            kwargs.setdefault("input_range", ext.input_range)
        SeD.__init__(self, variant, **kwargs)
        if ext is not None:
            _check_same_range("ConditionedSeD", self, ext)
        self._attach_extractor(ext)
        self.semantic_source = semantic_source
        self._condition: torch.Tensor | None = None
        self._condition_stamp: tuple[int, ...] | None = None
        self._condition_size: tuple[int, ...] | None = None  # (H, W) of the HR batch of the condition

    @torch.compiler.disable  # version counters cannot be traced: checked eagerly, also under torch.compile
    def _check_fresh(self) -> None:
        if self._condition_stamp != self._weights_stamp():
            raise RuntimeError(
                "ConditionedSeD's condition is stale: the discriminator's weights changed (an optimizer step or "
                "load_state_dict) since set_condition(). Call net_d.set_condition(gt) with this step's HR batch "
                "before its discriminator calls."
            )

    def _weights_stamp(self) -> tuple[int, ...]:
        # In-place updates (optimizer steps, load_state_dict) bump a tensor's version counter.
        return tuple(p._version for p in self.parameters())

    def set_condition(self, hr: torch.Tensor) -> torch.Tensor | None:
        """Compute and keep the semantics of the HR batch used by the following ``forward`` calls.

        Returns:
            The semantic map, or ``None`` for a discriminator without semantic fusion (nothing to keep).
        """
        if self.extractor is None:
            return None
        self._condition = _as_dtype(self.extractor(hr), _float_dtype(self))
        self._condition_stamp = self._weights_stamp()
        self._condition_size = tuple(hr.shape[-2:])
        return self._condition

    @property
    def has_condition(self) -> bool:
        """Whether semantics are stored (set and not cleared; they may still be stale, see the class docstring)."""
        return self._condition is not None

    def clear_condition(self) -> None:
        """Forget the stored semantics (frees their memory)."""
        self._condition = None
        self._condition_stamp = None
        self._condition_size = None

    @contextlib.contextmanager
    def condition(self, hr: torch.Tensor) -> Iterator[torch.Tensor | None]:
        """``set_condition(hr)`` for the block, ``clear_condition()`` after it (also when it raises)."""
        try:
            yield self.set_condition(hr)
        finally:
            self.clear_condition()

    def _stored_condition(self, x: object) -> torch.Tensor:
        batch = x.shape[0] if isinstance(x, torch.Tensor) and x.ndim else 0
        if self._condition is None:
            raise RuntimeError(
                "ConditionedSeD has no condition: call net_d.set_condition(gt) with the HR batch "
                "before the discriminator calls of each step (or build it with semantic_source='input'). "
                "Wrapped in DistributedDataParallel or DataParallel: net_d.module.set_condition(gt), or "
                "sed_discriminator.training.set_condition(net_d, gt), which unwraps."
            )
        self._check_fresh()
        if self._condition.shape[0] != batch:
            raise RuntimeError(
                f"ConditionedSeD's condition holds {self._condition.shape[0]} images but the input has {batch}: "
                "call net_d.set_condition(gt) with the HR batch of these images."
            )
        if isinstance(x, torch.Tensor) and x.ndim == 4 and tuple(x.shape[-2:]) != self._condition_size:
            raise RuntimeError(
                f"ConditionedSeD's condition was set from an HR batch of {self._condition_size} (H, W) but the input "
                f"is {tuple(x.shape[-2:])}: the generator's output must have the HR size (check its scale factor "
                "against the data), and set_condition(gt) takes the HR batch of these images."
            )
        return _as_dtype(self._condition, _float_dtype(self))

    def _semantic_for(self, x: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor | None:
        """``semantic`` when given, else the stored condition (or the input's semantics, per ``semantic_source``)."""
        if semantic is None and self.semantic_fusion:
            if self.semantic_source == "input":
                return _as_dtype(self.extractor(x), _float_dtype(self))
            return self._stored_condition(x)
        return semantic

    def forward(self, x: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Logits for ``x``; ``semantic`` overrides the stored condition when given."""
        return SeD.forward(self, x, self._semantic_for(x, semantic))

    @torch.no_grad()
    def attention_maps(  # type: ignore[override]
        self, x: torch.Tensor, semantic: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """:meth:`SeD.attention_maps` with the stored condition (or ``semantic`` when given)."""
        return SeD.attention_maps(self, x, self._semantic_for(x, semantic))
