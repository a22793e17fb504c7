"""SemanticExtractor on timm: presets, the paper's CLIP RN50 against independent references, weights, errors.

No test downloads anything. Random-weight models stand in for the pretrained ones, and every
weight file is written by the tests: open_clip's own ``ModifiedResNet`` (an independent
implementation of CLIP's image tower) saved in each layout users have (open_clip state dicts
with the ``visual.`` prefix as .pt and .safetensors, an open_clip training checkpoint, the image
tower alone, an OpenAI-style TorchScript archive with fp16 weights), timm state dicts, and a
Hugging Face cache laid out as ``huggingface_hub`` writes it.
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import timm
import torch
from open_clip.modified_resnet import ModifiedResNet
from safetensors.torch import save_file
from torch import nn

import reference_sed as R
import sed_discriminator as sd
import sed_discriminator.extractor as extractor_module
from sed_discriminator.config import set_value_checks, value_checks_enabled
from sed_discriminator.extractor import ExtractorPreset, get_extractor_preset, list_extractors, register_extractor

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

ROOT = Path(__file__).resolve().parents[1]
OPEN_CLIP_TRUNK = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "layer1", "layer2", "layer3")
PRESETS = ["clip_rn50", "clip_rn101", "clip_convnext_base", "dinov2_vits14", "dinov2_vitb14", "siglip_vitb16",
           "resnet50_in1k"]  # fmt: skip
TIMM_NAME = "timm:test_vit"  # timm's tiny test ViT: 64 channels at stride 16
# How each model rounds the grid of a side that is not a multiple of its stride.
ROUNDING = {"clip_rn50": math.floor, "clip_rn101": math.floor, "clip_convnext_base": math.floor,
            "resnet50_in1k": math.ceil, "dinov2_vits14": math.ceil, "dinov2_vitb14": math.ceil,
            "siglip_vitb16": math.ceil, TIMM_NAME: math.ceil}  # fmt: skip
SIZES = [(64, 64), (96, 96), (100, 76), (256, 256)]


def random_extractor(name: str, **kwargs) -> sd.SemanticExtractor:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return sd.SemanticExtractor(name, pretrained=None, **kwargs)


def load_quietly(name: str, path: Path | str, **kwargs) -> sd.SemanticExtractor:
    """Load the tests' own files, trusted also on torch < 2.10 (the rule itself: tests/test_untrusted.py)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a loaded extractor must not warn about random weights
        return sd.SemanticExtractor(name, pretrained=path, **{"trust_pickle": True, **kwargs})


@pytest.fixture(scope="module", params=[*PRESETS, TIMM_NAME])
def any_extractor(request) -> sd.SemanticExtractor:
    """Each preset once (random weights), for every test that takes it: pytest groups tests by preset."""
    return random_extractor(request.param)


@pytest.fixture(scope="module")
def rn50() -> sd.SemanticExtractor:
    return random_extractor("clip_rn50")


# -- presets and the registry ------------------------------------------------------------------


def test_list_extractors_rows() -> None:
    presets = list_extractors()
    assert list(presets) == sorted(PRESETS)
    assert {n: (p.channels, p.stride) for n, p in presets.items()} == {
        "clip_rn50": (1024, 16), "clip_rn101": (1024, 16), "clip_convnext_base": (512, 16),
        "dinov2_vits14": (384, 14), "dinov2_vitb14": (768, 14), "siglip_vitb16": (768, 16),
        "resnet50_in1k": (1024, 16),
    }  # fmt: skip
    assert presets["clip_rn50"].model == "resnet50_clip.openai" and presets["clip_rn50"].layer == 3
    assert all(p.description for p in presets.values())
    presets.clear()  # a copy: the registry is untouched
    assert "clip_rn50" in list_extractors()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_rows_match_timm(name: str) -> None:
    """channels/stride in the registry are the timm model's own feature_info at the preset's level."""
    preset = get_extractor_preset(name)
    model = extractor_module._create_model(preset.model, meta=True)
    info = model.feature_info[preset.layer]
    assert (info["num_chs"], info["reduction"]) == (preset.channels, preset.stride)
    assert preset.model in timm.list_pretrained(preset.model)


