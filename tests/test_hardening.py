"""No silent wrong answers (issue 16) and the small API traps of 0.2 (issue 17.4).

Each test fails on 0.2: a wrong result, a lost dtype, or an error that names no fix.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import re
import warnings

import pytest
import torch
from helpers import CS, TINY
from torch import nn

import sed_discriminator as sd
from sed_discriminator import extractor as extractor_module
from sed_discriminator.attention import Attention
from sed_discriminator.config import set_value_checks, value_checks_enabled
from sed_discriminator.losses import DiscriminatorLoss, GeneratorLoss
from sed_discriminator.sefb import channels_to_space


def tiny_sed(variant: str = "patch", **kwargs) -> sd.SeD:
    return sd.SeD(variant, **TINY, **kwargs)


@pytest.fixture
def tiny_preset(monkeypatch) -> str:
    """A registered extractor whose trunk is one strided convolution: 64 channels at stride 16, built in no time."""
    preset = extractor_module.ExtractorPreset(
        "hardening_tiny", build=lambda: nn.Conv2d(3, CS, 16, 16), channels=CS, stride=16
    )
    monkeypatch.setitem(extractor_module._PRESETS, preset.name, preset)
    return preset.name


def tiny_extractor(name: str, **kwargs) -> sd.SemanticExtractor:
    with pytest.warns(UserWarning, match="RANDOM"):
        return sd.SemanticExtractor(name, pretrained=None, **kwargs)


def tiny_adversary(name: str, **kwargs) -> sd.SeDAdversary:
    return sd.SeDAdversary(tiny_sed(), extractor=tiny_extractor(name), **kwargs)


def tiny_conditioned(name: str, **kwargs) -> sd.ConditionedSeD:
    kwargs.setdefault("extractor", tiny_extractor(name))
    return sd.ConditionedSeD("patch", width=8, head_dim=8, **kwargs)


# -- 16.1 the input range ------------------------------------------------------------------------

RANGE_ERROR = r"expects image values in \[0, 1\], got \[{}.*pass input_range=\(low, high\)"


def test_sed_refuses_0_255_and_warns_on_minus_one_to_one_by_default() -> None:
    # SeD also judges generator outputs, which can leave [0, 1] early in training: below ten range
    # widths beyond it, a warning; 0-255 images are of another scale and refused.
    assert not value_checks_enabled()
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4)
    with pytest.raises(ValueError, match="SeD " + RANGE_ERROR.format("0")):
        tiny_sed()(255 * x, s)
    with pytest.warns(UserWarning, match="SeD " + RANGE_ERROR.format("-") + r".*untrained generator"):
        logits = tiny_sed()(2 * x - 1, s)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("images", "low"), [(lambda x: 2 * x - 1, "-1"), (lambda x: 255 * x, "0")])
def test_extractor_refuses_other_ranges_by_default(tiny_preset, images, low) -> None:
    with pytest.raises(ValueError, match="SemanticExtractor " + RANGE_ERROR.format(low)):
        tiny_extractor(tiny_preset)(images(torch.rand(2, 3, 64, 64)))


def test_a_generators_overshoot_passes(tiny_preset) -> None:
    overshoot = torch.rand(2, 3, 64, 64) * 1.6 - 0.3  # [-0.3, 1.3]: an unclamped generator output
    tiny_sed()(overshoot, torch.randn(2, CS, 4, 4))
    tiny_extractor(tiny_preset)(overshoot)


def test_input_range_maps_images_to_the_papers_range(tiny_preset) -> None:
    paper, other = tiny_sed().eval(), tiny_sed(input_range=(-1, 1)).eval()
    other.load_state_dict(paper.state_dict())
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4)
    torch.testing.assert_close(other(2 * x - 1, s), paper(x, s), rtol=1e-5, atol=1e-6)
    ext = tiny_extractor(tiny_preset, input_range=(-1, 1))
    net_d = tiny_conditioned(tiny_preset, extractor=ext)
    assert net_d.input_range == (-1.0, 1.0)  # taken from the extractor
    with net_d.condition(2 * x - 1):
        net_d(2 * x - 1)
    assert pickle.loads(pickle.dumps(other)).input_range == (-1.0, 1.0)


def test_discriminator_and_extractor_ranges_must_agree(tiny_preset) -> None:
    with pytest.raises(ValueError, match=r"discriminator takes images in input_range=\(0.0, 1.0\) but the extractor"):
        sd.SeDAdversary(tiny_sed(), extractor=tiny_extractor(tiny_preset, input_range=(-1, 1)))
    with pytest.raises(ValueError, match=r"input_range must be \(low, high\) with high > low"):
        tiny_sed(input_range=(1, 0))


def test_range_check_runs_on_the_first_calls_or_with_value_checks() -> None:
    from sed_discriminator._checks import RANGE_CHECK_CALLS

    model, s, good, bad = tiny_sed(), torch.randn(1, CS, 4, 4), torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64) * 255
    for _ in range(RANGE_CHECK_CALLS):
        model(good, s)
    model(bad, s)  # no synchronisation after the first calls: this one is not looked at
    before = value_checks_enabled()
    set_value_checks(True)
    try:
        with pytest.raises(ValueError, match="SeD " + RANGE_ERROR.format("0")):
            model(bad, s)
        with pytest.warns(UserWarning, match="SeD " + RANGE_ERROR.format("-")):
            model(2 * good - 1, s)
    finally:
        set_value_checks(before)
    assert copy.deepcopy(model)._range_checks_left == RANGE_CHECK_CALLS  # a copy checks its first calls again


# -- 16.2 swapped (hr, sr) -----------------------------------------------------------------------


def _step_batches() -> tuple[torch.Tensor, torch.Tensor]:
    gain = torch.tensor(0.9, requires_grad=True)  # stands in for a generator's weights
    hr = torch.rand(2, 3, 64, 64)
    return hr * gain, hr  # sr carries the generator's gradient, hr none


def test_swapped_generator_loss_is_refused(tiny_preset) -> None:
    adv, (sr, hr) = tiny_adversary(tiny_preset), _step_batches()
    with pytest.raises(ValueError, match=r"generator_loss\(sr, hr\): hr carries a gradient and sr does not"):
        adv.generator_loss(hr, sr)


def test_swapped_discriminator_loss_after_the_generator_step_is_refused(tiny_preset) -> None:
    adv, (sr, hr) = tiny_adversary(tiny_preset), _step_batches()
    adv.generator_loss(sr, hr)
    with pytest.raises(ValueError, match=r"discriminator_loss\(sr, hr\): sr holds the HR batch of this step's earlier"):
        adv.discriminator_loss(hr, sr.detach())


def test_swapped_discriminator_loss_first_is_caught_by_the_generator_step(tiny_preset) -> None:
    adv, (sr, hr) = tiny_adversary(tiny_preset), _step_batches()
    adv.discriminator_loss(hr, sr.detach())  # nothing to compare with yet
    with pytest.raises(ValueError, match="swapped in this call or in the earlier one"):
        adv.generator_loss(sr, hr)


def test_legitimate_calls_are_not_taken_for_swaps(tiny_preset) -> None:
    adv, (sr, hr) = tiny_adversary(tiny_preset), _step_batches()
    adv.discriminator_loss(sr.detach(), hr.clone().requires_grad_(True))  # R1 on the real batch by hand
    adv.generator_loss(sr, hr)
    with torch.no_grad():  # logging the losses
        adv.generator_loss(sr, hr)
        adv.discriminator_loss(sr, hr)
    same = hr.clone()
    adv.generator_loss(same.requires_grad_(True), hr)  # a generator that returns its input


# -- 16.4 pickles keep the dtype -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_pickle_and_torch_save_keep_the_dtype(dtype) -> None:
    model = tiny_sed().to(dtype)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for restored in (pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        assert restored.conv1.parametrizations.weight.original.dtype == restored.att1.proj_in.weight.dtype == dtype
        # spectral norm keeps u and v in float32 whatever the weights' dtype; the pickle keeps each tensor's
        assert [t.dtype for t in restored.state_dict().values()] == [t.dtype for t in model.state_dict().values()]
        for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
            assert torch.equal(a, b), name


# -- 16.5 low-precision losses computed in float32 -----------------------------------------------


@pytest.mark.parametrize("kind", ["lsgan", "hinge", "vanilla", "ragan"])
def test_losses_of_bf16_logits_are_computed_in_float32(kind) -> None:
    fake, real = torch.randn(4, 1, 30, 30).bfloat16() * 3, torch.randn(4, 1, 30, 30).bfloat16() * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = sd.generator_loss(fake, real_logits=real, kind=kind)
        d = sd.discriminator_loss(fake, real_logits=real, kind=kind)
    g32 = sd.generator_loss(fake.float(), real_logits=real.float(), kind=kind)
    d32 = sd.discriminator_loss(fake.float(), real_logits=real.float(), kind=kind)
    assert g.dtype == d.dtype == torch.float32
    torch.testing.assert_close((g, d), (g32, d32), rtol=1e-6, atol=1e-6)


# -- 16.6 compiled ConditionedSeD keeps the stale-condition rule ----------------------------------


def test_compiled_conditioned_sed_refuses_a_stale_condition(tiny_preset) -> None:
    net_d = tiny_conditioned(tiny_preset).eval()  # eval: no power iteration, so repeated calls agree
    compiled = torch.compile(net_d, backend="eager")
    gt, x = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    net_d.set_condition(gt)
    eager = net_d(x)
    torch.testing.assert_close(compiled(x), eager)
    optimizer = torch.optim.SGD(net_d.parameters(), lr=0.1)
    compiled(x).mean().backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="condition is stale: the discriminator's weights changed"):
        compiled(x)
    net_d.set_condition(gt)
    compiled(x)


# -- 16.7 dtype conversions leave the user's extractor alone --------------------------------------


@pytest.mark.parametrize("owner", ["conditioned", "adversary"])
def test_dtype_conversion_does_not_convert_the_callers_extractor(tiny_preset, owner) -> None:
    ext = tiny_extractor(tiny_preset)
    weight = ext.trunk.weight.detach().clone()
    module = (
        tiny_conditioned(tiny_preset, extractor=ext)
        if owner == "conditioned"
        else sd.SeDAdversary(tiny_sed(), extractor=ext)
    )
    module.half()
    module.double()
    assert ext.trunk.weight.dtype == torch.float32 and torch.equal(ext.trunk.weight, weight)  # no half round trip
    gt, x = torch.rand(2, 3, 64, 64, dtype=torch.float64), torch.rand(2, 3, 64, 64, dtype=torch.float64)
    if owner == "conditioned":
        with module.condition(gt):
            assert module(x).dtype == torch.float64  # the float32 semantics are cast to the model's dtype
    else:
        assert module.generator_loss(x, gt).dtype == torch.float64
    module.to("meta")  # a move still reaches the extractor
    assert ext.trunk.weight.is_meta


# -- 16.9 / 16.13 timm models whose size or grid is fixed -----------------------------------------


def test_a_model_with_a_fixed_grid_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(extractor_module, "_PRESETS", dict(extractor_module._PRESETS))
    with pytest.raises(
        ValueError,
        match=r"'crossvit_tiny_240' (gives a 14x14 semantic grid whatever the input size|has no forward_intermediates)",
    ):
        sd.extractor.register_extractor(sd.extractor.ExtractorPreset("crossvit", model="crossvit_tiny_240"))


def test_a_model_with_a_fixed_input_size_names_it() -> None:
    ext = tiny_extractor("timm:levit_128s")
    with pytest.raises(ValueError, match=r"levit_128s.* does not run at 64x64: it is built for 224x224 images .*Resiz"):
        ext(torch.rand(1, 3, 64, 64))
    assert ext(torch.rand(1, 3, 224, 224)).shape[-2:] == (4, 4)


# -- 16.10 / 16.11 / 16.12 / 16.15 clear errors -------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(upscale=0), "upscale must be a positive integer, got 0"),
    (dict(upscale=-2), "upscale must be a positive integer, got -2"),
    (dict(heads=0), "heads must be a positive integer, got 0"),
    (dict(head_dim=2.5), "head_dim must be a positive integer, got 2.5"),
])  # fmt: skip
def test_sefb_arguments_are_checked(kwargs, message) -> None:
    with pytest.raises(ValueError, match=f"SeFB: {message}"):
        sd.SeFB(16, **{"upscale": 2, "semantic_channels": CS, **kwargs})
    with pytest.raises(ValueError, match="channels_to_space: factor must be a positive integer, got 0"):
        channels_to_space(torch.rand(1, 4, 2, 2), 0)


def test_integer_logits_and_text_weights_are_refused() -> None:
    logits = torch.ones(2, 1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="fake_logits must be floating-point logits .* got dtype torch.int64"):
        sd.generator_loss(logits)
    with pytest.raises(ValueError, match="real_logits must be floating-point logits"):
        sd.discriminator_loss(logits.float(), real_logits=logits)
    with pytest.raises(TypeError, match=r"generator_loss: weight must be a number \(e.g. weight=0.01\), got '0.01'"):
        sd.generator_loss(torch.zeros(2, 1), weight="0.01")
    for owner in (GeneratorLoss, DiscriminatorLoss):
        with pytest.raises(TypeError, match=f"{owner.__name__}: weight must be a number"):
            owner("vanilla", weight="0.01")
    with pytest.raises(TypeError, match="SeDAdversary: weight must be a number"):
        sd.SeDAdversary(tiny_sed(semantic_fusion=False), extractor="clip_rn50", pretrained=None, weight="0.01")
    assert sd.generator_loss(torch.zeros(2, 1), weight=torch.tensor(0.5)).item() == pytest.approx(0.5 * 0.6931, 1e-4)


def test_float64_image_under_bf16_autocast_says_what_to_do() -> None:
    model, s = tiny_sed(), torch.randn(1, CS, 4, 4)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(
            ValueError, match=r"SeD got a float64 image under torch.autocast.*Convert it with .float\(\) first"
        ),
    ):
        model(torch.rand(1, 3, 64, 64, dtype=torch.float64), s)


def test_an_empty_semantic_grid_is_refused() -> None:
    with pytest.raises(ValueError, match=r"SeD got a semantic map with an empty 0x0 grid .* SemanticExtractor"):
        tiny_sed()(torch.rand(1, 3, 64, 64), torch.randn(1, CS, 0, 0))


# -- 16.14 a wrapped ConditionedSeD -------------------------------------------------------------


def test_set_condition_through_wrappers(tiny_preset, tmp_path) -> None:
    from sed_discriminator.training import set_condition

    net_d = tiny_conditioned(tiny_preset)
    gt = torch.rand(2, 3, 64, 64)
    wrapped = nn.DataParallel(net_d)  # on the CPU: calls the module itself
    with pytest.raises(
        RuntimeError,
        match=r"has no condition.*net_d.module.set_condition\(gt\), or "
        r"sed_discriminator.training.set_condition\(net_d, gt\)",
    ):
        wrapped(gt)
    assert set_condition(wrapped, gt) is net_d._condition
    assert wrapped(gt).shape[0] == 2
    set_condition(torch.compile(net_d), gt)
    with pytest.raises(TypeError, match="set_condition needs a ConditionedSeD"):
        set_condition(tiny_sed(), gt)
    if not torch.distributed.is_available():
        return
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(net_d)
        net_d.clear_condition()
        assert set_condition(ddp, gt) is net_d._condition
    finally:
        torch.distributed.destroy_process_group()


# -- 17.4 API traps: keyword-only, separate methods, 0.2's calls still work with a warning ---------


def test_channels_to_space_channels_last_is_keyword_only() -> None:
    x = torch.rand(2, 16, 3, 3)
    assert inspect.signature(channels_to_space).parameters["channels_last"].kind is inspect.Parameter.KEYWORD_ONLY
    expected = channels_to_space(x, 2, channels_last=True)
    with pytest.warns(DeprecationWarning, match=r"pass it by keyword: channels_last=\.\.\."):
        old = channels_to_space(x, 2, True)
    assert torch.equal(old, expected) and old.stride() == expected.stride()
    with pytest.raises(TypeError, match="takes 2 positional arguments"):
        channels_to_space(x, 2, True, True)


def test_attention_maps_come_from_their_own_method() -> None:
    block = sd.SeFB(16, 2, semantic_channels=CS, head_dim=8)
    f, s = torch.rand(2, 16, 8, 8), torch.rand(2, CS, 4, 4)
    out, attn = block.forward_with_attention(f, s)
    torch.testing.assert_close(out, block(f, s), rtol=1e-5, atol=1e-6)
    assert attn.shape == (2, 1, 16, 64)
    with pytest.warns(DeprecationWarning, match=r"forward_with_attention\(features, semantic\)"):
        old_out, old_attn = block(f, s, return_attention=True)
    assert torch.equal(old_out, out) and torch.equal(old_attn, attn)
    attention, tokens, context = Attention(8, 1, 8), torch.rand(1, 4, 8), torch.rand(1, 6, 8)
    with pytest.warns(DeprecationWarning, match="return_attention=..."):
        positional = attention(tokens, context, True)
    assert torch.equal(positional[1], attention(tokens, context, return_attention=True)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # SeD itself uses the new forms
        tiny_sed().attention_maps(torch.rand(1, 3, 64, 64), torch.randn(1, CS, 4, 4))


def test_fuse_takes_features_then_semantic_like_sefb() -> None:
    assert list(inspect.signature(sd.SeD._fuse).parameters)[1:4] == ["name", "features", "semantic"]
    assert list(inspect.signature(sd.SeFB.forward).parameters)[1:3] == ["features", "semantic"]


def test_channels_last_semantic_map_trains_like_a_contiguous_one() -> None:
    # timm's ConvNeXt returns channels_last maps; torch 2.2's CPU GroupNorm backward crashed on them.
    net_d = sd.SeD("patch", **TINY)
    x = torch.rand(2, 3, 64, 64)
    s = torch.randn(2, TINY["semantic_channels"], 4, 4)
    grads = []
    for semantic in (s, s.contiguous(memory_format=torch.channels_last)):
        net_d.zero_grad()
        net_d.eval()
        net_d(x, semantic).square().mean().backward()
        grads.append([p.grad.clone() for p in net_d.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# -- issue 24: flags are booleans, never read by truthiness -----------------------------------------


def _flag_calls(tiny_preset: str, tmp_path) -> dict:
    from sed_discriminator import convert, visualize, weights

    path = weights.save_safetensors(tiny_sed(), tmp_path / "d.safetensors")
    extractor = tiny_extractor(tiny_preset)
    return {
        "semantic_fusion": lambda v: sd.SeD("patch", **TINY, semantic_fusion=v),
        "channels_last": lambda v: sd.SeD("patch", **TINY, channels_last=v),
        "batch_real_fake": lambda v: sd.SeDAdversary(tiny_sed(), extractor=extractor, batch_real_fake=v),
        "trust_pickle": lambda v: sd.SemanticExtractor(tiny_preset, pretrained=None, trust_pickle=v),
        "read_state_dict trust_pickle": lambda v: weights.read_state_dict(path, trust_pickle=v),
        "load_official_weights trust_pickle": lambda v: sd.load_official_weights(tiny_sed(), path, trust_pickle=v),
        "convert trust_pickle": lambda v: convert.convert(path, tmp_path / "o.safetensors", trust_pickle=v),
        "ema": lambda v: convert.convert(path, tmp_path / "o.safetensors", ema=v),
        "overwrite": lambda v: weights.save_safetensors(tiny_sed(), path, overwrite=v),
        "save_figure overwrite": lambda v: visualize.save_figure(None, tmp_path / "f.png", overwrite=v),
        "register_extractor overwrite": lambda v: extractor_module.register_extractor(
            extractor_module.get_extractor_preset(tiny_preset), overwrite=v
        ),
        "set_fused_attn(enable)": lambda v: tiny_sed().set_fused_attn(v),
        "SeFB set_fused_attn(enable)": lambda v: sd.SeFB(16, 2, semantic_channels=CS, head_dim=8).set_fused_attn(v),
        "channels_to_space(channels_last)": lambda v: channels_to_space(torch.rand(1, 4, 2, 2), 2, channels_last=v),
        "SemanticExtractor.train(mode)": lambda v: tiny_extractor(tiny_preset).train(v),
    }


@pytest.mark.parametrize("value", ["false", "no", 0, None], ids=["'false'", "'no'", "0", "numpy"])
def test_string_flags_are_refused_naming_the_parameter(tiny_preset, tmp_path, value) -> None:
    import numpy as np

    value = np.bool_(False) if value is None else value
    for name, call in _flag_calls(tiny_preset, tmp_path).items():
        parameter = name.split(" ")[-1]
        with pytest.raises(TypeError, match=rf"^{re.escape(parameter)} must be True(, False)? or (False|None), got "
                                             rf"{re.escape(repr(value))} \({type(value).__name__}\)"):  # fmt: skip
            call(value)
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "f.png").exists()
    assert sd.SeD("patch", **TINY, semantic_fusion=False).sefb_blocks() == {}  # a real bool still works
