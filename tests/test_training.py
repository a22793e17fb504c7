"""SeDAdversary and ConditionedSeD: semantics caching, G/D steps, the frozen extractor, serialisation."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import assert_close_scaled, assert_same, perturbed
from torch import nn

import sed_discriminator as sd
from sed_discriminator.attention import Attention

SIZES = dict(width=8, head_dim=8)  # semantic_channels follows the extractor (1024 for clip_rn50)


@pytest.fixture(scope="module")
def extractor() -> sd.SemanticExtractor:
    with pytest.warns(UserWarning, match="RANDOM"):
        return sd.SemanticExtractor("clip_rn50", pretrained=None)


@pytest.fixture
def counted(extractor):
    """The shared extractor, with a call counter."""
    calls = []
    handle = extractor.register_forward_hook(lambda m, args, out: calls.append(args[0]))
    yield extractor, calls
    handle.remove()


def batch(seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=g), torch.rand(2, 3, size, size, generator=g)


def adversary(extractor, variant: str = "patch", **kwargs) -> sd.SeDAdversary:
    return sd.SeDAdversary(
        sd.SeD(variant, semantic_channels=extractor.channels, **SIZES), extractor=extractor, **kwargs
    )


def bn_stats(ext: sd.SemanticExtractor) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ext.state_dict().items() if "running" in k or "num_batches" in k}


# -- SeDAdversary ------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["generator_loss", "discriminator_loss", "diagnostics"])
def test_sr_of_another_size_than_hr_is_refused(extractor, call: str) -> None:
    adv = adversary(extractor)
    _, hr = batch(size=64)
    sr = torch.rand(2, 3, 32, 32, requires_grad=True)  # a x2 output judged against x4 HR
    with pytest.raises(ValueError, match=rf"SeDAdversary\.{call}\(sr, hr\): sr is \(32, 32\) \(H, W\) but hr is "
                                         r"\(64, 64\); the generator's output must have the HR size"):  # fmt: skip
        getattr(adv, call)(sr, hr)
    assert adv._cache is None  # refused before any semantics were computed


def test_semantics_computed_once_per_step(counted) -> None:
    ext, calls = counted
    adv = adversary(ext)
    sr, hr = batch()
    adv.generator_loss(sr, hr)
    adv.r1_penalty(hr)  # before discriminator_loss ends the step: reuses them
    adv.discriminator_loss(sr, hr.clone())  # equal values: the same step
    assert len(calls) == 1 and calls[0] is hr
    assert adv._cache is None  # G and D have used them: nothing of the step is kept
    adv.discriminator_loss(sr, hr)  # D first, then G (some loops do it this way)
    adv.generator_loss(sr, hr)
    assert len(calls) == 2 and adv._cache is None
    hr2 = hr.clone()
    adv.discriminator_loss(sr, hr2)
    hr2.mul_(0.5)  # modified in place: recomputed
    adv.generator_loss(sr, hr2)
    assert len(calls) == 4
    adv.generator_loss(sr, hr)
    adv.discriminator_loss(sr, hr.flip(-1))  # another HR batch in the step's place: computed again
    assert len(calls) == 6
    torch.testing.assert_close(adv.semantics(hr2), ext(hr2))


@pytest.mark.parametrize("edit", ["data", "numpy"])
def test_semantics_cache_sees_edits_that_bypass_the_version_counter(counted, edit: str) -> None:
    ext, calls = counted
    adv = adversary(ext)
    sr, hr = batch()
    adv.discriminator_loss(sr, hr)
    version = hr._version
    if edit == "data":
        hr.data.mul_(0.5)
    else:
        hr.numpy()[...] *= 0.5
    assert hr._version == version  # the edit is invisible to autograd's version counter
    adv.generator_loss(sr, hr)
    assert len(calls) == 2
    torch.testing.assert_close(adv.semantics(hr), ext(hr))


def test_semantics_of_an_inference_mode_hr_batch(counted) -> None:
    ext, calls = counted
    adv = adversary(ext)
    sr, _ = batch()
    with torch.inference_mode():
        hr = torch.rand(2, 3, 32, 32)
    adv.generator_loss(sr, hr)
    adv.discriminator_loss(sr, hr)
    assert len(calls) == 1


def test_adversary_keeps_no_hr_batch_between_steps(extractor) -> None:
    import weakref

    adv = adversary(extractor)
    sr, hr = batch()
    adv.generator_loss(sr, hr)
    adv.discriminator_loss(sr, hr)
    ref = weakref.ref(hr)
    del hr
    assert ref() is None and adv._cache is None
    _, hr = batch(1)
    adv.discriminator_loss(sr, hr)
    assert adv._cache is not None
    adv.clear_cache()
    assert adv._cache is None


def test_adversary_defaults_are_the_papers(extractor) -> None:
    adv = sd.SeDAdversary(extractor=extractor)
    assert adv.weight == 0.01 and adv.loss == "vanilla" and not adv.batch_real_fake
    assert adv.discriminator.variant == "patch"
    sr, hr = batch()
    semantic = extractor(hr)
    expected = 0.01 * nn.functional.softplus(-adv.discriminator(sr, semantic)).mean()
    torch.testing.assert_close(adv.generator_loss(sr, hr), expected)


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_generator_step_leaves_d_without_gradients(extractor, variant: str) -> None:
    adv = adversary(extractor, variant, weight=0.01)
    d_params = list(adv.discriminator.parameters())
    generator = nn.Conv2d(3, 3, 3, padding=1)
    lr, hr = batch()
    sr = generator(lr)
    loss = adv.generator_loss(sr, hr)
    loss.backward()
    assert all(p.grad is None for p in d_params)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())
    assert all(p.requires_grad for p in d_params)  # restored after the call
    semantic = adv.semantics(hr)
    expected = 0.01 * nn.functional.softplus(-adv.discriminator(sr.detach(), semantic)).mean()
    torch.testing.assert_close(loss.detach(), expected.detach(), atol=1e-6, rtol=1e-5)


def test_generator_step_keeps_user_frozen_parameters_frozen(extractor) -> None:
    adv = adversary(extractor)
    frozen = adv.discriminator.conv_first.weight
    frozen.requires_grad_(False)
    sr, hr = batch()
    adv.generator_loss(sr.requires_grad_(), hr).backward()
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in adv.discriminator.parameters() if p is not frozen)


def test_generator_step_restores_requires_grad_after_an_error(extractor) -> None:
    adv = adversary(extractor)
    sr, hr = batch()
    with pytest.raises(ValueError, match=r"SeD expects 3 channels, got 2"):  # raised inside the frozen block
        adv.generator_loss(sr[:, :2], hr)
    assert all(p.requires_grad for p in adv.discriminator.parameters())


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_discriminator_step_gives_every_d_parameter_a_gradient(extractor, variant: str) -> None:
    adv = adversary(extractor, variant)
    generator = nn.Conv2d(3, 3, 3, padding=1)
    lr, hr = batch()
    sr = generator(lr)
    loss = adv.discriminator_loss(sr, hr)
    loss.backward()
    missing = [n for n, p in adv.discriminator.named_parameters() if p.grad is None]
    assert not missing
    assert all(p.grad is None for p in generator.parameters())  # fake is detached
    assert all(p.grad is None for p in extractor.parameters())
    assert loss.item() > 0 and torch.isfinite(loss)


def test_ragan_generator_loss_and_forward_pair(extractor) -> None:
    adv = adversary(extractor, loss="ragan")
    sr, hr = batch()
    sr.requires_grad_()
    g_loss, d_loss = adv(sr, hr)
    g_loss.backward()
    assert sr.grad is not None and all(p.grad is None for p in adv.discriminator.parameters())
    assert d_loss.ndim == 0 and torch.isfinite(d_loss)


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_adversary_r1_penalty(extractor, variant: str) -> None:
    """R1 of the fused-attention D in training mode equals ||d D(hr, semantics(hr)) / d hr||^2 by hand,
    with its gradients w.r.t. D's parameters (a double backward)."""
    discriminator = perturbed(sd.SeD(variant, semantic_channels=extractor.channels, **SIZES)).set_fused_attn(True)
    adv = sd.SeDAdversary(discriminator, extractor=extractor).train()
    by_hand = copy.deepcopy(adv.discriminator).set_fused_attn(False)  # same u/v: one power iteration each
    _, hr = batch()
    penalty = adv.r1_penalty(hr)
    penalty.backward()
    x = hr.clone().requires_grad_()
    (grad,) = torch.autograd.grad(by_hand(x, extractor(hr)).sum(), x, create_graph=True)
    expected = grad.pow(2).flatten(1).sum(1).mean()
    expected.backward()
    assert expected.item() > 0
    torch.testing.assert_close(penalty, expected, atol=1e-6, rtol=1e-5)
    for (name, p), q in zip(adv.discriminator.named_parameters(), by_hand.parameters()):
        if q.grad is None:  # only the last conv's bias cannot influence d D / d x
            assert p.grad is None and name in ("conv_last.bias", "conv9.bias"), name
        else:
            assert_close_scaled(p.grad, q.grad, 1e-4, msg=name)
    assert all(m.fused_attn for m in adv.discriminator.modules() if isinstance(m, Attention))


