"""Reading weight files and unwrapping state dicts, shared by every loader of the library.

:func:`read_state_dict` reads ``.safetensors`` files, TorchScript archives and ``torch.save``
files (with ``weights_only=True``) and turns every bad file into one ``ValueError`` that names
the file and says what to do. :func:`unwrap_state_dict` removes the containers and prefixes that
training frameworks add around a state dict.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping

import torch

__all__ = ["WRAPPER_KEYS", "PREFIXES", "unwrap_state_dict", "read_state_dict"]

# Containers around a state dict, in the order they are preferred when several are present:
# BasicSR's EMA weights before its raw weights, then Lightning's / timm's and other trainers'.
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")
# Key prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
PREFIXES = ("module.", "_orig_mod.")

_ZIP_MAGIC = b"PK\x03\x04"
_SNIFF_BYTES = 64
_GET_AGAIN = "Download or copy the file again (and compare its size or checksum with the source)."


def unwrap_state_dict(obj: object, *, source: str = "state dict") -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` dict inside a checkpoint object.

    Containers are unwrapped as long as one is found, preferring ``params_ema``, then ``params``
    (BasicSR), ``state_dict`` (Lightning, timm training checkpoints) and ``model``. The
    ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (``torch.compile``) prefixes are
    stripped from every key, repeatedly (``module._orig_mod.conv.weight`` -> ``conv.weight``).

    Args:
        obj: what ``torch.load`` returned, or a state dict.
        source: what ``obj`` came from, named in the error messages (e.g. the file path).

    Returns:
        A new dict; the tensors are not copied.

    Raises:
        TypeError: ``obj`` is not a mapping.
        ValueError: the unwrapped mapping is empty, has non-string keys or non-tensor values,
            or two keys become equal once their prefixes are stripped.

    Example:
        >>> unwrap_state_dict({"params": {"module.conv.weight": torch.zeros(1)}})
        {'conv.weight': tensor([0.])}
    """
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"{source} holds a {type(obj).__name__}, not a state dict (a mapping of parameter names to tensors). "
            "Pass what model.state_dict() returns, or a file saved with torch.save(model.state_dict(), path)."
        )
    state: Mapping = obj
    while True:
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if wrapper is None:
            break
        state = state[wrapper]
    if not state:
        raise ValueError(f"{source} holds an empty state dict: there are no weights in it.")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        examples = ", ".join(f"{k!r}: {type(state[k]).__name__}" for k in bad[:3])
        raise ValueError(
            f"{source} is not a state dict: {len(bad)} of its {len(state)} entries are not name -> tensor "
            f"({examples}). Expected keys are one of {list(WRAPPER_KEYS)} around a state dict, or parameter "
            "names; save the weights with torch.save(model.state_dict(), path)."
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        stripped = _strip_prefixes(key)
        if stripped in out:
            raise ValueError(
                f"{source} has two entries for {stripped!r} once the {list(PREFIXES)} prefixes are removed "
                f"(one of them is {key!r}); save a single model's state dict."
            )
        out[stripped] = value
    return out


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the state dict of a weight file, unwrapped with :func:`unwrap_state_dict`.

    The format is recognised from the file's first bytes, not its name: a ``.safetensors``
    file, a TorchScript archive (``torch.jit.save``, e.g. OpenAI's ``RN50.pt``) or a
    ``torch.save`` file (read with ``weights_only=True``, so no code in the file runs). Zip
    archives (``torch.save`` since PyTorch 1.6, TorchScript) are checked against the CRC-32 of
    each entry first, so flipped or zeroed bytes are reported instead of loading wrong weights
    (a safetensors file has no checksum: damage there is found only where it breaks the header).

    Args:
        path: the weight file.

    Returns:
        A flat ``{name: tensor}`` dict on the CPU.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ValueError: the file is empty, text, truncated, damaged, of an unknown format, or does
            not hold a state dict; the message names the file and the fix.

    Example:
        >>> state = read_state_dict("RN50.pt")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No weight file at {path!r}; check the path.")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder; pass the weight file inside it.")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"Weight file {path!r} is empty (0 bytes): the download or copy did not finish. {_GET_AGAIN}")
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if _is_text(head):
        raise ValueError(_text_file_message(path, head))
    if head.startswith(_ZIP_MAGIC):
        obj = _read_zip(path, size)
    elif _looks_like_safetensors(head, size):
        obj = _read_safetensors(path)
    elif path.endswith(".safetensors"):
        raise ValueError(
            f"Weight file {path!r} is not a valid safetensors file: its first 8 bytes do not give the length of "
            f"a JSON header that fits in the file's {size} bytes (truncated or damaged). {_GET_AGAIN}"
        )
    else:
        obj = _torch_load(path)
    try:
        return unwrap_state_dict(obj, source=f"Weight file {path!r}")
    except TypeError as err:  # one exception type for every bad file
        raise ValueError(str(err)) from None


