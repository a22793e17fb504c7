"""Convert a weight file once, where you trust it, to a ``.safetensors`` file that anyone can load safely.

``python -m sed_discriminator.convert IN OUT.safetensors`` reads the authors' SeD checkpoints,
BasicSR / traiNNer-redux / neosr ``net_d`` files (``params`` / ``params_ema``), ``module.``-prefixed
DDP files, ``SeD`` / ``ConditionedSeD`` state dicts and (with ``--extractor NAME``) the weight
files of a :class:`~sed_discriminator.SemanticExtractor` preset (OpenAI's ``RN50.pt``, open_clip
and timm files). It renames the legacy spectral-norm keys, loads the weights strictly into the
matching ``SeD`` / ``SemanticExtractor``, writes this library's key names atomically and loads
the written file back to check it. A safetensors file holds only tensors: reading it runs no code.

Example:
    .. code-block:: console

        python -m sed_discriminator.convert net_d_400000.pth net_d.safetensors --trust-pickle
        python -m sed_discriminator.convert RN50.pt clip_rn50.safetensors --extractor clip_rn50 --trust-pickle
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping

import torch

from ._checks import check_flag
from ._state import WRAPPER_KEYS, read_checkpoint, unwrap_state_dict
from .discriminator import SeD
from .extractor import SemanticExtractor, list_extractors
from .spectral_norm import remap_legacy_spectral_norm_keys
from .weights import load_official_weights, save_safetensors

__all__ = ["convert", "sed_config_from_state_dict", "main"]


def sed_config_from_state_dict(state: Mapping[str, torch.Tensor], *, heads: int = 1) -> dict:
    """The ``SeD`` arguments that a state dict (this library's key names) was saved from.

    ``heads`` cannot be read from the weights (the attention splits one projection into heads):
    it is given (the paper's is 1).

    Raises:
        ValueError: the state dict is not an SeD's.

    Example:
        >>> config = sed_config_from_state_dict(SeD("pixel", width=8, semantic_channels=64, head_dim=8).state_dict())
        >>> config["variant"], config["width"], config["semantic_channels"], config["heads"], config["head_dim"]
        ('pixel', 8, 64, 1, 8)
    """
    first = next((k for k in ("conv_first.weight", "conv0.weight") if k in state), None)
    if first is None or "conv1.parametrizations.weight.original" not in state:
        raise ValueError(
            "this is not an SeD checkpoint (no conv_first/conv0 and conv1 weights; first keys: "
            f"{list(state)[:3]}). For an extractor's weights pass --extractor NAME (one of {list(list_extractors())})."
        )
    width, in_channels = state[first].shape[:2]
    config = dict(variant="patch" if first == "conv_first.weight" else "pixel", in_channels=int(in_channels),
                  width=int(width), semantic_fusion="att1.norm.weight" in state)  # fmt: skip
    if config["semantic_fusion"]:
        inner = int(state["att1.proj_in.weight"].shape[0])
        if inner % heads:
            raise ValueError(f"the attention has {inner} channels, which --heads {heads} does not divide.")
        config.update(semantic_channels=int(state["att1.norm.weight"].shape[0]), heads=heads, head_dim=inner // heads)
    return config


def _pick_weights(raw: object, ema: bool | None, source: str) -> object:
    """BasicSR-style files hold ``params`` and ``params_ema``: pick by ``ema`` (None: EMA when present)."""
    if not isinstance(raw, Mapping) or not any(k in raw for k in ("params", "params_ema")):
        if ema:
            raise ValueError(f"{source} has no EMA weights ('params_ema'); leave out --ema.")
        return raw
    if ema is False:
        if "params" not in raw:
            raise ValueError(f"{source} has only EMA weights ('params_ema'); leave out --no-ema.")
        return raw["params"]
    if ema and "params_ema" not in raw:
        raise ValueError(f"{source} has no EMA weights ('params_ema', it has {sorted(raw)}); leave out --ema.")
    return raw.get("params_ema", raw.get("params"))


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    extractor: str | None = None,
    ema: bool | None = None,
    heads: int = 1,
    trust_pickle: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> str:
    """Convert ``source`` to the safetensors file ``out``, verified by a strict load of both.

    Args:
        source: the weight file (any format the library reads).
        out: the ``.safetensors`` file to write; it must not exist unless ``overwrite``.
        extractor: the :class:`~sed_discriminator.SemanticExtractor` preset the file is for;
            ``None`` for a discriminator (SeD) checkpoint.
        ema: for files with ``params`` and ``params_ema``: ``True`` the EMA weights, ``False``
            the raw ones, ``None`` the EMA weights when present.
        heads: the SeD's attention heads (not recorded in the weights; the paper's is 1).
        trust_pickle: read a pickle-based file / TorchScript archive (see
            :func:`~sed_discriminator.load_official_weights`): only for files you trust.
        overwrite: replace an existing ``out``.
        log: where the progress lines go.

    Returns:
        The path written.

    Raises:
        ValueError: the file cannot be read, is refused as untrusted, or does not match.
        FileExistsError: ``out`` exists and ``overwrite`` is false.
    """
    for name, flag in (("ema", ema), ("trust_pickle", trust_pickle), ("overwrite", overwrite)):
        check_flag(flag, name, none_ok=name == "ema")
    source, out = os.fspath(source), os.fspath(out)
    if not out.endswith(".safetensors"):
        raise ValueError(f"The output {out!r} must end in .safetensors.")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out!r} exists already; pass --overwrite to replace it.")
    log(f"reading {source}")
    if extractor is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notes
            model = SemanticExtractor(extractor, pretrained=source, trust_pickle=trust_pickle)
        what, meta = f"SemanticExtractor({extractor!r})", dict(kind="SemanticExtractor", name=extractor)
    else:
        raw = _pick_weights(read_checkpoint(source, trust_pickle=trust_pickle), ema, source)
        state = remap_legacy_spectral_norm_keys(unwrap_state_dict(raw, source=source))
        config = sed_config_from_state_dict(state, heads=heads)
        what = f"SeD({', '.join(f'{k}={v!r}' for k, v in config.items())})"
        model = load_official_weights(SeD(**config), state)
        meta = dict(kind="SeD", **config)
    log(f"loaded strictly into {what}")
    save_safetensors(model, out, overwrite=overwrite, metadata={"format": "pt", "sed_discriminator": json.dumps(meta)})
    written = model.state_dict()
    if extractor is not None:
        again = SemanticExtractor(extractor, pretrained=out).state_dict()
    else:
        again = load_official_weights(SeD(**config), out).state_dict()
    if written.keys() != again.keys() or not all(torch.equal(written[k], again[k]) for k in written):
        raise RuntimeError(f"{out!r} does not read back as written; the disk may be failing. Remove it and retry.")
    log(f"wrote {out} ({len(written)} tensors); it loads strictly, without trust_pickle")
    return out


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python -m sed_discriminator.convert IN OUT.safetensors [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m sed_discriminator.convert",
        description="Convert an SeD or extractor weight file, once and where you trust it, to a .safetensors file "
        "that loads without running code on any torch version.",
    )
    parser.add_argument("source", metavar="IN", help="the weight file (.pth/.pt/.bin/.ckpt/.safetensors)")
    parser.add_argument("out", metavar="OUT.safetensors", help="the file to write")
    presets = ", ".join(list_extractors())
    parser.add_argument("--extractor", metavar="NAME", help="the file holds a SemanticExtractor preset's weights "
                        f"(one of {presets}, or timm:MODEL); default: an SeD checkpoint")  # fmt: skip
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help=f"with {WRAPPER_KEYS[1]}/{WRAPPER_KEYS[0]} files: the EMA weights (--ema) or the raw ones "
                        "(--no-ema); default: EMA when present")  # fmt: skip
    parser.add_argument("--heads", type=int, default=1, help="the SeD's attention heads (default: 1, the paper's)")
    parser.add_argument("--trust-pickle", action="store_true", help="read a pickle-based file or TorchScript "
                        "archive: only for files you trust (a crafted one can run code while it is read)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    try:
        convert(args.source, args.out, extractor=args.extractor, ema=args.ema, heads=args.heads,
                trust_pickle=args.trust_pickle, overwrite=args.overwrite)  # fmt: skip
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
