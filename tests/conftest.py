import os

import pytest
import torch

# Triton kernels run on CPU tensors only in Triton's interpreter, and triton fixes that choice when
# it is first imported (its own @triton.jit helpers such as tl.sum are decorated then; an
# interpreted kernel cannot call compiled ones). So it is made here, before any test can import
# triton, and only where no GPU runs the kernels natively. It affects nothing but Triton kernels
# (torch.compile's CPU code generation does not use Triton), and mmfuse runs those on CPU tensors
# only under MMFUSE_BACKEND=triton, which the `device` fixture of tests/ops sets for the Triton cases.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

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
