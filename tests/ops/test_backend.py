"""Backend selection (mmfuse.ops._backend): device defaults, MMFUSE_BACKEND, and when the Triton
backend hands an op to the reference."""

import pytest
import torch

import mmfuse.kernels.triton as triton_kernels
from mmfuse.ops import _backend, attention, reference, rms_norm


def test_cpu_tensors_run_the_cpp_core_by_default(backend_env):
    backend_env(None)
    assert _backend.select("rms_norm", torch.randn(2, 8)) == "cpp"


def test_cuda_tensors_default_to_triton():
    assert _backend._DEVICE_DEFAULT["cuda"] == "triton"


@pytest.mark.parametrize("backend", ["triton"])
def test_float64_inputs_run_the_reference_under_triton(device):
    x, w = torch.randn(3, 8, device=device), torch.randn(8, device=device)
    assert _backend.select("rms_norm", x, w) == "triton"
    assert _backend.select("rms_norm", x.double(), w.double()) == "reference"
    # One float64 input is enough: apply_mrope's inv_freq, say.
    assert _backend.select("apply_mrope", x, x, None, w.double()) == "reference"


@pytest.mark.parametrize("backend", ["triton"])
def test_ops_without_triton_kernels_run_the_reference(device):
    q = torch.randn(5, 2, 16, device=device)
    out, lse = attention(q, q, q, causal=True, return_lse=True)
    want, want_lse = reference.attention(q, q, q, causal=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)


def test_forced_triton_refuses_devices_it_cannot_run_on(backend_env):
    pytest.importorskip("triton")
    backend_env("triton")
    with pytest.raises(ValueError, match="MMFUSE_BACKEND=triton runs on CUDA tensors"):
        _backend.select("rms_norm", torch.randn(4, 16, device="meta"))


def test_forced_triton_on_cpu_needs_the_interpreter(backend_env, monkeypatch):
    pytest.importorskip("triton")
    backend_env("triton")
    monkeypatch.setattr(triton_kernels, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 .* before triton is first imported"):
        rms_norm(torch.randn(4, 16), torch.randn(16))


def test_forced_triton_without_triton_says_so(backend_env, monkeypatch):
    backend_env("triton")
    monkeypatch.setattr(_backend, "triton_installed", lambda: False)
    with pytest.raises(ValueError, match="triton is not installed"):
        rms_norm(torch.randn(4, 16), torch.randn(16))
