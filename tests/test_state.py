"""_state: every bad weight file becomes one ValueError naming the file and the fix; wrappers and prefixes."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sed_discriminator as sd
from sed_discriminator._state import read_state_dict as _read_state_dict
from sed_discriminator._state import unwrap_state_dict

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def read_state_dict(path: Path, trust_pickle: bool = True) -> dict[str, torch.Tensor]:
    """The tests' own files are trusted (also on torch < 2.10); the rule itself: tests/test_untrusted.py."""
    return _read_state_dict(path, trust_pickle=trust_pickle)


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.randn(16, 8, 3, 3), "conv.bias": torch.randn(16), "fc.weight": torch.randn(64, 64)}


@pytest.fixture
def saved(tmp_path: Path, state) -> Path:
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    return path


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors", "torchscript"])
def test_good_files_load(tmp_path: Path, state, fmt: str) -> None:
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "zip":
        torch.save({"params": state}, path)
    elif fmt == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif fmt == "safetensors":
        save_file(state, str(path))
    else:
        module = torch.nn.Module()
        module.conv = torch.nn.Conv2d(8, 16, 3)
        module.fc = torch.nn.Linear(64, 64, bias=False)
        module.load_state_dict(state)
        torch.jit.save(torch.jit.script(module), str(path))
    assert_same(read_state_dict(path), state)


def test_format_is_read_from_the_content_not_the_name(tmp_path: Path, state) -> None:
    path = tmp_path / "really_safetensors.pth"
    save_file(state, str(path))
    assert_same(read_state_dict(path), state)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "RN50.pt"
    path.write_text("<!DOCTYPE html><html><body>Rate limit exceeded</body></html>\n")
    with pytest.raises(
        ValueError, match=r"RN50\.pt' is a text page .*starts with '<!DOCTYPE html>.*Download or copy the file again"
    ):
        read_state_dict(path)


