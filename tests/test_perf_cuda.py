"""CUDA-only performance checks (run by ``benchmarks/gpu_check.sh``; skipped without a GPU).

- Under bf16/fp16 the fused path really runs a FlashAttention or memory-efficient SDPA kernel
  (not the math fallback) and matches the math path; in fp32 it runs a fused kernel too.
- Each SDPA backend (flash, memory-efficient, cuDNN), forced in turn, agrees with the fp32 math
  reference in fp32 and bf16; the ones every CUDA build must take are required to accept the inputs.
- Fused and math paths agree on whole discriminators at 256 and, for the pixel SeD, at 512.
- AMP training with a GradScaler stays finite; spectral-norm state stays float32.
- The R1 penalty works on CUDA with the fused path on (flash / efficient kernels have no
  double backward; the penalty's forward uses the math backend).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sed_discriminator as sd
from sed_discriminator import SeD, SeFB

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"),
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FUSED_KERNELS = (
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward",
    "aten::_scaled_dot_product_cudnn_attention",
)
FLASH_OR_EFFICIENT = FUSED_KERNELS[:4]


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons mean fp32: switch TF32 off for matmuls and convolutions inside a test."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _ops(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


def _sefb_step(block: SeFB, dtype: torch.dtype, batch: int = 2) -> None:
    s = torch.randn(batch, 1024, 16, 16, device="cuda")
    f = torch.randn(batch, 128, 128, 128, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        out = block(f, s)
    out.float().square().mean().backward()


@pytest.mark.parametrize("name", list(DTYPES))
def test_fused_path_selects_flash_or_efficient_kernel(name: str) -> None:
    """Paper sizes (head_dim 64): the fused SeFB runs FlashAttention / memory-efficient SDPA."""
    dtype = DTYPES[name]
    block = SeD("pixel").cuda().sefb_blocks()["att1"]  # u = 8: 256 semantic x 16384 image tokens
    ops = _ops(lambda: _sefb_step(block, dtype))
    attention_ops = sorted(o for o in ops if "attention" in o)
    print(f"{name}: SDPA ops that ran: {attention_ops}")
    assert ops & set(FUSED_KERNELS), f"no fused SDPA kernel ran; ops: {attention_ops}"
    assert "aten::_scaled_dot_product_attention_math" not in ops
    # Restricted to FlashAttention + memory-efficient, SDPA must still accept the inputs (it
    # raises "No available kernel" otherwise), and one of the two must be what runs.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def restricted():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            _sefb_step(block, dtype)

    ops = _ops(restricted)
    ran = sorted(o for o in ops if "attention" in o)
    assert ops & set(FLASH_OR_EFFICIENT), f"flash/efficient did not run; ops: {ran}"


def test_fused_path_runs_a_fused_kernel_in_fp32() -> None:
    """FlashAttention takes no fp32; the memory-efficient (or cuDNN) kernel must, not the math fallback."""
    block = SeD("pixel").cuda().sefb_blocks()["att1"]
    ops = _ops(lambda: _sefb_step(block, torch.float32))
    attention_ops = sorted(o for o in ops if "attention" in o)
    print(f"fp32: SDPA ops that ran: {attention_ops}")
    assert ops & set(FUSED_KERNELS), f"no fused SDPA kernel ran in fp32; ops: {attention_ops}"
    assert "aten::_scaled_dot_product_attention_math" not in ops


# Backends every CUDA build of torch >= 2.2 takes at head_dim 64 (sm80 and newer for flash); cuDNN's
# attention depends on the cuDNN version and GPU, so its refusal is a skip, not a failure.
REQUIRED_BACKENDS = {("EFFICIENT_ATTENTION", "fp32"), ("EFFICIENT_ATTENTION", "bf16"), ("FLASH_ATTENTION", "bf16")}


def _sefb_with_attention_reaching_output() -> SeFB:
    torch.manual_seed(0)
    block = SeD("pixel").sefb_blocks()["att1"]
    with torch.no_grad():  # proj_out starts at zero in the pixel SeD: perturb every weight
        for p in block.parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1))
    return block.cuda()


def _sefb_out_and_grad(block: SeFB, f: torch.Tensor, s: torch.Tensor, dtype: torch.dtype | None):
    f = f.detach().requires_grad_(True)
    ctx = torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast("cuda", enabled=False)
    with ctx:
        out = block(f, s)
    out.float().square().mean().backward()
    return out.detach().float(), f.grad.float()


@pytest.mark.parametrize("name", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
def test_each_sdpa_backend_agrees_with_fp32_math(backend: str, name: str) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = _sefb_with_attention_reaching_output()
    s = torch.randn(2, 1024, 16, 16, device="cuda")
    f = torch.randn(2, 128, 128, 128, device="cuda")  # 256 semantic queries x 16384 image keys
    block.set_fused_attn(False)
    ref_out, ref_grad = _sefb_out_and_grad(block, f, s, None)  # the math path in fp32, TF32 off
    block.set_fused_attn(True)
    try:
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            out, grad = _sefb_out_and_grad(block, f, s, DTYPES.get(name))
    except RuntimeError as err:
        if (backend, name) in REQUIRED_BACKENDS:
            raise
        pytest.skip(f"{backend} does not take these {name} inputs here: {str(err).splitlines()[0][:200]}")
    tol = 1e-4 if name == "fp32" else 3e-2
    scale = max(1.0, ref_out.abs().max().item())
    assert (out - ref_out).abs().max().item() <= tol * scale
    assert _cosine(grad, ref_grad) > (0.9999 if name == "fp32" else 0.99)


@pytest.mark.parametrize("name", list(DTYPES))
def test_math_path_runs_no_fused_kernel(name: str) -> None:
    block = SeD("pixel").cuda().sefb_blocks()["att1"]
    block.set_fused_attn(False)
    ops = _ops(lambda: _sefb_step(block, DTYPES[name]))
    assert not ops & set(FUSED_KERNELS)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize(
    "variant, size, batch",
    [("patch", 256, 2), ("pixel", 256, 2), ("pixel", 512, 1)],  # 512: 65536 image keys at att1
    ids=["patch-256", "pixel-256", "pixel-512"],
)
@pytest.mark.parametrize("name, tol", [("fp32", 1e-4), ("bf16", 3e-2), ("fp16", 5e-3)])
def test_fused_matches_math_path(variant: str, size: int, batch: int, name: str, tol: float) -> None:
    torch.manual_seed(0)
    fused = SeD(variant).cuda().eval()
    with torch.no_grad():  # non-trivial weights: proj_out starts at zero in the pixel variant
        for p in fused.parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1))
    plain = copy.deepcopy(fused).set_fused_attn(False)
    x = torch.rand(batch, 3, size, size, device="cuda")
    s = torch.randn(batch, 1024, size // 16, size // 16, device="cuda")
    outs = []
    for model in (fused, plain):
        ctx = torch.autocast("cuda", dtype=DTYPES[name]) if name in DTYPES else torch.autocast("cuda", enabled=False)
        with ctx:
            out = model(x, s).float()
        out.square().mean().backward()
        outs.append((out.detach(), [p.grad.float() for p in model.parameters()]))
    (o1, g1), (o2, g2) = outs
    scale = max(1.0, o2.abs().max().item())
    assert (o1 - o2).abs().max().item() <= tol * scale
    for a, b in zip(g1, g2, strict=True):
        if b.abs().max() > 0:
            assert _cosine(a, b) > (0.9999 if name == "fp32" else 0.99)


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_amp_gradscaler_training_stays_finite(variant: str) -> None:
    torch.manual_seed(0)
    d = SeD(variant).cuda().train()
    opt = torch.optim.Adam(d.parameters(), lr=1e-4, betas=(0.9, 0.99))
    scaler = torch.amp.GradScaler("cuda")
    s = torch.randn(4, 1024, 16, 16, device="cuda")
    for _ in range(6):
        real = torch.rand(4, 3, 256, 256, device="cuda")
        fake = (real + 0.1 * torch.randn_like(real)).clamp(0, 1)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = sd.discriminator_loss(d(fake, s), real_logits=d(real, s))
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() >= 1.0
    assert all(torch.isfinite(p).all() for p in d.parameters())
    for name, buf in d.named_buffers():
        if name.endswith(("_u", "_v")):
            assert buf.dtype == torch.float32 and torch.isfinite(buf).all(), name


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_r1_penalty_with_fused_path_on_cuda(variant: str) -> None:
    torch.manual_seed(0)
    d = SeD(variant).cuda().train()
    assert sd.use_fused_attn()
    x = torch.rand(2, 3, 256, 256, device="cuda")
    s = torch.randn(2, 1024, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        penalty = sd.r1_penalty(d, x, s)
    penalty.backward()
    assert torch.isfinite(penalty)
    grads = [p.grad for p in d.parameters() if p.grad is not None]  # the last bias gets none from R1
    assert len(grads) > len(list(d.parameters())) - 3 and all(torch.isfinite(g).all() for g in grads)


def test_batched_real_fake_equals_two_calls_in_eval_mode_cuda() -> None:
    from sed_discriminator import SeDAdversary, SemanticExtractor

    extractor = SemanticExtractor(pretrained=None).cuda()
    d = SeD("patch").cuda().eval()
    two = SeDAdversary(d, extractor=extractor).eval()
    one = SeDAdversary(copy.deepcopy(d), extractor=extractor, batch_real_fake=True).eval()
    hr, sr = torch.rand(2, 2, 3, 256, 256, device="cuda").unbind(0)
    torch.testing.assert_close(one.discriminator_loss(sr, hr), two.discriminator_loss(sr, hr), atol=1e-5, rtol=1e-5)
