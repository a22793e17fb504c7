"""The ```python blocks of markdown files, for the tests that run the documentation (test_readme, test_docs).

Rule for which blocks run: a block opened with ```python runs; ```text, ```bash, ```diff, ```yaml ... never do.
A block whose nearest preceding non-blank line is an HTML comment ``<!-- test: skip ... -->`` is not run; the
comment says why in its ``...`` (e.g. ``<!-- test: skip: starts a BasicSR training run from its command line -->``).

What cannot run offline, one rule (:func:`offline_weights`): pretrained weights cannot be downloaded in CI, so every
weights *tag* (``pretrained="default"``, ``"openai"``, a preset's default, ...) given to ``SemanticExtractor`` -- and
so to ``SeDAdversary`` / ``ConditionedSeD``, which build one -- becomes random weights (``pretrained=None``); local
file paths are kept. The Hugging Face hub is set offline, so any other download fails the test. The snippets'
outputs are therefore meaningless there; only the code is tested.
"""

from __future__ import annotations

import contextlib
import os
import re
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import sed_discriminator as sd
from sed_discriminator.extractor import DEFAULT_WEIGHTS, SemanticExtractor

SKIP_MARKER = re.compile(r"^<!--\s*test:\s*skip\b.*-->$")
_FENCE_OPEN = re.compile(r"^(\s*)```python\s*$")
_FENCE_CLOSE = re.compile(r"^\s*```\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    skip: bool


def python_blocks(markdown: str, name: str = "markdown") -> list[Block]:
    """The ```python blocks of a markdown text, in order, with their skip markers."""
    blocks: list[Block] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        if _FENCE_OPEN.match(lines[i]):
            previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            start = i
            body = []
            i += 1
            while i < len(lines) and not _FENCE_CLOSE.match(lines[i]):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"{name}: the ```python block at line {start + 1} is never closed")
            code = textwrap.dedent("\n".join(body)) + "\n"
            blocks.append(Block(start + 1, code, bool(SKIP_MARKER.match(previous))))
        i += 1
    return blocks


@contextlib.contextmanager
def offline_weights(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The rule above and a scratch working directory; process-wide switches and the preset registry are restored."""
    build = SemanticExtractor.__init__

    def with_random_weights(self, *args, pretrained=DEFAULT_WEIGHTS, **kwargs):
        if isinstance(pretrained, str) and not os.path.isfile(pretrained):
            pretrained = None  # a tag: random weights instead of a download
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*has RANDOM weights.*")
            build(self, *args, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(SemanticExtractor, "__init__", with_random_weights)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sd.extractor, "_PRESETS", dict(sd.extractor._PRESETS))  # presets a snippet registers
    fused, checks = sd.use_fused_attn(), sd.config.value_checks_enabled()
    try:
        yield
    finally:
        sd.set_fused_attn(fused)
        sd.config.set_value_checks(checks)


def run_markdown(markdown: str, name: str) -> int:
    """Run the runnable ```python blocks of ``markdown`` in order in one namespace; returns how many ran."""
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for block in python_blocks(markdown, name):
        if block.skip:
            continue
        try:
            exec(compile(block.code, f"{name}:{block.line}", "exec"), namespace)
        except (Exception, SystemExit) as err:  # SystemExit: a snippet that parses a command line it lacks
            raise AssertionError(
                f"{name}: the python block at line {block.line} raised {type(err).__name__}: {err}\n{block.code}"
            ) from err
        ran += 1
    return ran