def test_clip_rn50_normalisation_is_clips(rn50) -> None:
    assert rn50.mean.flatten().tolist() == pytest.approx(R.CLIP_MEAN, abs=1e-7)
    assert rn50.std.flatten().tolist() == pytest.approx(R.CLIP_STD, abs=1e-7)


def test_unknown_names_and_layers() -> None:
    with pytest.raises(
        ValueError,
        match=(
            r"Unknown extractor 'clip_vit'\. Available: \[.*'clip_rn50'.*\], or any timm model as "
            r"'timm:<model name>'"
        ),
    ):
        sd.SemanticExtractor("clip_vit", pretrained=None)
    with pytest.raises(
        ValueError, match=r"timm has no model 'not_a_model' \(timm .*\); list them with timm\.list_models"
    ):
        sd.SemanticExtractor("timm:not_a_model", pretrained=None)
    with pytest.raises(
        ValueError,
        match=(
            r"layer=7 does not exist in timm model 'test_vit[.\w]*'; its levels are \{0: 64 ch @ stride 16, "
            r".*5: 64 ch @ stride 16\}"
        ),
    ):
        sd.SemanticExtractor("timm:test_vit", pretrained=None, layer=7)
    with pytest.raises(ValueError, match="'timm:' needs a model name"):
        sd.SemanticExtractor("timm:", pretrained=None)


def test_register_timm_preset_fills_channels_and_stride(monkeypatch) -> None:
    monkeypatch.setattr(extractor_module, "_PRESETS", dict(extractor_module._PRESETS))
    preset = register_extractor(ExtractorPreset("tiny_vit_block2", model="test_vit.r160_in1k", layer=2))
    assert (preset.channels, preset.stride) == (64, 16)
    assert "tiny_vit_block2" in sd.list_extractors()
    with pytest.raises(ValueError, match="named 'tiny_vit_block2' is registered already; pass overwrite=True"):
        register_extractor(preset)
    with pytest.raises(ValueError, match="may not start with 'timm:'"):
        register_extractor(ExtractorPreset("timm:x", model="test_vit"))
    ext = random_extractor("tiny_vit_block2")
    assert ext(torch.rand(1, 3, 32, 48)).shape == (1, 64, 2, 3)


def test_register_custom_trunk(monkeypatch) -> None:
    monkeypatch.setattr(extractor_module, "_PRESETS", dict(extractor_module._PRESETS))
    preset = ExtractorPreset(name="tiny_test", channels=8, stride=4, build=lambda: nn.Conv2d(3, 8, 4, 4))
    assert register_extractor(preset) is preset
    ext = random_extractor("tiny_test")
    assert (ext.channels, ext.stride) == (8, 4)
    assert ext(torch.rand(2, 3, 16, 12)).shape == (2, 8, 4, 3)
    with pytest.raises(ValueError, match="custom trunk without hub weights; pass pretrained= as a local file path"):
        sd.SemanticExtractor("tiny_test", pretrained="default")
    with pytest.raises(ValueError, match="needs channels= and stride="):
        ExtractorPreset(name="bad", build=lambda: nn.Identity())
    with pytest.raises(ValueError, match="needs exactly one of model="):
        ExtractorPreset(name="bad")


# -- the component, and every preset: shapes, frozen, a D step, local weights, pickling ----------


