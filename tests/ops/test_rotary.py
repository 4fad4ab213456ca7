"""rotary (cos/sin tables) against the float64 reference: both pairings, partial rotary, 4-D inputs,
every dtype and SIMD flavour, the inverse rotation as the gradient, in-place kernel calls."""

import pytest
import torch

import mmfuse._C as _C
from mmfuse.ops import reference, rotary
from mmfuse.ops._checks import dtype_code
from tests.ops.backends import BACKENDS, on, shrink, with_backends
from tests.ops.numerics import assert_matches, supported_isas, use_isa

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (T, H, D): odd token counts, the head dims of Qwen2.5-VL (text 128, vision 80) and 64.
SHAPES = [(1, 1, 64), (3, 2, 80), (127, 16, 128), (4097, 2, 80), (5, 16, 64)]
# (rotated frequencies as a fraction of D/2, interleaved)
MODES = {"half": (1.0, False), "interleaved": (1.0, True), "partial": (0.5, False), "partial-interleaved": (0.25, True)}


def _tables(rows, R, dtype=torch.float32):
    """cos/sin of random angles (large ones too, as at position ~10^4)."""
    angles = torch.randn(*rows, R, dtype=torch.float64) * 100
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _check_rotary(x, cos, sin, interleaved=False):
    """Forward and dx of mmfuse (on x's device) vs the float64 reference (and the reference run in
    x's dtype), both on the CPU."""
    xd = x.detach().requires_grad_(True)
    y = rotary(xd, cos, sin, interleaved)
    dy = torch.randn(y.shape, dtype=y.dtype)
    (dx,) = torch.autograd.grad(y, (xd,), dy.to(y.device))
    y, dx, x, cos, sin = y.cpu(), dx.cpu(), x.cpu(), cos.cpu(), sin.cpu()

    x64 = x.detach().double().requires_grad_(True)
    y64 = reference.rotary(x64, cos.double(), sin.double(), interleaved)
    (dx64,) = torch.autograd.grad(y64, (x64,), dy.double())

    xe = x.detach().requires_grad_(True)
    ye = reference.rotary(xe, cos, sin, interleaved)
    (dxe,) = torch.autograd.grad(ye, (xe,), dy)

    assert y.dtype == x.dtype and y.shape == x.shape
    assert_matches(y, y64, ye, grad=False, what="y")
    assert_matches(dx, dx64, dxe, grad=True, what="dx")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,H,D,backend", with_backends(SHAPES, lambda T, H, D: T <= 5))  # Triton: a program per token
