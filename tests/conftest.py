"""Shared fixtures: a small synthetic data root, generated once per test session."""

from __future__ import annotations

import pytest

from lightning_modules.data.phantom import generate_dataset


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """3 non-IID sites x 80 phantoms at 64 px + 60 held-out test images."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, sites=3, per_site=80, test_size=60, size=64, seed=0)
    return root
