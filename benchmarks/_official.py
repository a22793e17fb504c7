"""The authors' discriminators (github.com/lbc12345/SeD, ``models/``), imported from a local copy.

Their code is not part of this repository (it carries no licence): ``gpu_check`` times it side by side
with ours when a copy sits in ``third_party/sed_official/`` (ignored by git; another folder with
``SED_OFFICIAL_DIR``). To make one::

    git clone https://github.com/lbc12345/SeD /tmp/SeD
    mkdir -p third_party/sed_official
    cp /tmp/SeD/models/sed.py /tmp/SeD/models/module_attention.py third_party/sed_official/

Only their discriminator classes ``SeD_P`` (patch) and ``SeD_U`` (pixel) are used. Their ``sed.py``
imports OpenAI's ``clip`` package for its extractor; where that package is missing, a stand-in is
put in place for the import only, and their extractor class refuses to be built.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "third_party" / "sed_official"
PACKAGE = "sed_official"
FILES = ("sed.py", "module_attention.py")
CLASSES = {"patch": "SeD_P", "pixel": "SeD_U"}


def official_dir() -> Path:
    """Where the authors' ``models/`` copy is looked for (``SED_OFFICIAL_DIR`` or ``third_party/sed_official``)."""
    return Path(os.environ.get("SED_OFFICIAL_DIR") or DEFAULT_DIR)


def missing_reason(directory: Path | None = None) -> str | None:
    """``None`` when the copy is usable, else a sentence saying what is missing and how to add it."""
    directory = official_dir() if directory is None else Path(directory)
    absent = [name for name in FILES if not (directory / name).is_file()]
    if not absent:
        return None
    return (
        f"the authors' code is not in {directory} (missing {', '.join(absent)}); copy models/sed.py and "
        "models/module_attention.py of github.com/lbc12345/SeD there (see benchmarks/_official.py), and on the "
        "device machine pass that folder in the run tool's carry list"
    )


class _NoClipResNet:
    """Stand-in for ``clip.model.ModifiedResNet`` when OpenAI's ``clip`` package is not installed."""

    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError("OpenAI's clip package is not installed: the authors' CLIP extractor cannot be built here.")


def _clip_stand_in() -> dict[str, types.ModuleType]:
    clip = types.ModuleType("clip")
    model = types.ModuleType("clip.model")
    model.ModifiedResNet = _NoClipResNet
    clip.model = model
    return {"clip": clip, "clip.model": model}


def load_official(directory: Path | None = None) -> types.ModuleType:
    """Import the authors' ``sed.py`` (as ``sed_official.sed``) from ``directory``.

    Raises:
        FileNotFoundError: the copy is missing; the message says how to make it.
    """
    directory = (official_dir() if directory is None else Path(directory)).resolve()
    reason = missing_reason(directory)
    if reason:
        raise FileNotFoundError(reason[0].upper() + reason[1:] + ".")
    loaded = sys.modules.get(f"{PACKAGE}.sed")
    if loaded is not None and Path(loaded.__file__).resolve().parent == directory:
        return loaded
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(directory)]  # their files import each other relatively (from .module_attention ...)
    sys.modules[PACKAGE] = package
    stand_in = {} if importlib.util.find_spec("clip") else _clip_stand_in()
    sys.modules.update(stand_in)
    try:
        return importlib.import_module(f"{PACKAGE}.sed")
    finally:
        for name in stand_in:  # their module keeps what it bound; nothing else should see the stand-in
            sys.modules.pop(name, None)


def build_official(variant: str, directory: Path | None = None):
    """The authors' discriminator of ``variant`` (``"patch"``: ``SeD_P``, ``"pixel"``: ``SeD_U``), paper widths.

    Their layer widths are fixed by the paper (context widths 128/256/512, 1024 semantic channels), so
    there is no tiny version: small smoke runs use small images instead.
    """
    if variant not in CLASSES:
        raise ValueError(f"Unknown SeD variant {variant!r}; choose one of {tuple(CLASSES)}.")
    module = load_official(directory)
    return getattr(module, CLASSES[variant])(3)