class TestSemanticExtractor:
    """Per component as in kornia: smoke, cardinality, exception, gradients, dynamo, other dtypes.

    Gradients: the extractor is frozen and its output detached by design (SeD conditions on the
    HR image's semantics, never trains them), so the gradient test asserts that none flows.
    """

    def test_smoke(self, device: torch.device, dtype: torch.dtype) -> None:
        ext = random_extractor(TIMM_NAME).to(device, dtype)
        out = ext(torch.rand(2, 3, 32, 48, device=device, dtype=dtype))
        assert out.shape == (2, 64, 2, 3) and out.dtype == dtype and out.device == ext.mean.device
        assert torch.isfinite(out).all()
        assert "name='timm:test_vit', pretrained=None, channels=64, stride=16, layer=5" in repr(ext)

    def test_cardinality(self, any_extractor) -> None:
        ext, name = any_extractor, any_extractor.preset.name
        round_ = ROUNDING[name]
        for height, width in SIZES:
            out = ext(torch.rand(1, 3, height, width))
            grid = (round_(height / ext.stride), round_(width / ext.stride))
            assert out.shape == (1, ext.channels, *grid), (name, height, width)
            assert out.dtype == torch.float32 and torch.isfinite(out).all()

    def test_exception(self, rn50) -> None:
        with pytest.raises(ValueError, match=r"SemanticExtractor needs images of at least 16x16 pixels, got 8x64"):
            rn50(torch.rand(1, 3, 8, 64))
        with pytest.raises(
            ValueError, match=r"SemanticExtractor expects an image batch of shape \(B, 3, H, W\), got a 3-D tensor"
        ):
            rn50(torch.rand(3, 32, 32))
        with pytest.raises(
            ValueError, match=r"SemanticExtractor expects a floating-point image .* Convert it with x\.float\(\) / 255"
        ):
            rn50(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        with pytest.raises(ValueError, match="SemanticExtractor expects 3 channels, got 1"):
            rn50(torch.rand(1, 1, 32, 32))

    def test_no_gradient_frozen_eval_and_outside_the_discriminator(self, any_extractor) -> None:
        ext = any_extractor
        assert not any(p.requires_grad for p in ext.parameters())
        assert ext.train() is ext and not any(m.training for m in ext.modules())
        x = torch.rand(1, 3, 64, 64, requires_grad=True)
        out = ext(x)
        assert not out.requires_grad and out.grad_fn is None
        net_d = sd.ConditionedSeD("patch", extractor=ext, width=8, head_dim=8)
        trunk_params = {id(p) for p in ext.parameters()}
        assert not any(id(p) in trunk_params for p in net_d.parameters())
        assert not any("trunk" in k or "extractor" in k for k in net_d.state_dict())

    def test_other_input_dtypes_are_converted(self, rn50) -> None:
        x = torch.rand(1, 3, 32, 32)
        reference = rn50(x)
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            out = rn50(x.to(dtype))
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, reference, atol=0.1, rtol=0.05)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert rn50(x).dtype == torch.bfloat16

    @pytest.mark.parametrize("name", ["clip_rn50", TIMM_NAME])
    def test_dynamo(self, name: str) -> None:
        torch._dynamo.reset()
        ext = random_extractor(name)
        compiled = torch.compile(ext, backend="eager", fullgraph=True)  # dynamo's graph capture, no inductor
        x = torch.rand(2, 3, 64, 80)
        torch.testing.assert_close(compiled(x), ext(x), atol=1e-6, rtol=1e-6)


def test_full_discriminator_step(any_extractor) -> None:
    ext = any_extractor
    net_d = sd.SeD("patch", width=8, head_dim=8, semantic_channels=ext.channels)
    hr, sr = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64, requires_grad=True)
    semantic = ext(hr)
    fake, real = net_d(sr, semantic), net_d(hr, semantic)
    loss = sd.discriminator_loss(fake, real_logits=real)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in net_d.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert sr.grad is not None and not any(p.grad is not None for p in ext.parameters())


def test_local_weight_file_loads(any_extractor, tmp_path: Path) -> None:
    ext = any_extractor
    state = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in ext.trunk.state_dict().items()
    }
    path = tmp_path / "trunk.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_quietly(ext.preset.name, path)
    assert loaded.pretrained == str(path)
    for key, value in loaded.trunk.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.rand(1, 3, 64, 64)
    assert not torch.equal(loaded(x), ext(x))


def test_pickle_stores_how_to_rebuild(any_extractor) -> None:
    ext = any_extractor
    data = pickle.dumps(ext)
    assert len(data) < 1000  # the arguments, not the weights
    if ext.preset.name not in ("clip_rn50", TIMM_NAME):
        return  # rebuilding the large random models again costs time and proves nothing more
    with pytest.warns(UserWarning, match="RANDOM weights"):
        restored = pickle.loads(data)
    assert restored.config == ext.config and (restored.channels, restored.stride) == (ext.channels, ext.stride)
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(restored(x), ext(x), atol=0, rtol=0)


