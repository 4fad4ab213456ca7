"""linear_cross_entropy against the float64 reference (logits materialised there, never here):
every reduction, ignore_index, all-ignored batches, chunk sizes that do not divide N, gradients
for hidden and weight, every SIMD flavour, torch.compile, bad inputs. Tests taking `device` run on
the C++ core and on the Triton kernels (tests/ops/backends.py)."""

import pytest
import torch

from mmfuse.ops import linear_cross_entropy, reference
from mmfuse.ops.linear_cross_entropy import default_chunk_size
from tests.ops.backends import BACKENDS, on, with_backends
from tests.ops.numerics import assert_matches, supported_isas, use_isa

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
REDUCTIONS = ["mean", "sum", "none"]
# (N, H, V): odd row counts against tiny, mid and 32k vocabularies.
SHAPES = [(1, 16, 7), (3, 32, 1000), (127, 64, 1000), (1000, 16, 7), (9, 24, 32000)]


def _small(N, H, V):
    return N <= 64  # few Triton programs per chunk


def _labels(N, V, ignore_frac=0.25, ignore_index=-100):
    y = torch.randint(0, V, (N,))
    y[torch.rand(N) < ignore_frac] = ignore_index
    return y


def _inputs(N, H, V, dtype):
    h = torch.randn(N, H).to(dtype)
    w = (torch.randn(V, H) / H ** 0.5 * 3).to(dtype)
    return h, w


def _check_lce(h, w, y, reduction, chunk_size=None, ignore_index=-100, device="cpu"):
    """Loss and both gradients of mmfuse (on `device`) vs the float64 reference and eager, on the CPU."""
    ha, wa = (t.detach().to(device).requires_grad_(True) for t in (h, w))
    loss = linear_cross_entropy(ha, wa, on(device, y), ignore_index, reduction, chunk_size)
    # 'mean'/'sum' keep the forward's gradients (for dloss = 1) in the inputs' dtype and scale them
    # by dloss in backward: exact for a power of two (and for loss.backward()), one more rounding else.
    dl = torch.randn(loss.shape, dtype=loss.dtype) if reduction == "none" else torch.tensor(-2.0, dtype=loss.dtype)
    dh, dw = (g.cpu() for g in torch.autograd.grad(loss, (ha, wa), on(device, dl)))
    loss = loss.cpu()

    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    l64 = reference.linear_cross_entropy(h64, w64, y, ignore_index, reduction)
    dh64, dw64 = torch.autograd.grad(l64, (h64, w64), dl.double())

    he, we = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
    le = reference.linear_cross_entropy(he, we, y, ignore_index, reduction)
    dhe, dwe = torch.autograd.grad(le, (he, we), dl)

    assert loss.dtype == h.dtype and loss.shape == l64.shape
    assert_matches(loss, l64, le, grad=False, what=f"loss ({reduction}, chunk {chunk_size})")
    assert_matches(dh, dh64, dhe, grad=True, what=f"dhidden ({reduction}, chunk {chunk_size})")
    assert_matches(dw, dw64, dwe, grad=True, what=f"dweight ({reduction}, chunk {chunk_size})")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,H,V,backend", with_backends(SHAPES, _small))
def test_linear_cross_entropy_matches_fp64_reference(N, H, V, dtype, reduction, device):
    h, w = _inputs(N, H, V, dtype)
    _check_lce(h, w, _labels(N, V), reduction, device=device)


