"""Small things several test files share: tiny sizes, exact and scaled comparisons, tiny models and inputs.

Import them with ``from helpers import TINY, assert_same`` (pytest puts ``tests/`` on ``sys.path``);
``conftest.py`` re-exports ``TINY`` for files that import it from there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

import reference_sed as R
import sed_discriminator as sd

# Small widths keep unit tests fast on 2 CPU cores; the paper's sizes are tested separately.
TINY = dict(width=8, semantic_channels=64, head_dim=8)
CS = TINY["semantic_channels"]
VARIANTS = ("patch", "pixel")


def assert_same(actual: torch.Tensor | Mapping | nn.Module, expected: torch.Tensor | Mapping | nn.Module) -> None:
    """Bit-for-bit equality of two tensors, two state dicts or two modules' state dicts (keys in order)."""
    if isinstance(actual, nn.Module) or isinstance(expected, nn.Module):
        actual, expected = actual.state_dict(), expected.state_dict()
    if isinstance(actual, Mapping):
        assert list(actual) == list(expected), f"keys differ: {sorted(set(actual) ^ set(expected))}"
        for key, value in actual.items():
            torch.testing.assert_close(value, expected[key], atol=0, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
        return
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, msg: str = "") -> None:
    """max |actual - expected| <= rel * max(1, max |expected|): float32 sums of large gradients."""
    bound = rel * max(1.0, expected.abs().max().item())
    diff = (actual - expected).abs().max().item()
    assert diff <= bound, f"{msg + ': ' if msg else ''}max abs diff {diff:.3g} > {bound:.3g}"


def perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` with seeded noise on every parameter (see ``reference_sed.perturb_``), in place."""
    return R.perturb_(module, torch.Generator().manual_seed(seed))


def tiny_sed(variant: str, *, seed: int | None = None, fused: bool | None = None, **kwargs) -> sd.SeD:
    """A SeD of TINY sizes; ``seed`` perturbs its weights, ``fused`` sets the attention path."""
    model = sd.SeD(variant, **{**TINY, **kwargs})
    if seed is not None:
        perturbed(model, seed)
    if fused is not None:
        model.set_fused_attn(fused)
    return model


def settled_sed(variant: str = "patch", *, iterations: int = 15) -> sd.SeD:
    """A perturbed tiny SeD whose spectral norms have caught up with its weights (one power iteration
    per training forward), returned in eval mode."""
    model = tiny_sed(variant, seed=0)
    with torch.no_grad():
        for _ in range(iterations):
            model(torch.rand(1, 3, 32, 32), torch.randn(1, CS, 2, 2))
    return model.eval()


def sed_inputs(batch: int = 2, size: int = 64, *, seed: int = 1, semantic_channels: int = CS, dtype=None, device=None):
    """A seeded image batch in [0, 1] and a semantic map on the 1/16 grid."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g)
    s = torch.randn(batch, semantic_channels, size // 16, size // 16, generator=g)
    return x.to(device=device, dtype=dtype), s.to(device=device, dtype=dtype)


def sn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The spectral norms' power-iteration vectors ``u`` and ``v``, by name."""
    return {k: v for k, v in model.named_buffers() if k.endswith(("._u", "._v"))}


@contextlib.contextmanager
def tiny_preset(name: str) -> Iterator[str]:
    """Register a tiny extractor preset (timm's ``test_vit``, 64 channels, stride 16) and remove it afterwards,
    so that tests reading the registry (``list_extractors``) see only the library's presets."""
    from sed_discriminator import extractor

    extractor.register_extractor(
        extractor.ExtractorPreset(name=name, model="test_vit", layer=5, channels=64, stride=16), overwrite=True
    )
    try:
        yield name
    finally:
        extractor._PRESETS.pop(name, None)


class CreatesMarker:
    """Unpickling this calls ``open(path, "w")``: the file appears if the unpickler runs code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")
