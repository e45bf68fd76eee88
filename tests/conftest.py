"""Shared fixtures: where the real data is, the embedded model's cached conversion, and a tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
IN_CI = os.environ.get("CI", "").lower() == "true"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def need_shared_data() -> Path:
    """../shared/data, or a skip (a failure in CI, where missing data must not hide behind a skip)."""
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    message = f"the shared data folder {SHARED_DATA} is missing"
    if IN_CI:
        pytest.fail(message + " (CI=true: this must not be skipped)")
    pytest.skip(message)


@pytest.fixture
def shared_data() -> Path:
    return need_shared_data()


@pytest.fixture
def data_path_env(monkeypatch, shared_data):
    monkeypatch.setenv("RECIPE_DATA_PATH", str(shared_data))
    return shared_data
