"""swiglu / swiglu_packed against the float64 reference: forward, both gradients, every dtype,
every SIMD flavour, strided inputs, saturating gates, and the custom-op contracts."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from mmfuse.ops import _alloc, _backend, reference, swiglu, swiglu_packed
from mmfuse.ops.swiglu import _rows
from tests.ops.backends import BACKENDS, on, with_backends
from tests.ops.numerics import assert_matches, supported_isas, use_isa

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Odd row counts (1, 3, 127, 4097 with a small N) against MLP widths: vision 3420, text 5632, and small 64/80.
SHAPES = [(1, 64), (3, 80), (127, 3420), (4097, 80), (1, 5632), (7, 5632), (3, 3420)]


def _small(rows, cols):
    return rows <= 7  # a few dozen Triton programs at most


def _grads_of(fn, inputs, dout):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.device))
    return out.cpu(), [g.cpu() for g in grads]


def _check(fn, ref_fn, inputs, names, scale=1.0):
    """Output and input gradients of mmfuse `fn` (on the inputs' device) vs the float64 reference (and
    eager in the inputs' dtype), both on the CPU."""
    dout = torch.randn(_out_shape(ref_fn, inputs), dtype=inputs[0].dtype) * scale
    y, grads = _grads_of(fn, inputs, dout)
    inputs = [t.detach().cpu() for t in inputs]
    y64, grads64 = _grads_of(ref_fn, [t.double() for t in inputs], dout.double())
    ye, grads_e = _grads_of(ref_fn, inputs, dout)
    assert y.dtype == inputs[0].dtype and y.shape == y64.shape
    assert_matches(y, y64, ye, grad=False, what="out")
    for name, g, g64, ge in zip(names, grads, grads64, grads_e):
        assert g.dtype == inputs[0].dtype
        assert_matches(g, g64, ge, grad=True, what=name)
    return y, grads


def _out_shape(ref_fn, inputs):
    return ref_fn(*(torch.empty(t.shape, dtype=t.dtype, device="meta") for t in inputs)).shape


def _check_swiglu(gate, up):
    return _check(swiglu, reference.swiglu, [gate, up], ("dgate", "dup"))


def _check_packed(x):
    return _check(swiglu_packed, reference.swiglu_packed, [x], ("dx",))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols,backend", with_backends(SHAPES, _small))
def test_swiglu_matches_fp64_reference(rows, cols, dtype, device):
    _check_swiglu(*on(device, torch.randn(rows, cols, dtype=dtype) * 3, torch.randn(rows, cols, dtype=dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols,backend", with_backends(SHAPES, _small))
def test_swiglu_packed_matches_fp64_reference(rows, cols, dtype, device):
    _check_packed(on(device, torch.randn(rows, 2 * cols, dtype=dtype) * 3))


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_simd_flavour_matches_reference(isa, dtype):
    with use_isa(isa):
        # 1000 and 600 leave ragged tails after the 512-element tiles and the vector width.
        for rows, cols in [(3, 80), (2, 1000), (65, 600), (1, 7)]:
            _check_swiglu(torch.randn(rows, cols, dtype=dtype) * 4, torch.randn(rows, cols, dtype=dtype))
            _check_packed(torch.randn(rows, 2 * cols, dtype=dtype) * 4)


def _extreme_gates(dtype, cols=96):
    # Saturating values (sigmoid -> 0 or 1, exp under/overflow in naive formulas) mixed with ordinary ones.
    ext = torch.tensor([100.0, -100.0, 88.7, -88.7, 60.0, -60.0, 30.0, -30.0, 17.0, -17.0, 0.0, -0.0])
    g = torch.randn(4, cols) * 3
    g[:, : ext.numel()] = ext
    g[1, -ext.numel():] = ext.flip(0)
    return g.to(dtype)


# Triton's interpreter computes exp with numpy, which warns where exp(100) overflows to inf (as intended).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("isa,backend", [(isa, "cpp") for isa in supported_isas()] + [(None, "triton")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_saturating_gates_stay_finite_and_match_reference(isa, dtype, device):
    with use_isa(isa) if isa else contextlib.nullcontext():
        g = _extreme_gates(dtype)
        u = torch.randn_like(g)
        y, (dg, du) = _check_swiglu(*on(device, g, u))
        (dx,) = _check_packed(on(device, torch.cat((g, u), dim=-1)))[1]
    for t in (y, dg, du, dx):
        assert torch.isfinite(t).all()
    # silu(100) = 100 to fp32 precision; silu(-100) ~ -3.7e-42.
    assert y[0, 0] == (g[0, 0].double() * u[0, 0].double()).to(dtype)
    assert abs(y[0, 1].item()) < 1e-30


def test_fp32_silu_is_within_5e7_relative_everywhere():
    # Elementwise (not just the tensor-RMS rule): the polynomial exp and the sigmoid built on it keep
    # silu within 5e-7 relative of float64 across the whole range where fp32 exp is nonzero
    # (measured max 2.2e-7), in every flavour.
    g = torch.linspace(-104, 104, 1 << 20)
    ref = F.silu(g.double())
    keep = ref.abs() > 1e-30
    for isa in supported_isas():
        with use_isa(isa):
            y = swiglu(g, torch.ones_like(g)).double()
        rel = ((y - ref).abs() / ref.abs())[keep]
        assert rel.max().item() < 5e-7, f"{isa}: max relative error {rel.max().item():.3g}"


def test_fp32_gate_gradient_matches_reference_across_the_sigmoid_range():
    g = torch.linspace(-104, 104, 1 << 18)
    u = torch.randn_like(g)
    for isa in supported_isas():
        with use_isa(isa):
            _check_swiglu(g, u)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_batched_inputs(device):
    base = on(device, torch.randn(5, 6, 2 * 80))
    _check_swiglu(base[..., ::2], base[..., 1::2])          # strided last dim
    _check_swiglu(on(device, torch.randn(80, 9)).t(), on(device, torch.randn(9, 80)))  # transposed
    g, u = on(device, torch.randn(4, 7, 2 * 96)).chunk(2, dim=-1)  # halves of a packed tensor
    _check_swiglu(g, u)
    wide = on(device, torch.randn(3, 5, 2 * 96 + 40))
    _check_packed(wide[..., : 2 * 96])                        # packed rows inside wider rows
    _check_packed(on(device, torch.randn(2 * 64, 11)).t())     # transposed packed
    _check_packed(on(device, torch.randn(2, 2 * 48, 3)).transpose(1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_output_gradient_is_read_with_its_strides(device):
    # y.sum() backpropagates an expanded tensor of ones (row and column stride 0).
    g, u = (t.requires_grad_(True) for t in on(device, torch.randn(6, 40), torch.randn(6, 40)))
    dg, du = (t.cpu() for t in torch.autograd.grad(swiglu(g, u).sum(), (g, u)))
    g, u = g.cpu(), u.cpu()
    g64, u64 = g.detach().double().requires_grad_(True), u.detach().double().requires_grad_(True)
    dg64, du64 = torch.autograd.grad(reference.swiglu(g64, u64).sum(), (g64, u64))
    assert_matches(dg, dg64, None, grad=True, what="dgate")
    assert_matches(du, du64, None, grad=True, what="dup")


def test_row_strided_views_are_read_in_place():
    x = torch.randn(4, 7, 2 * 96 + 8)[..., : 2 * 96]   # packed rows inside wider rows
    gate, up = torch.randn(4, 7, 2 * 96).chunk(2, dim=-1)
    for t, cols in ((x, 2 * 96), (gate, 96), (up, 96)):
        v = _rows(t, cols)
        assert v.data_ptr() == t.data_ptr() and v.stride(1) == 1
    assert _rows(torch.randn(80, 9).t(), 80).is_contiguous()  # no row view exists: copied


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_unpacked_on_its_halves_bit_for_bit(device):
    x = on(device, torch.randn(33, 2 * 200)).requires_grad_(True)
    y = swiglu_packed(x)
    gate, up = x.detach().chunk(2, dim=-1)
    gate, up = gate.requires_grad_(True), up.requires_grad_(True)
    y2 = swiglu(gate, up)
    assert torch.equal(y, y2)
    dout = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, (x,), dout)
    dg, du = torch.autograd.grad(y2, (gate, up), dout)
    assert torch.equal(dx, torch.cat((dg, du), dim=-1))


def test_large_outputs_with_huge_page_advice_are_correct():
    # 2048 x 1100 fp32 outputs are 8.6 MiB: above the size from which mmfuse.ops._alloc advises huge pages.
    assert 2048 * 1100 * 4 >= _alloc._MIN_BYTES
    _check_swiglu(torch.randn(2048, 1100), torch.randn(2048, 1100))
    _check_packed(torch.randn(2048, 2 * 1100))


def test_result_does_not_depend_on_thread_count():
    # Few long rows are split into column tiles across threads; the split must not change a bit.
    g, u = torch.randn(2, 5000), torch.randn(2, 5000)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = swiglu(g, u), swiglu_packed(torch.cat((g, u), -1))
        torch.set_num_threads(2)
        two = swiglu(g, u), swiglu_packed(torch.cat((g, u), -1))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs_give_empty_outputs_and_gradients(device):
    g, u = (t.requires_grad_(True) for t in on(device, torch.randn(0, 32), torch.randn(0, 32)))
    y = swiglu(g, u)
    assert y.shape == (0, 32)
    dg, du = torch.autograd.grad(y.sum(), (g, u))
    assert dg.shape == du.shape == (0, 32)
    x = on(device, torch.randn(3, 0)).requires_grad_(True)
    yp = swiglu_packed(x)
    assert yp.shape == (3, 0)
    (dx,) = torch.autograd.grad(yp.sum(), (x,))
    assert dx.shape == (3, 0)


@pytest.mark.parametrize("backend", BACKENDS)  # float64 runs the reference under the Triton backend
def test_gradcheck_fp64(device):
    g, u = (t.requires_grad_(True) for t in on(device, torch.randn(5, 24, dtype=torch.float64),
                                               torch.randn(5, 24, dtype=torch.float64)))
    assert torch.autograd.gradcheck(swiglu, (g, u))
    x = on(device, torch.randn(3, 4, 2 * 12, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(swiglu_packed, (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_every_custom_op(dtype, device):
    g, u, x = (t.requires_grad_(True) for t in on(device, torch.randn(7, 48, dtype=dtype),
                                                  torch.randn(7, 48, dtype=dtype), torch.randn(7, 96, dtype=dtype)))
    dout = on(device, torch.randn(7, 48, dtype=dtype))
    torch.library.opcheck(torch.ops.mmfuse.swiglu.default, (g, u))
    torch.library.opcheck(torch.ops.mmfuse.swiglu_packed.default, (x,))
    torch.library.opcheck(torch.ops.mmfuse.swiglu_backward.default, (dout, g.detach(), u.detach()))
    torch.library.opcheck(torch.ops.mmfuse.swiglu_packed_backward.default, (dout, x.detach()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_runs_under_torch_compile_fullgraph(device):
    g, u, x = (t.requires_grad_(True) for t in on(device, torch.randn(4, 64), torch.randn(4, 64), torch.randn(4, 128)))
    fn = torch.compile(lambda a, b, c: swiglu(a, b) + swiglu_packed(c), backend="aot_eager", fullgraph=True)
    y = fn(g, u, x)
    grads = torch.autograd.grad(y.sum(), (g, u, x))
    want = swiglu(g, u) + swiglu_packed(x)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    for a, b in zip(grads, torch.autograd.grad(want.sum(), (g, u, x))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_backward_formulas_match_autograd():
    g, u, d = (torch.randn(6, 40, dtype=torch.float64) * 3 for _ in range(3))
    ga, ua = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
    want = torch.autograd.grad(reference.swiglu(ga, ua), (ga, ua), d)
    for got, w in zip(reference.swiglu_backward(d, g, u), want):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)
    x = torch.cat((g, u), dim=-1).requires_grad_(True)
    (want_x,) = torch.autograd.grad(reference.swiglu_packed(x), (x,), d)
    torch.testing.assert_close(reference.swiglu_packed_backward(d, x.detach()), want_x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_backend_env_gives_same_result(backend_env, device):
    g, u, x = (t.requires_grad_(True) for t in on(device, torch.randn(9, 64), torch.randn(9, 64), torch.randn(9, 128)))

    def run():
        y, yp = swiglu(g, u), swiglu_packed(x)
        return (y, yp, *torch.autograd.grad((y, yp), (g, u, x), (torch.ones_like(y), torch.ones_like(yp))))

    cpp = run()
    backend_env("reference")
    ref = run()
    for name, a, b in zip(("y", "y_packed", "dgate", "dup", "dx"), cpp, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_inputs_raise_clear_errors():
    g = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"up must have gate's shape \(4, 16\), got \(4, 15\)"):
        swiglu(g, torch.randn(4, 15))
    with pytest.raises(TypeError, match="up dtype torch.float16 must equal gate dtype torch.float32"):
        swiglu(g, torch.randn(4, 16, dtype=torch.float16))
    with pytest.raises(TypeError, match="gate has dtype int64"):
        swiglu(torch.ones(4, 16, dtype=torch.long), torch.ones(4, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="x has dtype int32"):
        swiglu_packed(torch.ones(4, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"must be even, got shape \(4, 15\)"):
        swiglu_packed(torch.randn(4, 15))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        swiglu(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="gate on cpu, up on meta"):
        swiglu(g, torch.randn(4, 16, device="meta"))
    with pytest.raises(ValueError, match=r"dout must have the output's shape \(4, 8\), got \(4, 16\)"):
        torch.ops.mmfuse.swiglu_packed_backward(g, g)


def test_cpp_backend_refuses_non_cpu_tensors(backend_env):
    backend_env("cpp")
    with pytest.raises(ValueError, match="MMFUSE_BACKEND=cpp runs on CPU tensors only"):
        _backend.select("swiglu", torch.randn(4, 16, device="meta"))