def test_extractor_outside_module_tree(extractor) -> None:
    adv = adversary(extractor)
    d_keys = set(adv.discriminator.state_dict())
    assert {k.removeprefix("discriminator.") for k in adv.state_dict()} == d_keys
    ext_ids = {id(p) for p in extractor.parameters()}
    assert not ext_ids & {id(p) for p in adv.parameters()}
    assert "extractor" not in dict(adv.named_children())
    assert adv.extractor is extractor


def test_train_step_keeps_extractor_frozen(extractor) -> None:
    adv = adversary(extractor).train()
    assert not any(m.training for m in extractor.modules())
    before = bn_stats(extractor)
    weights = {k: v.clone() for k, v in extractor.state_dict().items()}
    opt = torch.optim.Adam(adv.parameters(), lr=1e-2)
    sr, hr = batch()
    for _ in range(2):
        opt.zero_grad()
        adv.discriminator_loss(sr, torch.rand_like(hr)).backward()
        opt.step()
    assert all(torch.equal(v, bn_stats(extractor)[k]) for k, v in before.items())
    assert all(torch.equal(v, extractor.state_dict()[k]) for k, v in weights.items())


def test_adversary_constructor_errors(extractor) -> None:
    with pytest.raises(ValueError, match=r"Unknown GAN loss kind 'wgan'"):
        sd.SeDAdversary(sd.SeD("patch", **SIZES), extractor=extractor, loss="wgan")
    with pytest.raises(TypeError, match="extractor must be a SemanticExtractor or a preset name, got int"):
        sd.SeDAdversary(sd.SeD("patch", **SIZES), extractor=3)
    with pytest.raises(TypeError, match="positional argument"):
        sd.SeDAdversary(sd.SeD("patch", **SIZES), extractor)  # type: ignore[misc]
    message = (
        r"the discriminator takes semantic_channels=64 but extractor 'clip_rn50' gives 1024\. "
        r"Leave semantic_channels out .* semantic_channels=1024"
    )
    with pytest.raises(ValueError, match="SeDAdversary: " + message):
        sd.SeDAdversary(sd.SeD("patch", semantic_channels=64, **SIZES), extractor=extractor)
    with pytest.raises(ValueError, match="ConditionedSeD: " + message):
        sd.ConditionedSeD("patch", extractor=extractor, semantic_channels=64, **SIZES)
    with pytest.raises(ValueError, match=r"needs equal shapes; got hr \(2, 3, 32, 32\) and sr \(1, 3, 32, 32\)"):
        adversary(extractor, batch_real_fake=True).discriminator_loss(torch.rand(1, 3, 32, 32), batch()[1])


