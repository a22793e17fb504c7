"""SeFB, the semantic-aware fusion block: the per-component class, reference parity, fused == math, resampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_scaled, perturbed

import reference_sed as R
from sed_discriminator import SeFB
from sed_discriminator.sefb import semantic_grid_size

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

CS = 64  # semantic channels of the tiny blocks


def tiny_block(fused: bool = True, heads: int = 1, head_dim: int = 8, upscale: int = 2, kernel: int = 3, cf: int = 12):
    block = SeFB(cf, upscale, semantic_channels=CS, heads=heads, head_dim=head_dim, conv_out_kernel=kernel)
    block.set_fused_attn(fused)
    return block


class TestSeFB:
    """Per component as in kornia: smoke, cardinality, exception, gradcheck, dynamo."""

    def test_smoke(self, device: torch.device, dtype: torch.dtype) -> None:
        block = tiny_block(upscale=2).to(device, dtype)
        f, s = torch.randn(2, 12, 8, 8), torch.randn(2, CS, 4, 4)
        out = block(f.to(device, dtype), s.to(device, dtype))
        assert out.shape == (2, CS // 4, 8, 8) and out.dtype == dtype and out.device.type == device.type
        assert block.out_channels == CS // 4

    def test_cardinality_last_level_4x4_conv_out_lands_on_31(self) -> None:
        """Spec: the patch D's last SeFB maps a 16x16 grid with u=2 to 32x32 and its 4x4 conv_out to 31x31."""
        block = tiny_block(upscale=2, kernel=4)
        assert block.conv_out.kernel_size == (4, 4)
        out = block(torch.randn(1, 12, 31, 31), torch.randn(1, CS, 16, 16))
        assert out.shape == (1, CS // 4, 31, 31)
        assert semantic_grid_size((31, 31), 2, shrink=1) == (16, 16)

    @pytest.mark.parametrize("feature_size", [(7, 7), (9, 5), (1, 1)])
    def test_cardinality_odd_feature_sizes_are_covered_then_cropped(self, feature_size: tuple[int, int]) -> None:
        block = perturbed(tiny_block(upscale=2))
        out = block(torch.randn(1, 12, *feature_size), torch.randn(1, CS, 2, 2))
        assert out.shape == (1, CS // 4, *feature_size)
        assert torch.isfinite(out).all()

    def test_exception_constructor(self) -> None:
        message = r"semantic_channels=48 does not fit SeFB\(upscale=2\): it must be a multiple of 32"
        with pytest.raises(ValueError, match=message):
            SeFB(8, 2, semantic_channels=48)
        message = r"multiple of 64 \(GroupNorm's 32 groups and upscale\^2=64\), e.g. 64 or 128"
        with pytest.raises(ValueError, match=message):
            SeFB(8, 8, semantic_channels=32)
        with pytest.raises(ValueError, match="conv_out_kernel must be 3 or 4, got 5"):
            SeFB(8, 2, semantic_channels=64, conv_out_kernel=5)

    def test_exception_arguments_after_upscale_are_keyword_only(self) -> None:
        with pytest.raises(TypeError, match="positional argument"):
            SeFB(8, 2, 64)  # type: ignore[misc]

    def test_exception_direct_call(self) -> None:
        """Called directly, SeFB checks its inputs as SeD does instead of broadcasting or failing deep inside."""
        block = tiny_block()
        f, s = torch.randn(2, 12, 8, 8), torch.randn(2, CS, 4, 4)
        with pytest.raises(ValueError, match=r"got an image batch of 2 but a semantic batch of 1"):
            block(f, s[:1])
        with pytest.raises(ValueError, match=r"image features of shape \(B, 12, H, W\).*features first"):
            block(s, f)  # the 0.1 argument order
        with pytest.raises(ValueError, match=r"built with semantic_channels=64 but the semantic map has 32 channels"):
            block(f, torch.randn(2, 32, 4, 4))
        message = r"SeFB's weights are torch.float32 but its semantic map is torch.float16.*autocast"
        with pytest.raises(ValueError, match=message):
            block(f, s.half())

    @pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
    def test_gradcheck(self, fused: bool) -> None:
        block = perturbed(SeFB(4, 2, semantic_channels=32, heads=1, head_dim=4)).double()
        block.set_fused_attn(fused)
        s = torch.randn(1, 32, 2, 2, dtype=torch.float64, requires_grad=True)
        f = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(block, (f, s), fast_mode=True)

    def test_gradgradcheck_math_path(self) -> None:
        """Double backward (needed by R1) works on the math path."""
        block = perturbed(SeFB(4, 2, semantic_channels=32, heads=1, head_dim=4)).double()
        block.set_fused_attn(False)
        s = torch.randn(1, 32, 2, 2, dtype=torch.float64)
        f = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda f: block(f, s), (f,), fast_mode=True)

    @pytest.mark.slow
    def test_dynamo(self) -> None:
        torch._dynamo.reset()
        block = perturbed(tiny_block()).eval()
        compiled = torch.compile(block, backend="eager", fullgraph=True)
        f, s = torch.randn(2, 12, 8, 8), torch.randn(2, CS, 4, 4)
        with torch.no_grad():
            torch.testing.assert_close(compiled(f, s), block(f, s), atol=1e-6, rtol=1e-6)


def test_zero_initialised_proj_out_gives_conv_out_bias() -> None:
    """proj_out starts at zero (docs/reference.md section 2), so a fresh block outputs conv_out's bias everywhere."""
    block = tiny_block()
    assert torch.count_nonzero(block.proj_out.weight) == 0 and torch.count_nonzero(block.proj_out.bias) == 0
    out = block(torch.randn(2, 12, 8, 8), torch.randn(2, CS, 4, 4))
    expected = block.conv_out.bias.view(1, -1, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("heads, head_dim", [(1, 8), (2, 8), (1, 40)])
@pytest.mark.parametrize("upscale, kernel", [(2, 3), (4, 3), (2, 4)])
def test_matches_reference_block(upscale: int, kernel: int, heads: int, head_dim: int, fused: bool) -> None:
    ref = perturbed(R.RefSeFB(12, upscale, CS, heads, head_dim, last=kernel == 4))
    block = tiny_block(fused, heads, head_dim, upscale, kernel)
    block.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, CS, 3, 5, generator=g)
    f = torch.randn(2, 12, 3 * upscale - (kernel - 3), 5 * upscale - (kernel - 3), generator=g)
    torch.testing.assert_close(block(f, s), ref(s, f), atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads, head_dim", [(1, 32), (2, 40), (1, 64)])
def test_fused_equals_math_outputs_and_grads(heads: int, head_dim: int) -> None:
    block = perturbed(tiny_block(True, heads, head_dim))
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, CS, 4, 4, generator=g)
    # Non-contiguous features: a transposed view.
    f = torch.randn(2, 12, 8, 8, generator=g).transpose(-1, -2)
    assert not f.is_contiguous()
    results = []
    for fused in (True, False):
        block.set_fused_attn(fused)
        block.zero_grad()
        s_, f_ = s.clone().requires_grad_(), f.detach().clone().requires_grad_()
        out = block(f_, s_)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), s_.grad, f_.grad, {n: p.grad.clone() for n, p in block.named_parameters()}))
    (o1, gs1, gf1, gp1), (o2, gs2, gf2, gp2) = results
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
    assert_close_scaled(gs1, gs2, msg="semantic grad")
    assert_close_scaled(gf1, gf2, msg="feature grad")
    for name in gp1:
        assert_close_scaled(gp1[name], gp2[name], msg=name)


