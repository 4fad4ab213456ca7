"""The ops are real custom ops: a small transformer-style block built from them compiles with
torch.compile(fullgraph=True) (no graph breaks) and matches eager in forward and backward."""

import torch

from mmfuse import ops


class TinyBlock(torch.nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        self.norm1 = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.norm2 = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, residual):
        h = ops.rms_norm(x, self.norm1)
        h = self.proj(h)
        normed, summed = ops.add_rms_norm(h, residual, self.norm2)
        return normed * 2 + summed


def test_block_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    block = TinyBlock()
    x = torch.randn(10, 64, requires_grad=True)
    r = torch.randn(10, 64, requires_grad=True)
    eager_out = block(x, r)
    eager_grads = torch.autograd.grad(eager_out.sum(), (x, r, *block.parameters()))

    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    out = compiled(x, r)
    grads = torch.autograd.grad(out.sum(), (x, r, *block.parameters()))
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
