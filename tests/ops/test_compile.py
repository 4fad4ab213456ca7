"""The ops are real custom ops: a small transformer-style block built from them compiles with
torch.compile(fullgraph=True) (no graph breaks) and matches eager in forward and backward."""

import torch

from mmfuse import ops


class TinyBlock(torch.nn.Module):
    """Norm -> q/k projection with M-RoPE -> rotary on a third head set -> add+norm -> SwiGLU MLP."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1 = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.norm2 = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.qk = torch.nn.Linear(dim, 2 * dim)
        self.gate_up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)
        half = self.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half)))
        self.section = [2, 3, 3]

    def forward(self, x, residual, position_ids):
        T = x.shape[0]
        h = ops.rms_norm(x, self.norm1)
        q, k = self.qk(h).view(T, 2 * self.heads, self.head_dim).chunk(2, dim=1)
        q, k = ops.apply_mrope(q, k, position_ids, self.inv_freq, self.section)
        cos, sin = ops.mrope_cos_sin(position_ids, self.inv_freq, self.section)
        k = ops.rotary(k, cos, sin)
        h = (q * k).flatten(1)
        normed, summed = ops.add_rms_norm(h, residual, self.norm2)
        gate, up = self.gate_up(normed).chunk(2, dim=-1)
        mlp = self.down(torch.cat((ops.swiglu(gate, up), ops.swiglu_packed(self.gate_up(normed))), dim=-1))
        return mlp + summed


def test_block_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    block = TinyBlock()
    x = torch.randn(10, 64, requires_grad=True)
    r = torch.randn(10, 64, requires_grad=True)
    pos = torch.stack((torch.arange(10), torch.arange(10) // 3, torch.arange(10) % 3))
    eager_out = block(x, r, pos)
    eager_grads = torch.autograd.grad(eager_out.sum(), (x, r, *block.parameters()))

    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    out = compiled(x, r, pos)
    grads = torch.autograd.grad(out.sum(), (x, r, *block.parameters()))
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_attention_and_loss_compile_fullgraph_and_match_eager():
    torch._dynamo.reset()
    T, H, D, V = 12, 2, 16, 30
    q = torch.randn(T, 2 * H, D, requires_grad=True)
    k = torch.randn(T, H, D, requires_grad=True)
    v = torch.randn(T, H, D, requires_grad=True)
    w = torch.randn(V, 2 * H * D, requires_grad=True)
    cu = torch.tensor([0, 5, T], dtype=torch.int32)
    labels = torch.randint(0, V, (T,))
    labels[3] = -100

    def step(q, k, v, w):
        out = ops.attention(q, k, v, cu, cu, causal=True)
        h = out.flatten(1)
        return ops.linear_cross_entropy(h, w, labels) + ops.cross_entropy(h @ w.T, labels)

    eager = step(q, k, v, w)
    eager_grads = torch.autograd.grad(eager, (q, k, v, w))
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    got = compiled(q, k, v, w)
    grads = torch.autograd.grad(got, (q, k, v, w))
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
