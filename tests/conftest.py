"""Shared fixtures. Telemetry off before flwr is imported anywhere (no outbound calls)."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_cfg():
    from shared_model.config import load_config

    return load_config(model="tiny")
