"""SemanticExtractor: the frozen CLIP RN50 trunk, its preprocessing, local checkpoints and errors.

No test downloads anything: the real CLIP weights are replaced by checkpoints that the tests
write from open_clip's own (randomly initialised) ``ModifiedResNet``, in each layout users have:
an open_clip state dict with the ``visual.`` prefix (.pt and .safetensors), an open_clip training
checkpoint (``{"state_dict": {"module.visual....": ...}}``), visual-only keys, and an
OpenAI-style TorchScript archive with fp16 convolution weights.
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet
from safetensors.torch import save_file
from torch import nn

import reference_sed as R
import sed_discriminator as sd
import sed_discriminator.extractor as extractor_module

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

ROOT = Path(__file__).resolve().parents[1]
TRUNK_ROOTS = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "layer1", "layer2", "layer3")


@pytest.fixture(scope="module")
def random_extractor() -> sd.SemanticExtractor:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return sd.SemanticExtractor("clip_rn50", pretrained=None)


@pytest.fixture(scope="module")
def open_clip_resnet() -> ModifiedResNet:
    """open_clip's RN50 image tower (random weights, BN stats perturbed so they matter)."""
    torch.manual_seed(7)
    model = ModifiedResNet(layers=(3, 4, 6, 3), output_dim=1024, heads=32, image_size=224, width=64)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


def _trunk_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.split(".", 1)[0] in TRUNK_ROOTS}


def _openai_style_fp16(model: ModifiedResNet) -> nn.Module:
    """OpenAI's archive layout: the CLIP model with the image tower under ``visual``, fp16 conv weights."""

    class Visual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name in TRUNK_ROOTS:
                self.add_module(name, copy.deepcopy(getattr(model, name)))
            self.attnpool = nn.Module()
            self.attnpool.positional_embedding = nn.Parameter(torch.randn(50, 16))

    class CLIPLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = Visual()
            self.token_embedding = nn.Embedding(10, 8)
            self.logit_scale = nn.Parameter(torch.ones([]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.logit_scale.exp()

    clip = CLIPLike().eval()
    for module in clip.modules():  # like clip.model.convert_weights: convs/linears fp16, BN fp32
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.half()
            if module.bias is not None:
                module.bias.data = module.bias.data.half()
    return clip


@pytest.fixture(scope="module")
def checkpoints(open_clip_resnet, tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """name -> (path, the trunk weights it should load, as float32)."""
    root = tmp_path_factory.mktemp("clip_checkpoints")
    trunk = _trunk_state(open_clip_resnet)
    extras = {
        "visual.layer4.0.conv1.weight": torch.randn(8, 8, 1, 1),  # parts of the tower that are not run
        "visual.attnpool.positional_embedding": torch.randn(50, 16),
        "token_embedding.weight": torch.randn(10, 8),
        "logit_scale": torch.ones([]),
    }
    open_clip_state = {f"visual.{k}": v for k, v in trunk.items()} | extras
    out = {}

    path = root / "open_clip_RN50.pt"
    torch.save(open_clip_state, path)
    out["open_clip_pt"] = (path, trunk)

    path = root / "open_clip_model.safetensors"
    save_file(open_clip_state, str(path))
    out["open_clip_safetensors"] = (path, trunk)

    path = root / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in open_clip_state.items()}}, path)
    out["open_clip_training_ckpt"] = (path, trunk)

    path = root / "visual_only.pth"
    torch.save(dict(trunk) | {"attnpool.positional_embedding": torch.randn(50, 16)}, path)
    out["visual_only"] = (path, trunk)

    clip = _openai_style_fp16(open_clip_resnet)
    traced = torch.jit.trace(clip, torch.rand(1, 3, 8, 8))
    path = root / "RN50.pt"
    torch.jit.save(traced, str(path))
    fp16_trunk = {
        k[len("visual.") :]: (v.float() if v.is_floating_point() else v)
        for k, v in clip.state_dict().items()
        if k.startswith("visual.") and k.split(".")[1] in TRUNK_ROOTS
    }
    assert clip.visual.conv1.weight.dtype == torch.float16 and clip.visual.bn1.weight.dtype == torch.float32
    out["openai_torchscript_fp16"] = (path, fp16_trunk)
    return out


def _load(path: Path) -> sd.SemanticExtractor:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a loaded extractor must not warn about random weights
        return sd.SemanticExtractor("clip_rn50", pretrained=path)


