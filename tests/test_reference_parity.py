"""Parity of ``sed_discriminator.SeD`` with the independent plain reference in ``reference_sed.py``.

Weights go from the reference (legacy spectral-norm keys, the authors' layout) into the library
through :func:`sed_discriminator.load_official_weights`, so these tests also cover the key mapping.
Every comparison is float32 with a max abs difference of 1e-5 (docs/reference.md: "about 1e-5").
"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, sed_inputs
from torch import nn

import reference_sed as R
import sed_discriminator as sd
from sed_discriminator.sefb import channels_to_space

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

ATOL = 1e-5


@pytest.fixture
def no_tf32():
    """Full float32 on CUDA (TF32 convolutions alone exceed 1e-5); a no-op on CPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def make_pair(variant: str, seed: int = 0, **sizes) -> tuple[nn.Module, sd.SeD]:
    """A perturbed, SN-settled reference and a library SeD carrying its weights."""
    torch.manual_seed(seed)
    ref = R.build_reference(variant, **sizes)
    R.perturb_(ref, torch.Generator().manual_seed(seed + 1))
    R.settle_spectral_norm_(ref)
    lib = sd.SeD(variant, **sizes)
    sd.load_official_weights(lib, ref.state_dict())
    return ref, lib


@pytest.mark.parametrize("variant, expected", [("patch", R.PATCH_PARAMS), ("pixel", R.PIXEL_PARAMS)])
def test_parameter_count_paper(variant: str, expected: int) -> None:
    lib = sd.SeD(variant)
    ref = R.build_reference(variant)
    assert sum(p.numel() for p in lib.parameters()) == expected
    # The reference is built from docs/reference.md alone; agreeing on the count validates it too.
    assert sum(p.numel() for p in ref.parameters()) == expected


@pytest.mark.slow
@pytest.mark.parametrize("variant, out_shape", [("patch", (1, 1, 30, 30)), ("pixel", (1, 1, 256, 256))])
def test_parity_paper_sizes_256(variant: str, out_shape: tuple) -> None:
    ref, lib = make_pair(variant)
    ref.eval(), lib.eval()
    x, s = sed_inputs(1, 256, seed=0, semantic_channels=1024)
    with torch.no_grad():
        expected = ref(x, s)
        actual = lib(x, s)  # default path (fused attention unless SED_FUSED_ATTN=0)
    assert expected.shape == out_shape
    assert actual.shape == out_shape
    assert (actual - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_parity_tiny_eval(variant: str, size: int, fused: bool, device: torch.device, no_tf32) -> None:
    ref, lib = make_pair(variant, **TINY)
    ref.eval().to(device), lib.eval().to(device)
    lib.set_fused_attn(fused)
    x, s = sed_inputs(2, size, seed=0, device=device)
    with torch.no_grad():
        expected, actual = ref(x, s), lib(x, s)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_parity_tolerance_is_meaningful(variant: str) -> None:
    """The 1e-5 bound catches a wrong rearrange order and an output that ignores the semantics."""
    ref, lib = make_pair(variant, **TINY)
    shuffled = R.build_reference(variant, order="pixel_shuffle", **TINY)
    shuffled.load_state_dict(ref.state_dict())
    for m in (ref, lib, shuffled):
        m.eval()
    x, s = sed_inputs(2, 64, seed=0)
    other_s = torch.randn_like(s)
    with torch.no_grad():
        out = lib(x, s)
        assert (out - shuffled(x, s)).abs().max().item() > 100 * ATOL  # PixelShuffle order is NOT the reference's
        assert (out - lib(x, other_s)).abs().max().item() > 100 * ATOL  # semantics matter at this tolerance
        assert (out - ref(x, s)).abs().max().item() <= ATOL


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_parity_training_mode_steps(variant: str) -> None:
    """Training-mode forwards update u/v in the legacy order: buffers, outputs, grads and steps match."""
    ref, lib = make_pair(variant, **TINY)
    ref.train(), lib.train()
    lib.set_fused_attn(False)
    lib_params = dict(lib.named_parameters())
    lib_buffers = dict(lib.named_buffers())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    opt_lib = torch.optim.SGD(lib.parameters(), lr=0.05)
    for step in range(3):
        real, s = sed_inputs(2, 64, seed=10 + step)
        fake = torch.rand_like(real)
        losses = []
        for model, opt in ((ref, opt_ref), (lib, opt_lib)):
            opt.zero_grad()
            out_real, out_fake = model(real, s), model(fake, s)  # two forwards, one backward (a D step)
            loss = nn.functional.softplus(-out_real).mean() + nn.functional.softplus(out_fake).mean()
            loss.backward()
            losses.append((out_real.detach(), out_fake.detach()))
        for a, b in zip(losses[0], losses[1]):
            torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
        for name, buf in ref.named_buffers():
            torch.testing.assert_close(lib_buffers[R.legacy_to_library_name(name)], buf, atol=ATOL, rtol=0)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(lib_params[R.legacy_to_library_name(name)].grad, p.grad, atol=1e-5, rtol=1e-4)
        opt_ref.step()
        opt_lib.step()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(lib_params[R.legacy_to_library_name(name)], p, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_attention_maps_match_reference(variant: str) -> None:
    ref, lib = make_pair(variant, **TINY)
    ref.eval(), lib.eval()
    x, s = sed_inputs(2, 64, seed=0)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        getattr(ref, name).register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, args))
        for name in ("att1", "att2", "att3")
    ]
    with torch.no_grad():
        ref(x, s)
    for h in hooks:
        h.remove()
    maps = lib.attention_maps(x, s)
    assert sorted(maps) == ["att1", "att2", "att3"]
    for name, (sem, feat) in captured.items():
        expected = getattr(ref, name).cross_attention(sem, feat)
        assert maps[name].shape == (2, 1, sem.shape[-2] * sem.shape[-1], feat.shape[-2] * feat.shape[-1])
        torch.testing.assert_close(maps[name], expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(maps[name].sum(-1), torch.ones_like(maps[name].sum(-1)), atol=1e-5, rtol=0)


def _channels_to_space_loops(x: torch.Tensor, u: int) -> torch.Tensor:
    b, cu, h, w = x.shape
    c = cu // (u * u)
    out = torch.empty(b, c, h * u, w * u, dtype=x.dtype)
    for bi in range(b):
        for ci in range(c):
            for hi in range(h):
                for wi in range(w):
                    for uh in range(u):
                        for uw in range(u):
                            out[bi, ci, hi * u + uh, wi * u + uw] = x[bi, ci * u * u + uw * u + uh, hi, wi]
    return out


@pytest.mark.parametrize("u", [2, 3, 4])
def test_channels_to_space_index_formula(u: int) -> None:
    x = torch.randn(2, 2 * u * u, 3, 2)
    expected = _channels_to_space_loops(x, u)
    torch.testing.assert_close(channels_to_space(x, u), expected, rtol=0, atol=0)
    torch.testing.assert_close(R.channels_to_space(x, u), expected, rtol=0, atol=0)
    # Not PixelShuffle's order ...
    assert not torch.equal(nn.functional.pixel_shuffle(x, u), expected)
    # ... but PixelShuffle after swapping the two sub-indices (docs/reference.md section 2, step 5).
    swapped = x.view(2, 2, u, u, 3, 2).transpose(2, 3).reshape_as(x)
    torch.testing.assert_close(nn.functional.pixel_shuffle(swapped, u), expected, rtol=0, atol=0)


def test_channels_to_space_rejects_bad_channels() -> None:
    with pytest.raises(ValueError, match="divisible by 2"):
        channels_to_space(torch.randn(1, 6, 2, 2), 2)
