"""apply_mrope (angles computed in the kernel) and mrope_cos_sin against the float64 reference and
against Hugging Face transformers' Qwen2.5-VL text rotary embedding with position ids from a real
multimodal layout (get_rope_index)."""

import pytest
import torch

import mmfuse._C as _C
from mmfuse.ops import apply_mrope, mrope_cos_sin, reference, rotary
from mmfuse.ops._checks import dtype_code
from tests.ops.backends import BACKENDS, on, shrink, with_backends
from tests.ops.numerics import assert_matches, supported_isas, use_isa

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (T, Hq, Hk, D, mrope_section): Qwen2.5-VL's [16,24,24] at D 128, Liger's [8,12,12] at 64, an odd split at 80.
CASES = [
    (1, 2, 1, 64, [8, 12, 12]),
    (3, 16, 2, 128, [16, 24, 24]),
    (127, 16, 2, 128, [16, 24, 24]),
    (4097, 2, 1, 128, [16, 24, 24]),
    (9, 4, 4, 80, [10, 17, 13]),
    (5, 1, 2, 64, [0, 32, 0]),
]


def _inv_freq(D, theta=1e6):
    return 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def _positions(T, max_pos=20000):
    """[3, T]: text runs (t = h = w) interleaved with vision spans (distinct t, h, w), large values included."""
    pos = torch.arange(T).expand(3, T).clone()
    span = torch.rand(T) < 0.5
    pos[:, span] = torch.randint(0, max_pos, (3, int(span.sum())))
    return pos


def _tables_atol(backend):
    """How far apply_mrope (angles in the kernel) may be from rotary with mrope_cos_sin's tables:
    the C++ kernels' cos/sin are within half an ulp on both sides; the Triton kernel's own within
    one ulp, and on CUDA the tables come from torch's cos/sin (within 2 ulp), so errors of up to
    3 ulp of 1 times |x| ~ 4 add up there."""
    return 1e-6 if backend == "cpp" else 2e-6


