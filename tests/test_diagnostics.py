"""sed_discriminator.diagnostics: influence, attention sharpness and grids, and that they touch nothing."""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator

import pytest
import torch
from helpers import TINY, tiny_preset
from torch import nn

from sed_discriminator import ConditionedSeD, SeD, SeDAdversary
from sed_discriminator.diagnostics import (
    attention_grids,
    attention_sharpness,
    semantic_diagnostics,
    semantic_influence,
)
from sed_discriminator.extractor import SemanticExtractor
from sed_discriminator.spectral_norm import power_iteration_paused

KEYS = ["sem_influence", "attn_sharpness_att1", "attn_sharpness_att2", "attn_sharpness_att3"]


def tiny(variant: str, **kwargs) -> SeD:
    return SeD(variant, **TINY, **kwargs)


def batch(n: int = 3, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(n, 3, size, size), torch.randn(n, 64, size // 16, size // 16)


def wake_semantics_(model: SeD) -> SeD:
    """Give every SeFB a non-zero proj_out, so the semantics reach the logits (as training would)."""
    with torch.no_grad():
        for block in model.sefb_blocks().values():
            for layer in block.modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    layer.reset_parameters()  # torch's default init: the patch SeD's N(0, 0.02) is tiny
            nn.init.normal_(block.proj_out.weight, std=0.2)
    # Without residuals the semantics act only through where the cross-attention looks: make it look somewhere.
    return scale_cross_attention_(model, 10.0)


def scale_cross_attention_(model: SeD, factor: float) -> SeD:
    with torch.no_grad():
        for block in model.sefb_blocks().values():
            attn = block.transformer_blocks[0].attn2
            attn.to_q.weight.mul_(factor)
            attn.to_k.weight.mul_(factor)
    return model


@pytest.fixture(scope="module")
def tiny_extractor() -> Iterator[SemanticExtractor]:
    with tiny_preset("_diag_tiny"), pytest.warns(UserWarning, match="RANDOM weights"):
        yield SemanticExtractor("_diag_tiny", pretrained=None)


# -- semantic influence ------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_influence_is_exactly_zero_for_the_pixel_sed_at_init(train: bool) -> None:
    model = tiny("pixel").train(train)
    x, s = batch()
    assert semantic_influence(model, x, s) == 0.0


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_influence_grows_once_the_sefbs_use_the_semantics(variant: str) -> None:
    model = tiny(variant)
    x, s = batch()
    asleep = semantic_influence(model, x, s)
    awake = semantic_influence(wake_semantics_(model), x, s)
    assert awake > 1e-5
    assert awake > 100 * asleep, (asleep, awake)


def test_influence_follows_its_documented_formula_in_eval_numbers() -> None:
    model = wake_semantics_(tiny("patch")).double().train()  # training mode: the measure must still be eval-like
    x, s = (t.double() for t in batch())
    reference = copy.deepcopy(model).eval().set_fused_attn(False)
    with torch.no_grad():
        logits = reference(x, s).double()
        swapped = reference(x, torch.cat([s[-1:], s[:-1]])).double()
    expected = (swapped - logits).abs().mean() / (logits.std(unbiased=False) + 1e-8)
    assert semantic_influence(model, x, s) == pytest.approx(expected.item(), rel=1e-9)


def test_influence_is_zero_when_every_image_has_the_same_semantics() -> None:
    model = wake_semantics_(tiny("pixel"))
    x, s = batch()
    assert semantic_influence(model, x, s[:1].expand_as(s).contiguous()) == 0.0


@pytest.mark.parametrize("fn", [semantic_influence, semantic_diagnostics])
def test_a_batch_of_one_is_refused_with_the_reason(fn) -> None:
    x, s = batch(1)
    with pytest.raises(ValueError, match="at least 2 images.*semantics of another image.*batch of 1"):
        fn(tiny("pixel"), x, s)


# -- attention sharpness -----------------------------------------------------------------------


def reference_sharpness(probabilities: torch.Tensor) -> float:
    p = probabilities.double()
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1).mean().item()
    return 1 - entropy / math.log(p.shape[-1])


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_sharpness_is_in_unit_range_and_matches_the_entropy_formula(variant: str) -> None:
    model = scale_cross_attention_(tiny(variant), 8.0).double()
    x, s = (t.double() for t in batch())
    sharp = attention_sharpness(model, x, s)
    maps = model.attention_maps(x, s)
    assert sorted(sharp) == ["att1", "att2", "att3"]
    for name, value in sharp.items():
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(reference_sharpness(maps[name]), abs=1e-9)


def test_sharpness_is_zero_for_uniform_attention_and_grows_when_peaked() -> None:
    x, s = batch()
    uniform = scale_cross_attention_(tiny("pixel"), 0.0)  # zero queries and keys: every score equal
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in attention_sharpness(uniform, x, s).values())
    mild = attention_sharpness(tiny("pixel"), x, s)
    peaked = attention_sharpness(scale_cross_attention_(tiny("pixel"), 30.0), x, s)
    for name in mild:
        assert peaked[name] > mild[name] + 0.05, (name, mild, peaked)


def test_diagnostics_dict_equals_the_single_measures() -> None:
    model = wake_semantics_(tiny("patch"))
    x, s = batch()
    stats = semantic_diagnostics(model, x, s)
    assert list(stats) == KEYS
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["sem_influence"] == semantic_influence(model, x, s)
    assert {k: stats[f"attn_sharpness_{k}"] for k in ("att1", "att2", "att3")} == attention_sharpness(model, x, s)


# -- nothing changes: flags, spectral-norm vectors ---------------------------------------------


