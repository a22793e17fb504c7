"""Performance features keep the reference behaviour (CPU).

- In-place activations, channels_last models and the token layout of SeFB give the same
  numbers as the default path.
- ``SeDAdversary(batch_real_fake=True)`` equals the two reference calls in eval mode, and in
  training mode is exactly "one power iteration, then both batches with the same weights".
- The benchmark scripts start, plan and measure (tiny sizes; no timing is asserted).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_close_scaled, sed_inputs, tiny_preset, tiny_sed

import sed_discriminator as sd
from sed_discriminator import SeD, SeDAdversary, SemanticExtractor
from sed_discriminator.sefb import _to_tokens

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_sed.py"


@pytest.fixture(scope="module")
def tiny_extractor() -> Iterator[SemanticExtractor]:
    with tiny_preset("_perf_tiny"):
        yield SemanticExtractor("_perf_tiny", pretrained=None)


# -- same numbers as the default path --------------------------------------------------------------


def test_tokens_are_free_views_in_both_layouts() -> None:
    x = torch.randn(2, 6, 3, 5)
    cl = x.contiguous(memory_format=torch.channels_last)
    expected = x.flatten(2).transpose(1, 2)
    for t in (_to_tokens(x), _to_tokens(cl)):
        assert torch.equal(t, expected)
    assert _to_tokens(cl).is_contiguous() and _to_tokens(cl).data_ptr() == cl.data_ptr()


def _step(model: SeD, x: torch.Tensor, s: torch.Tensor):
    image = x.clone().requires_grad_(True)
    out = model(image, s)
    out.square().mean().backward()
    return out.detach(), image.grad, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("variant", ["patch", "pixel"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
def test_channels_last_matches_default_layout(variant: str, fused: bool) -> None:
    """channels_last=True, False and a model moved with .to(channels_last) agree (outputs and grads)."""
    torch.manual_seed(0)
    base = tiny_sed(variant, seed=0, fused=fused, channels_last=False).eval()
    cl = copy.deepcopy(base)
    cl.channels_last = True
    moved = copy.deepcopy(base).to(memory_format=torch.channels_last)
    x, s = sed_inputs()
    o1, gx1, gp1 = _step(base, x, s)
    for model, image in ((cl, x), (moved, x.contiguous(memory_format=torch.channels_last))):
        o2, gx2, gp2 = _step(model, image, s)
        assert_close_scaled(o2, o1, 1e-5)
        assert_close_scaled(gx2, gx1, 1e-5)
        for a, b in zip(gp2, gp1):
            assert_close_scaled(a, b, 1e-4)
    assert sorted(cl.state_dict()) == sorted(base.state_dict())


def test_channels_last_default_per_variant() -> None:
    assert SeD("pixel", **TINY).uses_channels_last("cpu") is True
    assert SeD("patch", **TINY).uses_channels_last("cpu") is False
    assert SeD("pixel", channels_last=False, **TINY).uses_channels_last("cpu") is False
    assert SeD("patch", channels_last=True, **TINY).uses_channels_last("cpu") is True
    # Devices whose layouts were not measured run the reference's NCHW layout.
    assert SeD("pixel", **TINY).uses_channels_last("cuda") is False
    assert SeD("pixel", **TINY).uses_channels_last("meta") is False
    assert SeD("pixel", **TINY).channels_last is None
    assert "channels_last=auto" in repr(SeD("pixel", **TINY))
    assert "channels_last=False" in repr(SeD("pixel", channels_last=False, **TINY))


@pytest.mark.parametrize("variant", ["patch", "pixel"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_every_feature_convolution_runs_in_the_chosen_layout(variant: str, channels_last: bool) -> None:
    """No concatenation or SeFB output silently drops the layout: every image-feature conv sees it."""
    model = SeD(variant, channels_last=channels_last, **TINY)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    seen: dict[str, bool] = {}  # single-channel maps are laid out both ways at once
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Conv2d) and (leaf.startswith("conv") or leaf == "proj_context"):
            module.register_forward_pre_hook(
                lambda m, args, name=name: seen.__setitem__(name, args[0].is_contiguous(memory_format=layout))
            )
    x, s = sed_inputs(batch=2)
    model(x, s).sum().backward()
    assert len(seen) >= 8
    wrong = sorted(name for name, ok in seen.items() if not ok)
    assert not wrong, f"convolutions in the wrong layout: {wrong}"


def test_channels_last_keeps_weights_and_state_dict_contiguous(tmp_path) -> None:
    """The layout is a forward choice only: the state dict saves with safetensors unchanged."""
    from safetensors.torch import load_file, save_file

    model = SeD("pixel", **TINY)
    x, s = sed_inputs()
    model(x, s).mean().backward()
    state = model.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    save_file(state, str(tmp_path / "d.safetensors"))
    assert sorted(load_file(str(tmp_path / "d.safetensors"))) == sorted(state)


def test_channels_last_survives_pickle_and_deepcopy() -> None:
    import pickle

    model = SeD("pixel", channels_last=False, **TINY)
    assert pickle.loads(pickle.dumps(model)).channels_last is False
    assert copy.deepcopy(model).channels_last is False


def test_channels_to_space_layouts_agree() -> None:
    from sed_discriminator.sefb import channels_to_space

    x = torch.randn(2, 3 * 16, 5, 7)
    expected = channels_to_space(x, 4)
    for source in (x, x.contiguous(memory_format=torch.channels_last)):
        out = channels_to_space(source, 4, channels_last=True)
        assert torch.equal(out, expected)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(channels_to_space(source, 4), expected) and channels_to_space(source, 4).is_contiguous()


# -- upsampled maps rebuilt in backward instead of saved -------------------------------------------


def _conv_and_source(dtype=torch.float64):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 3, 1, 1, bias=False).to(dtype)
    x = torch.randn(1, 4, 5, 6, dtype=dtype, requires_grad=True)
    return conv, x


def test_conv_upsampled_equals_plain_composition_with_double_backward() -> None:
    from sed_discriminator._upsample import conv_upsampled as _conv_upsampled

    conv, x = _conv_and_source()
    size = torch.Size((10, 12))

    def plain(inp):
        return conv(F.interpolate(inp, size=size, mode="bilinear", align_corners=False))

    def rebuilt(inp):
        return _conv_upsampled(conv, inp, size)

    assert torch.equal(rebuilt(x), plain(x))
    assert torch.autograd.gradcheck(rebuilt, (x,))
    assert torch.autograd.gradgradcheck(rebuilt, (x,))
    g_plain = torch.autograd.grad(plain(x).square().sum(), [x, conv.weight])
    g_rebuilt = torch.autograd.grad(rebuilt(x).square().sum(), [x, conv.weight])
    for a, b in zip(g_rebuilt, g_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_conv_upsampled_rejects_a_source_modified_in_place() -> None:
    from sed_discriminator._upsample import conv_upsampled as _conv_upsampled

    conv, leaf = _conv_and_source()
    x = leaf * 1.0
    out = _conv_upsampled(conv, x, torch.Size((10, 12)))
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
def test_pixel_sed_frees_its_upsampled_maps_after_forward(fused: bool) -> None:
    """The 2x-upsampled inputs of conv4, conv5 and conv6 are not kept alive by the graph."""
    import weakref

    model = tiny_sed("pixel", seed=0, fused=fused)
    refs = {}
    for name in ("conv4", "conv5", "conv6"):
        getattr(model, name).register_forward_pre_hook(
            lambda m, args, name=name: refs.__setitem__(name, weakref.ref(args[0]))
        )
    x, s = sed_inputs()
    out = model(x.requires_grad_(True), s)
    assert sorted(refs) == ["conv4", "conv5", "conv6"]
    alive = [name for name, ref in refs.items() if ref() is not None]
    assert not alive, f"upsampled maps still alive after forward: {alive}"
    out.square().mean().backward()
    assert x.grad is not None and model.conv6.parametrizations.weight.original.grad is not None


def test_pixel_sed_under_disabled_saved_tensor_hooks() -> None:
    """Where a wrapper forbids saved-tensor hooks, SeD saves the maps as usual instead of failing."""
    model = tiny_sed("pixel", seed=0, fused=True)
    x, s = sed_inputs()
    expected = _step(copy.deepcopy(model), x, s)
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):
        got = _step(model, x, s)
    assert torch.equal(got[0], expected[0])
    assert_close_scaled(got[1], expected[1], 1e-6)


def test_forward_leaves_inputs_untouched() -> None:
    """The in-place activations only ever touch fresh convolution outputs."""
    model = tiny_sed("pixel", seed=0, fused=True).train()
    x, s = sed_inputs()
    x0, s0 = x.clone(), s.clone()
    model(x, s).mean().backward()
    assert torch.equal(x, x0) and torch.equal(s, s0)


# -- batched real + fake -------------------------------------------------------------------------


def _adversaries(extractor: SemanticExtractor, variant: str):
    d = tiny_sed(variant, seed=0, fused=True)
    return SeDAdversary(d, extractor=extractor), SeDAdversary(
        copy.deepcopy(d), extractor=extractor, batch_real_fake=True
    )


@pytest.mark.parametrize("variant", ["patch", "pixel"])
@pytest.mark.parametrize("loss", ["vanilla", "ragan"])
def test_batched_real_fake_equals_two_calls_in_eval_mode(tiny_extractor, variant: str, loss: str) -> None:
    two, one = _adversaries(tiny_extractor, variant)
    two.loss = one.loss = loss
    two.eval(), one.eval()
    hr, _ = sed_inputs(seed=2)
    sr, _ = sed_inputs(seed=3)
    results = []
    for adversary in (two, one):
        value = adversary.discriminator_loss(sr, hr)
        value.backward()
        results.append((value.detach(), [p.grad for p in adversary.discriminator.parameters()]))
    (l1, g1), (l2, g2) = results
    assert_close_scaled(l2, l1, 1e-6)
    for a, b in zip(g2, g1):
        assert_close_scaled(a, b, 1e-5)


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_batched_real_fake_in_training_is_one_power_iteration(tiny_extractor, variant: str) -> None:
    """Training mode: the batched call = one SN power iteration, then real and fake with those weights.

    The reference's two calls make two iterations (the fake call sees weights one iteration on).
    """
    two, one = _adversaries(tiny_extractor, variant)
    twin = copy.deepcopy(one.discriminator)
    hr, _ = sed_inputs(seed=2)
    sr, _ = sed_inputs(seed=3)
    semantic = tiny_extractor(hr)
    batched = one.train().discriminator_loss(sr, hr)

    twin.train()
    with torch.no_grad():
        twin(hr[:1], semantic[:1])  # exactly one power iteration
    twin.eval()
    expected = sd.discriminator_loss(twin(sr, semantic), real_logits=twin(hr, semantic))
    assert_close_scaled(batched.detach(), expected.detach(), 1e-6)

    reference = two.train().discriminator_loss(sr, hr)
    u_two = [b for n, b in two.discriminator.named_buffers() if n.endswith("_u")]
    u_one = [b for n, b in one.discriminator.named_buffers() if n.endswith("_u")]
    assert torch.isfinite(reference)
    assert any(not torch.equal(a, b) for a, b in zip(u_two, u_one)), "two calls must run two power iterations"


def test_batched_real_fake_default_is_off(tiny_extractor) -> None:
    adversary = SeDAdversary(tiny_sed("patch", seed=0, fused=True), extractor=tiny_extractor)
    assert adversary.batch_real_fake is False
    calls = []
    adversary.discriminator.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    hr, _ = sed_inputs(seed=2)
    sr, _ = sed_inputs(seed=3)
    adversary.discriminator_loss(sr, hr)
    assert calls == [2, 2]
    adversary.batch_real_fake = True
    calls.clear()
    adversary.discriminator_loss(sr, hr)
    assert calls == [4]


# -- benchmark scripts ---------------------------------------------------------------------------


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_benchmark_help_and_dry_run() -> None:
    proc = _bench("--help")
    assert proc.returncode == 0 and "--quick" in proc.stdout
    proc = _bench("--dry-run", "--quick")
    assert proc.returncode == 0, proc.stderr
    assert "(baseline)" in proc.stdout and "configurations" in proc.stdout
    proc = _bench("--dry-run", "--device", "cuda", "--suites", "gpu", "--batch", "8")
    assert proc.returncode == 0, proc.stderr
    assert "step pixel 1024 b8" in proc.stdout


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import _harness

        yield _harness
    finally:
        sys.path.remove(str(BENCH.parent))


@pytest.mark.parametrize(
    "cfg",
    [
        dict(kind="disc", variant="pixel", size=32),
        dict(kind="disc", variant="patch", size=32, path="math", dtype="bf16", layout="cl"),
        dict(kind="sefb", variant="pixel", level="att1", size=64),
        dict(kind="step", variant="patch", size=32, semantics="per_call", extractor_mode="inference"),
        dict(kind="step", variant="pixel", size=32, batched=True),
        dict(kind="extractor", size=32, layout="cl"),
        dict(kind="disc", variant="pixel", size=32, layout="nchw"),
        dict(kind="sefb", variant="pixel", level="att2", size=64, layout="nchw"),
    ],
    ids=["disc", "disc-math-bf16-cl", "sefb", "step-per-call", "step-batched", "extractor", "disc-nchw", "sefb-nchw"],
)
def test_benchmark_harness_measures_tiny_configs(harness, cfg: dict) -> None:
    result = harness.measure({**cfg, "tiny": True, "batch": 2, "warmup": 1, "repeats": 1})
    assert len(result["times"]) == 1 and result["time"] > 0 and isinstance(result["peak"], (int, float))
    assert set(result) >= {"times", "cpu_times", "time", "cpu_time", "first", "peak", "peak_abs", "peak_method"}


@pytest.mark.parametrize("layout", ["default", "nchw"])
def test_benchmark_harness_builds_the_requested_layout(harness, layout: str) -> None:
    model = harness._build_disc({"variant": "pixel", "tiny": True, "layout": layout}, torch.device("cpu"))
    assert model.uses_channels_last("cpu") is (layout == "default")
    assert all(p.is_contiguous() for p in model.parameters())


def test_paired_ratio_script_runs_tiny() -> None:
    script = ROOT / "benchmarks" / "paired_ratio.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--tiny", "--size", "32", "--pairs", "2", "--variant", "patch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "median of pair ratios" in proc.stdout and "(pairs: " in proc.stdout


def test_gpu_check_script_is_valid_bash() -> None:
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert script.exists()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
