"""Files you did not make (issue 19): no code runs from a weight file, on every supported torch; the converter.

A crafted pickle whose unpickling would create a marker file goes to every public loader: the
marker never appears and the error says what to do. With torch's version patched to report
2.5.1 (known ``weights_only`` escapes), pickle-based files are refused unless the caller passes
``trust_pickle=True``; safetensors files always load. Section "16.3": weights that would give
NaN logits (NaN/Inf, zeroed spectral-norm vectors) and a conv given two sets of keys are refused.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TINY, CreatesMarker
from safetensors.torch import save_file

import reference_sed as R
import sed_discriminator as sd
from sed_discriminator._state import UntrustedFileError, read_state_dict, torch_is_patched
from sed_discriminator.convert import convert, main

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning", "ignore::DeprecationWarning")

TIMM_NAME = "timm:test_vit"  # timm's tiny test ViT
CVES = r"CVE-2025-32434.*CVE-2026-24747"


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "MARKER_code_ran"


@pytest.fixture(params=["torch_save_zip", "torch_save_legacy", "raw_pickle"])
def crafted(request, tmp_path: Path, marker: Path) -> Path:
    path = tmp_path / f"crafted_{request.param}.pth"
    payload = {"conv1.weight": torch.zeros(2, 2), "evil": CreatesMarker(marker)}
    if request.param == "raw_pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=request.param == "torch_save_zip")
    assert not marker.exists()
    return path


@pytest.fixture(params=["installed", "2.5.1"])
def torch_version(request, monkeypatch) -> str:
    if request.param != "installed":
        monkeypatch.setattr(torch, "__version__", request.param)
    return str(torch.__version__)


def _public_loaders():
    def official(path, **kw):
        sd.load_official_weights(sd.SeD("patch", **TINY), path, **kw)

    def extractor(path, **kw):
        sd.SemanticExtractor(TIMM_NAME, pretrained=path, **kw)

    def converter(path, **kw):
        argv = [str(path), str(Path(path).with_suffix(".safetensors"))] + (["--trust-pickle"] if kw else [])
        if main(argv) != 0:
            raise ValueError("convert failed")

    def pretrain_network_d(path, **kw):
        basicsr = pytest.importorskip("sed_discriminator.integrations.basicsr.models")
        basicsr.load_sed_checkpoint(sd.SeD("patch", **TINY), path, **kw)

    return {"load_official_weights": official, "SemanticExtractor": extractor, "convert": converter,
            "pretrain_network_d": pretrain_network_d, "read_state_dict": read_state_dict}  # fmt: skip


LOADERS = _public_loaders()


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("trust", [False, True], ids=["default", "trust_pickle"])
def test_crafted_pickle_never_runs(loader: str, trust: bool, crafted: Path, marker: Path, torch_version: str,
                                   capsys) -> None:  # fmt: skip
    kwargs = {"trust_pickle": True} if trust else {}
    with pytest.raises(ValueError) as info:
        LOADERS[loader](crafted, **kwargs)
    assert not marker.exists(), "code in the file ran"
    message = str(info.value) + capsys.readouterr().err
    if not torch_is_patched() and not trust:  # refused before the file is unpickled at all
        assert "Refusing to read" in message and "crafted_" in message and f"torch {torch_version}" in message
        assert "pass trust_pickle=True" in message and "python -m sed_discriminator.convert" in message
        assert "Upgrade torch to 2.10" in message
        assert re.search(CVES, message)
    else:  # torch.load(weights_only=True) refuses the object
        assert "crafted_" in message and "holds Python objects other than tensors" in message


class RunsShell:
    """Unpickling this calls ``os.system``: torch 2.14 refuses its module (``posix``) as blocked, in new words."""

    def __init__(self, marker: Path) -> None:
        self.command = f"touch {marker}"

    def __reduce__(self):
        import os

        return os.system, (self.command,)


@pytest.mark.skipif(not torch_is_patched(), reason="torch < 2.10 refuses pickles before reading them")
@pytest.mark.parametrize("payload", ["blocked_module", "unsupported_global"])
def test_a_refused_pickle_is_named_with_torchs_whole_text(payload: str, tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "crafted.pth"
    evil = RunsShell(marker) if payload == "blocked_module" else CreatesMarker(marker)
    torch.save({"conv1.weight": torch.zeros(2, 2), "evil": evil}, path)
    with pytest.raises(ValueError) as info:
        read_state_dict(path)
    assert not marker.exists(), "code in the file ran"
    message, torch_text = str(info.value), str(info.value.__cause__)
    assert "crafted.pth' holds Python objects other than tensors" in message and "download" not in message.lower()
    assert re.sub(r"\x1b\[[0-9;]*m", "", torch_text).strip() in message  # torch's text is kept whole,
    assert "arbitrary code execution" in message  # with its warning


def test_error_of_the_converter_names_the_way_out(crafted: Path, old_torch, capsys) -> None:
    assert main([str(crafted), str(crafted.with_suffix(".safetensors"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Refusing to read") and "--trust-pickle" in err
    assert not crafted.with_suffix(".safetensors").exists()


def _sed_file(tmp_path: Path, fmt: str) -> tuple[Path, sd.SeD]:
    source = R.perturb_(sd.SeD("patch", **TINY), torch.Generator().manual_seed(0)).eval()
    path = tmp_path / f"net_d.{fmt}"
    if fmt == "safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"params": source.state_dict()}, path)
    return path, source


def _same_logits(a: sd.SeD, b: sd.SeD) -> None:
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, TINY["semantic_channels"], 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x, s), b.eval()(x, s), atol=0, rtol=0)


def test_unpatched_torch_refuses_pth_without_the_keyword(tmp_path: Path, old_torch) -> None:
    path, source = _sed_file(tmp_path, "pth")
    with pytest.raises(UntrustedFileError, match=r"net_d\.pth'.*pickle-based.*torch 2\.5\.1.*" + CVES):
        sd.load_official_weights(sd.SeD("patch", **TINY), path)
    _same_logits(sd.load_official_weights(sd.SeD("patch", **TINY), path, trust_pickle=True), source)


def test_unpatched_torch_extractor_file(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with pytest.warns(UserWarning, match="RANDOM"):
        random_ext = sd.SemanticExtractor(TIMM_NAME, pretrained=None)
    state = {k: v + 0.1 for k, v in random_ext.trunk.state_dict().items()}
    torch.save(state, tmp_path / "vit.pth")
    save_file(state, str(tmp_path / "vit.safetensors"))
    request.getfixturevalue("old_torch")
    with pytest.raises(UntrustedFileError, match=r"vit\.pth'.*torch 2\.5\.1"):
        sd.SemanticExtractor(TIMM_NAME, pretrained=tmp_path / "vit.pth")
    x = torch.rand(1, 3, 32, 32)
    trusted = sd.SemanticExtractor(TIMM_NAME, pretrained=tmp_path / "vit.pth", trust_pickle=True)
    safe = sd.SemanticExtractor(TIMM_NAME, pretrained=tmp_path / "vit.safetensors")
    assert trusted.config["trust_pickle"] and not safe.config["trust_pickle"]
    torch.testing.assert_close(trusted(x), safe(x), atol=0, rtol=0)
    assert not torch.equal(safe(x), random_ext(x))


def test_safetensors_needs_no_keyword_on_any_torch(tmp_path: Path, monkeypatch) -> None:
    path, source = _sed_file(tmp_path, "safetensors")
    monkeypatch.setattr(torch, "__version__", "2.2.0")
    _same_logits(sd.load_official_weights(sd.SeD("patch", **TINY), path), source)


def test_torchscript_archive_needs_trust_on_every_torch(tmp_path: Path) -> None:
    module = torch.nn.Module()
    module.conv = torch.nn.Conv2d(3, 4, 3)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    with pytest.raises(
        UntrustedFileError, match=r"scripted\.pt': it is a TorchScript archive.*runs the code.*every torch"
    ):
        read_state_dict(path)
    assert set(read_state_dict(path, trust_pickle=True)) == {"conv.weight", "conv.bias"}


# -- the converter -----------------------------------------------------------------------------


def _authors_file(tmp_path: Path) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """A BasicSR-style net_d file of the authors' DDP layout: params + params_ema, ``module.``, legacy SN keys."""
    refs = []
    for seed in (0, 5):
        torch.manual_seed(seed)
        ref = R.build_reference("patch", **TINY)
        R.perturb_(ref, torch.Generator().manual_seed(seed + 1))
        refs.append(R.settle_spectral_norm_(ref).eval())
    raw, ema = refs
    path = tmp_path / "net_d_400000.pth"
    torch.save({"params": {f"module.{k}": v for k, v in raw.state_dict().items()},
                "params_ema": {f"module.{k}": v for k, v in ema.state_dict().items()}}, path)  # fmt: skip
    return path, raw, ema


