"""SeD from a BasicSR YAML config: registration, the model types, checkpoints and the launcher.

The pipeline tests run BasicSR's real ``train_pipeline`` on the CPU (``num_gpu: 0``) with a
tiny generator, a tiny SeD, a random CLIP (``pretrained: ~``) and images the test writes.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("basicsr", reason="needs basicsr-fixed (the `basicsr` extra)")
cv2 = pytest.importorskip("cv2")
yaml = pytest.importorskip("yaml")

from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY  # noqa: E402

import sed_discriminator.integrations._common as common  # noqa: E402
from sed_discriminator import SeD  # noqa: E402
from sed_discriminator.integrations import basicsr as sed_basicsr  # noqa: E402

WIDTH = 8
STEPS = 2
# Discriminator calls per step of BasicSR's optimize_parameters: SRGAN fake (G), real, fake (D);
# ESRGAN real + fake (G), fake, real, fake (D).
D_CALLS = {"SeDSRGANModel": 3, "SeDESRGANModel": 5}


def _write_images(root: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    for sub in ("gt", "lq"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(4):
        gt = (torch.rand(48, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
        cv2.imwrite(str(root / "gt" / f"{i}.png"), gt)
        cv2.imwrite(str(root / "lq" / f"{i}.png"), cv2.resize(gt, (24, 24), interpolation=cv2.INTER_AREA))


def _options(root: Path, name: str, model_type: str, variant: str, *, total_iter: int = STEPS, pretrain_d=None) -> Path:
    adam = {"type": "Adam", "lr": 1e-4, "betas": [0.9, 0.99]}
    opt = {
        "name": name,
        "model_type": model_type,
        "scale": 2,
        "num_gpu": 0,
        "manual_seed": 0,
        "datasets": {
            "train": {
                "name": "tiny", "type": "PairedImageDataset", "dataroot_gt": str(root / "gt"),
                "dataroot_lq": str(root / "lq"), "filename_tmpl": "{}", "io_backend": {"type": "disk"},
                "gt_size": 32, "use_hflip": True, "use_rot": False, "num_worker_per_gpu": 0,
                "batch_size_per_gpu": 2, "dataset_enlarge_ratio": 1, "prefetch_mode": None,
            }
        },
        "network_g": {"type": "MSRResNet", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 1,
                      "upscale": 2},
        "network_d": {"type": "ConditionedSeD", "variant": variant, "width": WIDTH, "pretrained": None,
                      "diagnostics_every": 1},
        "path": {"pretrain_network_g": None, "strict_load_g": True, "resume_state": None,
                 "pretrain_network_d": pretrain_d},
        "train": {
            "ema_decay": 0, "optim_g": dict(adam), "optim_d": dict(adam),
            "scheduler": {"type": "MultiStepLR", "milestones": [100000], "gamma": 0.5},
            "total_iter": total_iter, "warmup_iter": -1,
            "pixel_opt": {"type": "L1Loss", "loss_weight": 1.0, "reduction": "mean"},
            "gan_opt": {"type": "GANLoss", "gan_type": "vanilla", "real_label_val": 1.0, "fake_label_val": 0.0,
                        "loss_weight": 0.01},
            "net_d_iters": 1, "net_d_init_iters": 0,
        },
        "logger": {"print_freq": 1, "save_checkpoint_freq": STEPS, "use_tb_logger": False},
    }  # fmt: skip
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(opt))
    return path


class _Spy:
    """Records set_condition / forward / clear_condition calls on the registered ConditionedSeD."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, int, torch.Tensor | None]] = []
        cls = common.TrainerConditionedSeD
        set_condition, clear_condition, forward = cls.set_condition, cls.clear_condition, cls.forward

        def spy_set(net, hr):
            self.events.append(("set", id(net), hr.detach().clone()))
            return set_condition(net, hr)

        def spy_clear(net):
            self.events.append(("clear", id(net), None))
            return clear_condition(net)

        def spy_forward(net, x, semantic=None):
            self.events.append(("forward", id(net), x.detach().clone()))
            return forward(net, x, semantic)

        monkeypatch.setattr(cls, "set_condition", spy_set)
        monkeypatch.setattr(cls, "clear_condition", spy_clear)
        monkeypatch.setattr(cls, "forward", spy_forward)

    def steps(self) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """(condition, inputs of the D calls) per set/clear window; asserts every forward lies in one."""
        windows, current = [], None
        for kind, _, tensor in self.events:
            if kind == "set":
                assert current is None, "a condition was set twice without being cleared"
                current = (tensor, [])
            elif kind == "forward":
                assert current is not None, "the discriminator was called without a condition"
                current[1].append(tensor)
            else:
                assert current is not None
                windows.append(current)
                current = None
        assert current is None, "the last condition was not cleared"
        return windows