# -- presets -----------------------------------------------------------------------------------


def test_clip_rn50_preset_facts() -> None:
    preset = sd.get_extractor_preset("clip_rn50")
    assert (preset.channels, preset.stride, preset.open_clip_model) == (1024, 16, "RN50")
    assert preset.mean == R.CLIP_MEAN and preset.std == R.CLIP_STD
    assert "clip_rn50" in sd.list_extractors() and sd.list_extractors() == sorted(sd.list_extractors())


def test_unknown_preset_error() -> None:
    with pytest.raises(ValueError, match=r"Unknown extractor 'clip_vit'\. Available: \[.*'clip_rn50'.*\]"):
        sd.SemanticExtractor("clip_vit", pretrained=None)


def test_register_extractor(monkeypatch) -> None:
    monkeypatch.setattr(extractor_module, "_PRESETS", dict(extractor_module._PRESETS))
    preset = sd.ExtractorPreset(name="tiny_test", channels=8, stride=4, build=lambda: nn.Conv2d(3, 8, 4, 4))
    assert sd.register_extractor(preset) is preset
    assert "tiny_test" in sd.list_extractors()
    with pytest.raises(ValueError, match="named 'tiny_test' is registered already; pass overwrite=True"):
        sd.register_extractor(preset)
    sd.register_extractor(preset, overwrite=True)
    with pytest.warns(UserWarning, match="RANDOM"):
        ext = sd.SemanticExtractor("tiny_test", pretrained=None)
    assert (ext.channels, ext.stride) == (8, 4)
    assert ext(torch.rand(2, 3, 16, 12)).shape == (2, 8, 4, 3)
    with pytest.raises(ValueError, match="has no pretrained tags; pass pretrained= as a local file path"):
        sd.SemanticExtractor("tiny_test", pretrained="openai")


# -- the trunk ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size, grid", [((256, 256), (16, 16)), ((64, 96), (4, 6))])
def test_output_shape(random_extractor, size, grid) -> None:
    out = random_extractor(torch.rand(2, 3, *size))
    assert out.shape == (2, 1024, *grid)
    assert torch.isfinite(out).all()


def test_frozen_and_always_eval(random_extractor) -> None:
    ext = random_extractor
    assert not any(p.requires_grad for p in ext.parameters())
    assert ext.train() is ext
    assert not any(m.training for m in ext.modules())
    stats = {k: v.clone() for k, v in ext.state_dict().items() if "running" in k or "num_batches" in k}
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = ext(x)
    assert not out.requires_grad and out.grad_fn is None
    assert all(torch.equal(ext.state_dict()[k], v) for k, v in stats.items())


def test_random_weights_warn_and_are_reproducible(random_extractor) -> None:
    with pytest.warns(
        UserWarning,
        match=r"SemanticExtractor\('clip_rn50'\) has RANDOM weights.*pretrained='openai' or a local weight file",
    ):
        other = sd.SemanticExtractor("clip_rn50", pretrained=None)
    assert other.pretrained is None
    for a, b in zip(other.state_dict().values(), random_extractor.state_dict().values()):
        assert torch.equal(a, b)


