"""SeD: shapes over sizes and batches, input errors, value checks, gradients, init, serialisation."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import reference_sed as R
import sed_discriminator as sd
from sed_discriminator.config import set_value_checks, value_checks_enabled
from conftest import TINY

CS = TINY["semantic_channels"]
VARIANTS = ["patch", "pixel"]


def tiny(variant: str, **kwargs) -> sd.SeD:
    return sd.SeD(variant, **{**TINY, **kwargs})


def patch_side(n: int) -> int:
    """Output side of the patch D from its conv arithmetic (docs/reference.md section 3)."""
    n = n // 2  # conv_first 4/2/1
    n = n // 2  # conv1
    n = n // 2  # conv2
    return n - 1 - 1  # conv3 and conv_last, 4/1/1 each


@pytest.fixture
def value_checks():
    before = value_checks_enabled()
    set_value_checks(True)
    yield
    set_value_checks(before)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(32, 32), (64, 64), (96, 96), (200, 120), (256, 256)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_cardinality(variant: str, size: tuple[int, int], batch: int, device: torch.device) -> None:
    model = tiny(variant).to(device)
    h, w = size
    semantic = torch.randn(batch, CS, math.ceil(h / 16), math.ceil(w / 16), device=device)
    out = model(torch.rand(batch, 3, h, w, device=device), semantic)
    expected = (batch, 1, patch_side(h), patch_side(w)) if variant == "patch" else (batch, 1, h, w)
    assert out.shape == expected
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_batch(variant: str) -> None:
    out = tiny(variant)(torch.rand(0, 3, 64, 64), torch.randn(0, CS, 4, 4))
    assert out.shape == ((0, 1, 6, 6) if variant == "patch" else (0, 1, 64, 64))


@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (8, 8), (16, 16)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_semantic_grids_of_other_sizes(variant: str, grid: tuple[int, int]) -> None:
    model = R.perturb_(tiny(variant), torch.Generator().manual_seed(0)).eval()
    x = torch.rand(2, 3, 64, 64)
    out = model(x, torch.randn(2, CS, *grid))
    assert out.shape == ((2, 1, 6, 6) if variant == "patch" else (2, 1, 64, 64))
    assert torch.isfinite(out).all()


def test_semantic_grid_resampled_to_the_levels_grid() -> None:
    """Every level of a 64 px patch D needs a 4x4 grid: an 8x8 map acts as its antialiased resample."""
    model = R.perturb_(tiny("patch"), torch.Generator().manual_seed(0)).eval()
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, CS, 8, 8)
    down = F.interpolate(s, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(model(x, s), model(x, down), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_noncontiguous_input(variant: str) -> None:
    model = tiny(variant).eval()
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4)
    x_nc = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_nc.is_contiguous()
    expected = model(x, s)
    torch.testing.assert_close(model(x_nc, s), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model(cl, s), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_gradient(variant: str, device: torch.device) -> None:
    model = tiny(variant).train().to(device)
    out = model(torch.rand(2, 3, 48, 80, device=device), torch.randn(2, CS, 3, 5, device=device))
    out.mean().backward()
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    if variant == "patch":  # N(0, 0.02) everywhere: nothing is zero-initialised upstream of a gradient
        assert all(p.grad.abs().sum() > 0 for p in params.values())


# -- input errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x_shape, x_dtype, s_shape, message",
    [
        (
            (3, 64, 64),
            torch.float32,
            (1, CS, 4, 4),
            r"expects an image batch of shape \(B, 3, H, W\), got a 3-D tensor of shape \(3, 64, 64\)\. Add the batch "
            r"dimension with x\.unsqueeze\(0\)",
        ),
        ((1, 1, 3, 64, 64), torch.float32, (1, CS, 4, 4), r"got a 5-D tensor of shape \(1, 1, 3, 64, 64\)"),
        (
            (2, 1, 64, 64),
            torch.float32,
            (2, CS, 4, 4),
            r"SeD expects 3 channels, got 1 \(shape \(2, 1, 64, 64\)\)\. Repeat a grayscale image",
        ),
        ((2, 4, 64, 64), torch.float32, (2, CS, 4, 4), r"SeD expects 3 channels, got 4"),
        (
            (2, 3, 64, 64),
            torch.uint8,
            (2, CS, 4, 4),
            r"floating-point image with values in \[0, 1\], got dtype torch\.uint8\. Convert it with x\.float\(\) / "
            r"255",
        ),
        ((2, 3, 64, 64), torch.int64, (2, CS, 4, 4), r"got dtype torch\.int64"),
        (
            (2, 3, 64, 64),
            torch.float32,
            (3, CS, 4, 4),
            r"got an image batch of 2 but a semantic batch of 3\. Compute the semantics from the HR batch",
        ),
        ((2, 3, 16, 64), torch.float32, (2, CS, 1, 4), r"needs images of at least 32x32 pixels, got 16x64"),
        ((2, 3, 64, 31), torch.float32, (2, CS, 4, 2), r"needs images of at least 32x32 pixels, got 64x31"),
        (
            (2, 3, 64, 64),
            torch.float32,
            (2, 32, 4, 4),
            r"built with semantic_channels=64 but the semantic map has 32 channels \(shape \(2, 32, 4, 4\)\)",
        ),
        (
            (2, 3, 64, 64),
            torch.float32,
            (2, CS, 16),
            r"expects a semantic map of shape \(B, 64, h, w\), got a 3-D tensor",
        ),
    ],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_exception_messages(variant, x_shape, x_dtype, s_shape, message) -> None:
    model = tiny(variant)
    x = torch.zeros(x_shape, dtype=x_dtype)
    with pytest.raises(ValueError, match=message):
        model(x, torch.randn(s_shape))


def test_exception_types_for_non_tensors() -> None:
    model = tiny("patch")
    with pytest.raises(TypeError, match="expects a torch.Tensor image batch, got ndarray"):
        model(torch.rand(1, 3, 64, 64).numpy(), torch.randn(1, CS, 4, 4))
    with pytest.raises(
        TypeError,
        match=r"semantic map as a torch.Tensor, got NoneType\. Compute it with SemanticExtractor",
    ):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="floating-point semantic map, got dtype torch.int64"):
        model(torch.rand(1, 3, 64, 64), torch.zeros(1, CS, 4, 4, dtype=torch.int64))


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"Unknown SeD variant 'unet'; choose one of \('patch', 'pixel'\)"):
        sd.SeD("unet")
    with pytest.raises(ValueError, match="width must be a positive integer, got 0"):
        sd.SeD("patch", width=0)
    with pytest.raises(ValueError, match="head_dim must be a positive integer, got 8.0"):
        sd.SeD("patch", head_dim=8.0)
    with pytest.raises(TypeError, match="positional argument"):
        sd.SeD("patch", 3, 64)  # type: ignore[misc]
    with pytest.raises(TypeError, match="channels_last must be True, False or None, got 'yes'"):
        sd.SeD("patch", channels_last="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "variant, channels, step, suggestion",
    [("patch", 48, 32, "e.g. 32 or 64"), ("pixel", 96, 64, "e.g. 64 or 128"), ("pixel", 32, 64, "e.g. 64 or 128")],
)
def test_semantic_channels_that_do_not_fit_say_which_do(variant, channels, step, suggestion) -> None:
    from sed_discriminator.discriminator import semantic_channel_step

    assert semantic_channel_step(variant) == step
    with pytest.raises(ValueError, match=rf"semantic_channels={channels} does not fit SeD\('{variant}'\): "
                                         rf"its SeFBs need a multiple of {step} .*{suggestion}"):
        sd.SeD(variant, semantic_channels=channels)
    sd.SeD(variant, semantic_channels=channels, semantic_fusion=False)  # no SeFB, no constraint


@pytest.mark.parametrize("variant", ["patch", "pixel"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_inputs_of_another_dtype_than_the_model(variant: str, dtype: torch.dtype) -> None:
    model = tiny(variant)
    x, s = torch.rand(1, 3, 32, 32), torch.randn(1, CS, 2, 2)
    with pytest.raises(ValueError, match=rf"SeD's weights are torch.float32 but its image is {dtype}\. Convert "
                                         r"the input with .to\(torch.float32\), .*torch.autocast\('cpu'\)"):
        model(x.to(dtype), s)
    with pytest.raises(ValueError, match=rf"but its semantic map is {dtype}"):
        model(x, s.to(dtype))
    if dtype == torch.bfloat16:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision is what autocast is for
            assert torch.isfinite(model(x.to(dtype), s).float()).all()


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_meta_device_for_shape_inference(variant: str) -> None:
    with torch.device("meta"):
        model = tiny(variant)
        x, s = torch.empty(2, 3, 64, 48), torch.empty(2, CS, 4, 3)
    out = model(x, s)
    assert out.device.type == "meta"
    assert out.shape == tiny(variant)(torch.rand(2, 3, 64, 48), torch.randn(2, CS, 4, 3)).shape


def test_value_checks_nan(value_checks) -> None:
    model = tiny("patch")
    x, s = torch.rand(1, 3, 64, 64), torch.randn(1, CS, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="SeD got NaN or Inf values in its image; check the upstream computation"):
        model(x, s)
    s[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="SeD got NaN or Inf values in its semantic map"):
        model(torch.rand(1, 3, 64, 64), s)


def test_value_checks_off_by_default_let_nan_through() -> None:
    assert not value_checks_enabled()
    x = torch.rand(1, 3, 64, 64)
    x[0, 0, 0, 0] = float("nan")
    assert torch.isnan(tiny("patch")(x, torch.randn(1, CS, 4, 4))).any()


def test_set_value_checks_round_trip() -> None:
    before = value_checks_enabled()
    try:
        set_value_checks(True)
        assert value_checks_enabled() is True
        set_value_checks(False)
        assert value_checks_enabled() is False
    finally:
        set_value_checks(before)


# -- structure and init ------------------------------------------------------------------------


def test_patch_init_is_normal_002_with_zero_bias() -> None:
    model = sd.SeD("patch")
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            weight = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
            if weight.numel() >= 4096:
                assert abs(weight.std().item() - 0.02) < 0.002, name
                assert abs(weight.mean().item()) < 0.002, name
            if module.bias is not None:
                assert torch.count_nonzero(module.bias) == 0, name
    assert torch.count_nonzero(model.att1.proj_out.weight) > 0  # N(0, 0.02) reaches proj_out too
    assert torch.equal(model.att1.norm.weight, torch.ones(1024))  # norms keep their defaults


def test_pixel_init_keeps_proj_out_zero() -> None:
    model = sd.SeD("pixel")
    for block in model.sefb_blocks().values():
        assert torch.count_nonzero(block.proj_out.weight) == 0


@pytest.mark.parametrize(
    "variant, names",
    [
        ("patch", ["conv1", "conv11", "conv2", "conv21", "conv3", "conv31"]),
        (
            "pixel",
            ["conv1", "conv2", "conv3", "conv31", "conv4", "conv21", "conv5", "conv11", "conv6", "conv7", "conv8"],
        ),
    ],
)
def test_spectral_norm_on_the_specs_convs_only(variant: str, names: list[str]) -> None:
    model = tiny(variant)
    normed = sorted(n for n, m in model.named_children() if hasattr(m, "parametrizations"))
    assert normed == sorted(names)


@pytest.mark.parametrize("variant", VARIANTS)
def test_without_semantic_fusion(variant: str) -> None:
    model = tiny(variant, semantic_fusion=False)
    assert model.sefb_blocks() == {}
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == ((2, 1, 6, 6) if variant == "patch" else (2, 1, 64, 64))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in tiny(variant).parameters())


def test_attention_maps() -> None:
    model = R.perturb_(tiny("pixel"), torch.Generator().manual_seed(0)).eval()
    maps = model.attention_maps(torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4))
    # U-Net levels 32/16/8 px for a 64 px input; every semantic grid is 4x4.
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "att1": (2, 1, 16, 32 * 32),
        "att2": (2, 1, 16, 16 * 16),
        "att3": (2, 1, 16, 8 * 8),
    }
    for v in maps.values():
        assert v.grad_fn is None
        torch.testing.assert_close(v.sum(-1), torch.ones_like(v.sum(-1)), atol=1e-5, rtol=0)


def test_attention_maps_leave_the_spectral_norm_state_alone() -> None:
    model = tiny("patch").train()
    model.conv1.train(False)  # mixed modes come back as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.attention_maps(torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and not model.conv1.training and model.conv2.training
    model(torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4))  # a training forward does move them
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_extra_repr_names_the_variant() -> None:
    assert "variant='pixel'" in repr(tiny("pixel"))


# -- serialisation -----------------------------------------------------------------------------


def _train_step(model: sd.SeD) -> None:
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4)
    loss = F.softplus(-model(x, s)).mean() + F.softplus(model(torch.rand_like(x), s)).mean()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trip_after_a_step(variant: str) -> None:
    model = tiny(variant)
    _train_step(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert any(k.endswith("._u") for k in state) and any(k.endswith("._v") for k in state)
    torch.manual_seed(123)
    fresh = tiny(variant)
    fresh.load_state_dict(state, strict=True)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    model.eval(), fresh.eval()
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4)
    torch.testing.assert_close(fresh(x, s), model(x, s), atol=0, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_deepcopy(variant: str) -> None:
    model = tiny(variant).set_fused_attn(False)
    _train_step(model)
    clone = copy.deepcopy(model)
    model.eval(), clone.eval()
    x, s = torch.rand(1, 3, 64, 64), torch.randn(1, CS, 4, 4)
    torch.testing.assert_close(clone(x, s), model(x, s), atol=0, rtol=0)
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert not torch.equal(next(clone.parameters()), next(model.parameters()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_pickle(variant: str) -> None:
    model = tiny(variant).set_fused_attn(False)
    _train_step(model)
    model.eval()
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored) is sd.SeD and restored.variant == variant and not restored.training
    assert all(not m.fused_attn for m in restored.modules() if hasattr(m, "fused_attn"))
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name
    x, s = torch.rand(1, 3, 64, 64), torch.randn(1, CS, 4, 4)
    torch.testing.assert_close(restored(x, s), model(x, s), atol=0, rtol=0)
