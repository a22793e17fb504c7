"""Attention, gated-GELU feed-forward and the residual-free block; the fused-attention switches.

The fused path (``scaled_dot_product_attention``) must give the math path's outputs and
gradients; the switch is reachable per model (``SeD.set_fused_attn``), per block
(``SeFB.set_fused_attn``), process-wide (``sed_discriminator.set_fused_attn``) and through
the ``SED_FUSED_ATTN`` environment variable (read at import, so tested in subprocesses).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY, perturbed

import reference_sed as R
import sed_discriminator as sd
from sed_discriminator.attention import Attention, FeedForward, TransformerBlock, math_attention_scores

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_fused_flag():
    before = sd.use_fused_attn()
    yield
    sd.set_fused_attn(before)


@pytest.mark.parametrize("heads, head_dim", [(1, 32), (1, 40), (2, 64), (4, 8)])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_fused_equals_math(heads: int, head_dim: int, cross: bool, dtype: torch.dtype) -> None:
    dim = 24
    attn = perturbed(Attention(dim, heads, head_dim)).to(dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, dim, generator=g, dtype=dtype)
    # A non-contiguous context: every other token of a longer sequence.
    context = torch.randn(2, 22, dim, generator=g, dtype=dtype)[:, ::2] if cross else None
    outs, grads = [], []
    for fused in (True, False):
        attn.fused_attn = fused
        attn.zero_grad()
        x_ = x.clone().requires_grad_()
        out = attn(x_, context)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([x_.grad] + [p.grad.clone() for p in attn.parameters()])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=tol["atol"] * max(1.0, b.abs().max().item()), rtol=tol["rtol"])


def test_attention_matches_einsum_reference() -> None:
    ref = perturbed(R.RefAttention(16, 2, 8))
    attn = Attention(16, 2, 8)
    attn.load_state_dict(ref.state_dict())
    x, ctx = torch.randn(3, 5, 16), torch.randn(3, 9, 16)
    for fused in (True, False):
        attn.fused_attn = fused
        torch.testing.assert_close(attn(x, ctx), ref(x, ctx), atol=1e-5, rtol=0)
        torch.testing.assert_close(attn(x), ref(x), atol=1e-5, rtol=0)


def test_return_attention_probabilities() -> None:
    attn = perturbed(Attention(16, 2, 8))
    x, ctx = torch.randn(3, 5, 16), torch.randn(3, 9, 16)
    out, probs = attn(x, ctx, return_attention=True)
    assert probs.shape == (3, 2, 5, 9)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 5), atol=1e-6, rtol=0)
    ref = R.RefAttention(16, 2, 8)
    ref.load_state_dict(attn.state_dict())
    torch.testing.assert_close(probs, ref.scores(x, ctx), atol=1e-6, rtol=0)
    torch.testing.assert_close(out, attn(x, ctx), atol=1e-5, rtol=0)


def test_scores_upcast_reduced_precision_only() -> None:
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8)
    exact = math_attention_scores(q.double(), k.double(), 8**-0.5)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, torch.softmax(q.double() @ k.double().transpose(-1, -2) * 8**-0.5, -1))
    low = math_attention_scores(q.bfloat16(), k.bfloat16(), 8**-0.5)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), exact.float(), atol=1e-2, rtol=0)


def test_feed_forward_is_gated_exact_gelu() -> None:
    ref = perturbed(R.RefFeedForward(16))
    ff = FeedForward(16)
    ff.load_state_dict(ref.state_dict())
    assert ff.net[0].proj.out_features == 2 * 4 * 16 and ff.net[2].in_features == 4 * 16
    x = torch.randn(2, 5, 16) * 3
    torch.testing.assert_close(ff(x), ref(x), atol=1e-5, rtol=0)
    # The tanh approximation is measurably different, so the exact erf form is what we match.
    a, g = ref.net[0].proj(x).chunk(2, -1)
    approx = ref.net[2](a * torch.nn.functional.gelu(g, approximate="tanh"))
    assert (approx - ff(x)).abs().max() > 1e-5


def test_transformer_block_has_no_residuals() -> None:
    ref = perturbed(R.RefBlock(16, 1, 16))
    block = TransformerBlock(16, 1, 16)
    block.load_state_dict(ref.state_dict())
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 10, 16)
    torch.testing.assert_close(block(x, ctx), ref(x, ctx), atol=1e-5, rtol=0)
    with_residual = x + ref.attn1(ref.norm1(x))
    with_residual = with_residual + ref.attn2(ref.norm2(with_residual), ctx)
    with_residual = with_residual + ref.ff(ref.norm3(with_residual))
    assert (block(x, ctx) - with_residual).abs().max() > 1e-3
    for norm in (block.norm1, block.norm2, block.norm3):
        assert norm.eps == 1e-5 and norm.elementwise_affine


def test_sed_set_fused_attn_toggles_every_attention() -> None:
    model = sd.SeD("pixel", **TINY)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attns) == 6  # three SeFBs, self- and cross-attention each
    assert model.set_fused_attn(False) is model
    assert not any(a.fused_attn for a in attns)
    model.set_fused_attn(True)
    assert all(a.fused_attn for a in attns)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_sed_fused_equals_math(variant: str, dtype: torch.dtype, device: torch.device) -> None:
    # In float32 the two kernels round differently, and a few parameter gradients of the pixel
    # SeD (sums over 64x64 positions) then differ by ~2e-4 relative; float64 shows the paths are
    # the same computation, float32 that the rounding stays at that level.
    base = perturbed(sd.SeD(variant, **TINY)).to(device, dtype)
    x = torch.rand(2, 3, 64, 64, device=device, dtype=dtype)
    s = torch.randn(2, TINY["semantic_channels"], 4, 4, device=device, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    results = []
    for fused in (True, False):
        model = copy.deepcopy(base).set_fused_attn(fused)  # a training forward moves u/v: start both alike
        x_ = x.clone().requires_grad_()
        out = model(x_, s)
        out.mean().backward()
        results.append((out.detach(), x_.grad, [p.grad.clone() for p in model.parameters()]))
    (o1, gx1, gp1), (o2, gx2, gp2) = results
    torch.testing.assert_close(o1, o2, atol=tol, rtol=tol)
    torch.testing.assert_close(gx1, gx2, atol=tol / 10, rtol=tol * 10)
    for a, b in zip(gp1, gp2):
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= (5e-4 if dtype == torch.float32 else tol) * scale


def test_global_switch_affects_new_modules_only(restore_fused_flag) -> None:
    old = sd.SeFB(8, 2, semantic_channels=64, head_dim=8)
    old_flags = [m.fused_attn for m in old.modules() if isinstance(m, Attention)]
    sd.set_fused_attn(False)
    assert sd.use_fused_attn() is False
    new = sd.SeFB(8, 2, semantic_channels=64, head_dim=8)
    assert not any(m.fused_attn for m in new.modules() if isinstance(m, Attention))
    assert [m.fused_attn for m in old.modules() if isinstance(m, Attention)] == old_flags
    sd.set_fused_attn(True)
    assert sd.use_fused_attn() is True
    assert all(m.fused_attn for m in sd.SeD("patch", **TINY).modules() if isinstance(m, Attention))


_ENV_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import sed_discriminator as sd
    import sed_discriminator.config
    from sed_discriminator.attention import Attention
    torch.manual_seed(0)
    model = sd.SeD("patch", width=8, semantic_channels=64, head_dim=8).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        x, s = torch.rand(2, 3, 64, 64, generator=g), torch.randn(2, 64, 4, 4, generator=g)
        model.train()
        for _ in range(10):
            model(x, s)  # power iterations: sigma matches the perturbed weights
        model.eval()
        out = model(x, s)
    torch.save(out, sys.argv[1])
    print(json.dumps({
        "use_fused_attn": sd.use_fused_attn(),
        "value_checks": sed_discriminator.config.value_checks_enabled(),
        "module_flags": sorted({m.fused_attn for m in model.modules() if isinstance(m, Attention)}),
    }))
    """
)