def test_git_lfs_pointer(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 102\n")
    with pytest.raises(ValueError, match=r"model\.safetensors' is a Git LFS pointer.*git lfs pull"):
        read_state_dict(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pth' is empty \(0 bytes\).*Download or copy the file again"):
        read_state_dict(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_torch_file(tmp_path: Path, state, legacy: bool) -> None:
    full = tmp_path / "full.pth"
    torch.save(state, full, _use_new_zipfile_serialization=not legacy)
    path = tmp_path / "cut.pth"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    expected = (
        r"cut\.pth' \(\d+ bytes\) is a damaged or truncated zip archive"
        if not legacy
        else r"cut\.pth' is truncated, damaged"
    )
    with pytest.raises(ValueError, match=expected + r".*Download or copy the file again"):
        read_state_dict(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_file_named_safetensors_is_one_value_error(tmp_path: Path, state, legacy: bool) -> None:
    # torch >= 2.10's torch.load reads a path ending in .safetensors with safetensors: a raw SafetensorError.
    path = tmp_path / "fake.safetensors"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    what = r"a pickle \(torch\.save's legacy format" if legacy else "a torch.save file"
    with pytest.raises(ValueError, match=rf"fake\.safetensors' is named \.safetensors but is {what}.*Rename it to"):
        read_state_dict(path)
    path.rename(tmp_path / "fake.pth")
    assert_same(read_state_dict(tmp_path / "fake.pth"), state)  # renamed, it is read as what it is


def test_every_cut_of_a_legacy_pickle_is_one_value_error(tmp_path: Path, state) -> None:
    full = tmp_path / "full.pth"
    torch.save(state, full, _use_new_zipfile_serialization=False)
    raw = full.read_bytes()
    path = tmp_path / "cut.pth"
    for size in range(1, len(raw), 31):  # cut inside each of the pickles and the tensor data (an IndexError escaped)
        path.write_bytes(raw[:size])
        with pytest.raises(ValueError, match=r"cut\.pth' is truncated, damaged or not a PyTorch"):
            read_state_dict(path)


def test_flipped_bytes_are_detected(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    rng = random.Random(0)
    for i in rng.sample(range(len(data)), 64):
        data[i] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=r"weights\.pth' (is damaged: entry .* CRC-32|\(\d+ bytes\) is a damaged or truncated zip)"
    ):
        read_state_dict(saved)


def test_flipped_bytes_in_tensor_data_fail_the_checksum(saved: Path, state) -> None:
    data = bytearray(saved.read_bytes())
    payload = state["fc.weight"].numpy().tobytes()
    start = bytes(data).find(payload[:64])
    assert start > 0
    for i in range(start + 100, start + 164):
        data[i] ^= 0x01  # torch.load alone would return slightly wrong weights
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"weights\.pth' is damaged: entry '[^']+/data/\d+' does not match its CRC-32"):
        read_state_dict(saved)


def test_zeroed_block_is_detected(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[4096:8192] = bytes(4096)
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"weights\.pth' is damaged: .*flipped or zeroed bytes.*Download or copy"):
        read_state_dict(saved)


def test_bad_safetensors_header(tmp_path: Path, state) -> None:
    good = tmp_path / "good.safetensors"
    save_file(state, str(good))
    raw = good.read_bytes()
    bad_json = tmp_path / "bad_json.safetensors"
    bad_json.write_bytes(raw[:8] + b"{" + b"x" * 20 + raw[29:])
    with pytest.raises(ValueError, match=r"bad_json\.safetensors' is not a valid safetensors file \(.*header"):
        read_state_dict(bad_json)
    bad_length = tmp_path / "bad_length.safetensors"
    bad_length.write_bytes(b"\xff" * 8 + raw[8:])
    with pytest.raises(
        ValueError, match=r"bad_length\.safetensors' is not a valid safetensors file: its first 8 bytes"
    ):
        read_state_dict(bad_length)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors' is not a valid safetensors file .*truncated or damaged"):
        read_state_dict(cut)


def test_file_that_holds_no_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(
        ValueError, match=r"list\.pth' holds a list, not a state dict.*torch\.save\(model\.state_dict\(\)"
    ):
        read_state_dict(path)
    path = tmp_path / "mixed.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(
        ValueError, match=r"mixed\.pth' is not a state dict: 2 of its 2 entries are not name -> tensor \('epoch': int"
    ):
        read_state_dict(path)


def test_pickled_module_is_refused_with_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(
        ValueError, match=r"module\.pth' holds Python objects other than tensors.*model\.state_dict\(\)"
    ):
        read_state_dict(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(bytes(random.Random(1).randrange(128, 256) for _ in range(4096)))
    with pytest.raises(ValueError, match=r"noise\.bin' is truncated, damaged or not a PyTorch/safetensors weight file"):
        read_state_dict(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"No weight file at .*nothing\.pth"):
        read_state_dict(tmp_path / "nothing.pth")
    with pytest.raises(ValueError, match="is a folder; pass the weight file inside it"):
        read_state_dict(tmp_path)


def test_checksum_check_is_fast(tmp_path: Path) -> None:
    path = tmp_path / "big.pth"
    torch.save({"w": torch.zeros(25_000_000)}, path)  # 100 MB
    start = time.perf_counter()
    read_state_dict(path)
    checked = time.perf_counter() - start
    start = time.perf_counter()
    torch.load(path, weights_only=True)
    plain = time.perf_counter() - start
    assert checked < plain + 2.0, (checked, plain)


def test_unwrap_wrappers_and_prefixes(state) -> None:
    wrapped = {"module._orig_mod." + k: v for k, v in state.items()}
    assert_same(unwrap_state_dict({"state_dict": wrapped, "epoch": 3}), state)
    assert_same(unwrap_state_dict({"model": {"params": {"_orig_mod.module." + k: v for k, v in state.items()}}}), state)
    other = {k: torch.zeros_like(v) for k, v in state.items()}
    assert_same(unwrap_state_dict({"params": other, "params_ema": state}), state)  # EMA weights first
    assert_same(unwrap_state_dict({"state_dict": other, "params": state}), state)
    assert unwrap_state_dict(state) is not state


def test_unwrap_errors_name_the_source() -> None:
    with pytest.raises(TypeError, match=r"my checkpoint holds a list, not a state dict"):
        unwrap_state_dict([1], source="my checkpoint")
    with pytest.raises(ValueError, match=r"my checkpoint holds an empty state dict"):
        unwrap_state_dict({"params": {}}, source="my checkpoint")
    with pytest.raises(ValueError, match=r"my checkpoint has two entries for 'w' once the .* prefixes are removed"):
        unwrap_state_dict({"w": torch.zeros(1), "module.w": torch.ones(1)}, source="my checkpoint")


def test_load_official_weights_reports_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "sed.pth"
    path.write_text("not weights")
    with pytest.raises(ValueError, match=r"sed\.pth' is text, not a weight file"):
        sd.load_official_weights(sd.SeD("patch", width=8, semantic_channels=64, head_dim=8), path)
    with pytest.raises(
        ValueError, match=r"is not a state dict: 1 of its 1 entries are not name -> tensor \('epoch': int"
    ):
        sd.load_official_weights(sd.SeD("patch", width=8, semantic_channels=64, head_dim=8), {"epoch": 1})