def _ref_logits(ref: torch.nn.Module, model: sd.SeD) -> None:
    x, s = torch.rand(2, 3, 64, 64), torch.randn(2, TINY["semantic_channels"], 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, s), ref(x, s), atol=1e-5, rtol=0)


def test_converter_output_loads_strictly_with_the_same_logits(tmp_path: Path, capsys) -> None:
    source, raw, ema = _authors_file(tmp_path)
    out = tmp_path / "net_d.safetensors"
    assert main([str(source), str(out), "--trust-pickle"]) == 0  # the test's own file
    assert "loaded strictly into SeD(variant='patch'" in capsys.readouterr().out
    from_source = sd.load_official_weights(sd.SeD("patch", **TINY), source, trust_pickle=True)  # EMA first too
    converted = sd.load_official_weights(sd.SeD("patch", **TINY), out)
    _same_logits(converted, from_source)
    _ref_logits(ema, converted)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # written atomically

    with pytest.raises(FileExistsError, match=r"net_d\.safetensors' exists already; pass --overwrite"):
        convert(source, out, ema=False, trust_pickle=True)
    convert(source, out, ema=False, trust_pickle=True, overwrite=True)
    _ref_logits(raw, sd.load_official_weights(sd.SeD("patch", **TINY), out))


def test_converter_reads_plain_and_conditioned_state_dicts(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="RANDOM"):
        net = sd.ConditionedSeD("pixel", extractor=TIMM_NAME, pretrained=None, **TINY)
    R.perturb_(net, torch.Generator().manual_seed(2))
    torch.save({"module._orig_mod." + k: v for k, v in net.state_dict().items()}, tmp_path / "cond.pth")
    convert(tmp_path / "cond.pth", tmp_path / "cond.safetensors", trust_pickle=True, log=lambda _: None)
    plain = sd.load_official_weights(sd.SeD("pixel", **TINY), tmp_path / "cond.safetensors")
    x, s = torch.rand(1, 3, 64, 64), torch.randn(1, TINY["semantic_channels"], 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x, s), sd.SeD.forward(net.eval(), x, s), atol=0, rtol=0)


