"""SeD: the per-component class (shapes, errors, gradients, compile), value checks, init, serialisation."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import CS, VARIANTS, assert_same, sed_inputs, settled_sed, tiny_sed

import sed_discriminator as sd
from sed_discriminator.config import set_value_checks, value_checks_enabled

SIZES = [(32, 32), (64, 64), (96, 96), (200, 120), (256, 256)]


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


class TestSeD:
    """Per component as in kornia: smoke, cardinality, exception, gradcheck, dynamo."""

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_smoke(self, variant: str, device: torch.device, dtype: torch.dtype) -> None:
        model = tiny_sed(variant, seed=0).to(device, dtype)
        x, s = sed_inputs(2, 32, device=device, dtype=dtype)
        out = model(x, s)
        assert out.shape == ((2, 1, 2, 2) if variant == "patch" else (2, 1, 32, 32))
        assert out.dtype == dtype and out.device == x.device and torch.isfinite(out).all()
        assert f"variant='{variant}'" in repr(model)

    @pytest.mark.parametrize("batch", [1, 3])
    @pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
    @pytest.mark.parametrize("variant", VARIANTS)
    def test_cardinality(self, variant: str, size: tuple[int, int], batch: int, device: torch.device) -> None:
        model = tiny_sed(variant).to(device)
        h, w = size
        semantic = torch.randn(batch, CS, math.ceil(h / 16), math.ceil(w / 16), device=device)
        out = model(torch.rand(batch, 3, h, w, device=device), semantic)
        expected = (batch, 1, patch_side(h), patch_side(w)) if variant == "patch" else (batch, 1, h, w)
        assert out.shape == expected
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_cardinality_empty_batch(self, variant: str) -> None:
        out = tiny_sed(variant)(torch.rand(0, 3, 64, 64), torch.randn(0, CS, 4, 4))
        assert out.shape == ((0, 1, 6, 6) if variant == "patch" else (0, 1, 64, 64))

    @pytest.mark.parametrize("grid", [(1, 1), (3, 5), (8, 8), (16, 16)])
    @pytest.mark.parametrize("variant", VARIANTS)
    def test_cardinality_semantic_grids_of_other_sizes(self, variant: str, grid: tuple[int, int]) -> None:
        model = tiny_sed(variant, seed=0).eval()
        x = torch.rand(2, 3, 64, 64)
        out = model(x, torch.randn(2, CS, *grid))
        assert out.shape == ((2, 1, 6, 6) if variant == "patch" else (2, 1, 64, 64))
        assert torch.isfinite(out).all()

    def test_semantic_grid_resampled_to_the_levels_grid(self) -> None:
        """Every level of a 64 px patch D needs a 4x4 grid: an 8x8 map acts as its antialiased resample."""
        model = tiny_sed("patch", seed=0).eval()
        x, s = torch.rand(2, 3, 64, 64), torch.randn(2, CS, 8, 8)
        down = F.interpolate(s, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
        torch.testing.assert_close(model(x, s), model(x, down), atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_noncontiguous_and_channels_last_input(self, variant: str) -> None:
        model = tiny_sed(variant).eval()
        x, s = torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4)
        x_nc = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        cl = x.contiguous(memory_format=torch.channels_last)
        assert not x_nc.is_contiguous()
        expected = model(x, s)
        torch.testing.assert_close(model(x_nc, s), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model(cl, s), expected, atol=1e-6, rtol=1e-5)

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_gradient_reaches_every_parameter(self, variant: str, device: torch.device) -> None:
        model = tiny_sed(variant).train().to(device)
        out = model(torch.rand(2, 3, 48, 80, device=device), torch.randn(2, CS, 3, 5, device=device))
        out.mean().backward()
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.grad is None]
        assert not missing
        assert all(torch.isfinite(p.grad).all() for p in params.values())
        if variant == "patch":  # N(0, 0.02) everywhere: nothing is zero-initialised upstream of a gradient
            assert all(p.grad.abs().sum() > 0 for p in params.values())

    @pytest.mark.parametrize(
        "x_shape, x_dtype, s_shape, message",
        [
            (
                (3, 64, 64),
                torch.float32,
                (1, CS, 4, 4),
                r"expects an image batch of shape \(B, 3, H, W\), got a 3-D tensor of shape \(3, 64, 64\)\. "
                r"Add the batch dimension with x\.unsqueeze\(0\)",
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
                r"floating-point image with values in \[0, 1\], got dtype torch\.uint8\. "
                r"Convert it with x\.float\(\) / 255",
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
    def test_exception_messages(self, variant, x_shape, x_dtype, s_shape, message) -> None:
        model = tiny_sed(variant)
        x = torch.zeros(x_shape, dtype=x_dtype)
        with pytest.raises(ValueError, match=message):
            model(x, torch.randn(s_shape))

    def test_exception_non_tensors(self) -> None:
        model = tiny_sed("patch")
        with pytest.raises(TypeError, match="expects a torch.Tensor image batch, got ndarray"):
            model(torch.rand(1, 3, 64, 64).numpy(), torch.randn(1, CS, 4, 4))
        with pytest.raises(
            TypeError,
            match=r"semantic map as a torch.Tensor, got NoneType\. Compute it with SemanticExtractor",
        ):
            model(torch.rand(1, 3, 64, 64))
        with pytest.raises(ValueError, match="floating-point semantic map, got dtype torch.int64"):
            model(torch.rand(1, 3, 64, 64), torch.zeros(1, CS, 4, 4, dtype=torch.int64))

    def test_exception_constructor(self) -> None:
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
    def test_exception_semantic_channels_that_do_not_fit(self, variant, channels, step, suggestion) -> None:
        from sed_discriminator.discriminator import semantic_channel_step

        assert semantic_channel_step(variant) == step
        with pytest.raises(
            ValueError,
            match=rf"semantic_channels={channels} does not fit SeD\('{variant}'\): "
            rf"its SeFBs need a multiple of {step} .*{suggestion}",
        ):
            sd.SeD(variant, semantic_channels=channels)
        sd.SeD(variant, semantic_channels=channels, semantic_fusion=False)  # no SeFB, no constraint

    @pytest.mark.parametrize("variant", ["patch", "pixel"])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
    def test_exception_inputs_of_another_dtype_than_the_model(self, variant: str, dtype: torch.dtype) -> None:
        model = tiny_sed(variant)
        x, s = torch.rand(1, 3, 32, 32), torch.randn(1, CS, 2, 2)
        with pytest.raises(
            ValueError,
            match=rf"SeD's weights are torch.float32 but its image is {dtype}\. Convert "
            r"the input with .to\(torch.float32\), .*torch.autocast\('cpu'\)",
        ):
            model(x.to(dtype), s)
        with pytest.raises(ValueError, match=rf"but its semantic map is {dtype}"):
            model(x, s.to(dtype))
        if dtype == torch.bfloat16:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision is what autocast is for
                assert torch.isfinite(model(x.to(dtype), s).float()).all()

    @pytest.mark.parametrize("variant", ["patch", "pixel"])
    def test_meta_device_for_shape_inference(self, variant: str) -> None:
        with torch.device("meta"):
            model = tiny_sed(variant)
            x, s = torch.empty(2, 3, 64, 48), torch.empty(2, CS, 4, 3)
        out = model(x, s)
        assert out.device.type == "meta"
        assert out.shape == tiny_sed(variant)(torch.rand(2, 3, 64, 48), torch.randn(2, CS, 4, 3)).shape

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_gradcheck(self, variant: str) -> None:
        """float64 analytic gradients w.r.t. the image and the semantic map equal finite differences
        (eval mode: the spectral norms' vectors stay put between the evaluations)."""
        model = tiny_sed(variant, seed=0).double().eval()
        x, s = sed_inputs(1, 32, dtype=torch.float64)
        x.requires_grad_(), s.requires_grad_()
        assert torch.autograd.gradcheck(model, (x, s), fast_mode=True)

    def test_gradgradcheck_math_attention(self) -> None:
        """Double backward (R1) through the in-place LReLUs and the fused modules on the math backend."""
        model = tiny_sed("pixel", seed=0, fused=True).double().eval()
        x, s = sed_inputs(1, 32, dtype=torch.float64)

        def f(inp: torch.Tensor) -> torch.Tensor:
            with sd.math_attention():
                return model(inp, s)

        assert torch.autograd.gradgradcheck(f, (x.requires_grad_(),), fast_mode=True)

    @pytest.mark.slow
    @pytest.mark.parametrize("variant", VARIANTS)
    def test_dynamo(self, variant: str) -> None:
        torch._dynamo.reset()
        model = settled_sed(variant)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        x, s = sed_inputs(2, 64)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, s), model(x, s), atol=1e-6, rtol=1e-6)


