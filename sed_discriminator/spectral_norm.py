"""Spectral normalisation with the reference's numerics, and the legacy-key remapper.

The parametrization stores its state under the same names as
:func:`torch.nn.utils.parametrizations.spectral_norm`
(``<conv>.parametrizations.weight.original``, ``...weight.0._u``, ``...weight.0._v``), but

- runs the power iteration in the order of the legacy ``torch.nn.utils.spectral_norm`` hook
  that the authors trained with (``v`` from ``u``, then ``u`` from ``v``), so training steps
  match theirs, not only eval outputs;
- keeps ``u``, ``v`` and ``sigma`` in float32 with autocast disabled, since a power iteration
  in fp16 can underflow to NaN.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .config import _compiling

__all__ = [
    "SpectralNorm",
    "spectral_norm",
    "remap_legacy_spectral_norm_keys",
    "rename_legacy_spectral_norm_keys_",
    "check_spectral_norm_vectors",
    "LEGACY_KEY_LEAVES",
]

_THIS_THREAD = threading.local()  # .paused: power iteration paused on this thread (see power_iteration_paused)

_LEGACY_SUFFIXES = {
    "weight_orig": "parametrizations.weight.original",
    "weight_u": "parametrizations.weight.0._u",
    "weight_v": "parametrizations.weight.0._v",
}
LEGACY_KEY_LEAVES = frozenset(_LEGACY_SUFFIXES)


class SpectralNorm(nn.Module):
    """Parametrization ``W -> W / sigma(W)`` with one power iteration per training forward.

    Args:
        weight: the weight it will normalise (used to size ``u`` and ``v``).
        n_power_iterations: power iterations per training forward.
        eps: epsilon of the vector normalisation.
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, eps: float = 1e-12) -> None:
        super().__init__()
        if weight.ndim < 2:
            raise ValueError(
                f"SpectralNorm needs a weight with at least 2 dimensions, got shape {tuple(weight.shape)}."
            )
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        h, w = weight.shape[0], weight[0].numel()
        u = weight.new_empty(h, dtype=torch.float32).normal_()
        v = weight.new_empty(w, dtype=torch.float32).normal_()
        self.register_buffer("_u", F.normalize(u, dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(v, dim=0, eps=eps))
        self._power_method(weight.detach().flatten(1).float(), 15)

    @torch.no_grad()
    def _power_method(self, weight_mat: torch.Tensor, iterations: int) -> None:
        # In-place updates keep DataParallel replicas in sync; the legacy order is v first, then u.
        for _ in range(iterations):
            F.normalize(torch.mv(weight_mat.t(), self._u), dim=0, eps=self.eps, out=self._v)
            F.normalize(torch.mv(weight_mat, self._v), dim=0, eps=self.eps, out=self._u)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        # .half()/.bfloat16() must not drag the power-iteration state below float32.
        for name in ("_u", "_v"):
            buf = getattr(self, name)
            if buf.is_floating_point() and buf.dtype not in (torch.float32, torch.float64):
                setattr(self, name, buf.float())
        return self

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with _autocast_disabled(weight.device.type):
            weight_mat = weight.flatten(1).to(self._u.dtype)
            # under torch.compile the check folds to a constant: traced graphs never read the thread flag
            if self.training and (_compiling() or not getattr(_THIS_THREAD, "paused", False)):
                self._power_method(weight_mat, self.n_power_iterations)
            # Clones let two forwards (real, fake) share one backward despite the in-place updates.
            u = self._u.clone(memory_format=torch.contiguous_format)
            v = self._v.clone(memory_format=torch.contiguous_format)
            sigma = torch.dot(u, torch.mv(weight_mat, v))
            return (weight_mat.view_as(weight) / sigma).to(weight.dtype)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value


@contextlib.contextmanager
def power_iteration_paused() -> Iterator[None]:
    """Forwards on this thread leave every :class:`SpectralNorm`'s ``u`` and ``v`` alone inside the block.

    The normalised weights are then those of eval mode (``W / u.W.v`` with the current vectors),
    yet no ``training`` flag changes: a module shared with a training thread keeps training
    there, with its power iteration, while this thread inspects it (diagnostics, attention maps).
    Eager forwards only: a compiled graph keeps the flag it was traced with.

    Example:
        >>> conv = spectral_norm(nn.Conv2d(8, 8, 3))
        >>> u = conv.parametrizations.weight[0]._u.clone()
        >>> with power_iteration_paused():
        ...     _ = conv(torch.rand(1, 8, 5, 5))
        >>> conv.training, torch.equal(u, conv.parametrizations.weight[0]._u)
        (True, True)
    """
    previous = getattr(_THIS_THREAD, "paused", False)
    _THIS_THREAD.paused = True
    try:
        yield
    finally:
        _THIS_THREAD.paused = previous


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    # Devices without autocast (meta, used for shape inference) have nothing to disable.
    available = getattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda", "xpu", "mps", "hpu"))
    return (
        torch.autocast(device_type=device_type, enabled=False) if available(device_type) else contextlib.nullcontext()
    )


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1) -> nn.Module:
    """Register :class:`SpectralNorm` on ``module.<name>`` and return the module.

    Example:
        >>> conv = spectral_norm(nn.Conv2d(8, 8, 3))
        >>> sorted(conv.state_dict())
        ['bias', 'parametrizations.weight.0._u', 'parametrizations.weight.0._v', 'parametrizations.weight.original']
    """
    parametrize.register_parametrization(module, name, SpectralNorm(getattr(module, name), n_power_iterations))
    return module


