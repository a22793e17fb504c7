"""The trainer-agnostic pieces and the traiNNer-redux / neosr adapters, against stand-ins.

The stand-in models call ``net_d`` the way the trainers' model classes do at the versions read
(docs/integrations.md): traiNNer-redux's ``SRModel.optimize_parameters(current_iter,
current_accum_iter, apply_gradient)`` under autocast with ``_real_hr`` as the real batch where
set, and neosr's ``closure`` with the generator's GAN term under ``torch.inference_mode()`` and
every discriminator call in ``eval()``. Tests against the real clones are opt-in:
``SED_TRAINNER_PATH=/path/to/traiNNer-redux`` and ``SED_NEOSR_PATH=/path/to/neosr`` (in an
environment with the clone's requirements installed).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import CreatesMarker, assert_same, perturbed, sed_inputs
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel

from sed_discriminator import SeD, SemanticExtractor
from sed_discriminator._state import UntrustedFileError, torch_is_patched
from sed_discriminator.integrations import _common, neosr, trainner
from sed_discriminator.integrations._common import TrainerConditionedSeD, step_condition

WIDTH = 8
PACKAGE = Path(_common.__file__).resolve().parents[1]


def legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under the authors' (pre-parametrization) spectral-norm names; the real-clone scripts reuse it."""
    names = {"parametrizations.weight.original": "weight_orig", "parametrizations.weight.0._u": "weight_u",
             "parametrizations.weight.0._v": "weight_v"}  # fmt: skip
    legacy = {}
    for key, value in state.items():
        for new, old in names.items():
            key = key.replace(new, old)
        legacy[key] = value
    return legacy


@pytest.fixture(scope="module")
def extractor() -> SemanticExtractor:
    with pytest.warns(UserWarning, match="RANDOM"):
        return SemanticExtractor("clip_rn50", pretrained=None)


def _net_d(extractor: SemanticExtractor, variant: str = "patch") -> TrainerConditionedSeD:
    return TrainerConditionedSeD(variant, extractor=extractor, width=WIDTH)


class _Recorder:
    """Wraps a ConditionedSeD's forward: records (mode, inference mode, has condition, input) per call."""

    def __init__(self, net: TrainerConditionedSeD) -> None:
        self.calls: list[tuple[bool, bool, bool, torch.Tensor]] = []
        forward = net.forward

        def recording_forward(x, semantic=None):
            self.calls.append((net.training, torch.is_inference_mode_enabled(), net.has_condition, x.detach().clone()))
            return forward(x, semantic)

        net.forward = recording_forward


class TrainnerLikeModel:
    """Calls net_d like traiNNer-redux's SRModel.optimize_parameters (G step, then D step, AMP, accumulation)."""

    def __init__(self, net_d: nn.Module, *, use_amp: bool = False, accum_iters: int = 1) -> None:
        self.net_g = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(3, 3, 3, padding=1))
        self.net_d = net_d
        self.optimizer_g = torch.optim.Adam(self.net_g.parameters(), 1e-3)
        self.optimizer_d = torch.optim.Adam(self.net_d.parameters(), 1e-3)
        self.use_amp, self.amp_dtype, self.accum_iters = use_amp, torch.bfloat16, accum_iters
        self.gt = self.lq = self.output = self._real_hr = None
        self.d_grad_norms: list[float] = []

    def feed_data(self, data: dict[str, torch.Tensor]) -> None:
        self.lq, self.gt = data["lq"], data["gt"]

    def optimize_parameters(self, current_iter: int, current_accum_iter: int, apply_gradient: bool) -> None:
        for p in self.net_d.parameters():
            p.requires_grad = False
        with torch.autocast(device_type="cpu", dtype=self.amp_dtype, enabled=self.use_amp):
            self.output = self.net_g(self.lq)
            fake_g_pred = self.net_d(self.output)
            l_g = nn.functional.l1_loss(self.output, self.gt) + 0.01 * nn.functional.softplus(-fake_g_pred).mean()
        (l_g / self.accum_iters).backward()
        if apply_gradient:
            self.optimizer_g.step()
            self.optimizer_g.zero_grad()
        for p in self.net_d.parameters():
            p.requires_grad = True
        with torch.autocast(device_type="cpu", dtype=self.amp_dtype, enabled=self.use_amp):
            real_d_pred = self.net_d(self._real_hr if self._real_hr is not None else self.gt)
            fake_d_pred = self.net_d(self.output.detach())
            l_d = nn.functional.softplus(-real_d_pred).mean() + nn.functional.softplus(fake_d_pred).mean()
        (l_d / self.accum_iters).backward()
        self.log_dict = {"l_d": float(l_d.detach())}  # the trainers build a new log dict every step
        if apply_gradient:
            self.d_grad_norms.append(float(sum(p.grad.norm() for p in self.net_d.parameters() if p.grad is not None)))
            self.optimizer_d.step()
            self.optimizer_d.zero_grad()


class NeosrLikeModel(TrainnerLikeModel):
    """Calls net_d like neosr's image model: GAN term under inference_mode, every D call in eval()."""

    def closure(self, current_iter: int) -> torch.Tensor:
        for p in self.net_d.parameters():
            p.requires_grad = False
        self.output = self.net_g(self.lq)
        l_g_total = nn.functional.l1_loss(self.output, self.gt)
        self.net_d.eval()
        with torch.inference_mode():
            fake_g_pred = self.net_d(self.output)
        self.l_g_gan = nn.functional.softplus(-fake_g_pred).mean()
        l_g_total = l_g_total + self.l_g_gan
        self.net_d.train()
        l_g_total.backward()
        for p in self.net_d.parameters():
            p.requires_grad = True
        self.net_d.eval()
        real_d_pred = self.net_d(self.gt)
        fake_d_pred = self.net_d(self.output.detach())
        self.net_d.train()
        l_d = nn.functional.softplus(-real_d_pred).mean() + nn.functional.softplus(fake_d_pred).mean()
        l_d.backward()
        self.log_dict = {"l_d": float(l_d.detach())}
        return l_g_total

    def optimize_parameters(self, current_iter: int) -> None:  # type: ignore[override]
        self.closure(current_iter)
        self.closure(current_iter)  # neosr's SAM optimizer runs the closure a second time in the same step
        self.optimizer_g.step()
        self.optimizer_d.step()
        self.optimizer_g.zero_grad()
        self.optimizer_d.zero_grad()