def test_rotary_matches_fp64_reference(T, H, D, dtype, mode, device):
    frac, interleaved = MODES[mode]
    R = max(1, int(D // 2 * frac))
    cos, sin = _tables((T,), R)
    _check_rotary(*on(device, torch.randn(T, H, D, dtype=dtype), cos, sin), interleaved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_tables_in_x_dtype_are_accepted(dtype, backend, device):
    T = shrink(backend, 33, 7)
    cos, sin = _tables((T,), 40, dtype)
    _check_rotary(*on(device, torch.randn(T, 3, 80, dtype=dtype), cos, sin))
    _check_rotary(*on(device, torch.randn(T, 3, 80, dtype=dtype), cos, sin), interleaved=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batched_input_with_shared_or_per_batch_tables(dtype, interleaved, backend, device):
    B, S, H, D = 3, shrink(backend, 17, 3), 4, 64
    x = on(device, torch.randn(B, S, H, D, dtype=dtype))
    cos, sin = on(device, *_tables((S,), 24))    # [S, R]: one table for every sequence, partial rotary
    _check_rotary(x, cos, sin, interleaved)
    cos, sin = on(device, *_tables((B, S), 32))  # [B, S, R]
    _check_rotary(x, cos, sin, interleaved)
    # The 4-D result equals the 3-D op on the flattened tokens.
    y4 = rotary(x, cos, sin, interleaved)
    y3 = rotary(x.flatten(0, 1), cos.flatten(0, 1), sin.flatten(0, 1), interleaved)
    assert torch.equal(y4.flatten(0, 1), y3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    T = shrink(backend, 19, 5)
    x = on(device, torch.randn(6, T, 128)).transpose(0, 1)  # [T, 6, 128] stored heads-major
    angles = on(device, torch.randn(T, 128) * 10)
    cos, sin = angles.cos()[:, ::2], angles.sin()[:, 1::2]  # strided [19, 64] tables
    assert not x.is_contiguous() and not cos.is_contiguous()
    _check_rotary(x, cos, sin)
    _check_rotary(x, cos, sin, interleaved=True)
    _check_rotary(x[:, :, :96], cos[:, :40], sin[:, :40])  # sliced head dim with a pass-through tail


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_every_simd_flavour(isa, dtype):
    with use_isa(isa):
        for (T, H, D), R, interleaved in [((3, 2, 80), 40, False), ((65, 4, 128), 64, True), ((9, 3, 64), 13, False)]:
            cos, sin = _tables((T,), R)
            _check_rotary(torch.randn(T, H, D, dtype=dtype), cos, sin, interleaved)


def test_gradient_is_the_inverse_rotation():
    x = torch.randn(11, 3, 64, dtype=torch.float64)
    cos, sin = _tables((11,), 32, torch.float64)
    for interleaved in (False, True):
        y = rotary(x, cos, sin, interleaved)
        back = torch.ops.mmfuse.rotary(y, cos, sin, interleaved, True)
        torch.testing.assert_close(back, x, rtol=1e-12, atol=1e-12)


def test_rotary_gradcheck_fp64():
    x = torch.randn(4, 2, 12, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables((4,), 5, torch.float64)
    for interleaved in (False, True):
        fn = lambda a: rotary(a, cos, sin, interleaved)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_in_place_equals_out_of_place(dtype):
    T, H, D, R = 37, 3, 80, 36
    x = torch.randn(T, H, D, dtype=dtype)
    cos, sin = _tables((T,), R)
    for interleaved in (False, True):
        want = rotary(x, cos, sin, interleaved)
        buf = x.clone()
        _C.rotary(buf.data_ptr(), buf.data_ptr(), cos.data_ptr(), sin.data_ptr(), T, H, D, R, T,
                  dtype_code(x), dtype_code(cos), interleaved, False, 0)
        assert torch.equal(buf, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_zero_frequency_inputs(device):
    x = on(device, torch.randn(0, 4, 64)).requires_grad_(True)
    cos, sin = on(device, *_tables((0,), 32))
    y = rotary(x, cos, sin)
    assert y.shape == (0, 4, 64)
    x = on(device, torch.randn(5, 2, 64))
    cos, sin = on(device, *_tables((5,), 0))
    assert torch.equal(rotary(x, cos, sin), x)         # R = 0: every channel passes through


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype, backend, device):
    T = shrink(backend, 7, 3)
    x = on(device, torch.randn(T, 3, 64, dtype=dtype)).requires_grad_(True)
    cos, sin = on(device, *_tables((T,), 32))
    for interleaved, inverse in [(False, False), (True, False), (False, True)]:
        torch.library.opcheck(torch.ops.mmfuse.rotary.default, (x, cos, sin, interleaved, inverse))
    x4 = on(device, torch.randn(2, T, 3, 80, dtype=dtype)).requires_grad_(True)
    cos4, sin4 = on(device, *_tables((T,), 24, dtype))
    torch.library.opcheck(torch.ops.mmfuse.rotary.default, (x4, cos4, sin4, False, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph_with_gradients(device):
    x = on(device, torch.randn(9, 2, 64)).requires_grad_(True)
    cos, sin = on(device, *_tables((9,), 32))
    fn = torch.compile(lambda a: rotary(a, cos, sin).square().sum(), fullgraph=True, backend="aot_eager")
    (g,) = torch.autograd.grad(fn(x), (x,))
    (g_ref,) = torch.autograd.grad(rotary(x, cos, sin).square().sum(), (x,))
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_backend_env_gives_same_result(backend_env, backend, device):
    x = on(device, torch.randn(9, 4, 80)).requires_grad_(True)
    cos, sin = on(device, *_tables((9,), 30))
    dy = on(device, torch.randn(9, 4, 80))
    results = []
    for forced in (None if backend == "cpp" else "triton", "reference"):
        backend_env(forced)
        for interleaved in (False, True):
            y = rotary(x, cos, sin, interleaved)
            results.append((y, *torch.autograd.grad(y, (x,), dy)))
    for a, b in zip(results[:2], results[2:]):
        for t_cpp, t_ref in zip(a, b):
            torch.testing.assert_close(t_cpp, t_ref, rtol=1e-5, atol=1e-6)


def test_table_gradients_are_refused():
    x = torch.randn(4, 2, 64, requires_grad=True)
    cos, sin = _tables((4,), 32)
    with pytest.raises(NotImplementedError, match="gradients with respect to cos and sin are not provided"):
        rotary(x, cos.requires_grad_(True), sin)
    with torch.no_grad():
        rotary(x, cos, sin)                            # no gradient wanted: fine


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 2, 64)
    cos, sin = _tables((4,), 32)
    with pytest.raises(ValueError, match=r"x must have 3 or 4 dimensions, got shape \(4, 64\)"):
        rotary(x[:, 0], cos, sin)
    with pytest.raises(ValueError, match="head dim D = x.shape\\[-1\\] must be even"):
        rotary(torch.randn(4, 2, 63), cos[:, :16], sin[:, :16])
    with pytest.raises(ValueError, match=r"R = 40 frequencies but x's head dim D = 64 allows at most D/2 = 32"):
        rotary(x, *_tables((4,), 40))
    with pytest.raises(ValueError, match=r"cos/sin must be \[T, R\] with T = 4 .* got \(5, 32\)"):
        rotary(x, *_tables((5,), 32))
    with pytest.raises(ValueError, match=r"cos/sin must be \[S, R\] or \[B, S, R\]"):
        rotary(torch.randn(2, 4, 2, 64), *_tables((3, 4), 32))
    with pytest.raises(ValueError, match="cos and sin must have one shape"):
        rotary(x, cos, sin[:, :16])
    with pytest.raises(TypeError, match="x has dtype int64"):
        rotary(torch.ones(4, 2, 64, dtype=torch.long), cos, sin)
    with pytest.raises(TypeError, match="cos/sin dtype torch.float16 must be float32 or x's dtype torch.bfloat16"):
        rotary(x.bfloat16(), cos.half(), sin.half())
    with pytest.raises(TypeError, match="cos and sin must have one dtype"):
        rotary(x, cos, sin.double())
    with pytest.raises(ValueError, match="one device"):
        rotary(x, cos.to("meta"), sin.to("meta"))
