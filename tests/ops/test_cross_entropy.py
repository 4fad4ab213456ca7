"""cross_entropy against the float64 reference and F.cross_entropy: every reduction, ignore_index,
all-ignored batches (0, not NaN), gradients, every SIMD flavour, bad inputs. Tests taking `device`
run on the C++ core and on the Triton kernels (tests/ops/backends.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmfuse.ops import cross_entropy, reference
from tests.ops.backends import BACKENDS, on, with_backends
from tests.ops.numerics import assert_matches, supported_isas, use_isa

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
REDUCTIONS = ["mean", "sum", "none"]
# Odd row counts against tiny, mid and Qwen-sized vocabularies (one row of 151936 is 2 tiles short of 75).
SHAPES = [(1, 7), (3, 1000), (127, 1000), (1000, 7), (3, 32000), (2, 151936)]


def _small(N, V):
    return N <= 64  # a few Triton programs (a 151936 row is 38 BLOCK_V chunks of one program)


def _labels(N, V, ignore_frac=0.25, ignore_index=-100):
    y = torch.randint(0, V, (N,))
    y[torch.rand(N) < ignore_frac] = ignore_index
    return y


def _check_ce(x, y, reduction, ignore_index=-100, device="cpu"):
    """Loss and dlogits of mmfuse (on `device`) vs the float64 reference and eager, both on the CPU."""
    x, y = x.detach().cpu(), y.cpu()
    xa = on(device, x).requires_grad_(True)
    loss = cross_entropy(xa, on(device, y), ignore_index, reduction)
    dl = torch.randn(loss.shape, dtype=loss.dtype)
    (dx,) = torch.autograd.grad(loss, (xa,), on(device, dl))
    loss, dx = loss.cpu(), dx.cpu()

    x64 = x.detach().double().requires_grad_(True)
    l64 = reference.cross_entropy(x64, y, ignore_index, reduction)
    (dx64,) = torch.autograd.grad(l64, (x64,), dl.double())

    xe = x.detach().requires_grad_(True)
    le = reference.cross_entropy(xe, y, ignore_index, reduction)
    (dxe,) = torch.autograd.grad(le, (xe,), dl)

    assert loss.dtype == x.dtype and loss.shape == l64.shape
    assert_matches(loss, l64, le, grad=False, what=f"loss ({reduction})")
    assert_matches(dx, dx64, dxe, grad=True, what=f"dlogits ({reduction})")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,V,backend", with_backends(SHAPES, _small))
def test_cross_entropy_matches_fp64_reference(N, V, dtype, reduction, device):
    x = (torch.randn(N, V) * 4).to(dtype)
    _check_ce(x, _labels(N, V), reduction, device=device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_f_cross_entropy_in_fp64(reduction):
    x = torch.randn(300, 513, dtype=torch.float64, requires_grad=True)
    y = _labels(300, 513, ignore_index=-1)
    ours = cross_entropy(x, y, ignore_index=-1, reduction=reduction)
    theirs = F.cross_entropy(x, y, ignore_index=-1, reduction=reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(theirs, x, g)[0],
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cross_entropy_every_simd_flavour(isa, dtype):
    with use_isa(isa):
        for N, V in [(5, 4099), (33, 7)]:
            for reduction in REDUCTIONS:
                _check_ce((torch.randn(N, V) * 4).to(dtype), _labels(N, V), reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_ignored_batch_gives_zero_loss_and_gradient_not_nan(dtype, device):
    x, y = on(device, torch.randn(6, 50, dtype=dtype), torch.full((6,), -100))
    x.requires_grad_(True)
    for reduction in REDUCTIONS:
        loss = cross_entropy(x, y, reduction=reduction)
        (dx,) = torch.autograd.grad(loss.sum(), (x,))
        assert torch.equal(loss, torch.zeros_like(loss))
        assert torch.equal(dx, torch.zeros_like(dx))
    assert torch.isnan(F.cross_entropy(x.detach().float().cpu(), y.cpu()))  # the documented difference from PyTorch


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_rows_have_zero_loss_and_grad_and_leave_the_mean(device):
    x = torch.randn(8, 30)
    y = torch.randint(0, 30, (8,))
    y[y == 7] = 8  # rows 1 and 4 alone are ignored
    y[[1, 4]] = 7
    x, y = on(device, x, y)
    x.requires_grad_(True)
    rows = cross_entropy(x, y, ignore_index=7, reduction="none").cpu()
    assert rows[1] == 0 and rows[4] == 0
    mean = cross_entropy(x, y, ignore_index=7)
    torch.testing.assert_close(mean.cpu(), rows.sum() / 6)
    (dx,) = torch.autograd.grad(mean, (x,))
    assert torch.equal(dx.cpu()[[1, 4]], torch.zeros(2, 30))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_and_non_contiguous_logits(device):
    base = on(device, torch.randn(2, 9, 2 * 300))
    x = base[..., ::2]                        # [B, S, V] with strided classes
    y = torch.randint(0, 300, (2, 9))
    for reduction in REDUCTIONS:
        _check_ce(x, y, reduction, device=device)
    _check_ce(on(device, torch.randn(300, 11)).t(), torch.randint(0, 300, (11,)), "mean", device=device)
    _check_ce(on(device, torch.randn(5, 300 + 20))[:, :300], torch.randint(0, 300, (5,)), "sum",
              device=device)  # rows inside wider rows (a row stride, no copy on the Triton path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stable_for_large_and_masked_logits(device):
    x = torch.randn(4, 1000) * 1e4
    x[:, 500:] = -math.inf                     # masked vocabulary
    y = torch.randint(0, 500, (4,))
    loss = cross_entropy(*on(device, x, y), reduction="none").cpu()
    torch.testing.assert_close(loss.double(), F.cross_entropy(x.double(), y, reduction="none"), rtol=1e-6, atol=1e-3)
    xa = on(device, x).requires_grad_(True)
    (dx,) = torch.autograd.grad(cross_entropy(xa, on(device, y)), (xa,))
    dx = dx.cpu()
    assert torch.isfinite(dx).all() and torch.equal(dx[:, 500:], torch.zeros(4, 500))
    # Masked first: the online max starts at -inf for whole chunks (no exp(-inf - -inf) = NaN).
    xm = torch.randn(3, 9000)
    xm[:, :8500] = -math.inf
    ym = torch.randint(8500, 9000, (3,))
    torch.testing.assert_close(cross_entropy(*on(device, xm, ym), reduction="none").cpu().double(),
                               F.cross_entropy(xm.double(), ym, reduction="none"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logit_gives_nan_loss(device):
    x = torch.randn(3, 5000)
    x[1, 4321] = math.nan
    loss = cross_entropy(*on(device, x, torch.tensor([0, 1, 2])), reduction="none").cpu()
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isnan(loss[1])


def test_gradcheck_fp64():
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, -100, 12, 3, 3])
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda a: cross_entropy(a, y, reduction=reduction), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype, device):
    x, y = on(device, torch.randn(7, 48, dtype=dtype), torch.tensor([0, 5, -100, 47, 1, 2, 3]))
    x.requires_grad_(True)
    for reduction in REDUCTIONS:
        torch.library.opcheck(torch.ops.mmfuse.cross_entropy.default, (x, y, -100, reduction))


def test_reference_backward_formula_matches_autograd():
    x = torch.randn(6, 40, dtype=torch.float64)
    y = torch.tensor([1, -100, 39, 0, 5, 5])
    for reduction in REDUCTIONS:
        xa = x.clone().requires_grad_(True)
        loss = reference.cross_entropy(xa, y, reduction=reduction)
        g = torch.randn_like(loss)
        (want,) = torch.autograd.grad(loss, (xa,), g)
        torch.testing.assert_close(reference.cross_entropy_backward(g, x, y, reduction=reduction), want,
                                   rtol=1e-12, atol=1e-14)


def test_reference_backend_env_gives_same_result(backend_env):
    x = torch.randn(9, 64, requires_grad=True)
    y = _labels(9, 64)
    l_cpp = cross_entropy(x, y)
    g_cpp = torch.autograd.grad(l_cpp, (x,))[0]
    backend_env("reference")
    l_ref = cross_entropy(x, y)
    g_ref = torch.autograd.grad(l_ref, (x,))[0]
    torch.testing.assert_close(l_cpp, l_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_cpp, g_ref, rtol=1e-5, atol=1e-7)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"labels\[2\] \(flattened\) = 16 is outside \[0, 16\)"):
        cross_entropy(x, torch.tensor([0, 1, 16, 3]))
    with pytest.raises(ValueError, match=r"labels\[0\] \(flattened\) = -1 is outside"):
        cross_entropy(x, torch.tensor([-1, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        cross_entropy(x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="labels has dtype int32"):
        cross_entropy(x, torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    with pytest.raises(TypeError, match="logits has dtype int64"):
        cross_entropy(torch.ones(4, 16, dtype=torch.long), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(x, torch.tensor([0, 1, 2, 3]), reduction="avg")


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_forward_writes_the_scaled_gradient_in_place(dtype, device):
    # The in-pass gradient linear_cross_entropy relies on: written over the logits by the forward
    # kernel, equal to the backward kernel's from the saved lse (per-row scales, ignored rows 0).
    from mmfuse.kernels.triton import cross_entropy as kernels

    x = (torch.randn(9, 5000) * 4).to(dtype)
    y = _labels(9, 5000)
    rs = torch.randn(9)
    x_dev, y_dev, rs_dev = on(device, x, y, rs)
    loss, lse = kernels.forward(x_dev, y_dev, -100)
    want = kernels.backward(x_dev, y_dev, lse, -100, 0.5, rs_dev).cpu()
    buf = x_dev.clone()
    loss2, lse2 = kernels.forward(buf, y_dev, -100, grad=buf, scale=0.5, row_scale=rs_dev)
    assert torch.equal(loss2, loss) and torch.equal(lse2, lse)
    torch.testing.assert_close(buf.cpu(), want, rtol=0, atol=0)
    ref = reference.cross_entropy_backward(rs.double(), x.double(), y, reduction="none") * 0.5
    assert_matches(buf.cpu(), ref, reference.cross_entropy_backward(rs.to(dtype), x, y, reduction="none") * 0.5,
                   grad=True, what="in-place dlogits")
