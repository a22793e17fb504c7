"""The one place the library reads weight files: a damage pre-check, the untrusted-file rule, one ``torch.load``.

:func:`read_checkpoint` returns what a file holds; :func:`read_state_dict` also unwraps it with
:func:`unwrap_state_dict` (trainers' containers, timm's ``clean_state_dict`` for prefixes). Every
bad file becomes one ``ValueError`` that names the file and says what to do.

Why not timm's ``load_state_dict`` / ``create_model(pretrained_cfg_overlay={"file": ...})``: timm
reads ``.safetensors`` by file name only, cannot read TorchScript archives (OpenAI's ``RN50.pt``),
does not check a file for damage, and from timm 1.0.9 to 1.0.24 calls ``torch.load`` with
``weights_only=False``. Pickle-based files are read here only under :data:`TRUST_RULE`.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Mapping

import torch
from torch.torch_version import TorchVersion

from ._checks import check_flag

__all__ = [
    "WRAPPER_KEYS",
    "PATCHED_TORCH",
    "TRUST_RULE",
    "UntrustedFileError",
    "torch_is_patched",
    "check_finite",
    "unwrap_state_dict",
    "read_checkpoint",
    "read_state_dict",
]

# Containers around a state dict, in the order they are preferred when several are present:
# BasicSR's EMA weights before its raw weights, then Lightning's / timm's and other trainers'.
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")
# The first torch whose weights_only unpickler has no known escape (CVE-2025-32434 fixed in 2.6.0,
# CVE-2026-24747 fixed in 2.10.0).
PATCHED_TORCH = (2, 10)
TRUST_RULE = (
    "Pickle-based files (torch.save, .pt/.pth/.bin/.ckpt) are read with torch.load(weights_only=True) only on "
    "torch >= 2.10 or with trust_pickle=True; TorchScript archives (torch.jit.load runs the code inside them, on "
    "every torch) only with trust_pickle=True; .safetensors files always."
)

_ZIP_MAGIC = b"PK\x03\x04"
_SNIFF_BYTES = 64
_GET_AGAIN = "Download or copy the file again (and compare its size or checksum with the source)."


class UntrustedFileError(ValueError):
    """A pickle-based file or TorchScript archive that this torch cannot read safely, and no ``trust_pickle=True``."""


def unwrap_state_dict(obj: object, *, source: str = "state dict") -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` dict inside a checkpoint object.

    Containers are unwrapped as long as one is found, preferring ``params_ema``, then ``params``
    (BasicSR), ``state_dict`` (Lightning, timm training checkpoints) and ``model``. The
    ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (``torch.compile``) prefixes are
    stripped from every key by timm's ``clean_state_dict``, as often as they are nested
    (``_orig_mod.module.conv.weight`` -> ``conv.weight``).

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
    from timm.models import clean_state_dict

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
    out = dict(state)
    while True:  # older timm strips the two prefixes in one order only: repeat until nothing changes
        cleaned = clean_state_dict(out)
        if len(cleaned) < len(out):
            twin = next(k for k in out if k not in cleaned)
            raise ValueError(
                f"{source} has two entries for {next(iter(clean_state_dict({twin: None})))!r} once the "
                f"['module.', '_orig_mod.'] prefixes are removed (one of them is {twin!r}); save a single model's "
                "state dict."
            )
        if list(cleaned) == list(out):
            return cleaned
        out = cleaned


def check_finite(state: Mapping[str, torch.Tensor], *, source: str = "The state dict") -> None:
    """Refuse NaN or Inf in floating-point tensors: they make every output NaN, silently.

    Raises:
        ValueError: naming the first such tensor and how many values are bad.
    """
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ValueError(
                    f"{source} has {bad} NaN/Inf values in {key!r} (of {value.numel()}): the weights are broken "
                    "(a diverged training run or a damaged file). Load an earlier checkpoint."
                )


def torch_is_patched() -> bool:
    """Whether the running torch has no known escape from ``torch.load(weights_only=True)`` (>= 2.10)."""
    return TorchVersion(str(torch.__version__)) >= PATCHED_TORCH


def read_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a weight file: :func:`read_checkpoint` unwrapped with :func:`unwrap_state_dict`.

    Args:
        path: the weight file.
        trust_pickle: read a pickle-based file or a TorchScript archive also where that is not
            safe (see :func:`read_checkpoint`): only for files you trust.

    Returns:
        A flat ``{name: tensor}`` dict on the CPU.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        UntrustedFileError: (a ``ValueError``) the file needs ``trust_pickle=True`` here.
        ValueError: the file is empty, text, truncated, damaged, of an unknown format, or does
            not hold a state dict; the message names the file and the fix.

    Example:
        >>> state = read_state_dict("RN50.pt", trust_pickle=True)  # doctest: +SKIP
    """
    obj = read_checkpoint(path, trust_pickle=trust_pickle)
    try:
        return unwrap_state_dict(obj, source=f"Weight file {os.fspath(path)!r}")
    except TypeError as err:  # one exception type for every bad file
        raise ValueError(str(err)) from None


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> object:
    """What a weight file holds, read safely: the library's only ``torch.load`` / ``torch.jit.load``.

    The format is recognised from the file's first bytes, not its name. First a damage check
    that the readers lack: empty files, Git LFS pointers and HTML/text pages are named, and zip
    archives (``torch.save`` since PyTorch 1.6, TorchScript) are checked against the CRC-32 of
    each entry, so flipped or zeroed bytes are reported instead of loading wrong weights (a
    safetensors file has no checksum: damage there is found only where it breaks the header).
    Then :data:`TRUST_RULE`:

    - ``.safetensors`` files hold only tensors: always read, no code can run.
    - ``torch.save`` files are read with ``torch.load(weights_only=True)``, which on torch < 2.10
      can be made to run code by a crafted file (CVE-2025-32434, CVE-2026-24747): there only
      with ``trust_pickle=True``.
    - TorchScript archives (``torch.jit.save``, e.g. OpenAI's ``RN50.pt``): ``torch.jit.load``
      runs the code they hold on every torch, so only with ``trust_pickle=True``.

    Args:
        path: the weight file.
        trust_pickle: you trust the file (you made it, or it is an official release from its
            authors): read it even where a crafted file could run code.

    Returns:
        A dict of tensors for safetensors and TorchScript files, else what ``torch.save`` stored.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        UntrustedFileError: (a ``ValueError``) the rule above refuses the file; the message says
            the two ways out (upgrade torch, or convert the file once where you trust it).
        ValueError: the file is empty, text, truncated, damaged or of an unknown format.
    """
    check_flag(trust_pickle, "trust_pickle")
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
        names = _check_zip(path, size)
        torchscript = any(n.endswith("/constants.pkl") or "/code/" in n for n in names)
        if path.endswith(".safetensors"):
            raise _misnamed(path, "a TorchScript archive (torch.jit.save)" if torchscript else "a torch.save file")
        if torchscript:
            return _jit_load(path, trust_pickle)
    elif _looks_like_safetensors(head, size):
        return _read_safetensors(path)
    elif path.endswith(".safetensors"):
        if head.startswith(b"\x80"):  # a pickle's PROTO opcode: torch.save's legacy format, or pickle.dump
            raise _misnamed(path, "a pickle (torch.save's legacy format or pickle.dump)")
        raise ValueError(
            f"Weight file {path!r} is not a valid safetensors file: its first 8 bytes do not give the length of "
            f"a JSON header that fits in the file's {size} bytes (truncated or damaged). {_GET_AGAIN}"
        )
    return _torch_load(path, trust_pickle)