def _run_env(env_updates: dict[str, str], out_file: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SED_FUSED_ATTN", "SED_VALUE_CHECKS")}
    env.update(env_updates)
    return subprocess.run(
        [sys.executable, "-c", _ENV_SCRIPT, str(out_file)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_env_variables_in_subprocess(tmp_path: Path) -> None:
    math = _run_env({"SED_FUSED_ATTN": "0", "SED_VALUE_CHECKS": "1"}, tmp_path / "math.pt")
    assert math.returncode == 0, math.stderr
    fused = _run_env({"SED_FUSED_ATTN": "1"}, tmp_path / "fused.pt")
    assert fused.returncode == 0, fused.stderr
    math_info, fused_info = json.loads(math.stdout.splitlines()[-1]), json.loads(fused.stdout.splitlines()[-1])
    assert math_info == {"use_fused_attn": False, "value_checks": True, "module_flags": [False]}
    assert fused_info == {"use_fused_attn": True, "value_checks": False, "module_flags": [True]}
    out_math = torch.load(tmp_path / "math.pt", weights_only=True)
    out_fused = torch.load(tmp_path / "fused.pt", weights_only=True)
    assert out_math.shape == (2, 1, 6, 6)
    assert (out_math - out_fused).abs().max().item() <= 1e-5

    bad = _run_env({"SED_FUSED_ATTN": "yes"}, tmp_path / "bad.pt")
    assert bad.returncode != 0
    assert "ValueError: SED_FUSED_ATTN must be '0' or '1', got 'yes'" in bad.stderr

    empty = _run_env({"SED_FUSED_ATTN": "", "SED_VALUE_CHECKS": " "}, tmp_path / "empty.pt")  # set to nothing: defaults
    assert empty.returncode == 0, empty.stderr
    assert json.loads(empty.stdout.splitlines()[-1]) == fused_info


@pytest.mark.parametrize("value", ["0", "1", 0, 1, None])
def test_switches_take_booleans_only(value) -> None:
    from sed_discriminator.config import set_value_checks, value_checks_enabled

    before = (sd.use_fused_attn(), value_checks_enabled())
    with pytest.raises(TypeError, match=r"set_value_checks\(enable\) must be True or False, got"):
        set_value_checks(value)
    with pytest.raises(TypeError, match=r"set_fused_attn\(enable\) must be True or False, got"):
        sd.set_fused_attn(value)
    assert (sd.use_fused_attn(), value_checks_enabled()) == before