def remap_legacy_spectral_norm_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename legacy spectral-norm keys (``weight_orig``, ``weight_u``, ``weight_v``) to parametrization keys.

    Keys that are already in the new form, and all other keys, pass through unchanged.

    Args:
        state_dict: a state dict saved with ``torch.nn.utils.spectral_norm``.

    Returns:
        A new dict with ``<m>.weight_orig -> <m>.parametrizations.weight.original``,
        ``<m>.weight_u -> <m>.parametrizations.weight.0._u`` and
        ``<m>.weight_v -> <m>.parametrizations.weight.0._v``.

    Raises:
        ValueError: a conv has both a legacy key and its new form (which one holds the weights?).

    Example:
        >>> sorted(remap_legacy_spectral_norm_keys({"conv.weight_u": torch.ones(2)}))
        ['conv.parametrizations.weight.0._u']
    """
    out = dict(state_dict)
    rename_legacy_spectral_norm_keys_(out)
    return out


def rename_legacy_spectral_norm_keys_(state_dict: dict[str, torch.Tensor], prefix: str = "") -> None:
    """:func:`remap_legacy_spectral_norm_keys` in place, on the keys under ``prefix`` (the library's one rename).

    Raises:
        ValueError: a conv has both a legacy key and its new form.
    """
    for key in [k for k in state_dict if k.startswith(prefix) and k.rpartition(".")[2] in _LEGACY_SUFFIXES]:
        head, _, leaf = key.rpartition(".")
        new = f"{head}.{_LEGACY_SUFFIXES[leaf]}" if head else _LEGACY_SUFFIXES[leaf]
        if new in state_dict:
            raise ValueError(
                f"The state dict holds both {key!r} (legacy torch.nn.utils.spectral_norm) and {new!r} "
                "(parametrizations) for the same weight; keep the keys of one checkpoint only."
            )
        state_dict[new] = state_dict.pop(key)


def check_spectral_norm_vectors(state_dict: Mapping[str, torch.Tensor], *, source: str = "The state dict") -> None:
    """Refuse all-zero power-iteration vectors ``u``/``v`` (sigma would be 0, every logit NaN).

    Raises:
        ValueError: naming the first such key.
    """
    for key, value in state_dict.items():
        if key.endswith(("weight.0._u", "weight.0._v", ".weight_u", ".weight_v")) and not bool(value.any()):
            raise ValueError(
                f"{source} has an all-zero spectral-norm vector {key!r}: the normalised weight would divide by "
                "sigma = 0 and every output would be NaN (these vectors are never zero in a saved model). The file "
                "is damaged: copy or download it again."
            )