def _is_text(head: bytes) -> bool:
    if not head or b"\0" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:  # may cut a multi-byte character at the end
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _text_file_message(path: str, head: bytes) -> str:
    first = head.decode("utf-8", "replace").strip().splitlines()[0][:60] if head.strip() else ""
    if first.startswith("version https://git-lfs"):
        return (
            f"Weight file {path!r} is a Git LFS pointer, not the weights (it starts with {first!r}): run "
            "`git lfs pull` in the repository it comes from, or download the file itself."
        )
    elif first.lower().startswith(("<!doctype", "<html", "<?xml", "{")):
        why = "a text page (an HTML/JSON error page or a login page saved instead of the weights?)"
    else:
        why = "text, not a weight file"
    return f"Weight file {path!r} is {why} (it starts with {first!r}). {_GET_AGAIN}"


def _read_zip(path: str, size: int) -> object:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as err:
        raise ValueError(
            f"Weight file {path!r} ({size} bytes) is a damaged or truncated zip archive ({_first_line(err)}): "
            f"the download or copy stopped early, or the file was changed. {_GET_AGAIN}"
        ) from err
    if damaged is not None:
        raise ValueError(
            f"Weight file {path!r} is damaged: entry {damaged!r} does not match its CRC-32 checksum "
            f"(flipped or zeroed bytes from a bad disk, copy or download). {_GET_AGAIN}"
        )
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        try:
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
        except Exception as err:  # torch reports bad archives with RuntimeError and friends
            raise ValueError(
                f"Weight file {path!r} is a TorchScript archive that torch.jit.load cannot read "
                f"({type(err).__name__}: {_first_line(err)}). {_GET_AGAIN}"
            ) from err
    return _torch_load(path)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, json.JSONDecodeError, ValueError, OSError) as err:
        raise ValueError(
            f"Weight file {path!r} is not a valid safetensors file ({_first_line(err)}): truncated or damaged. "
            f"{_GET_AGAIN}"
        ) from err


def _torch_load(path: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise ValueError(
                f"Weight file {path!r} holds Python objects other than tensors (a whole pickled model?), which "
                "weights-only loading refuses to run. Save model.state_dict() instead; or, if you trust the "
                "file, load it yourself with torch.load(path, weights_only=False) and pass the state dict."
            ) from err
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        raise _unreadable(path, pickle.UnpicklingError(found.group(1)) if found else err) from err
    except (EOFError, RuntimeError, OSError, ValueError, struct.error, UnicodeDecodeError) as err:
        raise _unreadable(path, err) from err


def _unreadable(path: str, err: BaseException) -> ValueError:
    return ValueError(
        f"Weight file {path!r} is truncated, damaged or not a PyTorch/safetensors weight file "
        f"({type(err).__name__}: {_first_line(err) or 'no details'}). {_GET_AGAIN}"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""