def _run(opt_path: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(cwd)
    sed_basicsr.main(["-opt", str(opt_path)])


def _saved_d(cwd: Path, name: str, label) -> dict[str, torch.Tensor]:
    return torch.load(cwd / "experiments" / name / "models" / f"net_d_{label}.pth", weights_only=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("basicsr_data")
    _write_images(root)
    return root


def test_register_is_idempotent_and_survives_reload() -> None:
    first = sed_basicsr.register()
    assert sed_basicsr.register() == first
    assert "SeDRealESRGANModel" in first  # basicsr-fixed ships BasicSR's copy of RealESRGANModel
    assert ARCH_REGISTRY.get("ConditionedSeD") is sed_basicsr.TrainerConditionedSeD
    with pytest.warns(DeprecationWarning, match="basicsr.ConditionedSeD is deprecated since sed-discriminator 0.3"):
        assert sed_basicsr.ConditionedSeD is sed_basicsr.TrainerConditionedSeD  # 0.2's name
    for name in first:
        assert MODEL_REGISTRY.get(name) is getattr(sed_basicsr, name)
    old = MODEL_REGISTRY.get("SeDSRGANModel")
    models = importlib.reload(importlib.import_module("sed_discriminator.integrations.basicsr.models"))
    try:
        assert models.SeDSRGANModel is not old
        reloaded = importlib.reload(sed_basicsr)
        reloaded.register()  # a second definition of the same class replaces the first, no error
        assert MODEL_REGISTRY.get("SeDSRGANModel") is models.SeDSRGANModel
    finally:
        importlib.reload(sed_basicsr)
        sed_basicsr.register()


def test_register_refuses_a_foreign_object_under_its_name() -> None:
    sed_basicsr.register()
    table = MODEL_REGISTRY._obj_map
    original = table["SeDESRGANModel"]
    table["SeDESRGANModel"] = type("SeDESRGANModel", (), {"__module__": "someone_else"})
    try:
        with pytest.raises(ValueError, match="already holds another 'SeDESRGANModel'.*Rename or remove"):
            sed_basicsr.register()
    finally:
        table["SeDESRGANModel"] = original


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["patch", "pixel"])
@pytest.mark.parametrize("model_type", ["SeDSRGANModel", "SeDESRGANModel"])
def test_train_pipeline_conditions_every_d_call_and_saves_a_plain_sed(
    model_type: str, variant: str, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy(monkeypatch)
    from basicsr.utils.logger import MessageLogger

    logged: list[dict] = []
    log_call = MessageLogger.__call__
    monkeypatch.setattr(MessageLogger, "__call__", lambda self, log_vars: (logged.append(dict(log_vars)),
                                                                           log_call(self, log_vars))[1])  # fmt: skip
    name = f"{model_type}_{variant}"
    _run(_options(images, name, model_type, variant), tmp_path, monkeypatch)

    windows = spy.steps()
    assert len(windows) == STEPS
    assert len({net for _, net, _ in spy.events}) == 1  # one bare discriminator, no copies
    for condition, inputs in windows:
        assert len(inputs) == D_CALLS[model_type]
        assert condition.shape == inputs[0].shape
        # the condition is the step's HR batch: one of the calls judges exactly those images as real
        assert any(torch.equal(condition, x) for x in inputs)
        assert sum(not torch.equal(condition, x) for x in inputs) >= 1  # and the others the SR output

    exp = tmp_path / "experiments" / name
    # what BasicSR's MessageLogger (console, TensorBoard, wandb) gets at print_freq 1 carries SeD's diagnostics
    keys = {"sem_influence", "attn_sharpness_att1", "attn_sharpness_att2", "attn_sharpness_att3"}
    assert len(logged) == STEPS and all(keys <= set(log) for log in logged)
    assert all(0 <= log[f"attn_sharpness_att{i}"] <= 1 for log in logged for i in (1, 2, 3))
    assert (exp / "models" / f"net_g_{STEPS}.pth").is_file() and (exp / "training_states" / f"{STEPS}.state").is_file()
    saved = _saved_d(tmp_path, name, STEPS)
    assert set(saved) == {"params"}
    plain = SeD(variant, width=WIDTH)
    assert set(saved["params"]) == set(plain.state_dict())
    plain.load_state_dict(saved["params"], strict=True)
    # the same weights as safetensors beside it, the file to share
    from safetensors.torch import load_file

    shared = load_file(exp / "models" / f"net_d_{STEPS}.safetensors")
    assert set(shared) == set(saved["params"]) and all(torch.equal(shared[k], v) for k, v in saved["params"].items())


@pytest.mark.slow
def test_pretrain_network_d_starts_from_a_saved_and_from_a_legacy_checkpoint(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(_options(images, "first", "SeDSRGANModel", "patch"), tmp_path, monkeypatch)
    first = _saved_d(tmp_path, "first", STEPS)["params"]

    # The authors' files use torch.nn.utils.spectral_norm's names; write the same weights that way.
    legacy_names = {"parametrizations.weight.original": "weight_orig", "parametrizations.weight.0._u": "weight_u",
                    "parametrizations.weight.0._v": "weight_v"}  # fmt: skip
    legacy = {}
    for key, value in first.items():
        for new, old in legacy_names.items():
            if key.endswith(new):
                key = key[: -len(new)] + old
        legacy[f"module.{key}"] = value
    assert any(k.endswith("weight_orig") for k in legacy)
    torch.save({"params": legacy}, tmp_path / "legacy_d.pth")

    # total_iter 0: the pipeline builds the model (loading D) and saves it as it was loaded.
    for label, source in (("saved", f"experiments/first/models/net_d_{STEPS}.pth"), ("legacy", "legacy_d.pth")):
        _run(_options(images, label, "SeDSRGANModel", "patch", total_iter=0, pretrain_d=source), tmp_path, monkeypatch)
        loaded = _saved_d(tmp_path, label, "latest")["params"]
        assert set(loaded) == set(first)
        assert all(torch.equal(loaded[k], first[k]) for k in first), label


def test_load_sed_checkpoint_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    # trust_pickle=True: the test reads files it wrote itself (torch < 2.10 refuses .pth files otherwise)
    model = common.TrainerConditionedSeD("patch", width=WIDTH, semantic_fusion=False)
    with pytest.raises(FileNotFoundError, match="pretrain_network_d: no file at"):
        sed_basicsr.load_sed_checkpoint(model, tmp_path / "missing.pth")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="cannot be read as a torch checkpoint.*again"):
        sed_basicsr.load_sed_checkpoint(model, tmp_path / "cut.pth")
    torch.save({"params_x": model.state_dict(), "other": model.state_dict()}, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match=r"has no entry 'params'.*\['other', 'params_x'\].*param_key_d"):
        sed_basicsr.load_sed_checkpoint(model, tmp_path / "keys.pth", trust_pickle=True)
    sed_basicsr.load_sed_checkpoint(model, tmp_path / "keys.pth", param_key="params_x", trust_pickle=True)
    torch.save({"params": SeD("pixel", width=WIDTH, semantic_fusion=False).state_dict()}, tmp_path / "pixel.pth")
    with pytest.raises(ValueError, match="looks like the 'pixel' variant"):
        sed_basicsr.load_sed_checkpoint(model, tmp_path / "pixel.pth", trust_pickle=True)


def test_pretrain_network_d_follows_the_trust_rule(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from sed_discriminator._state import UntrustedFileError

    model = sed_basicsr.SeDSRGANModel.__new__(sed_basicsr.SeDSRGANModel)
    model.opt = {"dist": False, "path": {}}
    net = common.TrainerConditionedSeD("patch", width=WIDTH, semantic_fusion=False)
    source = SeD("patch", width=WIDTH, semantic_fusion=False).state_dict()
    torch.save({"params": source}, tmp_path / "d.pth")
    request.getfixturevalue("old_torch")  # after the save: torch reported as 2.5.1 from here on
    with pytest.raises(UntrustedFileError, match="pretrain_network_d: .*torch 2.5.1"):
        model.load_network(net, str(tmp_path / "d.pth"))
    model.opt["path"]["trust_pickle_d"] = True  # the YAML key
    model.load_network(net, str(tmp_path / "d.pth"))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in source.items())


def test_data_parallel_is_refused_with_the_torchrun_command() -> None:
    # BasicSR's model_to_device wraps in DataParallel for num_gpu > 1 without a distributed launcher.
    model = sed_basicsr.SeDSRGANModel.__new__(sed_basicsr.SeDSRGANModel)
    model.opt, model.device = {"num_gpu": 2, "dist": False}, torch.device("cpu")
    with pytest.raises(RuntimeError, match="DataParallel.*torchrun --nproc_per_node=N -m sed_discriminator"):
        model.model_to_device(common.TrainerConditionedSeD("patch", width=WIDTH, semantic_fusion=False))
    other = model.model_to_device(torch.nn.Conv2d(3, 1, 3))  # any other network keeps BasicSR's behaviour
    assert isinstance(other, torch.nn.DataParallel)


@pytest.mark.parametrize("gan_gt_usm", [True, False])
def test_real_esrgan_step_conditions_on_the_batch_d_judges_as_real(gan_gt_usm: bool) -> None:
    # RealESRGANModel.__init__ needs CUDA (DiffJPEG, USMSharp): set up its step's attributes by hand and
    # run its real optimize_parameters on the CPU.
    from basicsr.losses import build_loss

    cls = sed_basicsr.SeDRealESRGANModel
    model = cls.__new__(cls)
    model.opt = {"dist": False, "l1_gt_usm": True, "percep_gt_usm": True, "gan_gt_usm": gan_gt_usm}
    model.net_g = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(3, 3, 3, padding=1))
    with pytest.warns(UserWarning, match="RANDOM"):
        model.net_d = common.TrainerConditionedSeD("patch", width=WIDTH, pretrained=None)
    model.cri_pix, model.cri_ldl, model.cri_perceptual = build_loss({"type": "L1Loss", "loss_weight": 1.0}), None, None
    model.cri_gan = build_loss({"type": "GANLoss", "gan_type": "vanilla", "loss_weight": 0.1})
    model.optimizer_g = torch.optim.Adam(model.net_g.parameters(), 1e-4)
    model.optimizer_d = torch.optim.Adam(model.net_d.parameters(), 1e-4)
    model.net_d_iters, model.net_d_init_iters, model.ema_decay = 1, 0, 0
    model.gt = torch.rand(2, 3, 32, 32)
    model.gt_usm = (model.gt * 1.2).clamp(0, 1)
    model.lq = torch.nn.functional.avg_pool2d(model.gt, 2)
    seen = []
    set_condition = model.net_d.set_condition
    model.net_d.set_condition = lambda hr: (seen.append(hr), set_condition(hr))[1]
    model.optimize_parameters(1)
    assert len(seen) == 1 and seen[0] is (model.gt_usm if gan_gt_usm else model.gt)
    assert not model.net_d.has_condition and set(model.log_dict) >= {"l_g_gan", "l_d_real", "l_d_fake"}


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _arch_keys_are_valid(network_d: dict) -> None:
    import inspect

    from sed_discriminator import list_extractors, training

    accepted = set(inspect.signature(training.ConditionedSeD.__init__).parameters) | set(
        inspect.signature(SeD.__init__).parameters
    )
    keys = set(network_d) - {"type"}
    assert keys <= accepted - {"self", "kwargs"}, keys - accepted
    assert network_d["type"].lower() == "conditionedsed"
    assert network_d["variant"] in ("patch", "pixel") and network_d["extractor"] in list_extractors()


@pytest.mark.parametrize("name", ["train_RRDB_PSeD_x4.yml", "train_RRDB_USeD_x4.yml", "train_RealESRGAN_USeD_x4.yml"])
def test_example_configs_parse_and_name_registered_types(name: str, tmp_path: Path, monkeypatch) -> None:
    from basicsr.utils.options import parse_options
    from basicsr.utils.registry import DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY

    sed_basicsr.register()
    path = EXAMPLES / "basicsr" / name
    monkeypatch.setattr(sys, "argv", ["x", "-opt", str(path)])
    opt, _ = parse_options(str(tmp_path), is_train=True)
    assert opt["path"]["experiments_root"] == str(tmp_path / "experiments" / opt["name"])
    assert opt["model_type"] in MODEL_REGISTRY and opt["network_g"]["type"] in ARCH_REGISTRY
    _arch_keys_are_valid(opt["network_d"])
    for dataset in opt["datasets"].values():
        assert dataset["type"] in DATASET_REGISTRY or f"{dataset['type']}_basicsr" in DATASET_REGISTRY
    train = opt["train"]
    for key in ("pixel_opt", "perceptual_opt", "gan_opt"):
        assert train[key]["type"] in LOSS_REGISTRY
    for metric in opt.get("val", {}).get("metrics", {}).values():
        assert metric["type"] in METRIC_REGISTRY
    # the paper's adversarial loss and optimisers (docs/integrations.md)
    assert train["gan_opt"]["gan_type"] == "vanilla" and train["gan_opt"]["loss_weight"] == 0.01
    assert train["pixel_opt"]["loss_weight"] == 1.0
    for optim in ("optim_g", "optim_d"):
        assert train[optim]["type"] == "Adam" and train[optim]["lr"] == 1e-4 and train[optim]["betas"] == [0.9, 0.99]
    assert train["perceptual_opt"]["layer_weights"] == {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1, "conv4_4": 1,
                                                        "conv5_4": 1}  # fmt: skip
    if name.startswith("train_RRDB"):
        assert opt["network_g"]["num_block"] == 23 and opt["datasets"]["train"]["gt_size"] == 256
        assert opt["datasets"]["train"]["batch_size_per_gpu"] == 8
        assert train["scheduler"]["milestones"] == [100000, 200000] and train["total_iter"] == 300000
        weight = {"patch": 0.1, "pixel": 1.0}[opt["network_d"]["variant"]]
        assert train["perceptual_opt"]["perceptual_weight"] == weight
    else:  # every option Real-ESRGAN's model and dataset read is set
        import inspect
        import re

        from basicsr.data import realesrgan_dataset

        from sed_discriminator.integrations.basicsr import models

        model_keys = set(re.findall(r"opt\['(\w+)'\]", inspect.getsource(inspect.getmodule(models._RealESRGANModel))))
        data_keys = set(re.findall(r"opt\['(\w+)'\]", inspect.getsource(realesrgan_dataset)))
        assert model_keys - {"dist", "rank", "world_size", "is_train"} <= set(opt), model_keys - set(opt)
        optional = {"client_keys", "db_paths", "type"}  # lmdb backend only; the registry key
        assert data_keys - optional <= set(opt["datasets"]["train"]), data_keys - set(opt["datasets"]["train"])


def test_trainer_snippets_name_valid_arch_keys() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    _arch_keys_are_valid(yaml.safe_load((EXAMPLES / "trainner" / "network_d_sed.yml").read_text())["network_d"])
    _arch_keys_are_valid(tomllib.loads((EXAMPLES / "neosr" / "network_d_sed.toml").read_text())["network_d"])


def _import_integration(tmp_path: Path, fake_basicsr: str | None) -> subprocess.CompletedProcess:
    code = "import sys\n"
    if fake_basicsr is None:
        code += "sys.modules['basicsr'] = None  # as if it were not installed\n"
    else:
        (tmp_path / "basicsr" / "models").mkdir(parents=True)
        (tmp_path / "basicsr" / "__init__.py").write_text("")
        (tmp_path / "basicsr" / "models" / "__init__.py").write_text(fake_basicsr)
        code += f"sys.path.insert(0, {str(tmp_path)!r})\n"
    code += "import sed_discriminator.integrations.basicsr\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.slow
def test_missing_or_broken_basicsr_says_what_to_install(tmp_path: Path) -> None:
    proc = _import_integration(tmp_path, None)
    assert proc.returncode != 0 and "pip install basicsr-fixed" in proc.stderr
    # PyPI's basicsr 1.4.2 imports a module torchvision removed in 0.17
    proc = _import_integration(tmp_path, "import torchvision.transforms.functional_tensor\n")
    assert proc.returncode != 0
    assert "PyPI's basicsr 1.4.2" in proc.stderr and "pip uninstall basicsr" in proc.stderr


@pytest.mark.slow
def test_launcher_runs_as_python_m_from_outside_the_repository(images: Path, tmp_path: Path) -> None:
    opt = _options(images, "launched", "SeDESRGANModel", "patch", total_iter=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "sed_discriminator.integrations.basicsr", "-opt", str(opt)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "experiments" / "launched" / "models" / "net_d_latest.pth").is_file()
    repo = Path(sed_basicsr.__file__).resolve().parents[3]
    assert not (repo / "experiments" / "launched").exists()