def test_pickle_rebuilds_from_a_local_file(rn50, tmp_path: Path) -> None:
    state = {k: v * 1.01 if v.is_floating_point() else v for k, v in rn50.trunk.state_dict().items()}
    path = tmp_path / "rn50.pth"
    torch.save(state, path)
    ext = load_quietly("clip_rn50", path, input_range=(-1, 1), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert ext.config == dict(name="clip_rn50", pretrained=str(path), cache_dir=None, input_range=(-1.0, 1.0),
                              layer=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                              trust_pickle=True)  # fmt: skip
    buffer = io.BytesIO()
    torch.save(ext, buffer)
    assert buffer.tell() < 10_000  # torch.save's zip container around a few hundred bytes of arguments
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        restored = torch.load(buffer, weights_only=False)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(restored(x), ext(x), atol=0, rtol=0)
    assert sd.SemanticExtractor(**ext.config).config == ext.config
    with pytest.raises(AttributeError):
        ext.config = {}
    ext.config["name"] = "changed"  # a copy
    assert ext.config["name"] == "clip_rn50"


def test_deepcopy_keeps_the_module_as_it_is(rn50) -> None:
    double = copy.deepcopy(rn50).to(torch.float64)
    again = copy.deepcopy(double)
    assert all(p.dtype == torch.float64 for p in again.parameters()) and again.mean.dtype == torch.float64
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    assert again(x).dtype == torch.float64
    torch.testing.assert_close(again(x).float(), rn50(x.float()), atol=1e-4, rtol=1e-4)


# -- clip_rn50 is the paper's trunk: independent references ------------------------------------


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


def _open_clip_trunk(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.split(".", 1)[0] in OPEN_CLIP_TRUNK}


def _openai_style_fp16(model: ModifiedResNet) -> nn.Module:
    """OpenAI's archive layout: the CLIP model with the image tower under ``visual``, fp16 conv weights."""

    class CLIPLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = copy.deepcopy(model)
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
def checkpoints(open_clip_resnet, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip_checkpoints")
    full = {f"visual.{k}": v.clone() for k, v in open_clip_resnet.state_dict().items()}  # attnpool, layer4 too
    open_clip_state = full | {"token_embedding.weight": torch.randn(10, 8), "logit_scale": torch.ones([])}
    out = {}
    out["open_clip_pt"] = root / "open_clip_RN50.pt"
    torch.save(open_clip_state, out["open_clip_pt"])
    out["open_clip_safetensors"] = root / "open_clip_model.safetensors"
    save_file(open_clip_state, str(out["open_clip_safetensors"]))
    out["open_clip_training_ckpt"] = root / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in open_clip_state.items()}},
               out["open_clip_training_ckpt"])  # fmt: skip
    out["visual_only"] = root / "visual_only.pth"
    torch.save(_open_clip_trunk(open_clip_resnet), out["visual_only"])
    clip = _openai_style_fp16(open_clip_resnet)
    assert clip.visual.conv1.weight.dtype == torch.float16 and clip.visual.bn1.weight.dtype == torch.float32
    out["openai_torchscript_fp16"] = root / "RN50.pt"
    torch.jit.save(torch.jit.trace(clip, torch.rand(1, 3, 8, 8)), str(out["openai_torchscript_fp16"]))
    return out