def _batch(seed: int = 0, n: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 3, 32, 32, generator=gen)
    return {"gt": gt, "lq": nn.functional.avg_pool2d(gt, 2)}


# -- the registered architecture -----------------------------------------------------------------


def test_arch_loads_legacy_spectral_norm_keys_strictly_also_under_a_prefix(extractor: SemanticExtractor) -> None:
    source = _net_d(extractor)
    state = source.state_dict()
    legacy = legacy_keys(state)
    assert sum(k.endswith("weight_orig") for k in legacy) == 6
    target = _net_d(extractor)
    assert set(target.map_state_dict(legacy)) == set(state)
    target.load_state_dict(legacy, strict=True)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())

    # nested, as in neosr's EMA copy (AveragedModel keeps the network under "module.")
    wrapper = nn.Module()
    wrapper.module = _net_d(extractor)
    wrapper.load_state_dict({f"module.{k}": v for k, v in legacy.items()}, strict=True)
    loaded, expected = wrapper.module.conv1.parametrizations.weight, source.conv1.parametrizations.weight
    assert torch.equal(loaded.original, expected.original)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        _net_d(extractor).load_state_dict({**legacy, "conv1.weight_w": torch.zeros(1)}, strict=True)


def test_arch_without_condition_names_the_trainer_model_types(extractor: SemanticExtractor) -> None:
    with pytest.raises(RuntimeError, match="SeDSRGANModel.*sed_discriminator.integrations.basicsr.*trainner"):
        _net_d(extractor)(torch.rand(1, 3, 32, 32))


def test_arch_pretrained_false_means_random_weights() -> None:
    with pytest.warns(UserWarning, match="RANDOM"):
        net = TrainerConditionedSeD("patch", width=WIDTH, pretrained=False)
    assert net.extractor is not None and net.extractor.pretrained is None


def test_step_condition_is_a_no_op_for_other_discriminators_and_clears_on_error(extractor: SemanticExtractor) -> None:
    with step_condition(nn.Conv2d(3, 1, 3), None):
        pass
    with step_condition(None, None):
        pass
    net = _net_d(extractor)
    with pytest.raises(RuntimeError, match="no HR batch.*NoneType.*ground truth"):
        with step_condition(net, None):
            pass
    with pytest.raises(ValueError, match="boom"):
        with step_condition(net, torch.rand(2, 3, 32, 32)):
            assert net.has_condition
            raise ValueError("boom")
    assert not net.has_condition


def test_bare_discriminator_looks_through_compile_and_ddp_wrappers() -> None:
    net = TrainerConditionedSeD("patch", width=WIDTH, semantic_fusion=False)
    compiled = torch.compile(net)  # neosr's `compile = true` compiles net_d; nothing is compiled before a call
    assert _common.bare_discriminator(compiled) is net
    assert _common.bare_discriminator(nn.Conv2d(3, 1, 3)) is None and _common.bare_discriminator(None) is None
    with pytest.raises(RuntimeError, match="DataParallel"):
        _common.bare_discriminator(nn.DataParallel(compiled))


def test_data_parallel_is_refused_and_other_networks_are_not() -> None:
    net = nn.DataParallel(TrainerConditionedSeD("patch", width=WIDTH, semantic_fusion=False))
    model = TrainnerLikeModel(net)
    with pytest.raises(RuntimeError, match="DataParallel.*torchrun --nproc_per_node=N -m .*integrations.trainner"):
        trainner.hook_model(model)
    with pytest.raises(RuntimeError, match="DataParallel.*integrations.neosr"):
        neosr.hook_model(NeosrLikeModel(net))
    trainner.hook_model(TrainnerLikeModel(nn.DataParallel(nn.Conv2d(3, 1, 3))))


def test_no_module_outside_integrations_imports_a_trainer() -> None:
    trainers = {"basicsr", "realesrgan", "traiNNer", "neosr"}
    for path in PACKAGE.rglob("*.py"):
        if "integrations" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & trainers, f"{path} imports a trainer"


class TestTrainerConditionedSeD:
    """The registered architecture with its step condition, per kind as in kornia: smoke, shape, errors, compile."""

    @staticmethod
    def _pair(extractor: SemanticExtractor, variant: str = "patch", **to: object) -> tuple[TrainerConditionedSeD, SeD]:
        """The registered class and a plain SeD with the same weights (``to`` moves an extractor copy)."""
        net = TrainerConditionedSeD(variant, extractor=copy.deepcopy(extractor) if to else extractor, width=WIDTH)
        net = net.to(**to)
        plain = SeD(variant, width=WIDTH, semantic_channels=extractor.channels).to(**to)
        plain.load_state_dict(net.state_dict(), strict=True)
        return net, plain

    def test_smoke(self, extractor: SemanticExtractor, device: torch.device, dtype: torch.dtype) -> None:
        net, plain = self._pair(extractor, device=device, dtype=dtype)
        hr, sr = (torch.rand(2, 3, 32, 32, device=device, dtype=dtype) for _ in range(2))
        with step_condition(net, hr):
            logits = net(sr)
        assert logits.dtype == dtype and logits.device.type == device.type
        # the stored condition is the HR batch's semantics: the plain SeD given them explicitly agrees exactly
        assert torch.equal(logits, plain(sr, net.extractor(hr).to(dtype)))  # the extractor keeps its own dtype
        assert not net.has_condition

    @pytest.mark.parametrize(("variant", "size"), [("patch", (32, 32)), ("pixel", (48, 32))])
    def test_shape(self, extractor: SemanticExtractor, variant: str, size: tuple[int, int]) -> None:
        net, plain = self._pair(extractor, variant)
        hr, sr = torch.rand(2, 3, *size), torch.rand(2, 3, *size)
        with step_condition(net, hr):
            logits = net(sr)
        assert logits.shape == plain(sr, net.extractor(hr)).shape
        if variant == "pixel":
            assert logits.shape == (2, 1, *size)  # U+SeD: one logit per pixel

    def test_exception(self, extractor: SemanticExtractor) -> None:
        net, _ = self._pair(extractor)
        with pytest.raises(RuntimeError, match="without the HR condition of the step.*SeDSRGANModel.*semantic_source"):
            net(torch.rand(2, 3, 32, 32))
        with step_condition(net, torch.rand(2, 3, 32, 32)):
            with pytest.raises(RuntimeError, match="condition holds 2 images but the input has 3"):
                net(torch.rand(3, 3, 32, 32))
        with pytest.raises(RuntimeError, match="cannot run under nn.DataParallel.*torchrun"):
            with step_condition(nn.DataParallel(net), torch.rand(2, 3, 32, 32)):
                pass
        with pytest.raises(ValueError, match="Unknown SeD variant 'patchgan'"):
            TrainerConditionedSeD("patchgan", extractor=extractor, width=WIDTH)

    @pytest.mark.slow
    def test_compile_matches_eager(self, extractor: SemanticExtractor) -> None:
        # neosr's `compile = true` compiles net_d; the condition goes to the module inside the compiled wrapper
        net, _ = self._pair(extractor)
        compiled = torch.compile(net, backend="eager")  # dynamo's graph capture; inductor would cost minutes on CPU
        hr, sr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
        with step_condition(compiled, hr):
            eager, traced = net(sr), compiled(sr)
        torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("module", [neosr, trainner])