def _check_mrope(q, k, pos, inv_freq, section):
    """Outputs and dq, dk of mmfuse (on q's device) vs the float64 reference (and the reference run
    in q's dtype), both on the CPU."""
    qd, kd = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    qo, ko = apply_mrope(qd, kd, pos, inv_freq, section)
    dqo, dko = torch.randn(qo.shape, dtype=qo.dtype), torch.randn(ko.shape, dtype=ko.dtype)
    dq, dk = (t.cpu() for t in torch.autograd.grad((qo, ko), (qd, kd), on(q.device, dqo, dko)))
    qo, ko, q, k, pos, inv_freq = (t.cpu() for t in (qo, ko, q, k, pos, inv_freq))

    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k)]
    outs64 = reference.apply_mrope(*leaves64, pos, inv_freq, section)
    grads64 = torch.autograd.grad(outs64, leaves64, (dqo.double(), dko.double()))

    leaves_e = [t.detach().requires_grad_(True) for t in (q, k)]
    outs_e = reference.apply_mrope(*leaves_e, pos, inv_freq, section)
    grads_e = torch.autograd.grad(outs_e, leaves_e, (dqo, dko))

    for name, got, want, eager in [("q_out", qo, outs64[0], outs_e[0]), ("k_out", ko, outs64[1], outs_e[1])]:
        assert got.dtype == q.dtype
        assert_matches(got, want, eager, grad=False, what=name)
    for name, got, want, eager in [("dq", dq, grads64[0], grads_e[0]), ("dk", dk, grads64[1], grads_e[1])]:
        assert_matches(got, want, eager, grad=True, what=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,Hq,Hk,D,section,backend", with_backends(CASES, lambda T, *_: T <= 9))  # a program per token
def test_apply_mrope_matches_fp64_reference(T, Hq, Hk, D, section, dtype, device):
    q, k = torch.randn(T, Hq, D, dtype=dtype), torch.randn(T, Hk, D, dtype=dtype)
    _check_mrope(*on(device, q, k, _positions(T), _inv_freq(D)), section)


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_mrope_every_simd_flavour(isa, dtype):
    with use_isa(isa):
        for T, Hq, Hk, D, section in [(3, 4, 2, 128, [16, 24, 24]), (33, 2, 1, 80, [10, 17, 13])]:
            q, k = torch.randn(T, Hq, D, dtype=dtype), torch.randn(T, Hk, D, dtype=dtype)
            _check_mrope(q, k, _positions(T), _inv_freq(D), section)
            cos, sin = mrope_cos_sin(_positions(T), _inv_freq(D), section)
            assert cos.shape == (T, D // 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_op_equals_tables_plus_rotary(backend, device):
    T, D, section = shrink(backend, 65, 9), 128, [16, 24, 24]
    q, k, pos, inv = on(device, torch.randn(T, 8, D), torch.randn(T, 2, D), _positions(T), _inv_freq(D))
    cos, sin = mrope_cos_sin(pos, inv, section)
    qo, ko = apply_mrope(q, k, pos, inv, section)
    torch.testing.assert_close(qo, rotary(q, cos, sin), rtol=0, atol=_tables_atol(backend))
    torch.testing.assert_close(ko, rotary(k, cos, sin), rtol=0, atol=_tables_atol(backend))


def test_mrope_cos_sin_is_the_fp32_angle_to_within_one_ulp():
    T, D, section = 513, 128, [16, 24, 24]
    pos, inv = _positions(T, max_pos=128000), _inv_freq(D)
    cos, sin = mrope_cos_sin(pos, inv, section)
    ref_cos, ref_sin = reference.mrope_cos_sin(pos, inv, section)
    stream = reference.mrope_stream_of_frequency(D // 2, section)
    angle64 = (pos.float()[stream].T * inv).double()      # the fp32 angle, then exact cos/sin
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (T, D // 2)
    torch.testing.assert_close(cos.double(), angle64.cos(), rtol=0, atol=2 ** -24)
    torch.testing.assert_close(sin.double(), angle64.sin(), rtol=0, atol=2 ** -24)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=2 ** -23)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=2 ** -23)


def _tables_from_kernels(pos, inv, section):
    """(cos, sin) of mrope_cos_sin, and the same tables read back from apply_mrope's forward and
    inverse rotation of q = [1, 0] (out = [cos, sin], or [cos, -sin] inverted)."""
    T, half = pos.shape[1], inv.shape[0]
    cos, sin = mrope_cos_sin(pos, inv, section)
    q = torch.cat((torch.ones(T, 1, half), torch.zeros(T, 1, half)), -1)
    fwd, _ = torch.ops.mmfuse.apply_mrope(q, q, pos, inv, section, False)
    inv_rot, _ = torch.ops.mmfuse.apply_mrope(q, q, pos, inv, section, True)
    return [(cos, sin), (fwd[:, 0, :half], fwd[:, 0, half:]), (inv_rot[:, 0, :half], -inv_rot[:, 0, half:])]


@pytest.mark.parametrize("isa", supported_isas())
def test_cos_sin_sweep_is_within_half_ulp_of_exact_in_every_flavour(isa):
    """The vectorised sincos (common/sincos.h) over every (position, frequency) of positions
    0..70000 step 7 with Qwen's inv_freq: the exact cos/sin of the fp32 angle rounded to fp32,
    i.e. within 2^-25 (half an ulp of 1), in the tables and in the fused kernel, both directions."""
    D, section = 128, [16, 24, 24]
    pos, inv = torch.arange(0, 70000, 7).expand(3, -1).contiguous(), _inv_freq(D)
    angle64 = (pos[0].float()[:, None] * inv).double()
    with use_isa(isa):
        for cos, sin in _tables_from_kernels(pos, inv, section):
            assert (cos.double() - angle64.cos()).abs().max().item() <= 2 ** -25 + 2 ** -50
            assert (sin.double() - angle64.sin()).abs().max().item() <= 2 ** -25 + 2 ** -50


@pytest.mark.parametrize("isa", supported_isas())
def test_cos_sin_of_angles_beyond_2_21_fall_back_to_libm(isa):
    """Angles above 2^21 (outside the polynomial's reduction range), inf and NaN take the scalar
    libm path: fp32 libm accuracy (< 1 ulp) there, the polynomial's half ulp in the same rows."""
    T, D, section = 257, 128, [16, 24, 24]
    pos = torch.randint(0, 2 ** 23, (3, T))
    inv = _inv_freq(D)
    inv[[5, 40]] = float("inf")
    inv[[6, 41]] = float("nan")
    stream = reference.mrope_stream_of_frequency(D // 2, section)
    angle32 = pos.float()[stream].T * inv
    small, finite = angle32.abs() <= 2 ** 21, angle32.isfinite()
    big = finite & ~small
    assert big.any() and small.any() and not finite.all()
    with use_isa(isa):
        for cos, sin in _tables_from_kernels(pos, inv, section):
            for got, want in ((cos, angle32.double().cos()), (sin, angle32.double().sin())):
                err = (got.double() - want).abs()
                assert err[small].max().item() <= 2 ** -25 + 2 ** -50
                assert err[big].max().item() <= 2 ** -24
                assert got[~finite].isnan().all()


# Triton's interpreter computes with numpy, which warns on inf - inf (NaN, as intended).
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["triton"])
def test_triton_cos_sin_are_within_one_ulp_of_exact(device):
    """The Triton kernels' own cos/sin (no float64, no hardware approximation): within 2^-23 (one ulp
    of 1; measured 1.3 x 2^-24) of the exact cos/sin of the fp32 angle up to |angle| = 2^21, which
    covers positions below 2^21 times inv_freq <= 1, and 2^-22 up to 2^23 (measured 2.5 x 2^-24);
    NaN for infinite and NaN angles."""
    from mmfuse.kernels.triton.mrope import cos_sin

    D = 128
    sweep = (torch.arange(0, 70000, 7).float()[:, None] * _inv_freq(D)).flatten()   # Qwen's angles
    for angles, bound in ((sweep, 2 ** -23), (torch.rand(1 << 16, dtype=torch.float64).mul(2 ** 21).float(), 2 ** -23),
                          (torch.rand(1 << 14, dtype=torch.float64).mul(2 ** 23).float(), 2 ** -22),
                          (-torch.rand(1 << 12).mul(1000), 2 ** -23)):
        cos, sin = (t.cpu().double() for t in cos_sin(angles.to(device)))
        assert (cos - angles.double().cos()).abs().max().item() <= bound
        assert (sin - angles.double().sin()).abs().max().item() <= bound
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    assert all(t.isnan().all() for t in cos_sin(special.to(device)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_positions_3bs_are_flattened(backend, device):
    B, S, D, section = 2, shrink(backend, 11, 5), 64, [8, 12, 12]
    pos = on(device, torch.stack([_positions(S) for _ in range(B)], dim=1))  # [3, B, S] as HF's get_rope_index
    inv = on(device, _inv_freq(D))
    cos, sin = mrope_cos_sin(pos, inv, section)
    flat_cos, flat_sin = mrope_cos_sin(pos.reshape(3, -1), inv, section)
    assert cos.shape == (B, S, D // 2)
    assert torch.equal(cos.flatten(0, 1), flat_cos) and torch.equal(sin.flatten(0, 1), flat_sin)
    q, k = on(device, torch.randn(B, S, 4, D), torch.randn(B, S, 2, D))
    qo, ko = apply_mrope(q, k, pos, inv, section)
    qf, kf = apply_mrope(q.flatten(0, 1), k.flatten(0, 1), pos.reshape(3, -1), inv, section)
    assert qo.shape == q.shape and torch.equal(qo.flatten(0, 1), qf) and torch.equal(ko.flatten(0, 1), kf)
    torch.testing.assert_close(qo, rotary(q, cos, sin), rtol=0, atol=_tables_atol(backend))  # [B, S, R] tables


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_positions_and_non_contiguous_inputs(backend, device):
    T, D, section = shrink(backend, 23, 5), 128, [16, 24, 24]
    q = on(device, torch.randn(8, T, D)).transpose(0, 1)
    k = on(device, torch.randn(T, 2, 2 * D))[..., ::2]
    pos = on(device, torch.randint(0, 5000, (T, 3))).T                # strided [3, T]
    inv = on(device, _inv_freq(2 * D)[::2].clone())
    assert not (q.is_contiguous() or k.is_contiguous() or pos.is_contiguous())
    _check_mrope(q, k, pos, inv, section)
    a = apply_mrope(q, k, pos, inv, section)
    b = apply_mrope(q, k, pos.int(), inv, section)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_apply_mrope_gradcheck_fp64():
    T, D, section = 4, 12, [2, 2, 2]
    q = torch.randn(T, 2, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(T, 1, D, dtype=torch.float64, requires_grad=True)
    pos, inv = _positions(T, 50), _inv_freq(D)
    fn = lambda a, b: apply_mrope(a, b, pos, inv, section)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k))
    assert torch.autograd.gradgradcheck(fn, (q, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_one_output_only(device):
    q, k = (t.requires_grad_(True) for t in on(device, torch.randn(5, 2, 64), torch.randn(5, 1, 64)))
    pos, inv = on(device, _positions(5), _inv_freq(64))
    qo, _ = apply_mrope(q, k, pos, inv, [8, 12, 12])
    dq, dk = torch.autograd.grad(qo.sum(), (q, k), allow_unused=True)
    want = torch.ops.mmfuse.apply_mrope(torch.ones_like(q), torch.zeros_like(k), pos, inv, [8, 12, 12], True)[0]
    torch.testing.assert_close(dq, want)
    assert dk is None or torch.equal(dk, torch.zeros_like(k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_in_place_equals_out_of_place(dtype):
    T, Hq, Hk, D = 19, 3, 2, 80
    q, k = torch.randn(T, Hq, D, dtype=dtype), torch.randn(T, Hk, D, dtype=dtype)
    pos, inv = _positions(T), _inv_freq(D)
    for inverse in (False, True):
        want = torch.ops.mmfuse.apply_mrope(q, k, pos, inv, [10, 17, 13], inverse)
        qb, kb = q.clone(), k.clone()
        _C.mrope(qb.data_ptr(), qb.data_ptr(), Hq, kb.data_ptr(), kb.data_ptr(), Hk, pos.data_ptr(), inv.data_ptr(),
                 T, D, 10, 17, 13, dtype_code(q), inverse, 0)
        assert torch.equal(qb, want[0]) and torch.equal(kb, want[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_token_batch(device):
    q, k = on(device, torch.randn(0, 2, 64), torch.randn(0, 1, 64))
    qo, ko = apply_mrope(q.requires_grad_(True), k, *on(device, torch.zeros(3, 0, dtype=torch.long), _inv_freq(64)),
                         [8, 12, 12])
    assert qo.shape == (0, 2, 64) and ko.shape == (0, 1, 64)
    cos, _ = mrope_cos_sin(torch.zeros(3, 0, dtype=torch.long), _inv_freq(64), [8, 12, 12])
    assert cos.shape == (0, 32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype, backend, device):
    T, D, section = shrink(backend, 7, 3), 64, [8, 12, 12]
    q, k = (t.requires_grad_(True) for t in on(device, torch.randn(T, 4, D, dtype=dtype),
                                               torch.randn(T, 2, D, dtype=dtype)))
    pos, inv = on(device, _positions(T), _inv_freq(D))
    for inverse in (False, True):
        torch.library.opcheck(torch.ops.mmfuse.apply_mrope.default, (q, k, pos, inv, section, inverse))
    torch.library.opcheck(torch.ops.mmfuse.mrope_cos_sin.default, (pos, inv, section))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph_with_gradients(device):
    q, k = (t.requires_grad_(True) for t in on(device, torch.randn(9, 2, 64), torch.randn(9, 1, 64)))
    pos, inv = on(device, _positions(9), _inv_freq(64))

    def loss(a, b):
        qo, ko = apply_mrope(a, b, pos, inv, [8, 12, 12])
        return (qo.square().sum() + ko.pow(3).sum())

    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k), (q, k))
    want = torch.autograd.grad(loss(q, k), (q, k))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_backend_env_gives_same_result(backend_env, backend, device):
    q, k = (t.requires_grad_(True) for t in on(device, torch.randn(9, 4, 128), torch.randn(9, 2, 128)))
    pos, inv = on(device, _positions(9), _inv_freq(128))
    results = []
    for forced in (None if backend == "cpp" else "triton", "reference"):
        backend_env(forced)
        qo, ko = apply_mrope(q, k, pos, inv, [16, 24, 24])
        cos, sin = mrope_cos_sin(pos, inv, [16, 24, 24])
        results.append((qo, ko, cos, sin, *torch.autograd.grad((qo, ko), (q, k), (qo * 3, ko * 2))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=_tables_atol(backend))


def test_inv_freq_gradient_is_refused():
    q, k = torch.randn(3, 2, 64), torch.randn(3, 1, 64)
    inv = _inv_freq(64).requires_grad_(True)
    with pytest.raises(NotImplementedError, match="gradients with respect to inv_freq are not provided"):
        apply_mrope(q, k, _positions(3), inv, [8, 12, 12])


def test_bad_inputs_raise_clear_errors():
    q, k, pos, inv, sec = torch.randn(4, 2, 64), torch.randn(4, 1, 64), _positions(4), _inv_freq(64), [8, 12, 12]
    with pytest.raises(ValueError, match=r"q must have 3 or 4 dimensions, got shape \(4, 64\)"):
        apply_mrope(q[:, 0], k, pos, inv, sec)
    with pytest.raises(ValueError, match=r"mrope_section \[8, 12\] must have 3 non-negative entries"):
        apply_mrope(q, k, pos, inv, [8, 12])
    with pytest.raises(ValueError, match=r"mrope_section \[8, 12, 16\] .* summing to D/2 = 32"):
        apply_mrope(q, k, pos, inv, [8, 12, 16])
    with pytest.raises(ValueError, match=r"q and k must have the same tokens, got q \(4, 2, 64\) and k \(5, 1, 64\)"):
        apply_mrope(q, torch.randn(5, 1, 64), pos, inv, sec)
    with pytest.raises(ValueError, match="q and k must have the same head dim"):
        apply_mrope(q, torch.randn(4, 1, 128), pos, inv, sec)
    with pytest.raises(ValueError, match="head dim D must be even"):
        apply_mrope(torch.randn(4, 2, 63), torch.randn(4, 1, 63), pos, inv, sec)
    with pytest.raises(ValueError, match=r"inv_freq must have D/2 = 32 entries for head dim 64, got \(16,\)"):
        apply_mrope(q, k, pos, inv[:16], sec)
    with pytest.raises(ValueError, match=r"position_ids \(3, 5\) do not match the 4 tokens"):
        apply_mrope(q, k, _positions(5), inv, sec)
    with pytest.raises(ValueError, match=r"position_ids must be \[3, T\] or \[3, B, S\] .* got \(2, 4\)"):
        apply_mrope(q, k, pos[:2], inv, sec)
    with pytest.raises(ValueError, match=r"do not match q/k's \[B, S\] = \[2, 2\]"):
        apply_mrope(q.view(2, 2, 2, 64), k.view(2, 2, 1, 64), pos.view(3, 1, 4), inv, sec)
    with pytest.raises(TypeError, match="position_ids must be int64 or int32, got torch.float32"):
        apply_mrope(q, k, pos.float(), inv, sec)
    with pytest.raises(TypeError, match="q and k must have one dtype"):
        apply_mrope(q, k.double(), pos, inv, sec)
    with pytest.raises(TypeError, match="q has dtype int64"):
        apply_mrope(q.long(), k.long(), pos, inv, sec)
    with pytest.raises(ValueError, match="one device"):
        apply_mrope(q, k, pos, inv.to("meta"), sec)
    with pytest.raises(ValueError, match=r"position_ids must be \[3, T\] or \[3, B, S\]"):
        mrope_cos_sin(pos[None], inv, sec)
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_cos_sin(pos, inv, [1, 2, 3])


# ---- parity with Hugging Face transformers ------------------------------------------------------

def _hf_text_rope(head_dim, section, heads=2):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    config = Qwen2_5_VLTextConfig(
        hidden_size=head_dim * heads, num_attention_heads=heads, num_key_value_heads=1, num_hidden_layers=1,
        intermediate_size=32, vocab_size=64, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section})
    return Qwen2_5_VLRotaryEmbedding(config)


def _hf_multimodal_positions():
    """[3, 2, S] position ids from HF's get_rope_index on two sequences with images and a video."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                         intermediate_size=32, vocab_size=64, bos_token_id=None, eos_token_id=None),
        vision_config=dict(hidden_size=32, num_heads=2, depth=1, intermediate_size=32, out_hidden_size=64))
    model = Qwen2_5_VLModel(config)
    # Sequence 0: text, image (1, 4, 6) -> 6 tokens, text, video (2, 8, 4) -> 16 tokens, text.
    # Sequence 1: text, image (1, 12, 8) -> 24 tokens, text. Both 41 tokens long.
    types = torch.tensor([[0] * 5 + [1] * 6 + [0] * 3 + [2] * 16 + [0] * 11,
                          [0] * 9 + [1] * 24 + [0] * 8])
    input_ids = torch.randint(0, 64, types.shape)
    image_grid = torch.tensor([[1, 4, 6], [1, 12, 8]])
    video_grid = torch.tensor([[2, 8, 4]])
    pos, _ = model.get_rope_index(input_ids, types, image_grid_thw=image_grid, video_grid_thw=video_grid,
                                  second_per_grid_ts=torch.tensor([1.5]))
    assert pos.shape == (3, 2, 41) and not torch.equal(pos[0], pos[1])   # distinct t/h/w streams
    return pos


# offset 30000: a late chunk of a long packed sequence
@pytest.mark.parametrize("head_dim,section,offset,backend",
                         with_backends([(128, [16, 24, 24], 0), (128, [16, 24, 24], 30000), (64, [8, 12, 12], 0),
                                        (64, [8, 12, 12], 30000)], lambda D, sec, offset: D == 128 and offset))
def test_apply_mrope_matches_hf_qwen2_5_vl_text_rotary(head_dim, section, offset, device):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    emb = _hf_text_rope(head_dim, section)
    pos = _hf_multimodal_positions() + offset
    B, S = pos.shape[1:]
    q, k = torch.randn(B, S, 4, head_dim), torch.randn(B, S, 2, head_dim)
    cos_hf, sin_hf = emb(q, pos)                                          # [B, S, D], fp32
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos_hf, sin_hf)  # HF: [B, H, S, D]

    cos, sin = mrope_cos_sin(pos, emb.inv_freq, section)
    torch.testing.assert_close(torch.cat((cos, cos), -1), cos_hf, rtol=0, atol=2 ** -23)
    torch.testing.assert_close(torch.cat((sin, sin), -1), sin_hf, rtol=0, atol=2 ** -23)
    qo, ko = (t.cpu() for t in apply_mrope(*on(device, q, k, pos, emb.inv_freq), section))
    torch.testing.assert_close(qo, q_hf.transpose(1, 2), rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(ko, k_hf.transpose(1, 2), rtol=1e-6, atol=2e-6)