def _reference_layer3(model: ModifiedResNet, x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(R.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(R.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.layer3(model.layer2(model.layer1(model.stem((x - mean) / std))))


@pytest.mark.parametrize("size", [(96, 64), (100, 76), (77, 33), (256, 256)])
def test_clip_rn50_matches_open_clip_modified_resnet(open_clip_resnet, checkpoints, size) -> None:
    """CLIP mean/std, stem, layer1..layer3 at the input's own size: open_clip's numbers to 1e-6, odd sizes too."""
    ext = load_quietly("clip_rn50", checkpoints["open_clip_pt"])
    x = torch.rand(2, 3, *size)
    expected = _reference_layer3(open_clip_resnet, x)
    assert expected.shape == (2, 1024, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(ext(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["open_clip_pt", "open_clip_safetensors", "open_clip_training_ckpt", "visual_only"])
def test_open_clip_checkpoint_layouts(checkpoints, open_clip_resnet, fmt: str) -> None:
    ext = load_quietly("clip_rn50", checkpoints[fmt])
    assert ext.pretrained == str(checkpoints[fmt])
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(ext(x), _reference_layer3(open_clip_resnet, x), atol=1e-6, rtol=1e-6)


def test_extractor_state_dicts_load(checkpoints, open_clip_resnet, tmp_path: Path) -> None:
    """0.1's ``SemanticExtractor.state_dict()`` (open_clip names under ``trunk.``) and this version's."""
    old = tmp_path / "extractor_0.1.pth"
    torch.save({f"trunk.{k}": v for k, v in _open_clip_trunk(open_clip_resnet).items()}, old)
    new = tmp_path / "extractor_0.2.pth"
    torch.save(load_quietly("clip_rn50", old).state_dict(), new)
    x = torch.rand(1, 3, 64, 48)
    for path in (old, new):
        torch.testing.assert_close(
            load_quietly("clip_rn50", path)(x), _reference_layer3(open_clip_resnet, x), atol=1e-6, rtol=1e-6
        )


def test_openai_torchscript_archive(checkpoints, open_clip_resnet) -> None:
    with pytest.raises(
        ValueError, match=r"RN50\.pt': it is a TorchScript archive .*torch\.jit\.load runs the code .*trust_pickle=True"
    ):
        load_quietly("clip_rn50", checkpoints["openai_torchscript_fp16"], trust_pickle=False)  # runs code: opt in
    ext = load_quietly("clip_rn50", checkpoints["openai_torchscript_fp16"])
    rounded = _openai_style_fp16(open_clip_resnet).visual.float()
    x = torch.rand(1, 3, 64, 64)
    out = ext(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _reference_layer3(rounded, x), atol=1e-6, rtol=1e-6)  # the fp16-rounded weights
    assert not torch.equal(out, _reference_layer3(open_clip_resnet, x))  # ... which differ from the full ones


def test_rn101_loads_an_open_clip_rn101(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = ModifiedResNet(layers=(3, 4, 23, 3), output_dim=512, heads=32, image_size=224, width=64).eval()
    path = tmp_path / "RN101.pt"
    torch.save({f"visual.{k}": v for k, v in model.state_dict().items()}, path)
    x = torch.rand(1, 3, 64, 80)
    torch.testing.assert_close(load_quietly("clip_rn101", path)(x), _reference_layer3(model, x), atol=1e-6, rtol=1e-6)


# -- weight errors -----------------------------------------------------------------------------


_WRONG_MODELS = {
    "rn101_like": (  # RN101-like: more layer3 blocks
        "layer3.6.conv1.weight", (256, 1024, 1, 1),
        r"does not match this extractor's trunk \(resnet50_clip\.openai\): 0 missing keys .* 1 unexpected keys "
        r"\(e\.g\. \['stages\.2\.6\.conv1_1x1\.conv\.weight'\]\)\. Pass OpenAI's RN50\.pt",
    ),
    "wider": (
        "conv1.weight", (40, 3, 3, 3),
        r"stem\.conv1\.conv\.weight has shape \(40, 3, 3, 3\) but the trunk expects \(32, 3, 3, 3\); the checkpoint "
        r"is of another model",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(_WRONG_MODELS))
def test_another_models_checkpoint_is_named(open_clip_resnet, tmp_path: Path, name: str) -> None:
    key, shape, message = _WRONG_MODELS[name]
    state = {f"visual.{k}": v for k, v in _open_clip_trunk(open_clip_resnet).items()}
    state[f"visual.{key}"] = torch.randn(*shape)
    torch.save(state, tmp_path / f"{name}.pt")
    with pytest.raises(ValueError, match=message):
        sd.SemanticExtractor("clip_rn50", pretrained=tmp_path / f"{name}.pt", trust_pickle=True)


def test_a_discriminator_checkpoint_is_not_an_extractor(tmp_path: Path) -> None:
    path = tmp_path / "sed.pt"
    torch.save(sd.SeD("patch", width=8, semantic_channels=64, head_dim=8).state_dict(), path)
    with pytest.raises(ValueError, match=r"sed\.pt does not match this extractor's trunk .*: \d+ missing keys"):
        sd.SemanticExtractor("clip_rn50", pretrained=path, trust_pickle=True)


def test_bad_weight_files_name_the_file(tmp_path: Path) -> None:
    text = tmp_path / "RN50.pt"
    text.write_text("<html>404 Not Found</html>")
    with pytest.raises(ValueError, match=r"RN50\.pt' is a text page .*Download or copy the file again"):
        sd.SemanticExtractor("clip_rn50", pretrained=text)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.safetensors' is empty \(0 bytes\)"):
        sd.SemanticExtractor("dinov2_vits14", pretrained=empty)


def test_missing_path_errors(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"No weight file at .*RN50\.pt.*check the path or pass a pretrained tag"
    ):
        sd.SemanticExtractor("clip_rn50", pretrained=tmp_path / "nope" / "RN50.pt")
    with pytest.raises(FileNotFoundError, match="No weight file at 'RN50.safetensors'"):
        sd.SemanticExtractor("clip_rn50", pretrained="RN50.safetensors")
    with pytest.raises(TypeError, match="pretrained must be a tag, a file path or None, got dict"):
        sd.SemanticExtractor("clip_rn50", pretrained={})


def test_unknown_tag_error() -> None:
    with pytest.raises(
        ValueError,
        match=(
            r"Unknown pretrained tag 'laion9000' for extractor 'clip_rn50' \(timm model resnet50_clip\)\. "
            r"Available tags: \[.*'openai'.*'yfcc15m'\], 'default', a local file path"
        ),
    ):
        sd.SemanticExtractor("clip_rn50", pretrained="laion9000")


@pytest.mark.parametrize("name", [*PRESETS, TIMM_NAME])
def test_offline_error_is_fast_and_says_what_to_do(monkeypatch, tmp_path: Path, name: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        sd.SemanticExtractor(name, cache_dir=tmp_path)
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    model = get_extractor_preset(name).model
    if "." not in model:
        model = f"{model}.{timm.models.get_pretrained_cfg(model).tag}"
    assert f"weights of timm model {model}" in message and f"not in the Hugging Face cache ({tmp_path})" in message
    repo = timm.models.get_pretrained_cfg(model).hf_hub_id  # timm's repo for these weights
    assert f"download https://huggingface.co/{repo}/resolve/main/" in message
    assert f"pass its path: SemanticExtractor({name!r}, pretrained='/path/to/file')" in message
    assert not any(tmp_path.iterdir())


_OFFLINE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import timm, sed_discriminator as sd
    start = time.perf_counter()
    try:
        sd.SemanticExtractor("clip_rn50", pretrained="openai", cache_dir=sys.argv[1])
    except Exception as err:
        print("ERROR-TYPE:", type(err).__name__, "SECONDS:", time.perf_counter() - start)
        print(err)
    else:
        print("NO ERROR")
    """
)


@pytest.mark.slow
def test_offline_error_in_a_fresh_process(tmp_path: Path) -> None:
    cache = tmp_path / "empty_cache"
    cache.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(cache), HF_HUB_CACHE=str(cache), XDG_CACHE_HOME=str(cache))
    result = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, str(cache)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    first, message = result.stdout.split("\n", 1)
    assert first.startswith("ERROR-TYPE: RuntimeError SECONDS:") and float(first.split()[-1]) < 5.0
    assert "HF_HUB_OFFLINE is set" in message and "OpenAI's RN50.pt TorchScript archive" in message
    assert not any(cache.rglob("*.safetensors")) and not any(cache.rglob("*.bin"))


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


@pytest.mark.parametrize("filename", ["model.safetensors", "open_clip_pytorch_model.bin"])
def test_tag_loads_from_the_hub_cache_without_network(monkeypatch, rn50, checkpoints, open_clip_resnet,
                                                      tmp_path: Path, filename: str) -> None:  # fmt: skip
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("a cached tag must not touch the network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    if filename == "model.safetensors":  # timm's own layout
        source = tmp_path / "timm.safetensors"
        save_file(load_quietly("clip_rn50", checkpoints["open_clip_pt"]).trunk.state_dict(), str(source))
    else:  # open_clip's file in the same repo
        source = checkpoints["open_clip_pt"]
    cache = tmp_path / "cache"
    _fake_hub_cache(cache, "timm/resnet50_clip.openai", filename, source)
    for tag in ("openai", "default"):
        ext = load_quietly("clip_rn50", tag, cache_dir=cache)
        assert ext.pretrained == tag
        x = torch.rand(1, 3, 64, 64)
        torch.testing.assert_close(ext(x), _reference_layer3(open_clip_resnet, x), atol=1e-6, rtol=1e-6)


def test_other_tag_uses_its_repo(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        RuntimeError,
        match=r"'yfcc15m' weights of timm model resnet50_clip\.yfcc15m .*huggingface\.co/timm/resnet50_clip\.yfcc15m/",
    ):
        sd.SemanticExtractor("clip_rn50", pretrained="yfcc15m", cache_dir=tmp_path)


# -- inputs ------------------------------------------------------------------------------------


def test_input_range_and_normalisation_overrides(rn50) -> None:
    x = torch.rand(1, 3, 32, 32)
    signed = random_extractor("clip_rn50", input_range=(-1, 1))
    torch.testing.assert_close(signed(x * 2 - 1), rn50(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"input_range must be \(low, high\) with high > low, got \(1, 0\)"):
        sd.SemanticExtractor("clip_rn50", pretrained=None, input_range=(1, 0))
    plain = random_extractor("clip_rn50", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert plain.mean.flatten().tolist() == [0.0, 0.0, 0.0]
    mean, std = torch.tensor(R.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(R.CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(plain(x), rn50(x * std + mean), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"std must be positive, got \(0, 1, 1\)"):
        sd.SemanticExtractor("clip_rn50", pretrained=None, std=(0, 1, 1))
    with pytest.raises(ValueError, match=r"mean must have 3 values \(one per RGB channel\), got \(0\.5,\)"):
        sd.SemanticExtractor("clip_rn50", pretrained=None, mean=(0.5,))


def test_vit_normalisation_comes_from_the_model() -> None:
    cfg = timm.models.get_pretrained_cfg("vit_base_patch16_siglip_224.webli").to_dict()
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5)
    ext = random_extractor("timm:test_vit")
    expected = timm.models.get_pretrained_cfg("test_vit").mean
    assert tuple(ext.mean.flatten().tolist()) == pytest.approx(tuple(expected))


def test_layer_override(rn50) -> None:
    layer2 = random_extractor("clip_rn50", layer=2)
    assert (layer2.channels, layer2.stride) == (512, 8)
    assert layer2(torch.rand(1, 3, 64, 64)).shape == (1, 512, 8, 8)
    assert rn50.channels == 1024  # the registry's preset is unchanged
    last = random_extractor("timm:test_vit", layer=-1)
    assert last(torch.rand(1, 3, 40, 40)).shape == (1, 64, 3, 3)  # 40 px padded to 48: ceil(40 / 16)


def test_vit_padding_rule() -> None:
    ext = random_extractor("timm:test_vit")
    x = torch.rand(1, 3, 40, 56)
    padded = torch.nn.functional.pad((x - ext.mean) / ext.std, (0, 8, 0, 8))  # zeros after normalisation
    with torch.no_grad():
        expected = ext.trunk.forward_intermediates(padded, indices=[ext.preset.layer], norm=True,
                                                   output_fmt="NCHW", intermediates_only=True)[0]  # fmt: skip
    torch.testing.assert_close(ext(x), expected, atol=1e-6, rtol=1e-6)


def test_value_checks_range_and_nan(rn50) -> None:
    before = value_checks_enabled()
    set_value_checks(True)
    try:
        with pytest.raises(
            ValueError, match=r"expects image values in \[0, 1\], got \[0, 255\]\. Scale \[0, 255\] images by 1/255"
        ):
            rn50(torch.tensor([0.0, 255.0]).repeat(16 * 16 * 3 // 2).view(1, 3, 16, 16))
        nan = torch.rand(1, 3, 16, 16)
        nan[0, 1, 2, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN or Inf"):
            rn50(nan)
        rn50(torch.rand(1, 3, 16, 16))
    finally:
        set_value_checks(before)


def test_mean_std_not_in_state_dict(rn50) -> None:
    keys = set(rn50.state_dict())
    assert "mean" not in keys and "std" not in keys and all(k.startswith("trunk.") for k in keys)
    assert not any(k.startswith(("trunk.stages.3", "trunk.head")) for k in keys)  # layer4 and attnpool are pruned