@pytest.mark.parametrize("fn", [semantic_influence, attention_sharpness, semantic_diagnostics, attention_grids])
def test_state_dict_and_every_training_flag_stay_as_found_even_during_the_call(fn) -> None:
    model = wake_semantics_(tiny("patch")).train()
    model.att2.train(False)  # mixed modes must survive too
    flags = {name: m.training for name, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[tuple[str, bool]] = []
    for name, m in model.named_modules():
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, mod.training)))
    fn(model, *batch())
    assert seen and all(training == flags[name] for name, training in seen)
    assert {name: m.training for name, m in model.named_modules()} == flags
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    model(*batch())  # a training forward does move the spectral-norm vectors: the check above can fail
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_attention_maps_no_longer_switch_the_module_to_eval() -> None:
    model = tiny("pixel").train()
    seen = []
    model.conv31.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    model.attention_maps(*batch())
    assert seen == [True]


def test_power_iteration_pause_holds_on_its_own_thread_only() -> None:
    model = tiny("patch").train()
    x, s = batch()
    u = model.conv1.parametrizations.weight[0]._u
    entered, release = threading.Event(), threading.Event()

    def inspector() -> None:
        with power_iteration_paused():
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=inspector)
    thread.start()
    try:
        assert entered.wait(30)
        before = u.clone()
        model(x, s)  # this thread trains while the other one holds its pause
        assert not torch.equal(before, u)
    finally:
        release.set()
        thread.join()


# -- wrappers, ConditionedSeD, dtypes ----------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [nn.DataParallel, torch.compile, lambda m: torch.compile(nn.DataParallel(m))],
    ids=["dataparallel", "compiled", "compiled_dataparallel"],
)
def test_wrapped_discriminators_are_unwrapped(wrap) -> None:
    model = wake_semantics_(tiny("patch"))
    x, s = batch()
    assert semantic_diagnostics(wrap(model), x, s) == semantic_diagnostics(model, x, s)


def test_conditioned_sed_uses_its_stored_condition(tiny_extractor: SemanticExtractor) -> None:
    model = ConditionedSeD("pixel", extractor=tiny_extractor, width=8, head_dim=8)
    wake_semantics_(model)
    x, hr = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    semantic = model.set_condition(hr)
    assert semantic_diagnostics(model, x) == semantic_diagnostics(model, x, semantic)
    maps = model.attention_maps(x)
    expected = SeD.attention_maps(model, x, semantic)
    assert all(torch.equal(maps[k], expected[k]) for k in expected)
    model.clear_condition()
    with pytest.raises(RuntimeError, match="has no condition: call net_d.set_condition"):
        semantic_influence(model, x)
    with pytest.raises(RuntimeError, match="has no condition: call net_d.set_condition"):
        model.attention_maps(x)


def test_adversary_diagnostics_reuse_the_step_cache_and_keep_it(tiny_extractor: SemanticExtractor) -> None:
    adversary = SeDAdversary(wake_semantics_(tiny("pixel")), extractor=tiny_extractor)
    sr = torch.rand(2, 3, 32, 32, requires_grad=True)
    hr = torch.rand(2, 3, 32, 32)
    adversary.generator_loss(sr, hr)
    cached = adversary._cache
    stats = adversary.diagnostics(sr, hr)
    assert adversary._cache is cached  # the step goes on with its semantics
    assert list(stats) == KEYS
    assert stats == semantic_diagnostics(adversary.discriminator, sr.detach(), tiny_extractor(hr))
    assert stats["sem_influence"] > 0


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_bf16_autocast_and_float64(variant: str) -> None:
    x, s = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = semantic_diagnostics(tiny(variant), x, s)
    assert list(stats) == KEYS and all(math.isfinite(v) for v in stats.values())
    assert all(0.0 <= stats[k] <= 1.0 for k in KEYS[1:])
    if variant == "pixel":
        assert stats["sem_influence"] == 0.0
    model64 = wake_semantics_(tiny(variant)).double()
    stats64 = semantic_diagnostics(model64, x.double(), s.double())
    assert stats64["sem_influence"] > 0


# -- attention grids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "size", "features"),
    [
        ("pixel", (64, 48), {"att1": (32, 24), "att2": (16, 12), "att3": (8, 6)}),
        ("patch", (64, 48), {"att1": (16, 12), "att2": (8, 6), "att3": (7, 5)}),
        ("patch", (37, 45), {"att1": (9, 11), "att2": (4, 5), "att3": (3, 4)}),
    ],
)
def test_attention_grids_carry_the_grid_and_the_feature_map(variant: str, size, features) -> None:
    model = tiny(variant)
    x, s = torch.rand(2, 3, *size), torch.randn(2, 64, 3, 3)
    grids = attention_grids(model, x, s)
    flat = model.attention_maps(x, s)
    for name, g in grids.items():
        block = model.sefb_blocks()[name]
        gh, gw = (math.ceil((n + block.shrink) / block.upscale) for n in features[name])
        assert g.shape == (2, 1, gh, gw, *features[name])
        assert torch.equal(g.flatten(4).flatten(2, 3), flat[name])
        torch.testing.assert_close(g.sum((-2, -1)), torch.ones(2, 1, gh, gw), atol=1e-5, rtol=0)


# -- clear errors ------------------------------------------------------------------------------


def test_clear_errors_for_missing_semantics_no_fusion_and_other_modules() -> None:
    x, s = batch()
    with pytest.raises(ValueError, match="pass semantic=, the semantic map of the HR images"):
        semantic_influence(tiny("patch"), x)
    with pytest.raises(ValueError, match="semantic_fusion=False, so it has no semantic path to measure"):
        attention_sharpness(tiny("patch", semantic_fusion=False), x, s)
    with pytest.raises(TypeError, match="needs an SeD or ConditionedSeD .* got Conv2d"):
        semantic_diagnostics(nn.Conv2d(3, 1, 3), x, s)
