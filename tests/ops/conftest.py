import os

import pytest
import torch

from tests.ops.backends import GPU


@pytest.fixture
def backend():
    """The backend a test runs on; tests parametrize it (see tests/ops/backends.py)."""
    return "cpp"


@pytest.fixture
def device(backend, monkeypatch):
    """The device whose tensors the test hands to mmfuse, with MMFUSE_BACKEND set for `backend`."""
    if backend == "cpp":
        return torch.device("cpu")
    pytest.importorskip("triton")
    if not GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and Triton's interpreter is off "
                    "(TRITON_INTERPRET=1 must be set before triton is imported)")
    # Forced rather than implied by the device, so a missing triton fails instead of testing the reference.
    monkeypatch.setenv("MMFUSE_BACKEND", "triton")
    return torch.device("cuda" if GPU else "cpu")