def test_0_2_class_name_still_imports_with_a_deprecation(module) -> None:
    with pytest.warns(DeprecationWarning, match=re.escape(f"{module.__name__}.ConditionedSeD is deprecated since")):
        exec(f"from {module.__name__} import ConditionedSeD", namespace := {})
    assert namespace["ConditionedSeD"] is TrainerConditionedSeD
    with pytest.warns(DeprecationWarning, match="removed in 0.4.*TrainerConditionedSeD from sed_discriminator.integ"):
        assert module.ConditionedSeD is TrainerConditionedSeD
    with pytest.raises(AttributeError, match="has no attribute 'ConditionedSeDx'"):
        module.ConditionedSeDx  # noqa: B018


# -- traiNNer-redux ----------------------------------------------------------------------------


def test_trainner_hook_conditions_every_d_call_on_the_real_batch(extractor: SemanticExtractor) -> None:
    net = _net_d(extractor)
    rec = _Recorder(net)
    model = trainner.hook_model(TrainnerLikeModel(net))
    assert trainner.hook_model(model).optimize_parameters is model.optimize_parameters  # twice: no double wrap
    for it in (1, 2):
        model.feed_data(_batch(it))
        model.optimize_parameters(it, 0, True)
        assert not net.has_condition  # cleared after the step
    assert len(rec.calls) == 6 and all(cond for _, _, cond, _ in rec.calls)
    assert torch.equal(rec.calls[4][3], _batch(2)["gt"])  # the real call of step 2 judges that step's gt

    # ECO: the real batch is _real_hr, and so is the condition
    real = torch.rand(2, 3, 32, 32)
    model.feed_data(_batch(3))
    model._real_hr = real
    seen = []
    original = net.set_condition
    net.set_condition = lambda hr: (seen.append(hr), original(hr))[1]
    model.optimize_parameters(3, 0, True)
    assert seen[-1] is real


def test_trainner_hook_with_accumulation_and_bf16_autocast(extractor: SemanticExtractor) -> None:
    net = _net_d(extractor)
    model = trainner.hook_model(TrainnerLikeModel(net, use_amp=True, accum_iters=2))
    for accum, apply in ((0, False), (1, True)):  # one step accumulated over two batches
        model.feed_data(_batch(accum))
        model.optimize_parameters(1, accum, apply)
    assert len(model.d_grad_norms) == 1 and model.d_grad_norms[0] > 0


def test_without_the_hook_a_stale_condition_is_refused(extractor: SemanticExtractor) -> None:
    # what the hook prevents: the previous step's condition used after D's optimizer step
    net = _net_d(extractor)
    model = TrainnerLikeModel(net)
    model.feed_data(_batch())
    net.set_condition(model.gt)
    model.optimize_parameters(1, 0, True)
    with pytest.raises(RuntimeError, match="stale"):
        model.optimize_parameters(2, 0, True)


def test_trainner_hook_finds_the_bare_model_under_ddp(extractor: SemanticExtractor, tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        bare = _net_d(extractor)
        model = trainner.hook_model(TrainnerLikeModel(nn.parallel.DistributedDataParallel(bare)))
        seen = []
        original = bare.set_condition
        bare.set_condition = lambda hr: (seen.append(hr), original(hr))[1]
        model.feed_data(_batch())
        model.optimize_parameters(1, 0, True)
        assert len(seen) == 1 and seen[0] is model.gt and not bare.has_condition
    finally:
        dist.destroy_process_group()


# -- neosr -----------------------------------------------------------------------------------------


def test_neosr_hook_holds_through_inference_mode_eval_calls_and_a_second_closure(extractor: SemanticExtractor) -> None:
    net = _net_d(extractor)
    rec = _Recorder(net)
    model = neosr.hook_model(NeosrLikeModel(net))
    before = [p.detach().clone() for p in net.parameters()]
    model.feed_data(_batch())
    model.optimize_parameters(1)
    assert len(rec.calls) == 6 and all(cond for _, _, cond, _ in rec.calls)
    modes = [(training, inference) for training, inference, _, _ in rec.calls[:3]]
    assert modes == [(False, True), (False, False), (False, False)]  # (train mode, inference mode) per call
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))  # D trained
    # neosr's generator GAN term: computed under inference_mode, it carries no gradient to G
    assert not model.l_g_gan.requires_grad
    assert not net.has_condition


def test_eval_mode_calls_leave_spectral_norm_power_iteration_still(extractor: SemanticExtractor) -> None:
    # why neosr's eval-mode D step matters for a spectral-norm discriminator such as SeD
    net = _net_d(extractor)
    u = net.conv1.parametrizations.weight[0]._u
    start = u.clone()
    hr = torch.rand(2, 3, 32, 32)
    with net.condition(hr):
        net.eval()
        net(hr)
        assert torch.equal(u, start)
        net.train()
        net(hr)
    assert not torch.equal(u, start)


DIAGNOSTICS = {"sem_influence", "attn_sharpness_att1", "attn_sharpness_att2", "attn_sharpness_att3"}


