"""Runs every ```python block of README.md, in order, in one shared namespace.

- A block whose nearest preceding non-blank line is ``<!-- test: skip -->`` is not run.
- The real CLIP RN50 weights cannot be downloaded in CI (no network), so before a block runs,
  ``pretrained="openai"`` (or ``'openai'``) in it is replaced with ``pretrained=<path>`` of a
  randomly initialised clip_rn50 trunk checkpoint that this test writes (timm layout).
  Semantic maps are therefore meaningless here; only the code is tested.
- Blocks run in a temporary working directory; the process-wide switches (fused attention,
  value checks) are restored afterwards.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import sed_discriminator as sd

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARKER = "<!-- test: skip -->"
_FENCE_OPEN = re.compile(r"^(\s*)```python\s*$")
_FENCE_CLOSE = re.compile(r"^\s*```\s*$")
_OPENAI = re.compile(r"""pretrained\s*=\s*(["'])openai\1""")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    skip: bool


def python_blocks(markdown: str) -> list[Block]:
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
                raise ValueError(f"README.md: the ```python block at line {start + 1} is never closed")
            blocks.append(Block(start + 1, textwrap.dedent("\n".join(body)) + "\n", previous == SKIP_MARKER))
        i += 1
    return blocks


def with_local_weights(code: str, path: Path) -> str:
    return _OPENAI.sub(lambda _: f"pretrained={str(path)!r}", code)


def test_block_parser() -> None:
    markdown = textwrap.dedent(
        """\
        # Title
        ```python
        a = 1
        ```
        text
        <!-- test: skip -->
        ```python
        raise RuntimeError("skipped")
        ```
        ```bash
        pip install x
        ```
        - item

          ```python
          b = a + 1
          ```
        """
    )
    blocks = python_blocks(markdown)
    assert [(b.line, b.skip) for b in blocks] == [(2, False), (7, True), (15, False)]
    assert blocks[2].code == "b = a + 1\n"
    replaced = with_local_weights('E("clip_rn50", pretrained="openai")', Path("/w/x.pt"))
    assert replaced == "E(\"clip_rn50\", pretrained='/w/x.pt')"
    assert with_local_weights("E(pretrained='openai')", Path("/w/x.pt")) == "E(pretrained='/w/x.pt')"
    with pytest.raises(ValueError, match="never closed"):
        python_blocks("```python\nx = 1\n")


@pytest.fixture
def random_clip_checkpoint(tmp_path: Path) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trunk = sd.SemanticExtractor("clip_rn50", pretrained=None).trunk  # timm layout
    path = tmp_path / "weights" / "RN50_random.pt"
    path.parent.mkdir()
    torch.save(trunk.state_dict(), path)
    return path


@pytest.mark.slow
def test_readme_python_blocks(random_clip_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8")) if README.exists() else []
    runnable = [b for b in blocks if not b.skip]
    if not runnable:
        pytest.skip("README.md has no runnable ```python blocks")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fused, checks = sd.use_fused_attn(), sd.config.value_checks_enabled()
    namespace: dict = {"__name__": "__readme__"}
    try:
        for block in runnable:
            code = with_local_weights(block.code, random_clip_checkpoint)
            try:
                exec(compile(code, f"README.md:{block.line}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(
                    f"README.md python block at line {block.line} raised {type(err).__name__}: {err}\n{block.code}"
                ) from err
    finally:
        sd.set_fused_attn(fused)
        sd.config.set_value_checks(checks)