def test_converter_extractor_file(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="RANDOM"):
        ext = sd.SemanticExtractor(TIMM_NAME, pretrained=None)
    torch.save({k: v * 1.5 for k, v in ext.trunk.state_dict().items()}, tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"not an SeD checkpoint.*pass --extractor NAME"):
        convert(tmp_path / "vit.pth", tmp_path / "vit.safetensors", trust_pickle=True, log=lambda _: None)
    convert(
        tmp_path / "vit.pth", tmp_path / "vit.safetensors", extractor=TIMM_NAME, trust_pickle=True, log=lambda _: None
    )
    x = torch.rand(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        a = sd.SemanticExtractor(TIMM_NAME, pretrained=tmp_path / "vit.pth", trust_pickle=True)
        b = sd.SemanticExtractor(TIMM_NAME, pretrained=tmp_path / "vit.safetensors")
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_converter_errors(tmp_path: Path, capsys) -> None:
    source, _, _ = _authors_file(tmp_path)
    assert main([str(source), str(tmp_path / "out.pth")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"has no EMA weights"):
        plain = tmp_path / "plain.pth"
        torch.save(torch.load(source, weights_only=True)["params"], plain)
        convert(plain, tmp_path / "x.safetensors", ema=True, trust_pickle=True, log=lambda _: None)
    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "y.safetensors")]) == 2
    assert "No weight file at" in capsys.readouterr().err


# -- 16.3: weights that would give NaN logits, two sets of keys -----------------------------------


def _state() -> dict[str, torch.Tensor]:
    return R.perturb_(sd.SeD("patch", **TINY), torch.Generator().manual_seed(0)).state_dict()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_16_3_nan_and_inf_are_refused(bad: float) -> None:
    state = _state()
    state["att2.proj_out.weight"][0, 0] = bad
    model = sd.SeD("patch", **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"1 NaN/Inf values in 'att2\.proj_out\.weight'.*Load an earlier checkpoint"):
        sd.load_official_weights(model, state)
    with pytest.raises(ValueError, match=r"NaN/Inf values in 'att2\.proj_out\.weight'"):
        model.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


@pytest.mark.parametrize("leaf", ["parametrizations.weight.0._u", "parametrizations.weight.0._v", "weight_u"])
def test_16_3_zeroed_spectral_norm_vectors_are_refused(leaf: str) -> None:
    state = _state()
    if leaf == "weight_u":  # the authors' legacy name
        state = {k.replace("parametrizations.weight.0._u", "weight_u"): v for k, v in state.items()}
    key = f"conv2.{leaf}"
    state[key] = torch.zeros_like(state[key])
    with pytest.raises(
        ValueError, match=r"all-zero spectral-norm vector 'conv2\.parametrizations\.weight\.0\._[uv]'.*NaN"
    ):
        sd.load_official_weights(sd.SeD("patch", **TINY), state)
    with pytest.raises(ValueError, match=r"all-zero spectral-norm vector"):
        torch.nn.Sequential(sd.SeD("patch", **TINY)).load_state_dict({f"0.{k}": v for k, v in state.items()})


def test_16_3_legacy_and_new_keys_for_one_conv_are_refused() -> None:
    state = _state()
    state["conv3.weight_orig"] = state["conv3.parametrizations.weight.original"] * 2
    with pytest.raises(
        ValueError, match=r"both 'conv3\.weight_orig' .* and 'conv3\.parametrizations\.weight\.original'"
    ):
        sd.load_official_weights(sd.SeD("patch", **TINY), state)
    with pytest.raises(ValueError, match=r"both 'conv3\.weight_orig'"):
        sd.SeD("patch", **TINY).load_state_dict(state)