@pytest.mark.parametrize("adapter", [trainner, neosr])
def test_log_dict_gets_the_diagnostics_every_n_iterations(adapter, extractor: SemanticExtractor) -> None:
    net = TrainerConditionedSeD("patch", extractor=extractor, width=WIDTH, diagnostics_every=2)
    model = adapter.hook_model((TrainnerLikeModel if adapter is trainner else NeosrLikeModel)(net))
    logs = []
    for it in (1, 2, 3):
        model.feed_data(_batch(it))
        model.optimize_parameters(*((it, 0, True) if adapter is trainner else (it,)))
        logs.append(dict(model.log_dict))
    assert set(logs[0]) == {"l_d"}  # iteration 1: not measured yet
    assert set(logs[1]) == {"l_d"} | DIAGNOSTICS
    assert 0 <= logs[1]["sem_influence"] < float("inf")
    assert all(0 <= logs[1][f"attn_sharpness_att{i}"] <= 1 for i in (1, 2, 3))
    assert {k: logs[2][k] for k in DIAGNOSTICS} == {k: logs[1][k] for k in DIAGNOSTICS}  # the latest stays logged
    assert not net.has_condition


def test_diagnostics_every_zero_logs_nothing_and_a_bad_value_says_how_to_fix(extractor: SemanticExtractor) -> None:
    model = trainner.hook_model(TrainnerLikeModel(TrainerConditionedSeD("patch", extractor=extractor, width=WIDTH,
                                                                        diagnostics_every=0)))  # fmt: skip
    model.feed_data(_batch())
    model.optimize_parameters(100, 0, True)
    assert set(model.log_dict) == {"l_d"}
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"diagnostics_every must be a whole number.*set it under network_d"):
            TrainerConditionedSeD("patch", extractor=extractor, width=WIDTH, diagnostics_every=bad)


def test_a_batch_of_one_warns_instead_of_measuring(extractor: SemanticExtractor) -> None:
    model = trainner.hook_model(TrainnerLikeModel(TrainerConditionedSeD("patch", extractor=extractor, width=WIDTH,
                                                                        diagnostics_every=1)))  # fmt: skip
    model.feed_data(_batch(n=1))
    with pytest.warns(UserWarning, match="batch of at least 2 images.*diagnostics_every: 0"):
        model.optimize_parameters(1, 0, True)
    assert set(model.log_dict) == {"l_d"}


# -- D's checkpoints in traiNNer-redux and neosr: pretrain_network_d and save_network ----------------------


class TrainnerCheckpoints:
    """traiNNer-redux's BaseModel checkpoint methods at commit 6862931: their signatures, torch.load/save bodies.

    As in its SRModel, the constructor loads ``path.pretrain_network_d`` into ``net_d`` (so the
    adapter hooks the class, before ``hook_model`` sees a model). ``save()`` is SRModel's for
    ``net_d``; ``save_network`` switches schedule-free optimizers to eval() while it writes.
    """

    def __init__(self, net_d: nn.Module, folder: Path, *, fmt: str = "pth", **path: object) -> None:
        path = {"pretrain_network_d": None, "strict_load_d": True, "param_key_d": None, "resume_models": str(folder),
                **path}  # fmt: skip
        self.opt = SimpleNamespace(path=SimpleNamespace(**path), logger=SimpleNamespace(save_checkpoint_format=fmt))
        self.net_d, self.optimizers, self.own_loads = net_d, [], []
        if self.opt.path.pretrain_network_d is not None:
            p = self.opt.path
            self.load_network(self.net_d, p.pretrain_network_d, p.strict_load_d, p.param_key_d)

    def load_network(self, net: nn.Module, load_path: str, strict: bool = True, param_key: str | None = "params"):
        self.own_loads.append(load_path)
        state = torch.load(load_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state[param_key] if param_key in state else state.get("params", state), strict=strict)

    def save_network(self, net: nn.Module, net_label: str, save_dir: str, current_iter: int, param_key: str) -> None:
        for o in self.optimizers:
            o.eval()
        label = "latest" if current_iter == -1 else str(current_iter)
        path = os.path.join(save_dir, f"{net_label}_{label}.{self.opt.logger.save_checkpoint_format}")
        state = {k.removeprefix("module."): v.cpu() for k, v in net.state_dict().items()}
        if self.opt.logger.save_checkpoint_format == "safetensors":
            save_file(state, path)
        else:
            torch.save(state, path)
        for o in self.optimizers:
            o.train()

    def optimize_parameters(self, current_iter: int, current_accum_iter: int, apply_gradient: bool) -> None:
        pass  # hook_model wraps it; the steps are tested with TrainnerLikeModel

    def save(self, current_iter: int) -> None:
        self.save_network(self.net_d, "net_d", self.opt.path.resume_models, current_iter, "params")


class NeosrCheckpoints:
    """neosr's ``base`` checkpoint methods at commit 31c7022: their signatures, torch.load/save bodies.

    As in its ``image`` model, the constructor loads ``path.pretrain_network_d``; ``save()`` saves
    D's EMA copy (an ``AveragedModel``) where there is one, as ``{"params": ...}``.
    """

    def __init__(self, net_d: nn.Module, folder: Path, **path: object) -> None:
        self.opt = {"path": {"models": folder, **path}}
        self.net_d, self.net_d_ema, self.own_loads = net_d, None, []
        load_path = self.opt["path"].get("pretrain_network_d", None)
        if load_path is not None:
            param_key = self.opt["path"].get("param_key_d")
            self.load_network(self.net_d, load_path, param_key, self.opt["path"].get("strict_load_d", True))

    def load_network(self, net: nn.Module, load_path: str, param_key: str, strict: bool = True) -> None:
        self.own_loads.append(load_path)
        state = torch.load(load_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("params", state), strict=strict)

    def save_network(self, net, net_label, current_iter, param_key="params") -> None:
        if current_iter == -1:
            current_iter = "latest"
        nets, keys = (net, param_key) if isinstance(net, list) else ([net], [param_key])
        save_dict = {
            key: {k.removeprefix("module."): v.cpu() for k, v in n.state_dict().items() if k != "n_averaged"}
            for n, key in zip(nets, keys)
        }
        torch.save(save_dict, Path(self.opt["path"]["models"]) / f"{net_label}_{current_iter}.pth")

    def optimize_parameters(self, current_iter: int) -> None:
        pass

    def save(self, current_iter: int) -> None:
        self.save_network(self.net_d_ema if self.net_d_ema is not None else self.net_d, "net_d", current_iter)


CHECKPOINTS = {"trainner": (trainner.TRAINNER, TrainnerCheckpoints), "neosr": (neosr.NEOSR, NeosrCheckpoints)}


