"""Runs every ```python block of README.md, in order, in one shared namespace (docs/*.md: tests/test_docs.py).

Which blocks run and what cannot run offline follow the rules of tests/doc_snippets.py: ```python blocks run unless
a ``<!-- test: skip: reason -->`` line stands just above; every weights tag (``pretrained="openai"``, the default
``"default"``) becomes random weights, local files are kept, and the Hugging Face hub is offline. Semantic maps are
therefore meaningless here; only the code is tested.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from doc_snippets import offline_weights, python_blocks, run_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    markdown = README.read_text(encoding="utf-8")
    blocks = python_blocks(markdown, "README.md")
    runnable = sum(not b.skip for b in blocks)
    assert runnable >= 5, "README.md lost its runnable ```python blocks"  # Usage and its subsections have 5 today
    with offline_weights(tmp_path, monkeypatch):
        assert run_markdown(markdown, "README.md") == runnable
