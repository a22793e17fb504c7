"""The library's spectral norm: legacy power-iteration numerics, parametrization key names, fp32 state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from sed_discriminator.spectral_norm import SpectralNorm, remap_legacy_spectral_norm_keys, spectral_norm

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def legacy_and_library(seed: int = 0) -> tuple[nn.Conv2d, nn.Conv2d]:
    torch.manual_seed(seed)
    legacy = nn.utils.spectral_norm(nn.Conv2d(6, 10, 3, padding=1))
    lib = spectral_norm(nn.Conv2d(6, 10, 3, padding=1))
    with torch.no_grad():
        lib.parametrizations.weight.original.copy_(legacy.weight_orig)
        lib.bias.copy_(legacy.bias)
        lib.parametrizations.weight[0]._u.copy_(legacy.weight_u)
        lib.parametrizations.weight[0]._v.copy_(legacy.weight_v)
    return legacy, lib


def test_training_forwards_follow_the_legacy_hook() -> None:
    legacy, lib = legacy_and_library()
    x = torch.randn(2, 6, 8, 8)
    for _ in range(4):
        torch.testing.assert_close(lib(x), legacy(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lib.parametrizations.weight[0]._u, legacy.weight_u, atol=1e-6, rtol=0)
        torch.testing.assert_close(lib.parametrizations.weight[0]._v, legacy.weight_v, atol=1e-6, rtol=0)


def test_eval_forward_leaves_u_v_alone_and_matches_legacy() -> None:
    legacy, lib = legacy_and_library()
    legacy.eval(), lib.eval()
    u = lib.parametrizations.weight[0]._u.clone()
    x = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(lib(x), legacy(x), atol=1e-6, rtol=1e-5)
    assert torch.equal(lib.parametrizations.weight[0]._u, u)


def test_normalised_weight_has_unit_spectral_norm() -> None:
    conv = spectral_norm(nn.Conv2d(6, 10, 3))  # 15 power iterations at registration
    for _ in range(50):
        conv(torch.randn(1, 6, 5, 5))
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert abs(sigma.item() - 1.0) < 1e-3


def test_state_dict_keys_equal_torch_parametrization() -> None:
    ours = spectral_norm(nn.Conv2d(4, 4, 3))
    torchs = parametrizations.spectral_norm(nn.Conv2d(4, 4, 3))
    assert sorted(ours.state_dict()) == sorted(torchs.state_dict())
    ours.load_state_dict(torchs.state_dict(), strict=True)


def test_two_forwards_one_backward() -> None:
    """Each forward's graph keeps the u/v of its own power iteration (the second forward updates them in
    place), so one backward through both gives the legacy hook's gradients."""
    legacy, lib = legacy_and_library()
    x1, x2 = torch.randn(1, 6, 8, 8), torch.randn(1, 6, 8, 8)
    for conv in (legacy, lib):
        (conv(x1).square().sum() + conv(x2).square().sum()).backward()
    torch.testing.assert_close(lib.parametrizations.weight.original.grad, legacy.weight_orig.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lib.bias.grad, legacy.bias.grad, atol=1e-6, rtol=1e-5)
    assert lib.parametrizations.weight.original.grad.abs().sum() > 0


def test_u_v_stay_float32_under_low_precision_casts() -> None:
    conv = spectral_norm(nn.Conv2d(4, 4, 3))
    for dtype in (torch.bfloat16, torch.float16):
        converted = copy.deepcopy(conv).to(dtype)
        sn = converted.parametrizations.weight[0]
        assert converted.parametrizations.weight.original.dtype == dtype
        assert sn._u.dtype == torch.float32 and sn._v.dtype == torch.float32
    assert copy.deepcopy(conv).double().parametrizations.weight[0]._u.dtype == torch.float64


def test_autocast_bf16_keeps_sigma_fp32_and_gives_finite_output() -> None:
    conv = spectral_norm(nn.Conv2d(4, 4, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(torch.randn(1, 4, 6, 6))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert conv.parametrizations.weight[0]._u.dtype == torch.float32


def test_rejects_vector_weight() -> None:
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        SpectralNorm(torch.randn(5))


def test_remap_legacy_keys() -> None:
    t = torch.zeros(1)
    legacy = {
        "conv1.weight_orig": t,
        "conv1.weight_u": t,
        "conv1.weight_v": t,
        "conv1.bias": t,
        "att1.norm.weight": t,
        "weight_orig": t,
        "conv2.parametrizations.weight.original": t,
    }
    assert sorted(remap_legacy_spectral_norm_keys(legacy)) == sorted(
        [
            "conv1.parametrizations.weight.original",
            "conv1.parametrizations.weight.0._u",
            "conv1.parametrizations.weight.0._v",
            "conv1.bias",
            "att1.norm.weight",
            "parametrizations.weight.original",
            "conv2.parametrizations.weight.original",
        ]
    )


def test_legacy_state_dict_loads_after_remap() -> None:
    legacy, _ = legacy_and_library()
    fresh = spectral_norm(nn.Conv2d(6, 10, 3, padding=1))
    fresh.load_state_dict(remap_legacy_spectral_norm_keys(legacy.state_dict()), strict=True)
    legacy.eval(), fresh.eval()
    x = torch.randn(1, 6, 8, 8)
    torch.testing.assert_close(fresh(x), legacy(x), atol=1e-6, rtol=1e-5)
