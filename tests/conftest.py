import os

import pytest
import torch

# Tests compare against float64 references; determinism keeps failures reproducible.
torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def backend_env(monkeypatch):
    """Set MMFUSE_BACKEND for one test."""
    def set_backend(value: str | None):
        if value is None:
            monkeypatch.delenv("MMFUSE_BACKEND", raising=False)
        else:
            monkeypatch.setenv("MMFUSE_BACKEND", value)
    return set_backend