def test_adversary_builds_sed_from_variant_name(extractor) -> None:
    adv = sd.SeDAdversary("pixel", extractor=extractor)
    assert isinstance(adv.discriminator, sd.SeD) and adv.discriminator.variant == "pixel"
    assert adv.discriminator.semantic_channels == extractor.channels


# -- ConditionedSeD ----------------------------------------------------------------------------


def conditioned(extractor, variant: str = "patch", **kwargs) -> sd.ConditionedSeD:
    return sd.ConditionedSeD(variant, extractor=extractor, **SIZES, **kwargs)


def test_conditioned_requires_a_condition(extractor) -> None:
    net_d = conditioned(extractor)
    with pytest.raises(
        RuntimeError,
        match=r"ConditionedSeD has no condition: call net_d\.set_condition\(gt\) with the HR batch",
    ):
        net_d(torch.rand(2, 3, 32, 32))
    net_d.set_condition(torch.rand(2, 3, 32, 32))
    net_d(torch.rand(2, 3, 32, 32))
    net_d.clear_condition()
    with pytest.raises(RuntimeError, match="has no condition"):
        net_d(torch.rand(2, 3, 32, 32))


def test_conditioned_equals_sed_with_hr_semantics(counted) -> None:
    ext, calls = counted
    net_d = conditioned(ext).eval()
    sr, hr = batch()
    net_d.set_condition(hr)
    out_fake, out_real = net_d(sr), net_d(hr)
    assert len(calls) == 1
    semantic = ext(hr)
    torch.testing.assert_close(out_fake, sd.SeD.forward(net_d, sr, semantic))
    torch.testing.assert_close(out_real, sd.SeD.forward(net_d, hr, semantic))
    other = torch.randn_like(semantic)
    torch.testing.assert_close(net_d(sr, other), sd.SeD.forward(net_d, sr, other))  # explicit semantic wins