def _hooked_class(name: str) -> type:
    """The stand-in's class hooked as ``install()`` hooks the trainer's base class (a fresh subclass per test)."""
    adapter, base = CHECKPOINTS[name]
    return adapter.hook_checkpoints(type(f"Hooked{base.__name__}", (base,), {}))


def _plain_d(**kwargs: object) -> TrainerConditionedSeD:
    return TrainerConditionedSeD("patch", width=WIDTH, semantic_fusion=False, **kwargs)


def test_trust_pickle_d_is_a_network_d_key_outside_the_state_dict() -> None:
    net = _plain_d(trust_pickle_d=True)
    assert net.trust_pickle_d is True and _plain_d().trust_pickle_d is False
    assert list(net.state_dict()) == list(SeD("patch", width=WIDTH, semantic_fusion=False).state_dict())
    assert copy.deepcopy(net).trust_pickle_d is True  # neosr's AveragedModel deep-copies D
    with pytest.raises(ValueError, match="trust_pickle_d must be true or false, got 'yes'.*under network_d"):
        _plain_d(trust_pickle_d="yes")


@pytest.mark.parametrize("key", ["semantic_fusion", "channels_last", "trust_pickle_d", "strict_load_d"])
def test_quoted_config_flags_are_refused_with_the_key(key: str, tmp_path: Path) -> None:
    unquoted = r"write true(, false or null| or false) unquoted under {} \(a quoted 'false' is a string"
    if key == "strict_load_d":
        save_file(SeD("patch", width=WIDTH, semantic_fusion=False).state_dict(), tmp_path / "d.safetensors")
        with pytest.raises(ValueError, match=r"strict_load_d must be true or false, got 'false' \(str\); "
                                             + unquoted.format(r"path in options\.yml")):  # fmt: skip
            _common.load_sed_checkpoint(_plain_d(), tmp_path / "d.safetensors", strict="false", config="options.yml")
        return
    where = unquoted.format("network_d in the trainer's config")
    with pytest.raises(ValueError, match=rf"{key} must be true.* got 'false' \(str\); " + where):
        TrainerConditionedSeD("patch", width=WIDTH, pretrained=None, **{"semantic_fusion": False, key: "false"})


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_pretrain_network_d_follows_the_trust_rule(name: str, tmp_path: Path, old_torch) -> None:
    state = perturbed(SeD("patch", width=WIDTH, semantic_fusion=False)).state_dict()
    torch.save({"params": {f"module.{k}": v for k, v in legacy_keys(state).items()}}, tmp_path / "d.pth")  # authors'
    save_file(state, tmp_path / "d.safetensors")
    cls = _hooked_class(name)
    config = CHECKPOINTS[name][0].config
    with pytest.raises(UntrustedFileError, match=rf"pretrain_network_d: Refusing .*d\.pth.*torch 2\.5\.1.*In {config}: "
                                                 r"set `trust_pickle_d(: | = )true` under \[?network_d"):  # fmt: skip
        cls(_plain_d(), tmp_path, pretrain_network_d=str(tmp_path / "d.pth"))
    trusted = cls(_plain_d(trust_pickle_d=True), tmp_path, pretrain_network_d=str(tmp_path / "d.pth"))
    assert_same(trusted.net_d.state_dict(), state)
    shared = cls(_plain_d(), tmp_path, pretrain_network_d=tmp_path / "d.safetensors")  # neosr's resume passes a Path
    assert_same(shared.net_d.state_dict(), state)
    assert trusted.own_loads == shared.own_loads == []  # the trainer's own torch.load never read them
    with pytest.raises(FileNotFoundError, match=f"pretrain_network_d: no file at .*check the path in {config}"):
        cls(_plain_d(), tmp_path, pretrain_network_d=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("trust", [False, True], ids=["default", "trust_pickle_d"])
@pytest.mark.parametrize("version", ["installed", "2.5.1"])
def test_a_crafted_pickle_never_runs_through_pretrain_network_d(
    name: str, trust: bool, version: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "MARKER_code_ran"
    crafted = tmp_path / "crafted_d.pth"
    torch.save({"params": {"conv1.weight": torch.zeros(2, 2), "evil": CreatesMarker(marker)}}, crafted)
    if version != "installed":
        monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(ValueError) as info:
        _hooked_class(name)(_plain_d(trust_pickle_d=trust), tmp_path, pretrain_network_d=str(crafted))
    assert not marker.exists(), "code in the file ran"
    message = str(info.value)
    assert message.startswith("pretrain_network_d: ") and "crafted_d.pth" in message
    if not torch_is_patched() and not trust:  # refused before the file is unpickled at all
        assert isinstance(info.value, UntrustedFileError) and "trust_pickle_d" in message
    else:  # torch.load(weights_only=True) refuses the object
        assert "holds Python objects other than tensors" in message


def _logits_match(net: TrainerConditionedSeD, path: Path, channels: int) -> None:
    fresh = SeD("patch", width=WIDTH, semantic_channels=channels)
    fresh.load_state_dict(load_file(path), strict=True)
    x, s = sed_inputs(semantic_channels=channels)
    net.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x, s), net(x, s))


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_save_network_writes_a_safetensors_file_beside_the_trainers(
    name: str, extractor: SemanticExtractor, tmp_path: Path
) -> None:
    adapter, base = CHECKPOINTS[name]
    net = perturbed(_net_d(extractor))
    model = adapter.hook_model(base(net, tmp_path))
    model.save(7)
    model.save(-1)
    own = torch.load(tmp_path / "net_d_7.pth", weights_only=True)  # the trainer's own file, as before
    own = own.get("params", own)
    assert_same(own, net.state_dict())
    for label in ("7", "latest"):
        _logits_match(net, tmp_path / f"net_d_{label}.safetensors", extractor.channels)
    with safe_open(tmp_path / "net_d_7.safetensors", "pt") as f:
        assert f.metadata() == {"variant": "patch"}