def test_value_checks_nan(value_checks) -> None:
    model = tiny_sed("patch")
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
    assert torch.isnan(tiny_sed("patch")(x, torch.randn(1, CS, 4, 4))).any()


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
    model = tiny_sed(variant)
    normed = sorted(n for n, m in model.named_children() if hasattr(m, "parametrizations"))
    assert normed == sorted(names)


@pytest.mark.parametrize("variant", VARIANTS)
def test_without_semantic_fusion(variant: str) -> None:
    model = tiny_sed(variant, semantic_fusion=False)
    assert model.sefb_blocks() == {}
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == ((2, 1, 6, 6) if variant == "patch" else (2, 1, 64, 64))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in tiny_sed(variant).parameters())


def test_attention_maps() -> None:
    model = tiny_sed("pixel", seed=0).eval()
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
    model = tiny_sed("patch").train()
    model.conv1.train(False)  # mixed modes come back as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.attention_maps(torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and not model.conv1.training and model.conv2.training
    model(torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4))  # a training forward does move them
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


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
    model = tiny_sed(variant)
    _train_step(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert any(k.endswith("._u") for k in state) and any(k.endswith("._v") for k in state)
    torch.manual_seed(123)
    fresh = tiny_sed(variant)
    fresh.load_state_dict(state, strict=True)
    assert_same(fresh, model)
    model.eval(), fresh.eval()
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4)
    assert_same(fresh(x, s), model(x, s))


@pytest.mark.parametrize("variant", VARIANTS)
def test_deepcopy(variant: str) -> None:
    model = tiny_sed(variant).set_fused_attn(False)
    _train_step(model)
    clone = copy.deepcopy(model)
    model.eval(), clone.eval()
    x, s = torch.rand(1, 3, 64, 64), torch.randn(1, CS, 4, 4)
    assert_same(clone(x, s), model(x, s))
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert not torch.equal(next(clone.parameters()), next(model.parameters()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_pickle(variant: str) -> None:
    model = tiny_sed(variant).set_fused_attn(False)
    _train_step(model)
    model.eval()
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored) is sd.SeD and restored.variant == variant and not restored.training
    assert all(not m.fused_attn for m in restored.modules() if hasattr(m, "fused_attn"))
    assert_same(restored, model)
    x, s = torch.rand(1, 3, 64, 64), torch.randn(1, CS, 4, 4)
    assert_same(restored(x, s), model(x, s))
