"""Shared fixtures. ``tests/helpers.py`` holds the reusable dataset builder."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for p in (str(REPO_ROOT), str(TESTS_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

from helpers import make_tiny_dataset, tiny_config  # noqa: E402


@pytest.fixture
def tiny_dataset(tmp_path):
    """A fresh tiny dataset (3 classes x 8 clips, 6 test clips, every hard case)."""
    return make_tiny_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_dataset_ro(tmp_path_factory):
    """The same tiny dataset, shared by the session: tests must not modify it."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture
def tiny_cfg():
    return tiny_config()
