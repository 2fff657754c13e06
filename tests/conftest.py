"""Shared fixtures: the real test data in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSISEG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test with a clear reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (set WSISEG_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def nucls(shared_data: Path) -> Path:
    """The square NuCLS tiles (``train/``, ``test/``); skips when they are absent."""
    root = shared_data / "labelled-tiles" / "nucls" / "square"
    if not root.is_dir():
        pytest.skip(f"NuCLS tiles not found at {root}")
    return root


@pytest.fixture(scope="session")
def slides_dir(shared_data: Path) -> Path:
    return shared_data / "slides"