def test_conditioned_semantic_source_input(extractor) -> None:
    net_d = conditioned(extractor, semantic_source="input").eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(net_d(x), sd.SeD.forward(net_d, x, extractor(x)))
    with pytest.raises(ValueError, match="semantic_source must be 'condition' or 'input', got 'hr'"):
        conditioned(extractor, semantic_source="hr")


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_conditioned_state_dict_equals_sed(extractor, variant: str) -> None:
    net_d = conditioned(extractor, variant)
    plain = sd.SeD(variant, semantic_channels=1024, **SIZES)
    assert list(net_d.state_dict()) == list(plain.state_dict())
    assert sum(p.numel() for p in net_d.parameters()) == sum(p.numel() for p in plain.parameters())
    sd.load_official_weights(net_d, plain.state_dict())
    plain.load_state_dict(net_d.state_dict(), strict=True)


def test_conditioned_train_step_and_frozen_extractor(extractor) -> None:
    net_d = conditioned(extractor).train()
    assert not extractor.training
    before = bn_stats(extractor)
    opt = torch.optim.Adam(net_d.parameters(), lr=1e-2)
    sr, hr = batch()
    net_d.set_condition(hr)
    loss = nn.functional.softplus(-net_d(hr)).mean() + nn.functional.softplus(net_d(sr)).mean()
    loss.backward()
    assert all(p.grad is not None for p in net_d.parameters())
    opt.step()
    assert all(torch.equal(v, bn_stats(extractor)[k]) for k, v in before.items())


def test_to_dtype_converts_the_discriminator_not_the_extractor(extractor) -> None:
    # .double() converts D; the extractor (possibly shared with other modules) keeps its dtype and its
    # semantic maps are cast to D's dtype.
    net_d = conditioned(copy.deepcopy(extractor)).to(torch.float64)
    assert all(p.dtype == torch.float32 for p in net_d.extractor.parameters())
    assert all(p.dtype == torch.float64 for p in net_d.parameters())
    u = net_d.conv1.parametrizations.weight[0]._u
    assert u.dtype == torch.float64
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    net_d.set_condition(x)
    assert net_d(x).dtype == torch.float64

    adv = sd.SeDAdversary(sd.SeD("patch", semantic_channels=1024, **SIZES), extractor=copy.deepcopy(extractor))
    adv = adv.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in adv.extractor.parameters())
    assert all(p.dtype == torch.float64 for p in adv.discriminator.parameters())


def test_conditioned_deepcopy_and_pickle(extractor) -> None:
    net_d = conditioned(extractor)
    sr, hr = batch()
    net_d.set_condition(hr)
    net_d(sr).mean().backward()
    net_d.eval()
    for clone in (copy.deepcopy(net_d), pickle.loads(pickle.dumps(net_d))):
        assert type(clone) is sd.ConditionedSeD and clone.semantic_source == "condition"
        assert_same(clone, net_d)
        with pytest.raises(RuntimeError, match="has no condition"):  # a condition belongs to one step
            clone(sr)
        clone.set_condition(hr)
        assert_same(clone(sr), net_d(sr))
        clone.set_condition(sr)
        assert_same(clone(sr), sd.SeD.forward(net_d, sr, extractor(sr)))


def test_conditioned_condition_goes_stale_when_d_changes(extractor) -> None:
    net_d = conditioned(extractor)
    opt = torch.optim.SGD(net_d.parameters(), lr=0.1)
    sr, hr = batch()
    net_d.set_condition(hr)
    (net_d(hr).mean() - net_d(sr).mean()).backward()  # every D call of the step: fine
    opt.step()
    stale = r"condition is stale: the discriminator's weights changed .* Call net_d\.set_condition\(gt\)"
    with pytest.raises(RuntimeError, match=stale):
        net_d(sr)  # the next step, set_condition forgotten
    net_d.set_condition(hr)
    net_d(sr)
    net_d.load_state_dict(net_d.state_dict())
    with pytest.raises(RuntimeError, match=stale):
        net_d(sr)
    net_d.set_condition(hr)
    with pytest.raises(RuntimeError, match=r"condition holds 2 images but the input has 1: call net_d\.set_condition"):
        net_d(sr[:1])
    wrong_size = (
        r"condition was set from an HR batch of \(32, 32\) \(H, W\) but the input is \(48, 48\): the generator's"
    )
    with pytest.raises(RuntimeError, match=wrong_size):
        net_d(torch.rand(2, 3, 48, 48))


