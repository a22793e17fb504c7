"""Adversarial losses (the per-component class, known values per kind) and the R1 penalty."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_same, settled_sed

import sed_discriminator as sd
from sed_discriminator.attention import Attention
from sed_discriminator.losses import LOSS_KINDS, DiscriminatorLoss, GeneratorLoss

LOG2 = math.log(2.0)


class TestAdversarialLosses:
    """GeneratorLoss / DiscriminatorLoss and their functions, per component as in kornia: smoke, cardinality,
    exception, gradcheck, dynamo, module == function."""

    @pytest.mark.parametrize("kind", LOSS_KINDS)
    def test_smoke(self, kind: str, device: torch.device, dtype: torch.dtype) -> None:
        real, fake = (torch.randn(2, 1, 6, 6, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        for loss in (GeneratorLoss(kind)(fake, real_logits=real), DiscriminatorLoss(kind)(fake, real_logits=real)):
            assert loss.shape == () and loss.dtype == dtype and loss.device == real.device and torch.isfinite(loss)
            assert loss.requires_grad

    @pytest.mark.parametrize("shape", [(1, 1, 30, 30), (3, 1, 6, 6), (4, 1), (5,)], ids=lambda s: "x".join(map(str, s)))
    @pytest.mark.parametrize("kind", LOSS_KINDS)
    def test_cardinality(self, kind: str, shape: tuple[int, ...]) -> None:
        """Any logits shape (patch maps, pixel maps, one logit per image) reduces to the mean over all logits."""
        real, fake = torch.randn(shape), torch.randn(shape)
        flat_g = sd.generator_loss(fake.flatten(), real_logits=real.flatten(), kind=kind)
        flat_d = sd.discriminator_loss(fake.flatten(), real_logits=real.flatten(), kind=kind)
        assert_same(sd.generator_loss(fake, real_logits=real, kind=kind), flat_g)
        assert_same(sd.discriminator_loss(fake, real_logits=real, kind=kind), flat_d)

    def test_exception_ragan_needs_real_logits(self) -> None:
        with pytest.raises(
            ValueError,
            match=r"The 'ragan' generator loss needs real_logits, the discriminator's output on real images",
        ):
            sd.generator_loss(torch.zeros(2, 1, 4, 4), kind="ragan")
        with pytest.raises(ValueError, match="needs real_logits"):
            GeneratorLoss("ragan")(torch.zeros(2, 1, 4, 4))

    def test_exception_unknown_kind(self) -> None:
        message = r"Unknown GAN loss kind 'wgan'; choose one of \('vanilla', 'lsgan', 'hinge', 'ragan'\)"
        for call in (
            lambda: sd.generator_loss(torch.zeros(1), kind="wgan"),
            lambda: sd.discriminator_loss(torch.zeros(1), real_logits=torch.zeros(1), kind="wgan"),
            lambda: GeneratorLoss("wgan"),
            lambda: DiscriminatorLoss("wgan"),
        ):
            with pytest.raises(ValueError, match=message):
                call()

    def test_exception_0_1_argument_order(self) -> None:
        """0.1 took discriminator_loss(real, fake): positional logits after the first now raise."""
        real, fake = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
        with pytest.raises(TypeError, match="positional argument"):
            sd.discriminator_loss(real, fake)  # type: ignore[misc]
        with pytest.raises(TypeError, match="positional argument"):
            sd.generator_loss(fake, real, "ragan")  # type: ignore[misc]
        with pytest.raises(TypeError, match="positional argument"):
            DiscriminatorLoss()(real, fake)  # type: ignore[misc]

    @pytest.mark.parametrize("kind", LOSS_KINDS)
    def test_exception_empty_batch(self, kind: str) -> None:
        empty, full = torch.zeros(0, 1, 4, 4), torch.zeros(2, 1, 4, 4)
        message = r"is empty \(shape \(0, 1, 4, 4\)\), so the loss would be NaN"
        with pytest.raises(ValueError, match="generator_loss: fake_logits " + message):
            sd.generator_loss(empty, real_logits=full, kind=kind)
        with pytest.raises(ValueError, match="discriminator_loss: real_logits " + message):
            sd.discriminator_loss(full, real_logits=empty, kind=kind)
        with pytest.raises(ValueError, match="discriminator_loss: fake_logits " + message):
            DiscriminatorLoss(kind)(empty, real_logits=full)

    @pytest.mark.parametrize("kind", LOSS_KINDS)
    def test_gradcheck(self, kind: str) -> None:
        g = torch.Generator().manual_seed(0)
        real = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
        fake = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
        # The generator's ragan loss detaches real_logits, so only fake_logits is checked there.
        assert torch.autograd.gradcheck(lambda f: sd.generator_loss(f, real_logits=real, kind=kind), (fake,))
        if kind != "ragan":  # D's ragan loss detaches each side's mean inside the other's term, by design
            d_loss = lambda f, r: sd.discriminator_loss(f, real_logits=r, kind=kind)  # noqa: E731
            assert torch.autograd.gradcheck(d_loss, (fake, real))

    @pytest.mark.slow
    def test_dynamo(self) -> None:
        torch._dynamo.reset()
        real, fake = torch.randn(2, 1, 6, 6), torch.randn(2, 1, 6, 6)
        for kind in LOSS_KINDS:
            g_loss, d_loss = GeneratorLoss(kind), DiscriminatorLoss(kind)
            compiled_g = torch.compile(g_loss, backend="eager", fullgraph=True)
            compiled_d = torch.compile(d_loss, backend="eager", fullgraph=True)
            torch.testing.assert_close(compiled_g(fake, real_logits=real), g_loss(fake, real_logits=real))
            torch.testing.assert_close(compiled_d(fake, real_logits=real), d_loss(fake, real_logits=real))

    @pytest.mark.parametrize("kind", LOSS_KINDS)
    def test_module(self, kind: str) -> None:
        real, fake = torch.randn(2, 1, 5, 5), torch.randn(2, 1, 5, 5)
        g_mod, d_mod = GeneratorLoss(kind, weight=0.5), DiscriminatorLoss(kind, weight=2.0)
        expected_g = sd.generator_loss(fake, real_logits=real, kind=kind, weight=0.5)
        expected_d = sd.discriminator_loss(fake, real_logits=real, kind=kind, weight=2.0)
        torch.testing.assert_close(g_mod(fake, real_logits=real), expected_g, atol=0, rtol=0)
        torch.testing.assert_close(d_mod(fake, real_logits=real), expected_d, atol=0, rtol=0)
        assert f"kind='{kind}'" in repr(g_mod) and "weight=2.0" in repr(d_mod)


def test_kinds() -> None:
    assert LOSS_KINDS == ("vanilla", "lsgan", "hinge", "ragan")


@pytest.mark.parametrize(
    "kind, g_value, d_value",
    [("vanilla", LOG2, 2 * LOG2), ("lsgan", 1.0, 1.0), ("hinge", 0.0, 2.0), ("ragan", LOG2, LOG2)],
)
def test_zero_logits(kind: str, g_value: float, d_value: float) -> None:
    zeros = torch.zeros(2, 1, 30, 30)
    assert sd.generator_loss(zeros, real_logits=zeros, kind=kind).item() == pytest.approx(g_value, abs=1e-6)
    assert sd.discriminator_loss(zeros, real_logits=zeros, kind=kind).item() == pytest.approx(d_value, abs=1e-6)


@pytest.mark.parametrize("kind", ["vanilla", "lsgan", "hinge"])
def test_perfect_discriminator(kind: str) -> None:
    target_real = {"vanilla": 50.0, "lsgan": 1.0, "hinge": 1.0}[kind]
    target_fake = {"vanilla": -50.0, "lsgan": 0.0, "hinge": -1.0}[kind]
    real, fake = torch.full((4, 1, 8, 8), target_real), torch.full((4, 1, 8, 8), target_fake)
    assert sd.discriminator_loss(fake, real_logits=real, kind=kind).item() == pytest.approx(0.0, abs=1e-6)
    # the same logits with the roles swapped: the loss of a discriminator that is always wrong
    assert sd.discriminator_loss(real, real_logits=fake, kind=kind).item() > 1.0


def test_formulas_on_random_logits() -> None:
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(3, 1, 6, 6, generator=g) * 2, torch.randn(3, 1, 6, 6, generator=g) * 2
    sp = F.softplus  # BCE-with-logits(x, 1) = softplus(-x), (x, 0) = softplus(x)
    expected = {
        "vanilla": (sp(-fake).mean(), sp(-real).mean() + sp(fake).mean()),
        "lsgan": ((fake - 1).pow(2).mean(), (real - 1).pow(2).mean() + fake.pow(2).mean()),
        "hinge": (-fake.mean(), F.relu(1 - real).mean() + F.relu(1 + fake).mean()),
        "ragan": (
            0.5 * (sp(real - fake.mean()).mean() + sp(-(fake - real.mean())).mean()),
            0.5 * (sp(-(real - fake.mean())).mean() + sp(fake - real.mean()).mean()),
        ),
    }
    for kind, (g_loss, d_loss) in expected.items():
        torch.testing.assert_close(sd.generator_loss(fake, real_logits=real, kind=kind), g_loss)
        torch.testing.assert_close(sd.discriminator_loss(fake, real_logits=real, kind=kind), d_loss)
        torch.testing.assert_close(sd.generator_loss(fake, real_logits=real, kind=kind, weight=0.01), 0.01 * g_loss)
        torch.testing.assert_close(sd.discriminator_loss(fake, real_logits=real, kind=kind, weight=3.0), 3.0 * d_loss)


def test_r1_penalty_of_an_empty_batch_is_a_clear_error() -> None:
    model = sd.SeD("patch", **TINY)
    with pytest.raises(ValueError, match=r"r1_penalty needs a non-empty batch of real images, got \(0, 3, 32, 32\)"):
        sd.r1_penalty(model, torch.zeros(0, 3, 32, 32), torch.zeros(0, TINY["semantic_channels"], 2, 2))


def test_ragan_generator_loss_detaches_real() -> None:
    real = torch.randn(2, 1, 4, 4, requires_grad=True)
    fake = torch.randn(2, 1, 4, 4, requires_grad=True)
    sd.generator_loss(fake, real_logits=real, kind="ragan").backward()
    assert real.grad is None and fake.grad is not None


# -- R1 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_r1_penalty_with_fused_attention_matches_math_path(variant: str) -> None:
    fused = settled_sed(variant).set_fused_attn(True)
    math_model = copy.deepcopy(fused).set_fused_attn(False)
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, TINY["semantic_channels"], 4, 4)
    penalties, grads = [], []
    for model in (fused, math_model):
        penalty = sd.r1_penalty(model, x, s)
        penalty.backward()  # double backward through D
        penalties.append(penalty.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert penalties[0].item() > 0
    torch.testing.assert_close(penalties[0], penalties[1], atol=1e-6, rtol=1e-5)
    # Only the last conv's bias cannot influence d D / d x; every other parameter gets a gradient.
    last_bias = "conv_last.bias" if variant == "patch" else "conv9.bias"
    assert [n for n, g in grads[0].items() if g is None] == [last_bias]
    assert [n for n, g in grads[1].items() if g is None] == [last_bias]
    for name, a in grads[0].items():
        if a is not None:
            b = grads[1][name]
            # float32 sums of large second-order terms in a different order: relative to the tensor's scale
            assert (a - b).abs().max() <= 1e-4 * b.abs().max(), name
    assert x.grad is None  # a detached copy of the real batch is differentiated
    assert all(m.fused_attn for m in fused.modules() if isinstance(m, Attention))  # the math fallback is temporary


def test_r1_penalty_formula() -> None:
    model = settled_sed().set_fused_attn(False)
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, TINY["semantic_channels"], 4, 4)
    x_ = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(x_, s).sum(), x_)
    expected = grad.pow(2).flatten(1).sum(1).mean()
    torch.testing.assert_close(sd.r1_penalty(model, x, s), expected, atol=1e-6, rtol=1e-5)


def test_plain_double_backward_through_fused_cpu_kernel_raises() -> None:
    """Documents why r1_penalty switches to the math backend: the fused CPU SDPA kernel has no
    double backward, so a hand-written R1 on the fused path fails at the second backward."""
    model = settled_sed().set_fused_attn(True)
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = model(x, torch.randn(2, TINY["semantic_channels"], 4, 4))
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"derivative for .*scaled_dot_product.* is not implemented"):
        grad.pow(2).sum().backward()


def test_math_attention_context_enables_double_backward() -> None:
    model = settled_sed().set_fused_attn(True)
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    with sd.math_attention():
        out = model(x, torch.randn(1, TINY["semantic_channels"], 4, 4))
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    grad.pow(2).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "conv_last.bias")
