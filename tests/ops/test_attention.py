"""attention / attention_merge against the float64 reference (explicit masked softmax per sequence)."""

import pytest
import torch
import torch.nn.functional as F

from mmfuse.ops import attention, attention_merge, reference
from tests.ops.backends import BACKENDS, GPU, on, with_backends
from tests.ops.numerics import assert_matches, supported_isas, use_isa

CPU = torch.device("cpu")


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _check(lengths_q, lengths_k, hq, hk, d, dtype=torch.float32, causal=False, window=None, scale=None,
           lse_grad=False, device=CPU):
    """Forward (out, lse) and dq/dk/dv of mmfuse (on `device`) vs the float64 reference and the eager
    dtype run (on the CPU)."""
    tq, tk = sum(lengths_q), sum(lengths_k)
    q = torch.randn(tq, hq, d, dtype=dtype)
    k = torch.randn(tk, hk, d, dtype=dtype)
    v = torch.randn(tk, hk, d, dtype=dtype)
    packed = len(lengths_q) > 1 or lengths_q != lengths_k
    cu_q, cu_k = (_cu(lengths_q), _cu(lengths_k)) if packed else (None, None)
    kw = dict(causal=causal, softmax_scale=scale, window=window)

    def run(fn, tensors, dev=CPU):
        ts = [t.detach().to(dev).requires_grad_(True) for t in tensors]
        out, lse = fn(*ts)
        dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        dlse = torch.randn(lse.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(lse.dtype)
        dout, dlse = dout.to(dev), dlse.to(dev)
        loss = (out * dout).sum() + ((torch.where(lse.isinf(), 0, lse) * dlse).sum() if lse_grad else 0)
        return tuple(t.cpu() for t in (out, lse) + torch.autograd.grad(loss, ts))

    cu_qd, cu_kd = (None, None) if cu_q is None else on(device, cu_q, cu_k)
    ours = run(lambda q, k, v: attention(q, k, v, cu_qd, cu_kd, return_lse=True, **kw), (q, k, v), device)
    ref = run(lambda q, k, v: reference.attention(q, k, v, cu_q, cu_k, **kw), (q.double(), k.double(), v.double()))
    eager = run(lambda q, k, v: reference.attention(q, k, v, cu_q, cu_k, **kw), (q, k, v))
    lowp = dtype in (torch.bfloat16, torch.float16)
    assert ours[0].dtype == dtype and ours[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(ours[1].isinf(), ref[1].isinf()), "lse: -inf rows differ"
    fin = ~ref[1].isinf()
    assert_matches(ours[1][fin], ref[1][fin], eager[1][fin], grad=False, what="lse", low_precision=lowp)
    for name, a, r, e, grad in zip(("out", "dq", "dk", "dv"), ours[:1] + ours[2:], ref[:1] + ref[2:],
                                   eager[:1] + eager[2:], (False, True, True, True)):
        if r.abs().max() == 0:  # e.g. dq of length-1 sequences: exactly 0 in fp64, rounding noise here
            assert a.double().abs().max() < 1e-5, f"{name}: expected ~0"
            continue
        assert_matches(a, r, e, grad=grad, what=name, low_precision=lowp)


# The Triton cases (backend "triton"): every case on a GPU; in the interpreter (CPU-only runs) the
# cases of at most a few hundred tokens, a few seconds each at most (`with_backends`' second argument).
LONG = [b for b in BACKENDS if b == "cpp" or GPU]  # over a few hundred tokens: no interpreter


def _no_long(*case):
    return False


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length,d,backend",
                         with_backends([(n, d) for n in (1, 7, 33, 64, 129) for d in (64, 80, 128)]))
def test_single_sequence_matches_fp64_reference(length, d, causal, device):
    _check([length], [length], 2, 1, d, causal=causal, device=device)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", LONG)
def test_long_sequence_1000(causal, device):
    _check([1000], [1000], 2, 1, 64, causal=causal, device=device)


@pytest.mark.parametrize("window,backend", with_backends([((300, 0),), ((200, 150),), ((-1, 100),)], _no_long))
def test_long_packed_sequences_with_windows(window, device):
    # Several forward (384-row) and backward (96 x 128) tiles per sequence, partly visible ones included.
    _check([900, 500], [1100, 450], 4, 2, 40, window=window, device=device)


@pytest.mark.parametrize("hq,hk,backend", with_backends([(1, 1), (2, 1), (7, 7), (7, 1), (8, 2), (8, 8)]))
def test_gqa_packed_sequences(hq, hk, device):
    _check([7, 64, 1, 129], [7, 64, 1, 129], hq, hk, 64, causal=True, device=device)


@pytest.mark.parametrize("window", [(16, 0), (5, 3), (-1, 7), (70, -1), (0, 0)])
@pytest.mark.parametrize("causal,backend", with_backends([False, True]))
def test_sliding_window(window, causal, device):
    _check([129, 7, 64], [129, 7, 64], 2, 1, 80, causal=causal, window=window, device=device)


@pytest.mark.parametrize("causal,backend", with_backends([False, True]))
def test_unequal_query_and_key_lengths_align_bottom_right(causal, device):
    # Lq > Lk leaves the first causal rows with no key: out 0, lse -inf; Lq < Lk: decode-like rows.
    _check([7, 129, 1, 64], [20, 64, 5, 64], 2, 1, 64, causal=causal, device=device)
    _check([30], [5], 2, 2, 64, causal=causal, window=(3, -1), device=device)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", LONG)
def test_generation_steps_over_long_caches(causal, device):
    # One (or a few) new query rows per sequence against caches longer than the short path takes: the tiled
    # path with buffers sized to its largest query tile, not to a full tile.
    _check([1, 1, 3], [600, 300, 1000], 8, 2, 64, causal=causal, device=device)
    # Sequences without query rows between them (how generation describes the unused tail of each cache
    # buffer): skipped by the forward, and their keys get zero gradients.
    _check([1, 0, 2, 0, 0], [600, 400, 20, 300, 5], 8, 2, 64, causal=causal, device=device)


@pytest.mark.parametrize("dtype,backend", with_backends([torch.bfloat16, torch.float16, torch.float64]), ids=str)
def test_low_and_double_precision(dtype, device):
    # float64 runs the reference under the Triton backend (the kernels keep to fp32 math).
    _check([7, 129, 64], [7, 129, 64], 4, 2, 128, dtype=dtype, causal=True, device=device)
    _check([65], [65], 2, 1, 80, dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient_and_scale(dtype, device):
    _check([7, 100], [7, 100], 4, 2, 64, dtype=dtype, causal=True, lse_grad=True, scale=0.3, device=device)


@pytest.mark.parametrize("d,backend", with_backends([1, 33, 96, 200, 256]))
def test_any_head_dim_up_to_256(d, device):
    _check([37, 70], [37, 70], 2, 1, d, causal=True, device=device)


@pytest.mark.parametrize("isa", supported_isas())
def test_every_simd_flavour(isa):
    with use_isa(isa):
        # Sequences of at most 256 rows take the staged short path, longer ones the tiled path (300 here).
        _check([7, 129, 64, 300], [7, 129, 64, 300], 4, 2, 80, causal=True, window=(40, -1))
        _check([70], [70], 2, 2, 64, dtype=torch.bfloat16)
        _check([64, 64, 300], [64, 64, 300], 2, 1, 72)  # a head dim that is not a whole number of vectors


@pytest.mark.parametrize("backend", LONG)
def test_short_sequences_split_over_kv_head_chunks(device):
    # Windows of 64 with 8/4 heads of 160: the staged operands of all kv heads exceed the staging budget, so
    # each window is several items (2 kv heads each forward, 1 backward); the 200-row one takes the tiled path.
    _check([64, 64, 64, 200, 64], [64, 64, 64, 200, 64], 8, 4, 160, device=device)
    _check([64, 30, 64], [64, 50, 64], 8, 4, 160, causal=True, window=(20, 5), lse_grad=True, device=device)


@pytest.mark.parametrize("causal,backend", with_backends([False, True]))
def test_equals_sdpa_on_dense_inputs(causal, device):
    q, k, v = (torch.randn(1, 4, 200, 64) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)[0].transpose(0, 1)
    q, k, v = on(device, q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1))
    got = attention(q, k, v, causal=causal).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_of_two_key_halves_equals_attention_over_all_keys(device):
    q, k, v = on(device, torch.randn(50, 4, 64), torch.randn(90, 2, 64), torch.randn(90, 2, 64))
    whole, lse = attention(q, k, v, return_lse=True)
    oa, la = attention(q, k[:40], v[:40], return_lse=True)
    ob, lb = attention(q, k[40:], v[40:], return_lse=True)
    merged, mlse = attention_merge(oa, la, ob, lb)
    torch.testing.assert_close(merged, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mlse, lse, rtol=1e-5, atol=1e-5)
    # A side that sees nothing (lse = -inf) is a no-op.
    empty_o, empty_l = torch.zeros_like(whole), torch.full_like(lse, float("-inf"))
    torch.testing.assert_close(attention_merge(whole, lse, empty_o, empty_l)[0], whole)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_gradients_flow_through_lse(device):
    q, k, v = (t.requires_grad_(True) for t in on(device, torch.randn(20, 2, 64), torch.randn(30, 2, 64),
                                                   torch.randn(30, 2, 64)))
    dout = on(device, torch.randn(20, 2, 64))
    whole = attention(q, k, v)
    g_whole = torch.autograd.grad(whole, (q, k, v), dout)
    oa, la = attention(q, k[:13], v[:13], return_lse=True)
    ob, lb = attention(q, k[13:], v[13:], return_lse=True)
    g_merged = torch.autograd.grad(attention_merge(oa, la, ob, lb)[0], (q, k, v), dout)
    for a, b in zip(g_merged, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_before_any_work():
    q, k = torch.randn(10, 4, 64), torch.randn(10, 2, 64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(TypeError, match="int32"):
        attention(q, k, k, cu.long(), cu.long())
    with pytest.raises(ValueError, match="non-decreasing"):
        attention(q, k, k, torch.tensor([0, 6, 4, 10], dtype=torch.int32), torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at 10"):
        attention(q, k, k, torch.tensor([0, 4, 9], dtype=torch.int32), cu)
    with pytest.raises(ValueError, match="both"):
        attention(q, k, k, cu, None)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q, torch.randn(10, 3, 64), torch.randn(10, 3, 64))
    with pytest.raises(ValueError, match="head dim"):
        attention(q, torch.randn(10, 2, 32), torch.randn(10, 2, 32))
    with pytest.raises(ValueError, match="head dim must be"):
        attention(torch.randn(4, 1, 300), torch.randn(4, 1, 300), torch.randn(4, 1, 300))
    with pytest.raises(ValueError, match=">= -1"):
        attention(q, k, k, window=(-2, 0))
    with pytest.raises(ValueError, match="same shape"):
        attention(q, k, torch.randn(9, 2, 64))
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, k.double(), k)
    with pytest.raises(ValueError, match="max_seqlen"):
        attention(q, k, k, cu, cu, max_seqlen_q=5, max_seqlen_k=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(device):
    base = torch.randn(70, 4, 128)
    q = base[..., ::2]
    k = torch.randn(2, 70, 64).transpose(0, 1)
    v = torch.randn(70, 2, 64)
    assert not q.is_contiguous() and not k.is_contiguous()
    want, _ = reference.attention(q.double(), k.double(), v.double(), causal=True)
    # Moved as views of moved bases, so the strides survive on the GPU too.
    qd, kd = on(device, base)[..., ::2], on(device, k.transpose(0, 1).contiguous()).transpose(0, 1)
    assert not qd.is_contiguous() and not kd.is_contiguous()
    got = attention(qd, kd, on(device, v), causal=True).cpu()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(packed, device):
    q, k, v = on(device, torch.randn(20, 4, 64), torch.randn(20, 2, 64), torch.randn(20, 2, 64))
    cu = on(device, torch.tensor([0, 7, 20], dtype=torch.int32)) if packed else None
    torch.library.opcheck(torch.ops.mmfuse.attention.default, (q, k, v, cu, cu, -1, -1, True, 0.125, 5, -1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_smoke(device):
    q, k, v = (torch.randn(33, 2, 64, device=device, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 10, 33], dtype=torch.int32, device=device)

    def loss(q, k, v):
        return attention(q, k, v, cu, cu, causal=True).square().sum()

    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_backward_is_bitwise_repeatable_with_several_threads():
    """dQ partials are summed in a fixed order, so training on the CPU resumes bit for bit."""
    torch.manual_seed(0)
    q = torch.randn(300, 4, 32, requires_grad=True)
    k = torch.randn(300, 2, 32, requires_grad=True)
    v = torch.randn(300, 2, 32, requires_grad=True)
    cu = torch.tensor([0, 170, 300], dtype=torch.int32)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        grads = []
        for _ in range(8):
            out = attention(q, k, v, cu, cu, 170, 170, causal=True)
            grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    finally:
        torch.set_num_threads(threads)
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0]))


def test_backward_of_long_sequences_is_bitwise_repeatable_with_several_threads():
    """The tiled path (sequences over 256 rows) sums per-thread dQ partials: in a fixed order, too."""
    torch.manual_seed(0)
    q = torch.randn(700, 4, 32, requires_grad=True)
    k = torch.randn(700, 2, 32, requires_grad=True)
    v = torch.randn(700, 2, 32, requires_grad=True)
    cu = torch.tensor([0, 400, 464, 700], dtype=torch.int32)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        grads = []
        for _ in range(8):
            out = attention(q, k, v, cu, cu, 400, 400, causal=True)
            grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    finally:
        torch.set_num_threads(threads)
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0]))