@pytest.mark.parametrize("chunk_size,backend", with_backends([1, 7, 50, 127, 500]))
def test_chunk_sizes_that_do_not_divide_n(chunk_size, device):
    h, w = _inputs(127, 32, 300, torch.float32)
    y = _labels(127, 300)
    for reduction in REDUCTIONS:
        _check_lce(h, w, y, reduction, chunk_size, device=device)


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_bf16_with_chunks_and_ignored_rows(device):
    # bf16 logits chunks overwritten by their gradient, dweight summed over chunks in fp32.
    h, w = _inputs(50, 32, 1000, torch.bfloat16)
    y = _labels(50, 1000)
    for reduction in REDUCTIONS:
        _check_lce(h, w, y, reduction, chunk_size=16, device=device)


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy_every_simd_flavour(isa, dtype):
    with use_isa(isa):
        h, w = _inputs(37, 24, 2051, dtype)
        for reduction in REDUCTIONS:
            _check_lce(h, w, _labels(37, 2051), reduction, chunk_size=8)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_gemms_widened_or_not_match_fp64_reference(native, monkeypatch):
    """A CPU without bf16 GEMM instructions runs the chunk GEMMs in fp32 (widened weight); one with
    them in bf16. Whichever this machine is, both paths are checked."""
    import importlib

    # the module, not the op the package re-exports under the same name
    lce_module = importlib.import_module("mmfuse.ops.linear_cross_entropy")
    monkeypatch.setattr(lce_module, "_native_half_gemm", lambda dtype: native)
    torch.manual_seed(3)
    h, w = _inputs(127, 64, 1000, torch.bfloat16)
    for reduction in REDUCTIONS:
        _check_lce(h, w, _labels(127, 1000), reduction, chunk_size=50)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_batch_gives_zero_loss_and_gradients(device):
    h, w, y = on(device, torch.randn(5, 8), torch.randn(11, 8), torch.full((5,), -100))
    h.requires_grad_(True)
    w.requires_grad_(True)
    for reduction in REDUCTIONS:
        loss = linear_cross_entropy(h, w, y, reduction=reduction)
        dh, dw = torch.autograd.grad(loss.sum(), (h, w))
        assert torch.equal(loss, torch.zeros_like(loss))
        assert torch.equal(dh, torch.zeros_like(h)) and torch.equal(dw, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_batched_hidden(device):
    h, w = _inputs(2 * 13, 16, 40, torch.float32)
    y = _labels(26, 40, ignore_index=3)
    _check_lce(h.reshape(2, 13, 16), w, y.reshape(2, 13), "mean", chunk_size=5, ignore_index=3, device=device)
    _check_lce(h.reshape(2, 13, 16), w, y.reshape(2, 13), "none", chunk_size=5, ignore_index=3, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_no_grad_give_the_same_loss(device):
    h, w = _inputs(20, 16, 50, torch.float32)
    y = _labels(20, 50)
    ha = on(device, h).requires_grad_(True)
    loss = linear_cross_entropy(ha, *on(device, w, y))
    (dh,) = torch.autograd.grad(loss, (ha,))
    h64 = h.double().requires_grad_(True)
    (dh64,) = torch.autograd.grad(reference.linear_cross_entropy(h64, w.double(), y), (h64,))
    assert_matches(dh.cpu(), dh64, None, grad=True, what="dhidden with frozen weight")
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(*on(device, h, w, y)), loss.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_through_the_same_forward_recomputes(device):
    h, w = on(device, torch.randn(4, 8), torch.randn(10, 8))
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = linear_cross_entropy(h, w, on(device, torch.tensor([1, 2, 3, 4])))
    first = torch.autograd.grad(loss, (h, w), on(device, torch.tensor(3.0)), retain_graph=True)
    first = tuple(g.clone() for g in first)
    second = torch.autograd.grad(loss, (h, w), on(device, torch.tensor(6.0)))
    # Rounding, not equality: the Triton path scales the logit gradients by grad_output before its
    # GEMMs, so 3x and 6x round differently (1.6e-6 relative seen on AMD Zen 3); a reused or stale
    # gradient would be off by 50% or more.
    for a, b in zip(first, second):
        torch.testing.assert_close(2 * a, b, rtol=1e-5, atol=1e-6)


def test_default_chunk_size_is_about_the_size_of_hidden_with_a_floor():
    assert default_chunk_size(4096, 2048, 151936) == 256     # ceil(4096 / 75) = 55 -> 64, floor 256
    assert default_chunk_size(65536, 2048, 151936) == 1024   # ceil(65536 / 75) = 874 -> 1024
    assert default_chunk_size(1000, 64, 7) == 1024


def test_gradcheck_fp64():
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, -100, 8, 3, 3, 1])
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, y, reduction=reduction, chunk_size=4),
                                        (h, w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype, device):
    h, w, y = on(device, torch.randn(7, 16, dtype=dtype), torch.randn(30, 16, dtype=dtype),
                 torch.tensor([0, 5, -100, 29, 1, 2, 3]))
    h.requires_grad_(True)
    w.requires_grad_(True)
    for reduction in REDUCTIONS:
        for need in [(True, True), (True, False), (False, False)]:
            torch.library.opcheck(torch.ops.mmfuse.linear_cross_entropy.default, (h, w, y, -100, reduction, 3, *need))
    torch.library.opcheck(torch.ops.mmfuse.linear_cross_entropy_backward.default,
                          (on(device, torch.randn(7, dtype=dtype)), h.detach(), w.detach(), y, -100, "none", 3, True,
                           True))
    torch.library.opcheck(torch.ops.mmfuse.linear_cross_entropy_backward.default,
                          (on(device, torch.tensor(0.5, dtype=dtype)), h.detach(), w.detach(), y, -100, "mean", 3, True,
                           False))