def test_trainner_safetensors_holds_the_weights_the_trainer_saved(tmp_path: Path) -> None:
    class SchedulefreeLike:  # schedule-free optimizers swap in other weights for eval() (saving)
        def __init__(self, net: nn.Module) -> None:
            self.params = list(net.parameters())

        def eval(self) -> None:
            with torch.no_grad():
                for p in self.params:
                    p.add_(1.0)

        def train(self) -> None:
            with torch.no_grad():
                for p in self.params:
                    p.sub_(1.0)

    net = perturbed(_plain_d())
    model = trainner.hook_model(TrainnerCheckpoints(net, tmp_path))
    model.optimizers = [SchedulefreeLike(net)]
    model.save(3)
    own, shared = torch.load(tmp_path / "net_d_3.pth", weights_only=True), load_file(tmp_path / "net_d_3.safetensors")
    assert_same(dict(sorted(shared.items())), dict(sorted(own.items())))  # safetensors sorts the keys
    assert not torch.equal(shared["conv1.parametrizations.weight.original"],
                           net.state_dict()["conv1.parametrizations.weight.original"])  # fmt: skip

    # traiNNer-redux's default format is safetensors: its own file is the one to share, nothing is added
    (tmp_path / "st").mkdir()
    model = trainner.hook_model(TrainnerCheckpoints(net, tmp_path / "st", fmt="safetensors"))
    model.save(3)
    assert [p.name for p in (tmp_path / "st").iterdir()] == ["net_d_3.safetensors"]
    own = tmp_path / "st" / "net_d_3.safetensors"
    with safe_open(own, "pt") as f:
        assert f.metadata() is None  # the trainer's file, not rewritten
    SeD("patch", width=WIDTH, semantic_fusion=False).load_state_dict(load_file(own), strict=True)


def test_neosr_safetensors_holds_ds_ema_copy(tmp_path: Path) -> None:
    net = perturbed(_plain_d())
    model = neosr.hook_model(NeosrCheckpoints(net, tmp_path))
    model.net_d_ema = AveragedModel(net)
    perturbed(net, seed=1)  # the live D moves on; neosr saves the EMA copy
    model.save(4)
    shared = load_file(tmp_path / "net_d_4.safetensors")
    own = torch.load(tmp_path / "net_d_4.pth", weights_only=True)["params"]
    assert_same(dict(sorted(shared.items())), dict(sorted(own.items())))  # safetensors sorts the keys
    assert_same(dict(sorted(model.net_d_ema.module.state_dict().items())), dict(sorted(shared.items())))
    SeD("patch", width=WIDTH, semantic_fusion=False).load_state_dict(shared, strict=True)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_checkpoint_hooks_are_idempotent_and_leave_other_networks_alone(name: str, tmp_path: Path) -> None:
    adapter, base = CHECKPOINTS[name]
    cls = _hooked_class(name)
    load, save = cls.load_network, cls.save_network
    adapter.hook_checkpoints(cls)
    assert (cls.load_network, cls.save_network) == (load, save)
    conv = nn.Conv2d(3, 1, 3)
    torch.save({"params": conv.state_dict()}, tmp_path / "conv.pth")
    model = cls(nn.Conv2d(3, 1, 3), tmp_path, pretrain_network_d=str(tmp_path / "conv.pth"))
    assert model.own_loads == [str(tmp_path / "conv.pth")]  # the trainer's own loader, as without the adapter
    assert_same(model.net_d, conv)
    adapter.hook_model(model)  # a model of a hooked class gets no second wrapper
    assert "load_network" not in vars(model) and "save_network" not in vars(model)
    model.save(2)
    assert (tmp_path / "net_d_2.pth").is_file() and not (tmp_path / "net_d_2.safetensors").exists()

    plain = adapter.hook_model(base(_plain_d(), tmp_path))  # hooked instance: twice changes nothing
    load, save = plain.load_network, plain.save_network
    adapter.hook_model(plain)
    assert (plain.load_network, plain.save_network) == (load, save)


# -- the launchers, against stand-in clones --------------------------------------------------------

_STAND_IN_TRAIN = """
import json, os, sys
import torch
from {package}.models import build_model
model = build_model({{"argv": sys.argv[1:]}})
for it in (1, 2):
    model.feed_data({{"gt": torch.rand(2, 3, 32, 32), "lq": torch.rand(2, 3, 16, 16)}})
    model.optimize_parameters(*{step_args})
conditioned = getattr(model.optimize_parameters, "__sed_conditioned__", False)
registered = "{arch}" in __import__("{package}.utils.registry", fromlist=["x"]).ARCH_REGISTRY._obj_map
base = getattr(__import__("{base_module}", fromlist=["x"]), "{base_class}")
base_hooked = [getattr(getattr(base, m), "__sed_conditioned__", False) for m in ("load_network", "save_network")]
result = {{"argv": sys.argv, "cwd": os.getcwd(), "conditioned": conditioned, "arch": registered,
           "base_hooked": base_hooked}}
json.dump(result, open(sys.argv[-1], "w"))
"""

_STAND_IN_BASE = """
class {base_class}:  # the trainer's model base class: install() hooks its checkpoint methods
    def load_network(self, net, load_path, strict=True, param_key="params"):
        raise AssertionError("not called by the stand-in")

    def save_network(self, net, net_label, current_iter, param_key="params"):
        raise AssertionError("not called by the stand-in")
"""

_STAND_IN_REGISTRY = """
class Registry:
    def __init__(self, name):
        self._name, self._obj_map = name, {}
ARCH_REGISTRY = Registry("arch")
"""


def _stand_in_clone(root: Path, package: str, model: str, step_args: str, arch: str, init: str = "") -> Path:
    (root / package / "models").mkdir(parents=True)
    (root / package / "utils").mkdir()
    (root / package / "__init__.py").write_text(init)
    (root / package / "utils" / "__init__.py").write_text("")
    (root / package / "utils" / "registry.py").write_text(_STAND_IN_REGISTRY)
    (root / package / "models" / "__init__.py").write_text(
        f"def build_model(opt):\n    from tests_stand_in import make_model\n    return make_model({model!r})\n"
    )
    adapter = trainner.TRAINNER if package == "traiNNer" else neosr.NEOSR
    base_module, base_class = adapter.base_model.split(":")
    (root / Path(*base_module.split("."))).with_suffix(".py").write_text(_STAND_IN_BASE.format(base_class=base_class))
    (root / "train.py").write_text(_STAND_IN_TRAIN.format(package=package, step_args=step_args, arch=arch,
                                                          base_module=base_module, base_class=base_class))  # fmt: skip
    return root