def test_return_attention_sums_to_one_and_keeps_output() -> None:
    block = perturbed(tiny_block(True, heads=2))
    s, f = torch.randn(3, CS, 4, 3), torch.randn(3, 12, 8, 6)
    out, attn = block(f, s, return_attention=True)
    assert attn.shape == (3, 2, 4 * 3, 8 * 6)
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 2, 12), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, block(f, s), atol=1e-5, rtol=1e-5)


def test_semantic_grid_is_resampled_bilinear_antialiased() -> None:
    block = perturbed(tiny_block(upscale=2))
    f = torch.randn(2, 12, 8, 8)
    big = torch.randn(2, CS, 11, 7)
    needed = semantic_grid_size((8, 8), 2)
    assert needed == (4, 4)
    resampled = F.interpolate(big, size=needed, mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(block(f, big), block(f, resampled), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "size, upscale, shrink, expected",
    [((64, 64), 4, 0, (16, 16)), ((31, 31), 2, 1, (16, 16)), ((25, 13), 2, 0, (13, 7))],
)
def test_semantic_grid_size(size, upscale, shrink, expected) -> None:
    assert semantic_grid_size(size, upscale, shrink) == expected


def test_set_fused_attn_reaches_both_attentions() -> None:
    block = tiny_block(True)
    block.set_fused_attn(False)
    attns = [block.transformer_blocks[0].attn1, block.transformer_blocks[0].attn2]
    assert [a.fused_attn for a in attns] == [False, False]
    block.set_fused_attn(True)
    assert [a.fused_attn for a in attns] == [True, True]
