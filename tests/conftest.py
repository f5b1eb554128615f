"""Shared fixtures: small models and stages, and float64 settings for exact comparisons."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
torch.set_num_threads(1)


@pytest.fixture
def digits_tensors():
    """The real digits data as (x, y) tensors: 1,797 8x8 images, standardised."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    return (x - x.mean()) / x.std(), torch.tensor(y)


@pytest.fixture(scope="module")
def digits():
    """The default config's dataset (the real digits: train, val and test splits)."""
    from driver.config import load_config
    from driver.data.load import load_dataset

    return load_dataset(load_config().data)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 4 CPUs for one test module (modules may define their own)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