# ---- Triton kernels only ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton"])
def test_triton_backward_is_bitwise_repeatable(device):
    """dK/dV are reduced over the query heads of a group inside one program and dQ by its own
    kernel: no atomics, so gradients are the same on every run."""
    q, k, v = (t.requires_grad_(True) for t in on(device, torch.randn(100, 4, 64), torch.randn(100, 2, 64),
                                                   torch.randn(100, 2, 64)))
    cu = on(device, torch.tensor([0, 70, 100], dtype=torch.int32))
    grads = [torch.autograd.grad(attention(q, k, v, cu, cu, causal=True).square().sum(), (q, k, v))
             for _ in range(3)]
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0]))


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_programs_loop_past_the_grid(device, monkeypatch):
    """Grids are capped at 65535 programs per axis and programs loop over the tiles and sequences
    beyond; here the cap is 2, so every program of the three kernels loops."""
    from mmfuse.kernels.triton import attention as kernels

    monkeypatch.setattr(kernels, "grid", lambda n: max(1, min(int(n), 2)))
    _check([7, 129, 1, 64], [20, 129, 5, 64], 4, 2, 64, causal=True, lse_grad=True, device=device)
    _check([129, 7, 64], [129, 7, 64], 2, 1, 80, window=(16, 3), device=device)
