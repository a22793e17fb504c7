"""load_official_weights: the authors' checkpoint layout (legacy SN keys, DDP prefix), files, errors.

The checkpoints are written by the tests from the independent reference (``reference_sed.py``),
which uses the legacy ``torch.nn.utils.spectral_norm`` hook and the authors' parameter names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import reference_sed as R
import sed_discriminator as sd
from conftest import TINY

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

CS = TINY["semantic_channels"]


def reference(variant: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    ref = R.build_reference(variant, **{**TINY, **kwargs})
    R.perturb_(ref, torch.Generator().manual_seed(seed + 1))
    return R.settle_spectral_norm_(ref).eval()


def authors_checkpoint(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as the authors' DDP training saved it: ``module.`` + legacy SN keys."""
    return {f"module.{k}": v.clone() for k, v in ref.state_dict().items()}


def assert_same_outputs(ref: torch.nn.Module, model: sd.SeD) -> None:
    model.eval()
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, CS, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x, s), ref(x, s), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_authors_layout_loads(variant: str) -> None:
    ref = reference(variant)
    ckpt = authors_checkpoint(ref)
    assert any(k.endswith(".weight_orig") for k in ckpt) and any(k.endswith(".weight_u") for k in ckpt)
    assert all(k.startswith("module.") for k in ckpt)
    model = sd.SeD(variant, **TINY)
    assert sd.load_official_weights(model, ckpt) is model
    u = model.conv1.parametrizations.weight[0]._u
    torch.testing.assert_close(u, ref.conv1.weight_u, atol=0, rtol=0)
    assert_same_outputs(ref, model)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_from_a_file(tmp_path: Path, suffix: str) -> None:
    ref = reference("patch")
    path = tmp_path / f"sed_patch{suffix}"
    if suffix == ".safetensors":
        save_file(authors_checkpoint(ref), str(path))
    else:
        torch.save({"params": authors_checkpoint(ref)}, path)  # BasicSR-style wrapper
    model = sd.load_official_weights(sd.SeD("patch", **TINY), path, trust_pickle=True)  # the test's own file
    assert_same_outputs(ref, model)
    model2 = sd.load_official_weights(sd.SeD("patch", **TINY), str(path), trust_pickle=True)
    assert_same_outputs(ref, model2)


@pytest.mark.parametrize("wrapper", ["state_dict", "params", "params_ema"])
def test_unwraps_containers(wrapper: str) -> None:
    ref = reference("pixel")
    model = sd.load_official_weights(sd.SeD("pixel", **TINY), {wrapper: authors_checkpoint(ref)})
    assert_same_outputs(ref, model)


def test_library_and_compiled_prefixes_round_trip() -> None:
    source = R.perturb_(sd.SeD("patch", **TINY), torch.Generator().manual_seed(0)).eval()
    state = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    model = sd.load_official_weights(sd.SeD("patch", **TINY), state).eval()
    x, s = torch.rand(1, 3, 64, 64), torch.randn(1, CS, 4, 4)
    torch.testing.assert_close(model(x, s), source(x, s), atol=0, rtol=0)


@pytest.mark.parametrize("ckpt_variant, model_variant", [("patch", "pixel"), ("pixel", "patch")])
def test_wrong_variant_error(ckpt_variant: str, model_variant: str) -> None:
    ckpt = authors_checkpoint(reference(ckpt_variant))
    with pytest.raises(ValueError) as info:
        sd.load_official_weights(sd.SeD(model_variant, **TINY), ckpt)
    message = str(info.value)
    assert f"Checkpoint does not match SeD('{model_variant}')" in message
    assert f"The checkpoint looks like the '{ckpt_variant}' variant; the model is '{model_variant}'." in message
    assert "Build the model with the checkpoint's variant" in message


def test_shape_mismatch_error() -> None:
    ckpt = authors_checkpoint(reference("patch"))
    with pytest.raises(
        ValueError,
        match=r"Checkpoint tensor \S+ has shape \(\d+, .*\) but the model expects .*match width",
    ):
        sd.load_official_weights(sd.SeD("patch", **{**TINY, "width": 16}), ckpt)


def test_missing_key_error_is_strict() -> None:
    ckpt = authors_checkpoint(reference("patch"))
    del ckpt["module.att2.proj_out.weight"]
    model = sd.SeD("patch", **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"1 missing keys \(e\.g\. \['att2\.proj_out\.weight'\]\), 0 unexpected keys"):
        sd.load_official_weights(model, ckpt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_rejects_other_sources(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="source must be a path or a state dict, got int"):
        sd.load_official_weights(sd.SeD("patch", **TINY), 3)
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        sd.load_official_weights(sd.SeD("patch", **TINY), path, trust_pickle=True)


@pytest.mark.parametrize("variant", ["patch", "pixel"])
def test_plain_load_state_dict_takes_legacy_spectral_norm_keys(variant: str) -> None:
    """A trainer's own loader (load_state_dict, strict) reads the authors' checkpoint layout too."""
    source = sd.SeD(variant, width=8, semantic_channels=64, head_dim=8)
    legacy = {}
    for key, value in source.state_dict().items():
        for new, old in (
            ("parametrizations.weight.original", "weight_orig"),
            ("parametrizations.weight.0._u", "weight_u"),
            ("parametrizations.weight.0._v", "weight_v"),
        ):
            key = key.replace(new, old)
        legacy[key] = value
    assert any(k.endswith(".weight_orig") for k in legacy)
    target = sd.SeD(variant, width=8, semantic_channels=64, head_dim=8)
    target.load_state_dict(legacy, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    wrapper = torch.nn.Sequential(sd.SeD(variant, width=8, semantic_channels=64, head_dim=8))  # under a prefix
    wrapper.load_state_dict({f"0.{k}": v for k, v in legacy.items()}, strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        target.load_state_dict({k: v for k, v in legacy.items() if not k.endswith("weight_u")}, strict=True)
