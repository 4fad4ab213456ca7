"""The eager route (ops/_eager.py): in plain eager mode the ops call their implementation directly,
around the dispatcher. It must be invisible: outputs and every gradient bitwise those of the custom
op, and the custom op still runs wherever something other than plain eager autograd looks at the
call (dispatch modes, fake tensors, profiles keep the op's name)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmfuse import ops
from mmfuse.ops import _eager
from tests.ops.backends import BACKENDS, on


def _inputs(seed, device):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g).to(device)


def _rms_norm(r):
    x, w = r(5, 3, 16), r(16)
    return (x, w), lambda x, w: ops.rms_norm(x, w, 1e-6)


def _add_rms_norm(r):
    x, res, w = r(7, 16), r(7, 16), r(16)
    return (x, res, w), lambda x, res, w: ops.add_rms_norm(x, res, w, 1e-5)


def _rotary(r):
    x, cos, sin = r(6, 2, 8), r(6, 4), r(6, 4)
    return (x,), lambda x: ops.rotary(x, cos, sin)


def _apply_mrope(r):
    q, k = r(6, 4, 16), r(6, 2, 16)
    pos = on(q.device, torch.arange(18).reshape(3, 6) % 5)
    inv_freq = on(q.device, 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16))
    return (q, k), lambda q, k: ops.apply_mrope(q, k, pos, inv_freq, [2, 3, 3])


def _swiglu(r):
    return (r(4, 10), r(4, 10)), ops.swiglu


def _swiglu_packed(r):
    return (r(4, 20),), ops.swiglu_packed


def _attention(r):
    # Packed, causal GQA with the lse returned: the lse's gradient flows into the backward too.
    q, k, v = r(12, 4, 16), r(12, 2, 16), r(12, 2, 16)
    cu = on(q.device, torch.tensor([0, 5, 12], dtype=torch.int32))

    def fn(q, k, v):
        out, lse = ops.attention(q, k, v, cu, cu, 7, 7, causal=True, return_lse=True)
        return out, lse
    return (q, k, v), fn


CASES = {"rms_norm": _rms_norm, "add_rms_norm": _add_rms_norm, "rotary": _rotary, "apply_mrope": _apply_mrope,
         "swiglu": _swiglu, "swiglu_packed": _swiglu_packed, "attention": _attention}


def _run(case, route: bool, device="cpu"):
    previous = _eager.set_enabled(route)
    try:
        leaves, fn = CASES[case](_inputs(0, device))
        leaves = [t.clone().requires_grad_(True) for t in leaves]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grad_fns = {type(o.grad_fn).__name__ for o in outs}
        weights = [on(device, torch.randn(o.shape, generator=torch.Generator().manual_seed(i)))
                   for i, o in enumerate(outs)]
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        return [o.detach() for o in outs], [t.grad for t in leaves], grad_fns
    finally:
        _eager.set_enabled(previous)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_eager_route_is_bitwise_the_custom_op(case, device):
    outs, grads, grad_fns = _run(case, True, device)
    want_outs, want_grads, want_fns = _run(case, False, device)
    # Each route really ran: the graph nodes name it.
    assert all(n.startswith("Eager_mmfuse_") for n in grad_fns), grad_fns
    assert all(n.startswith("GeneratedBackwardFor_mmfuse_") for n in want_fns), want_fns
    for got, want in zip(outs + grads, want_outs + want_grads):
        assert torch.equal(got, want)


def test_without_grad_the_route_returns_plain_tensors_equal_to_the_op():
    x, w = torch.randn(4, 8), torch.randn(8, requires_grad=True)
    with torch.no_grad():
        y = ops.rms_norm(x, w)
    assert y.grad_fn is None and not y.requires_grad
    assert torch.equal(y, torch.ops.mmfuse.rms_norm(x, w.detach(), 1e-6))


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_custom_op():
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8)
    with _Seen() as seen:
        ops.rms_norm(x, w).sum().backward()
    assert "mmfuse.rms_norm.default" in seen.ops
    assert "mmfuse.rms_norm_backward.default" in seen.ops


def test_fake_tensors_take_the_custom_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.randn(9, 4, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16)
        out = ops.attention(q, k, v, causal=True)
    assert type(out).__name__ == "FakeTensor" and out.shape == (9, 4, 16)


def test_profiles_keep_the_op_names():
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8)
    with torch.profiler.profile() as prof:
        ops.swiglu(x, x * 2).sum().backward()
        ops.rms_norm(x, w)
    names = {e.key for e in prof.key_averages()}
    assert {"mmfuse::swiglu", "mmfuse::swiglu_backward", "mmfuse::rms_norm"} <= names


def test_environment_switch():
    for value, want in (("0", False), ("off", False), ("False", False), ("1", True), ("", True)):
        assert _eager.setting_from({"MMFUSE_EAGER_ROUTE": value}) is want
    assert _eager.setting_from({}) is True
