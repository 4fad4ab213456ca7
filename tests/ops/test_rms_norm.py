"""rms_norm / add_rms_norm against the float64 reference (HF Qwen2RMSNorm rounding order)."""

import pytest
import torch

from mmfuse.ops import _backend, add_rms_norm, reference, rms_norm
from tests.ops.backends import BACKENDS, on, with_backends
from tests.ops.numerics import assert_matches, supported_isas, use_isa

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Odd row counts (1, 3, 127, 4097) against the hidden sizes that matter (vision 80/1280, text 2048/3584, MLP 5632).
SHAPES = [(1, 64), (3, 80), (127, 128), (4097, 80), (7, 2048), (33, 5632), (1, 5632), (5, 1280)]


def _small(rows, dim):
    return rows <= 127  # a few dozen Triton programs at most


def _check_rms_norm(x, w, eps=1e-6):
    """Forward and both gradients of mmfuse (on x's device) vs the float64 reference (and eager in
    x's dtype), both on the CPU."""
    xd, wd = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    y = rms_norm(xd, wd, eps)
    dy = torch.randn(y.shape, dtype=y.dtype)
    dx, dw = (t.cpu() for t in torch.autograd.grad(y, (xd, wd), dy.to(y.device)))
    y = y.cpu()
    x, w = x.detach().cpu(), w.detach().cpu()

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
@pytest.mark.parametrize("rows,dim,backend", with_backends(SHAPES, _small))
def test_rms_norm_matches_fp64_reference(rows, dim, dtype, device):
    x = torch.randn(rows, dim, dtype=dtype) * 3
    w = torch.rand(dim, dtype=dtype) + 0.5
    _check_rms_norm(*on(device, x, w))


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_every_simd_flavour(isa, dtype):
    with use_isa(isa):
        for rows, dim in [(3, 80), (65, 2048), (2, 1000)]:
            _check_rms_norm(torch.randn(rows, dim, dtype=dtype), torch.randn(dim, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_weight_with_half_input_promotes_like_hf(dtype, device):
    x, w = on(device, torch.randn(17, 256, dtype=dtype), torch.randn(256, dtype=torch.float32))
    assert rms_norm(x, w).dtype == torch.float32
    _check_rms_norm(x, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_batched_inputs(device):
    base = on(device, torch.randn(6, 40, 2 * 96))
    x = base[..., ::2]                      # strided last dim
    w = on(device, torch.randn(2 * 96))[::2]  # strided weight
    assert not x.is_contiguous() and not w.is_contiguous()
    _check_rms_norm(x, w)
    xt = on(device, torch.randn(96, 9)).t()  # transposed
    _check_rms_norm(xt, on(device, torch.randn(96)))
    row_slice = on(device, torch.randn(5, 3, 96 + 32))[..., :96]  # rows inside wider rows
    _check_rms_norm(row_slice, on(device, torch.randn(96)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_is_honoured(device):
    x = torch.full((2, 64), 1e-3)
    w = torch.ones(64)
    for eps in (1e-6, 1e-2):
        got = rms_norm(*on(device, x, w), eps).cpu()
        torch.testing.assert_close(got, reference.rms_norm(x, w, eps), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_zero_weight_gradient(device):
    x = on(device, torch.randn(0, 32)).requires_grad_(True)
    w = on(device, torch.randn(32)).requires_grad_(True)
    y = rms_norm(x, w)
    assert y.shape == (0, 32)
    (dw,) = torch.autograd.grad(y.sum(), (w,))
    assert torch.equal(dw.cpu(), torch.zeros(32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,dim,backend", with_backends([(1, 64), (127, 80), (9, 2048), (4097, 128)], _small))
def test_add_rms_norm_outputs_and_grads_match_reference(rows, dim, dtype, device):
    x = torch.randn(rows, dim, dtype=dtype, requires_grad=True)
    r = torch.randn(rows, dim, dtype=dtype, requires_grad=True)
    w = (torch.rand(dim, dtype=dtype) + 0.5).requires_grad_(True)
    leaves = [t.detach().to(device).requires_grad_(True) for t in (x, r, w)]
    normed, summed = add_rms_norm(*leaves)
    dn, ds = torch.randn(normed.shape, dtype=normed.dtype), torch.randn(summed.shape, dtype=summed.dtype)
    grads = [g.cpu() for g in torch.autograd.grad((normed, summed), leaves, on(device, dn, ds))]
    normed, summed = normed.cpu(), summed.cpu()

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_sum_is_rounded_before_normalising(device):
    # In bf16 the stored sum is what the next layer sees; normalising the unrounded sum would differ.
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    r = torch.randn(64, 256, dtype=torch.bfloat16)
    w = torch.randn(256, dtype=torch.bfloat16)
    normed, summed = (t.cpu() for t in add_rms_norm(*on(device, x, r, w)))
    assert torch.equal(summed, x + r)
    assert torch.equal(normed, reference.rms_norm(x + r, w))


@pytest.mark.parametrize("backend", BACKENDS)  # float64 runs the reference under the Triton backend
def test_rms_norm_gradcheck_fp64(device):
    x = on(device, torch.randn(5, 24, dtype=torch.float64)).requires_grad_(True)
    w = on(device, torch.randn(24, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    r = on(device, torch.randn(5, 24, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: add_rms_norm(a, b, c, 1e-5), (x, r, w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype, device):
    x, r, w = (t.requires_grad_(True) for t in on(device, torch.randn(7, 48, dtype=dtype),
                                                  torch.randn(7, 48, dtype=dtype), torch.randn(48, dtype=dtype)))
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_backend_env_gives_same_result(backend_env, device):
    x = on(device, torch.randn(9, 64)).requires_grad_(True)
    w = on(device, torch.randn(64)).requires_grad_(True)
    y_cpp = rms_norm(x, w)
    g_cpp = torch.autograd.grad(y_cpp.sum(), (x, w))
    backend_env("reference")
    y_ref = rms_norm(x, w)
    g_ref = torch.autograd.grad(y_ref.sum(), (x, w))
    torch.testing.assert_close(y_cpp, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_cpp, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_rows_wider_than_one_tile_are_processed_in_chunks(device):
    # Rows wider than the per-program tile (8192 columns) take the chunked two-pass path; a 64-column
    # tile exercises it on small rows, with a ragged last chunk and several programs' partial dweights.
    from mmfuse.kernels.triton import rms_norm as kernels

    for dtype in (torch.float32, torch.bfloat16):
        x, r, w = on(device, torch.randn(5, 200, dtype=dtype), torch.randn(5, 200, dtype=dtype),
                     torch.rand(200, dtype=dtype) + 0.5)
        dy, ds = on(device, torch.randn(5, 200, dtype=dtype), torch.randn(5, 200, dtype=dtype))
        whole = kernels.forward(x, w, r, 1e-6, dtype), kernels.backward(dy, x, w, 1e-6, ds)
        chunked = (kernels.forward(x, w, r, 1e-6, dtype, max_tile=64),
                   kernels.backward(dy, x, w, 1e-6, ds, max_tile=64))
        for a, b in zip((*whole[0], *whole[1]), (*chunked[0], *chunked[1])):
            torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1.6e-2, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_weight_gradient_is_deterministic(device):
    # Per-program partial sums reduced in a fixed order: the same bits on every run.
    x, w, dy = on(device, torch.randn(300, 96), torch.randn(96), torch.randn(300, 96))
    first = torch.ops.mmfuse.rms_norm_backward(dy, x, w, 1e-6, None)[1]
    for _ in range(2):
        assert torch.equal(torch.ops.mmfuse.rms_norm_backward(dy, x, w, 1e-6, None)[1], first)


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
