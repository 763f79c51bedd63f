"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` of the checkout; tests that need real data skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