def test_lm_head_loss_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    head = torch.nn.Linear(16, 70, bias=False)
    x = torch.randn(12, 16, requires_grad=True)
    y = _labels(12, 70)

    def step(x):
        return linear_cross_entropy(torch.tanh(x), head.weight, y, chunk_size=5)

    eager = step(x)
    eager_grads = torch.autograd.grad(eager, (x, head.weight))
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    out = compiled(x)
    grads = torch.autograd.grad(out, (x, head.weight))
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_reference_backend_env_gives_same_result(backend_env):
    h, w = _inputs(19, 16, 90, torch.float32)
    y = _labels(19, 90)
    results = []
    for backend in (None, "reference"):
        backend_env(backend)
        for reduction in REDUCTIONS:
            ha, wa = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            loss = linear_cross_entropy(ha, wa, y, reduction=reduction, chunk_size=6)
            results.append((loss, *torch.autograd.grad(loss.sum(), (ha, wa))))
    for a, b in zip(results[:3], results[3:]):
        for x, z in zip(a, b):
            torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"labels\[3\] \(flattened\) = 10 is outside \[0, 10\)"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"weight must have shape \[V, 8\]"):
        linear_cross_entropy(h, torch.randn(10, 7), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="weight dtype torch.bfloat16 must equal hidden dtype torch.float32"):
        linear_cross_entropy(h, w.bfloat16(), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="labels has dtype float32"):
        linear_cross_entropy(h, w, torch.zeros(4))
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3]), chunk_size=-2)
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3]), reduction="batchmean")


def test_triton_default_chunk_keeps_fp32_logits_within_the_budget():
    pytest.importorskip("triton")
    from mmfuse.kernels.triton.linear_cross_entropy import LOGITS_BUDGET_BYTES, default_chunk_size as gpu_chunk

    assert gpu_chunk(16384, 2048, 151936) == 256     # Liger's rule: ceil(16384 / 75) = 219 -> 256
    assert gpu_chunk(65536, 2048, 151936) == 256     # 1024 by Liger's rule, capped by the budget (441 rows)
    assert gpu_chunk(1000, 64, 7) == 1024
    for n in (1, 4096, 1 << 20):
        assert gpu_chunk(n, 2048, 151936) * 151936 * 4 <= LOGITS_BUDGET_BYTES


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_never_holds_more_than_a_chunk_of_logits(device, monkeypatch):
    from mmfuse.kernels.triton import cross_entropy as ce_kernels

    seen = []
    real = ce_kernels.forward

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(ce_kernels, "forward", spy)
    h, w = _inputs(45, 16, 300, torch.float32)
    y = _labels(45, 300)
    _check_lce(h, w, y, "mean", chunk_size=8, device=device)
    n_valid = int((y != -100).sum())
    assert max(r for r, _ in seen) == 8 and sum(r for r, _ in seen) == n_valid  # ignored rows skip the GEMMs
