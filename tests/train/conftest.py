"""Fixtures of the training tests (helpers live in ``_tiny_run.py``).

The session Ray comes from ``ray_local`` in ``tests/conftest.py`` (2 CPUs, loopback).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from alignx.axes import AXES

from ._tiny_run import write_axis_data


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory with 16 train / 4 validation rows per axis."""
    for axis in AXES:
        write_axis_data(tmp_path, axis, {"train": 16, "validation": 4, "test": 2})
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def _fast_ray_train_polling():
    """Ray Train's controller polls workers every 2 s by default; 0.5 s makes each tiny run
    finish sooner (the driver propagates this variable to the controller and workers)."""
    import os

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """In-process torch work uses one thread: the 2-core box is shared with Ray workers, and
    oversubscribed intra-op threads slow the tiny model down a hundredfold."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def ds_cpu_ops() -> None:
    """Build DeepSpeed's CPU comm op once before trainers start (no-op when cached)."""
    from alignx.train.engine import prebuild_cpu_ops

    prebuild_cpu_ops()
