"""Mixed precision (CPU bf16) and compiled training steps (eager / aot_eager backends) against eager fp32.

The eval-mode compile test of SeD is ``TestSeD.test_dynamo`` in test_discriminator.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import CS, TINY, assert_same, settled_sed, sn_buffers

import sed_discriminator as sd


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_bf16_autocast_cpu(variant: str) -> None:
    model = settled_sed(variant).train()
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4)
    reference = copy.deepcopy(model)(x, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, s)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    out.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for name, buf in sn_buffers(model).items():
        assert buf.dtype == torch.float32, name
    # bf16 keeps ~3 significant digits; relative to the output's scale.
    assert (out.float() - reference).abs().max() <= 5e-2 * reference.abs().max().clamp_min(1)


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_bf16_weights_keep_fp32_power_iteration(variant: str) -> None:
    model = settled_sed(variant).to(torch.bfloat16).train()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in sn_buffers(model).values())
    out = model(torch.rand(2, 3, 64, 64, dtype=torch.bfloat16), torch.randn(2, CS, 4, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(b.dtype == torch.float32 for b in sn_buffers(model).values())


def test_extractor_under_bf16_autocast() -> None:
    with pytest.warns(UserWarning, match="RANDOM"):
        ext = sd.SemanticExtractor("clip_rn50", pretrained=None)
    x = torch.rand(1, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ext(x)
    assert torch.isfinite(out).all() and out.shape == (1, 1024, 2, 2)


def _train_step(model, x, s):
    out = model(x, s)
    out.square().mean().backward()
    return out.detach()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_training_step_equals_eager(backend: str) -> None:
    """Training-mode forwards mutate the u/v buffers; the compiled graph must mutate them alike."""
    torch._dynamo.reset()
    eager = settled_sed("patch").train()
    other = copy.deepcopy(eager)
    compiled = torch.compile(other, backend=backend)
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4)
    for _ in range(2):
        torch.testing.assert_close(_train_step(compiled, x, s), _train_step(eager, x, s), atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(sn_buffers(eager).items(), sn_buffers(other).values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    for (name, a), b in zip(eager.named_parameters(), other.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5 * max(1.0, a.grad.abs().max().item()), rtol=1e-4, msg=name)
    # The compiled module's state dict carries the _orig_mod. prefix; load_official_weights strips it.
    restored = sd.load_official_weights(sd.SeD("patch", **TINY), compiled.state_dict()).eval()
    other.eval()
    with torch.no_grad():
        assert_same(restored(x, s), other(x, s))