def _misnamed(path: str, what: str) -> ValueError:
    return ValueError(
        f"Weight file {path!r} is named .safetensors but is {what}, not a safetensors file: reading it could run "
        "code, so it is not read as one. Rename it to .pth if you trust it (it is then read under the rule for "
        f"pickle-based files), or get the real safetensors file. {_GET_AGAIN}"
    )


def _untrusted(path: str, what: str, why: str) -> UntrustedFileError:
    return UntrustedFileError(
        f"Refusing to read {path!r}: it is {what}, and {why}. If you trust the file (you made it, or it is its "
        "authors' official release), pass trust_pickle=True. Better, convert it once where you trust it and use "
        "(and share) the safetensors file, which cannot run code: `python -m sed_discriminator.convert "
        f"{path} OUT.safetensors --trust-pickle`."
    )


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
    return bool(text) and all(c.isprintable() or c in "\t\r\n" for c in text)


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


def _check_zip(path: str, size: int) -> list[str]:
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
    return names


def _jit_load(path: str, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if not trust_pickle:
        raise _untrusted(
            path, "a TorchScript archive (torch.jit.save, like OpenAI's RN50.pt)",
            "torch.jit.load runs the code stored in such an archive, on every torch version",
        )  # fmt: skip
    try:
        return dict(torch.jit.load(path, map_location="cpu").state_dict())
    except Exception as err:  # torch reports bad archives with RuntimeError and friends
        raise ValueError(
            f"Weight file {path!r} is a TorchScript archive that torch.jit.load cannot read "
            f"({type(err).__name__}: {_first_line(err)}). {_GET_AGAIN}"
        ) from err


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as err:  # SafetensorError, JSON and OS errors all mean a damaged file here
        raise ValueError(
            f"Weight file {path!r} is not a valid safetensors file ({_first_line(err)}): truncated or damaged. "
            f"{_GET_AGAIN}"
        ) from err


def _torch_load(path: str, trust_pickle: bool) -> object:
    if not trust_pickle and not torch_is_patched():
        raise _untrusted(
            path, "a pickle-based file (torch.save)",
            f"the installed torch {torch.__version__} has known escapes from torch.load(weights_only=True) that "
            "let a crafted file run code while it is read (CVE-2025-32434, fixed in torch 2.6; CVE-2026-24747, "
            "fixed in torch 2.10). Upgrade torch to 2.10 or newer to read such files safely",
        )  # fmt: skip
    try:
        with open(path, "rb") as f:  # a file object: torch >= 2.10 would pick its reader by the file's name
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        cause = found.group(1) if found else str(err)
        # torch < 2.4 reports data cut after whole pickles as a weights-only refusal naming the EOF
        if _pickles_are_whole(path) and not re.search(r"\bEOF\b|corrupt|truncat", cause, re.IGNORECASE):
            torch_says = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # without its terminal bold
            raise ValueError(
                f"Weight file {path!r} holds Python objects other than tensors (a whole pickled model, or a file "
                "crafted to run code), which torch.load(weights_only=True) refused to load. Save "
                "model.state_dict() instead; or, only if you trust the file (loading it runs any code in it), load "
                "it yourself with torch.load(path, weights_only=False) and pass the state dict. torch says: "
                f"{torch_says}"
            ) from err
        raise _unreadable(path, pickle.UnpicklingError(cause) if found else err) from err
    except Exception as err:  # torch's readers report damaged bytes as EOF, Runtime, Index, Key ... errors
        raise _unreadable(path, err) from err


def _pickles_are_whole(path: str) -> bool:
    """Whether the pickles of a ``torch.save`` file parse to their STOP opcodes (read, never run: pickletools).

    Tells a refused object (a whole pickle) from a damaged file. A zip archive's pickle is its
    ``data.pkl``; a legacy file is up to four pickles in a row (magic, protocol, system, object).
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                stream = io.BytesIO(archive.read(name))
            pickles = 1
        else:
            stream, pickles = io.BytesIO(open(path, "rb").read()), 4
        with stream:
            for _ in range(pickles):
                if not stream.read(1):
                    break  # a raw pickle ends after one
                stream.seek(-1, io.SEEK_CUR)
                for _ in pickletools.genops(stream):
                    pass
        return True
    except Exception:  # StopIteration, ValueError (cut off), UnicodeDecodeError ...: not whole
        return False


def _unreadable(path: str, err: BaseException) -> ValueError:
    return ValueError(
        f"Weight file {path!r} is truncated, damaged or not a PyTorch/safetensors weight file "
        f"({type(err).__name__}: {_first_line(err) or 'no details'}). {_GET_AGAIN}"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""