def test_matches_open_clip_modified_resnet(open_clip_resnet, checkpoints) -> None:
    """Independent check of the trunk and the preprocessing: CLIP mean/std, stem, layer1..layer3, no resize."""
    ext = _load(checkpoints["open_clip_pt"][0])
    x = torch.rand(2, 3, 96, 64)
    mean = torch.tensor(R.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(R.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        m = open_clip_resnet
        expected = m.layer3(m.layer2(m.layer1(m.stem((x - mean) / std))))
    assert expected.shape == (2, 1024, 6, 4)
    torch.testing.assert_close(ext(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "fmt",
    ["open_clip_pt", "open_clip_safetensors", "open_clip_training_ckpt", "visual_only", "openai_torchscript_fp16"],
)
def test_local_checkpoint_formats(checkpoints, fmt: str) -> None:
    path, expected = checkpoints[fmt]
    ext = _load(path)
    assert ext.pretrained == str(path)
    state = ext.trunk.state_dict()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert not any(p.requires_grad for p in ext.parameters())


def test_torchscript_fp16_outputs_follow_the_rounded_weights(checkpoints, open_clip_resnet) -> None:
    ext = _load(checkpoints["openai_torchscript_fp16"][0])
    full = _load(checkpoints["open_clip_pt"][0])
    x = torch.rand(1, 3, 64, 64)
    out, out_full = ext(x), full(x)
    assert out.dtype == torch.float32
    assert not torch.equal(out, out_full)  # the fp16 rounding is really there ...
    torch.testing.assert_close(out, out_full, atol=5e-2, rtol=5e-2)  # ... and small


def test_pathlike_and_str_paths_agree(checkpoints) -> None:
    path = checkpoints["visual_only"][0]
    a, b = _load(path), _load(str(path))
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


# -- checkpoint errors -------------------------------------------------------------------------


def test_wrong_model_checkpoint_errors(open_clip_resnet, tmp_path) -> None:
    trunk = _trunk_state(open_clip_resnet)
    deeper = {f"visual.{k}": v for k, v in trunk.items()}
    deeper["visual.layer3.6.conv1.weight"] = torch.randn(256, 1024, 1, 1)  # RN101-like: more layer3 blocks
    path = tmp_path / "rn101_like.pt"
    torch.save(deeper, path)
    with pytest.raises(
        ValueError,
        match=r"does not match this extractor's trunk: 0 missing keys .* 1 unexpected keys \(e\.g\. "
        r"\['layer3\.6\.conv1\.weight'\]\)",
    ):
        sd.SemanticExtractor("clip_rn50", pretrained=path)

    wider = {f"visual.{k}": v for k, v in trunk.items()}
    wider["visual.conv1.weight"] = torch.randn(40, 3, 3, 3)
    path = tmp_path / "wider.pt"
    torch.save(wider, path)
    with pytest.raises(
        ValueError,
        match=r"conv1\.weight has shape \(40, 3, 3, 3\) but the trunk expects \(32, 3, 3, 3\); "
        r"the checkpoint is of another "
        r"model",
    ):
        sd.SemanticExtractor("clip_rn50", pretrained=path)

    path = tmp_path / "sed.pt"
    torch.save(sd.SeD("patch", width=8, semantic_channels=64, head_dim=8).state_dict(), path)
    with pytest.raises(
        ValueError,
        match=r"does not match this extractor's trunk: \d+ missing keys.*Pass OpenAI's CLIP archive or an open_clip "
        r"checkpoint",
    ):
        sd.SemanticExtractor("clip_rn50", pretrained=path)


def test_missing_path_errors(tmp_path) -> None:
    missing = tmp_path / "nope" / "RN50.pt"
    with pytest.raises(
        FileNotFoundError,
        match=r"No weight file at .*RN50\.pt.*check the path or pass a pretrained tag",
    ):
        sd.SemanticExtractor("clip_rn50", pretrained=missing)
    with pytest.raises(FileNotFoundError, match="No weight file at 'RN50.safetensors'"):
        sd.SemanticExtractor("clip_rn50", pretrained="RN50.safetensors")


def test_unknown_tag_error() -> None:
    with pytest.raises(
        ValueError,
        match=r"Unknown pretrained tag 'laion9000' for extractor 'clip_rn50' \(open_clip model RN50\)\. "
        r"Available tags: "
        r"\[.*'openai'.*\], or a local file path",
    ):
        sd.SemanticExtractor("clip_rn50", pretrained="laion9000")


_OFFLINE_SCRIPT = textwrap.dedent(
    """
    import sys
    import sed_discriminator as sd
    try:
        sd.SemanticExtractor("clip_rn50", pretrained="openai", cache_dir=sys.argv[1])
    except Exception as err:
        print("ERROR-TYPE:", type(err).__name__)
        print(err)
    else:
        print("NO ERROR")
    """
)


@pytest.mark.slow
def test_offline_error_tells_the_user_to_pass_a_local_path(tmp_path) -> None:
    cache = tmp_path / "empty_cache"
    cache.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(cache), HF_HUB_CACHE=str(cache), XDG_CACHE_HOME=str(cache))
    result = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, str(cache)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ERROR-TYPE: RuntimeError" in out
    assert "Could not get the 'openai' weights of RN50" in out and "offline" in out
    assert "pass its path: SemanticExtractor(pretrained='/path/to/file')" in out
    assert "On a machine with internet, download OpenAI's archive" in out  # where to get the file
    assert not any(cache.rglob("*.bin")) and not any(cache.rglob("*.pt"))


def _fake_hub_cache(root: Path, repo_id: str, filename: str, source: Path) -> Path:
    """A Hugging Face cache (the layout huggingface_hub writes) holding ``source`` as ``filename``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(source, snapshot / filename)
    return snapshot / filename


@pytest.mark.parametrize("filename", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_tag_loads_from_the_hub_cache_without_network(monkeypatch, checkpoints, tmp_path, filename: str) -> None:
    import huggingface_hub
    import open_clip.pretrained

    def no_network(*args, **kwargs):
        raise AssertionError("a cached tag must not touch the network")

    for module in (huggingface_hub, open_clip.pretrained):
        monkeypatch.setattr(module, "hf_hub_download", no_network, raising=False)
    source_key = "open_clip_safetensors" if filename.endswith(".safetensors") else "open_clip_pt"
    source, trunk = checkpoints[source_key]
    hub = open_clip.get_pretrained_cfg("RN50", "openai")["hf_hub"].rstrip("/")
    _fake_hub_cache(tmp_path, hub, filename, source)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        extractor = sd.SemanticExtractor("clip_rn50", pretrained="openai", cache_dir=str(tmp_path))
    loaded = extractor.trunk.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trunk.items())


# -- inputs ------------------------------------------------------------------------------------


def test_input_range_minus_one_one(random_extractor) -> None:
    signed = copy.deepcopy(random_extractor)
    signed.input_range = (-1.0, 1.0)
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(signed(x * 2 - 1), random_extractor(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"input_range must be \(low, high\) with high > low, got \(1, 0\)"):
        sd.SemanticExtractor("clip_rn50", pretrained=None, input_range=(1, 0))


def test_input_errors(random_extractor) -> None:
    with pytest.raises(ValueError, match=r"SemanticExtractor needs images of at least 16x16 pixels, got 8x64"):
        random_extractor(torch.rand(1, 3, 8, 64))
    with pytest.raises(
        ValueError,
        match=r"SemanticExtractor expects an image batch of shape \(B, 3, H, W\), got a 3-D tensor",
    ):
        random_extractor(torch.rand(3, 32, 32))
    with pytest.raises(
        ValueError,
        match=r"SemanticExtractor expects a floating-point image .* Convert it with x\.float\(\) / 255",
    ):
        random_extractor(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="SemanticExtractor expects 3 channels, got 1"):
        random_extractor(torch.rand(1, 1, 32, 32))


def test_value_checks_range_and_nan(random_extractor) -> None:
    before = sd.value_checks_enabled()
    sd.set_value_checks(True)
    try:
        with pytest.raises(
            ValueError,
            match=r"expects image values in \[0, 1\], got \[0, 255\]\. Scale \[0, 255\] images by 1/255",
        ):
            random_extractor(torch.tensor([0.0, 255.0]).repeat(16 * 16 * 3 // 2).view(1, 3, 16, 16))
        with pytest.raises(ValueError, match=r"expects image values in \[0, 1\], got \[-1, 1\]"):
            random_extractor(torch.linspace(-1, 1, 3 * 16 * 16).view(1, 3, 16, 16))
        nan = torch.rand(1, 3, 16, 16)
        nan[0, 1, 2, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN or Inf"):
            random_extractor(nan)
        random_extractor(torch.rand(1, 3, 16, 16))  # in range: fine
    finally:
        sd.set_value_checks(before)
    random_extractor(torch.linspace(-1, 1, 3 * 16 * 16).view(1, 3, 16, 16))  # checks off: no error


def test_to_dtype_moves_trunk_and_constants(random_extractor) -> None:
    ext = copy.deepcopy(random_extractor).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in ext.parameters())
    assert ext.mean.dtype == torch.float64 and ext.std.dtype == torch.float64
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    out = ext(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), random_extractor(x.float()), atol=1e-4, rtol=1e-4)


def test_mean_std_not_in_state_dict(random_extractor) -> None:
    keys = set(random_extractor.state_dict())
    assert "mean" not in keys and "std" not in keys
    assert all(k.startswith("trunk.") for k in keys)


def test_pickle_round_trip(random_extractor) -> None:
    restored = pickle.loads(pickle.dumps(random_extractor))
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(restored(x), random_extractor(x), atol=0, rtol=0)
    assert not restored.train().training
