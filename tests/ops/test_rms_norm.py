"""rms_norm / add_rms_norm against the float64 reference (HF Qwen2RMSNorm rounding order)."""

import pytest
import torch

from mmfuse.ops import _backend, add_rms_norm, reference, rms_norm
from tests.ops.numerics import assert_matches, supported_isas, use_isa

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Odd row counts (1, 3, 127, 4097) against the hidden sizes that matter (vision 80/1280, text 2048/3584, MLP 5632).
SHAPES = [(1, 64), (3, 80), (127, 128), (4097, 80), (7, 2048), (33, 5632), (1, 5632), (5, 1280)]


def _check_rms_norm(x, w, eps=1e-6):
    """Forward and both gradients of mmfuse vs float64 reference (and eager in x's dtype)."""
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    y = rms_norm(x, w, eps)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)

    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y64 = reference.rms_norm(x64, w64, eps)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())

    xe = x.detach().requires_grad_(True)
    we = w.detach().requires_grad_(True)
    ye = reference.rms_norm(xe, we, eps)
    dxe, dwe = torch.autograd.grad(ye, (xe, we), dy)

    assert y.dtype == torch.promote_types(x.dtype, w.dtype)
    lowp = x.dtype in (torch.bfloat16, torch.float16)
    assert_matches(y, y64, ye, grad=False, what="y", low_precision=lowp)
    assert_matches(dx, dx64, dxe, grad=True, what="dx", low_precision=lowp)
    assert_matches(dw, dw64, dwe, grad=True, what="dw", low_precision=lowp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,dim", SHAPES)
def test_rms_norm_matches_fp64_reference(rows, dim, dtype):
    x = torch.randn(rows, dim, dtype=dtype) * 3
    w = torch.rand(dim, dtype=dtype) + 0.5
    _check_rms_norm(x, w)


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_every_simd_flavour(isa, dtype):
    with use_isa(isa):
        for rows, dim in [(3, 80), (65, 2048), (2, 1000)]:
            _check_rms_norm(torch.randn(rows, dim, dtype=dtype), torch.randn(dim, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_weight_with_half_input_promotes_like_hf(dtype):
    x = torch.randn(17, 256, dtype=dtype)
    w = torch.randn(256, dtype=torch.float32)
    assert rms_norm(x, w).dtype == torch.float32
    _check_rms_norm(x, w)


def test_non_contiguous_and_batched_inputs():
    base = torch.randn(6, 40, 2 * 96)
    x = base[..., ::2]                      # strided last dim
    w = torch.randn(2 * 96)[::2]            # strided weight
    assert not x.is_contiguous() and not w.is_contiguous()
    _check_rms_norm(x, w)
    xt = torch.randn(96, 9).t()             # transposed
    _check_rms_norm(xt, torch.randn(96))


def test_eps_is_honoured():
    x = torch.full((2, 64), 1e-3)
    w = torch.ones(64)
    for eps in (1e-6, 1e-2):
        torch.testing.assert_close(rms_norm(x, w, eps), reference.rms_norm(x, w, eps), rtol=1e-6, atol=0)


def test_empty_batch_gives_zero_weight_gradient():
    x = torch.randn(0, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    y = rms_norm(x, w)
    assert y.shape == (0, 32)
    (dw,) = torch.autograd.grad(y.sum(), (w,))
    assert torch.equal(dw, torch.zeros(32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,dim", [(1, 64), (127, 80), (9, 2048), (4097, 128)])
def test_add_rms_norm_outputs_and_grads_match_reference(rows, dim, dtype):
    x = torch.randn(rows, dim, dtype=dtype, requires_grad=True)
    r = torch.randn(rows, dim, dtype=dtype, requires_grad=True)
    w = (torch.rand(dim, dtype=dtype) + 0.5).requires_grad_(True)
    normed, summed = add_rms_norm(x, r, w)
    dn, ds = torch.randn_like(normed), torch.randn_like(summed)
    grads = torch.autograd.grad((normed, summed), (x, r, w), (dn, ds))

    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, r, w)]
    n64, s64 = reference.add_rms_norm(*leaves64)
    grads64 = torch.autograd.grad((n64, s64), leaves64, (dn.double(), ds.double()))

    leaves_e = [t.detach().requires_grad_(True) for t in (x, r, w)]
    ne, se = reference.add_rms_norm(*leaves_e)
    grads_e = torch.autograd.grad((ne, se), leaves_e, (dn, ds))

    assert_matches(normed, n64, ne, grad=False, what="normed")
    assert_matches(summed, s64, se, grad=False, what="summed")
    for name, g, g64, ge in zip(("dx", "dresidual", "dw"), grads, grads64, grads_e):
        assert_matches(g, g64, ge, grad=True, what=name)


def test_add_rms_norm_sum_is_rounded_before_normalising():
    # In bf16 the stored sum is what the next layer sees; normalising the unrounded sum would differ.
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    r = torch.randn(64, 256, dtype=torch.bfloat16)
    w = torch.randn(256, dtype=torch.bfloat16)
    normed, summed = add_rms_norm(x, r, w)
    assert torch.equal(summed, x + r)
    assert torch.equal(normed, reference.rms_norm(x + r, w))


def test_rms_norm_gradcheck_fp64():
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    r = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: add_rms_norm(a, b, c, 1e-5), (x, r, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    x = torch.randn(7, 48, dtype=dtype, requires_grad=True)
    r = torch.randn(7, 48, dtype=dtype, requires_grad=True)
    w = torch.randn(48, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.mmfuse.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.mmfuse.add_rms_norm.default, (x, r, w, 1e-6))


def test_reference_backward_formula_matches_autograd():
    x = torch.randn(6, 40, dtype=torch.float64)
    w = torch.randn(40, dtype=torch.float64)
    dy = torch.randn(6, 40, dtype=torch.float64)
    xa, wa = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    grads = torch.autograd.grad(reference.rms_norm(xa, wa), (xa, wa), dy)
    for got, want in zip(reference.rms_norm_backward(dy, x, w), grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_backend_env_gives_same_result(backend_env):
    x = torch.randn(9, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    y_cpp = rms_norm(x, w)
    g_cpp = torch.autograd.grad(y_cpp.sum(), (x, w))
    backend_env("reference")
    y_ref = rms_norm(x, w)
    g_ref = torch.autograd.grad(y_ref.sum(), (x, w))
    torch.testing.assert_close(y_cpp, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_cpp, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_clear_errors(backend_env):
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"weight must have shape \[16\].*\(8,\)"):
        rms_norm(x, torch.randn(8))
    with pytest.raises(TypeError, match="x has dtype int64"):
        rms_norm(torch.ones(4, 16, dtype=torch.long), torch.randn(16))
    with pytest.raises(TypeError, match="weight dtype torch.float16 must equal x dtype torch.float32"):
        rms_norm(x, torch.randn(16, dtype=torch.float16))
    with pytest.raises(ValueError, match="residual must match x"):
        add_rms_norm(x, torch.randn(4, 15), torch.randn(16))
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x, torch.randn(16, device="meta"))
    backend_env("cpp")
    with pytest.raises(ValueError, match="MMFUSE_BACKEND=cpp runs on CPU tensors only"):
        _backend.select("rms_norm", torch.randn(4, 16, device="meta"))
    backend_env("bogus")
    with pytest.raises(ValueError, match="MMFUSE_BACKEND='bogus'"):
        rms_norm(x, torch.randn(16))
