"""Pickling of SeD: torch refuses to pickle parametrized modules (the spectral-norm convolutions).

A pickle therefore holds the constructor arguments, the state dict, the per-module flags and
the instance attributes a subclass adds, and the model is rebuilt from them. Attributes named
in the class's ``_TRANSIENT`` (e.g. a stored condition) are not pickled: they come back with
their default. Forward/backward hooks are not pickled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attention import Attention

__all__ = ["reduce_module", "rebuild_module"]

_MODULE_ATTRS = frozenset(nn.Module().__dict__)


def reduce_module(model: nn.Module, init: Any, config: dict) -> tuple:
    """The ``__reduce__`` value of ``model``: rebuilt later by ``init(model, **config)``."""
    transient = getattr(type(model), "_TRANSIENT", {})
    flags = dict(
        training=[m.training for m in model.modules()],
        fused_attn=[m.fused_attn for m in model.modules() if isinstance(m, Attention)],
        requires_grad=[p.requires_grad for p in model.parameters()],
    )
    extra = {k: v for k, v in model.__dict__.items() if k not in _MODULE_ATTRS and k not in transient}
    return rebuild_module, (type(model), init, config, model.state_dict(), flags, extra)


def rebuild_module(cls: type, init: Any, config: dict, state: dict, flags: dict, extra: dict) -> nn.Module:
    """Inverse of :func:`reduce_module`."""
    model = cls.__new__(cls)
    with torch.random.fork_rng(devices=[]):  # rebuilding must not consume the caller's random stream
        init(model, **config)
    # assign=True: the parameters and buffers take the pickled tensors themselves, so a float16 or
    # float64 model comes back in its dtype (and on its device) instead of the constructor's float32.
    model.load_state_dict(state, strict=True, assign=True)
    for module, mode in zip(model.modules(), flags["training"]):
        module.training = mode
    for module, fused in zip((m for m in model.modules() if isinstance(m, Attention)), flags["fused_attn"]):
        module.fused_attn = fused
    for param, requires_grad in zip(model.parameters(), flags["requires_grad"]):
        param.requires_grad_(requires_grad)
    model.__dict__.update(extra)
    model.__dict__.update(getattr(cls, "_TRANSIENT", {}))
    return model