def test_conditioned_condition_context_manager(extractor) -> None:
    net_d = conditioned(extractor)
    sr, hr = batch()
    assert not net_d.has_condition
    with net_d.condition(hr) as semantic:
        assert net_d.has_condition
        torch.testing.assert_close(semantic, extractor(hr))
        net_d(sr)
    assert not net_d.has_condition
    with pytest.raises(RuntimeError, match="has no condition"):
        net_d(sr)
    with pytest.raises(KeyError):
        with net_d.condition(hr):
            raise KeyError("inside")
    assert net_d._condition is None


def test_conditioned_without_fusion_builds_no_extractor(monkeypatch) -> None:
    def no_extractor(*args, **kwargs):
        raise AssertionError("SemanticExtractor must not be built")

    monkeypatch.setattr(sd.training, "SemanticExtractor", no_extractor)
    net_d = sd.ConditionedSeD("pixel", semantic_fusion=False, **SIZES)
    assert net_d.extractor is None and not net_d.sefb_blocks()
    x = torch.rand(2, 3, 32, 32)
    assert net_d.set_condition(x) is None
    assert net_d(x).shape == (2, 1, 32, 32)
    assert net_d.to(torch.float64)(x.double()).dtype == torch.float64
    pickle.loads(pickle.dumps(net_d))


def test_whole_model_save_keeps_how_to_rebuild_the_extractor_not_its_weights(extractor, tmp_path) -> None:
    net_d = conditioned(extractor)
    sr, hr = batch()
    net_d.set_condition(hr)
    torch.save(net_d, tmp_path / "net_d.pth")
    torch.save(sd.SeD("patch", semantic_channels=1024, **SIZES), tmp_path / "sed.pth")
    torch.save(extractor.trunk.state_dict(), tmp_path / "trunk.pth")
    size = (tmp_path / "net_d.pth").stat().st_size
    assert size < (tmp_path / "sed.pth").stat().st_size + 100_000  # the discriminator plus a few bytes
    assert (tmp_path / "trunk.pth").stat().st_size > 3 * size  # the trunk would dominate
    with pytest.warns(UserWarning, match="RANDOM"):  # rebuilt from its arguments (random weights here)
        loaded = torch.load(tmp_path / "net_d.pth", weights_only=False)
    assert loaded._condition is None and loaded.extractor.preset.name == "clip_rn50"
    loaded.set_condition(hr)
    torch.testing.assert_close(loaded.eval()(sr), net_d.eval()(sr))


def test_adversary_pickle_leaves_the_step_cache_out(extractor) -> None:
    adv = adversary(extractor)
    sr, hr = batch()
    adv.discriminator_loss(sr, hr)
    assert adv._cache is not None
    with pytest.warns(UserWarning, match="RANDOM"):
        clone = pickle.loads(pickle.dumps(adv))
    assert clone._cache is None
    torch.testing.assert_close(clone.discriminator_loss(sr, hr), adv.discriminator_loss(sr, hr))


def test_adversary_deepcopy(extractor) -> None:
    adv = adversary(extractor)
    clone = copy.deepcopy(adv)
    sr, hr = batch()
    torch.testing.assert_close(clone.discriminator_loss(sr, hr), adv.discriminator_loss(sr, hr))


# -- frozen_parameters ---------------------------------------------------------------------------


def test_frozen_parameters_gives_gradients_to_the_input_only() -> None:
    d = sd.SeD("patch", width=8, semantic_channels=64, head_dim=8)
    user_frozen = d.conv_first.bias
    user_frozen.requires_grad_(False)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    s = torch.rand(2, 64, 2, 2)
    with sd.frozen_parameters(d):
        assert not any(p.requires_grad for p in d.parameters())
        d(x, s).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())
    assert not user_frozen.requires_grad
    assert all(p.requires_grad for p in d.parameters() if p is not user_frozen)


def test_frozen_parameters_restores_after_an_error() -> None:
    layer = nn.Linear(3, 3)
    with pytest.raises(RuntimeError, match="inside"):
        with sd.frozen_parameters(layer):
            raise RuntimeError("inside")
    assert all(p.requires_grad for p in layer.parameters())
