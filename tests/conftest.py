"""Shared fixtures: device/dtype selection (CPU by default) and seeding; shared helpers live in helpers.py.

Pick another device with ``pytest --device cuda`` or ``SED_TEST_DEVICE=cuda``; tests whose
device is unavailable are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TINY  # noqa: F401  (re-exported: `from conftest import TINY` keeps working)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default=os.environ.get("SED_TEST_DEVICE", "cpu"), help="cpu or cuda")


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device(name)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.fixture
def old_torch(monkeypatch: pytest.MonkeyPatch) -> str:
    """Report torch as 2.5.1, a version with known ``torch.load(weights_only=True)`` escapes (the trust rule's case)."""
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    return "2.5.1"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