@pytest.fixture
def stand_in_models(extractor: SemanticExtractor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    module = type(sys)("tests_stand_in")
    module.make_model = lambda kind: (TrainnerLikeModel if kind == "trainner" else NeosrLikeModel)(_net_d(extractor))
    monkeypatch.setitem(sys.modules, "tests_stand_in", module)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.chdir(tmp_path)  # the launchers change into the clone; restored afterwards
    yield
    for name in [n for n in sys.modules if n.split(".")[0] in ("traiNNer", "neosr")]:
        del sys.modules[name]


def _assert_launched(launcher, clone: Path, options: str, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    launcher.main([str(clone), "-opt", options, str(out)])
    result = __import__("json").loads(out.read_text())
    # run in the clone, as its own `python train.py`; the relative -opt path still names the file it named
    argv = [str(clone / "train.py"), "-opt", str(tmp_path / options), str(out)]
    assert result == {"argv": argv, "cwd": str(clone), "conditioned": True, "arch": True,
                      "base_hooked": [True, True]}  # fmt: skip


def test_trainner_launcher_registers_hooks_and_runs_the_clones_train_py(stand_in_models, tmp_path: Path) -> None:
    clone = _stand_in_clone(tmp_path / "clone", "traiNNer", "trainner", "(it, 0, True)", "conditionedsed")
    _assert_launched(trainner, clone, "x.yml", tmp_path)
    import traiNNer.models
    import traiNNer.models.base_model as base_model

    hooked = base_model.BaseModel.load_network
    trainner.install()  # again: no second wrapper, no duplicate registration
    assert traiNNer.models.build_model.__wrapped__.__module__ == "traiNNer.models"
    assert base_model.BaseModel.load_network is hooked and hooked.__wrapped__.__module__ == "traiNNer.models.base_model"


def test_neosr_launcher_sets_argv_before_importing_neosr(stand_in_models, tmp_path: Path) -> None:
    init = "import sys\nassert '-opt' in sys.argv, 'neosr parses its options at import'\n"
    clone = _stand_in_clone(tmp_path / "clone", "neosr", "neosr", "(it,)", "ConditionedSeD", init=init)
    _assert_launched(neosr, clone, "x.toml", tmp_path)


def test_install_without_the_base_model_class_warns_that_the_trust_rule_does_not_apply() -> None:
    moved = dataclasses.replace(trainner.TRAINNER, base_model="sed_no_such_trainer.models:BaseModel")
    with pytest.warns(UserWarning, match="has no sed_no_such_trainer.models:BaseModel.*trust rule does not apply"):
        moved._hook_base_model()


def test_launchers_reject_a_folder_that_is_not_a_clone(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a traiNNer-redux clone.*traiNNer-redux into"):
        trainner.use_clone(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a neosr clone"):
        neosr.use_clone(tmp_path)
    with pytest.raises(SystemExit, match="first argument must be the clone's path"):
        trainner.main(["-opt", "x.yml"])
    with pytest.raises(SystemExit, match="first argument must be the clone's path"):
        neosr.main([])


# -- opt-in: the real clones --------------------------------------------------------------------

_REAL_TRAINNER = """
import os, sys, torch
{legacy_keys}
from safetensors.torch import load_file
from sed_discriminator import SeD
from sed_discriminator.integrations import trainner, _common
trainner.use_clone(sys.argv[1]); trainner.install()
calls = []
forward = _common.TrainerConditionedSeD.forward
def spy(s, x, semantic=None):
    calls.append(s.has_condition)
    return forward(s, x, semantic)
_common.TrainerConditionedSeD.forward = spy
sys.argv = ["train.py", "-opt", "opt.yml"]
from traiNNer.utils.config import Config
from traiNNer.utils import make_exp_dirs
import traiNNer.models
def build(mkdirs=True, trust=True, fmt="safetensors", **path):
    Config._config = None
    opt, _ = Config.load_config_from_file(os.getcwd(), is_train=True)
    opt.num_gpu = 0
    opt.network_d["trust_pickle_d"] = trust
    opt.logger.save_checkpoint_format = fmt
    for k, v in path.items():
        setattr(opt.path, k, v)
    if mkdirs:
        make_exp_dirs(opt)
    return opt, traiNNer.models.build_model(opt)
opt, model = build()
gt = torch.rand(2, 3, 32, 32)
for it in (1, 2):
    model.feed_data({"gt": gt, "lq": torch.nn.functional.avg_pool2d(gt, 2)})
    model.optimize_parameters(it, 0, True)
assert calls == [True] * 6, calls
model.save(0, 2)
path = os.path.join(opt.path.resume_models, "net_d_2.safetensors")
saved = load_file(path)
SeD("patch", width=8).load_state_dict(saved, strict=True)
torch.save({"params": legacy_keys(saved)}, "legacy_d.pth")
for source in (path, "legacy_d.pth"):
    _, loaded = build(mkdirs=False, pretrain_network_d=source, strict_load_d=True)
    now = loaded.net_d.state_dict()
    assert set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved), source
from sed_discriminator._state import UntrustedFileError
installed, torch.__version__ = torch.__version__, "2.5.1"  # a torch with known weights_only escapes
try:
    build(mkdirs=False, trust=False, pretrain_network_d="legacy_d.pth", strict_load_d=True)
    raise AssertionError("an untrusted .pth was read on torch 2.5.1")
except UntrustedFileError as err:
    assert "trust_pickle_d: true" in str(err), err
torch.__version__ = installed
opt, model = build(mkdirs=False, fmt="pth")  # a .pth save gets its .safetensors copy
model.save(0, 3)
own = torch.load(os.path.join(opt.path.resume_models, "net_d_3.pth"), weights_only=True)
copy = load_file(os.path.join(opt.path.resume_models, "net_d_3.safetensors"))
own = own.get("params", own)
assert set(own) == set(copy) and all(torch.equal(own[k], copy[k]) for k in copy)
# AMP (autocast with the model's device type, here the CPU) and channels_last networks
Config._config = None
opt, _ = Config.load_config_from_file(os.getcwd(), is_train=True)
opt.num_gpu, opt.use_amp, opt.use_channels_last = 0, True, True
calls.clear()
model = traiNNer.models.build_model(opt)
assert model.use_amp and model.memory_format == torch.channels_last
model.feed_data({"gt": gt, "lq": torch.nn.functional.avg_pool2d(gt, 2)})
model.optimize_parameters(1, 0, True)
assert calls == [True] * 3 and all(torch.isfinite(torch.as_tensor(v)) for v in model.log_dict.values())
print("REAL-TRAINNER-OK")
"""

_REAL_NEOSR = """
import os, sys, types, torch
{legacy_keys}
sys.argv = ["train.py", "-opt", "opt.toml"]
from sed_discriminator import SeD
from sed_discriminator.integrations import neosr as adapter, _common
adapter.use_clone(os.environ["SED_NEOSR_PATH"]); adapter.install()
import neosr.models.base as base, neosr.models.image as image
class CPU(types.ModuleType):  # neosr hard-codes CUDA: model device, torch.load's map_location, autocast
    def __getattr__(self, name):
        return getattr(torch, name)
shim = CPU("torch_on_cpu")
shim.device = lambda *a, **k: torch.device("cpu")
shim.load = lambda *a, **k: torch.load(*a, **{**k, "map_location": "cpu"})
shim.autocast = lambda device_type, **k: torch.autocast("cpu", **k)
base.torch = image.torch = shim
calls = []
forward = _common.TrainerConditionedSeD.forward
def spy(s, x, semantic=None):
    out = forward(s, x, semantic)
    calls.append((s.has_condition, s.training, torch.is_inference_mode_enabled(), out.requires_grad))
    return out
_common.TrainerConditionedSeD.forward = spy
from neosr.utils.options import parse_options
from neosr.utils import make_exp_dirs
import neosr.models
opt, _ = parse_options(os.getcwd(), is_train=True)
opt["root_path"] = os.getcwd()
make_exp_dirs(opt)
model = neosr.models.build_model(opt)
gt = torch.rand(2, 3, 32, 32)
for it in (1, 2):
    model.feed_data({"gt": gt, "lq": torch.nn.functional.avg_pool2d(gt, 2)})
    model.optimize_parameters(it)
assert calls == [(True, False, True, False), (True, False, False, True), (True, False, False, True)] * 2, calls
model.save(0, 2)
saved = torch.load(os.path.join(opt["path"]["models"], "net_d_2.pth"), weights_only=True)["params"]
SeD("patch", width=8).load_state_dict(saved, strict=True)
from safetensors.torch import load_file
shared = load_file(os.path.join(opt["path"]["models"], "net_d_2.safetensors"))  # written beside it by the adapter
assert set(shared) == set(saved) and all(torch.equal(shared[k], saved[k]) for k in saved)
torch.save({"params": legacy_keys(saved)}, "legacy_d.pth")
opt, _ = parse_options(os.getcwd(), is_train=True)
opt["root_path"] = os.getcwd()
opt["path"]["pretrain_network_d"] = "legacy_d.pth"
now = neosr.models.build_model(opt).net_d.state_dict()
assert set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved)
from sed_discriminator._state import UntrustedFileError
opt["network_d"] = {**opt["network_d"], "trust_pickle_d": False}
torch.__version__ = "2.5.1"  # a torch with known weights_only escapes
try:
    neosr.models.build_model(opt)
    raise AssertionError("an untrusted .pth was read on torch 2.5.1")
except UntrustedFileError as err:
    assert "trust_pickle_d = true" in str(err), err
print("REAL-NEOSR-OK")
"""

_TRAINNER_YML = """
name: sed_real_trainner
scale: 2
use_amp: false
num_gpu: 0
manual_seed: 0
datasets:
  train: {{name: tiny, type: pairedimagedataset, dataroot_gt: [{data}], dataroot_lq: [{data}], lq_size: 16,
          num_worker_per_gpu: 0, batch_size_per_gpu: 2, accum_iter: 1}}
network_g: {{type: compact, num_feat: 8, num_conv: 1}}
network_d: {{type: ConditionedSeD, variant: patch, width: 8, pretrained: ~, trust_pickle_d: true}}
path: {{pretrain_network_g: ~, resume_state: ~}}
train:
  ema_decay: 0
  optim_g: {{type: AdamW, lr: !!float 1e-4, weight_decay: 0, betas: [0.9, 0.99]}}
  optim_d: {{type: AdamW, lr: !!float 1e-4, weight_decay: 0, betas: [0.9, 0.99]}}
  scheduler: {{type: MultiStepLR, milestones: [100000], gamma: 0.5}}
  total_iter: 2
  losses:
    - {{type: l1loss, loss_weight: 1.0}}
    - {{type: ganloss, gan_type: vanilla, loss_weight: 0.01}}
logger: {{print_freq: 1, save_checkpoint_freq: 2, save_checkpoint_format: safetensors, use_tb_logger: false}}
"""

_NEOSR_TOML = """
name = "sed_real_neosr"
model_type = "image"
scale = 2
num_gpu = 0
manual_seed = 0
[datasets.train]
type = "paired"
dataroot_gt = "{data}"
dataroot_lq = "{data}"
patch_size = 16
batch_size = 2
[path]
[network_g]
type = "compact"
[network_d]
type = "ConditionedSeD"
variant = "patch"
width = 8
pretrained = false
trust_pickle_d = true
[train]
ema = -1
[train.optim_g]
type = "adamw"
lr = 1e-4
[train.optim_d]
type = "adamw"
lr = 1e-4
[train.pixel_opt]
type = "L1Loss"
loss_weight = 1.0
[train.gan_opt]
type = "gan_loss"
gan_type = "bce"
loss_weight = 0.01
[logger]
total_iter = 2
save_checkpoint_freq = 2
use_tb_logger = false
"""


def _run_real(script: str, config_name: str, config: str, tmp_path: Path, *args: str) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / config_name).write_text(textwrap.dedent(config).format(data=tmp_path / "data"))
    (tmp_path / "run.py").write_text(script.replace("{legacy_keys}", inspect.getsource(legacy_keys)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "-OK" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SED_TRAINNER_PATH"), reason="set SED_TRAINNER_PATH to a traiNNer-redux clone")
def test_real_trainner_srmodel_steps_saves_and_loads_on_cpu(tmp_path: Path) -> None:
    _run_real(_REAL_TRAINNER, "opt.yml", _TRAINNER_YML, tmp_path, os.environ["SED_TRAINNER_PATH"])


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SED_NEOSR_PATH"), reason="set SED_NEOSR_PATH to a neosr clone")
def test_real_neosr_image_model_steps_and_saves_on_cpu(tmp_path: Path) -> None:
    _run_real(_REAL_NEOSR, "opt.toml", _NEOSR_TOML, tmp_path)
