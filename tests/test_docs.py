"""Runs every ```python block of docs/*.md, so that a stale snippet fails CI (README.md: tests/test_readme.py).

Which blocks run: see tests/doc_snippets.py (```python runs; a ``<!-- test: skip: reason -->`` line just above a
block skips it). The blocks of one file run in order in one namespace of their own, so each file's snippets must
import what they use.

What cannot run offline follows one rule, stated in tests/doc_snippets.py (offline_weights): every weights tag
becomes random weights, local files are kept, the Hugging Face hub is offline.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from doc_snippets import offline_weights, python_blocks, run_markdown
from sed_discriminator.extractor import SemanticExtractor

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))


@pytest.fixture
def offline_docs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with offline_weights(tmp_path, monkeypatch):
        yield


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_doc_python_blocks_run(doc: Path, offline_docs: None) -> None:
    markdown = doc.read_text(encoding="utf-8")
    blocks = python_blocks(markdown, doc.name)
    if not blocks:
        pytest.skip(f"docs/{doc.name} has no ```python blocks")
    ran = run_markdown(markdown, f"docs/{doc.name}")
    assert ran == sum(not b.skip for b in blocks)


def test_a_broken_snippet_fails_with_its_file_and_line(offline_docs: None) -> None:
    markdown = textwrap.dedent(
        """\
        ```python
        from sed_discriminator import SeD
        d = SeD("patch", width=8)
        ```
        <!-- test: skip: shows a call that needs a GPU -->
        ```python
        raise RuntimeError("skipped blocks never run")
        ```
        ```bash
        this is not python
        ```
        ```python
        d.no_such_method()
        ```
        """
    )
    with pytest.raises(AssertionError, match=r"docs/x\.md: the python block at line 12 raised AttributeError"):
        run_markdown(markdown, "docs/x.md")


def test_tags_become_random_weights_and_paths_are_kept(offline_docs: None, tmp_path: Path) -> None:
    extractor = SemanticExtractor("clip_rn50", pretrained="openai")
    assert extractor.pretrained is None  # the tag was swapped, nothing was downloaded
    path = tmp_path / "trunk.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in extractor.state_dict().items()}, str(path))
    assert SemanticExtractor("clip_rn50", pretrained=path).pretrained == str(path)


def test_skip_marker_needs_the_test_skip_comment() -> None:
    markdown = "<!-- test: skip: needs a GPU -->\n```python\nx = 1\n```\n<!-- a note -->\n```python\ny = 2\n```\n"
    assert [(b.line, b.skip) for b in python_blocks(markdown)] == [(2, True), (6, False)]
    with pytest.raises(ValueError, match="never closed"):
        python_blocks("```python\nx = 1\n", "docs/y.md")


def test_a_preset_a_snippet_registers_is_gone_afterwards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sed_discriminator.extractor import list_extractors

    markdown = textwrap.dedent(
        """\
        ```python
        from sed_discriminator.extractor import ExtractorPreset, register_extractor
        register_extractor(ExtractorPreset("doc_only", model="resnet18", layer=2, channels=256, stride=16))
        ```
        """
    )
    before = list(list_extractors())
    with monkeypatch.context() as patch, offline_weights(tmp_path, patch):
        run_markdown(markdown, "docs/x.md")
        assert "doc_only" in list_extractors()
    assert list(list_extractors()) == before
