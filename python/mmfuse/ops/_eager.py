"""The ops' custom-op registration, and the eager route around the dispatcher.

Every op is a `torch.library.custom_op` (so `torch.ops.mmfuse.<name>`, torch.compile, fake tensors and
opcheck all work). Going through the dispatcher in eager mode costs Python on every call, though: the
op's autograd wrapper, a redispatch, and the backend wrapper around our implementation. On the 2-core
EPYC machine a chain of 50 `rms_norm`s [256, 64] with one backward costs 511 µs per op (forward +
backward) through the custom op, 308 µs through this route, and 319 µs through `F.rms_norm`
(`python -m bench.ops.bench_dispatch`). The tiny model's step makes ~30 such calls and takes 48.0 ms
through the custom ops, 41.2 ms through the route.

`FusedOp` keeps the undecorated implementation beside the custom op. Called in plain eager mode on
plain tensors, it runs that implementation directly: inside an `autograd.Function` built from the
op's own setup_context and backward when autograd must record it, bare otherwise. Same kernels, same
saved tensors, same backward, so the results are bitwise those of the custom op (tests/ops/
test_eager_route.py). Everywhere else the custom op runs: under torch.compile and other tracing,
with a TorchDispatchMode (fake tensors, functionalization) or a torch-function mode active, on
tensor subclasses, inside functorch transforms (vmap, grad), and when an op without an autograd
formula meets inputs that require grad (its error). `MMFUSE_EAGER_ROUTE=0` turns the route off.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch


def setting_from(environ) -> bool:
    """MMFUSE_EAGER_ROUTE: 0 / false / no / off turn the route off; anything else (or unset) leaves it on."""
    return environ.get("MMFUSE_EAGER_ROUTE", "1").strip().lower() not in ("0", "false", "no", "off")


_enabled = setting_from(os.environ)


def set_enabled(on: bool) -> bool:
    """Turns the eager route on or off; returns the previous setting (tests and benchmarks compare)."""
    global _enabled
    previous, _enabled = _enabled, bool(on)
    return previous


def enabled() -> bool:
    return _enabled


def _plain_eager(args: tuple) -> bool:
    """Whether nothing but plain eager autograd would see this call (see the module docstring)."""
    # is_compiling first: Dynamo folds it to True and must not trace the C queries behind it.
    return not (torch.compiler.is_compiling()
                or torch._C._has_torch_function(args)              # subclasses, torch-function modes
                or torch._C._len_torch_dispatch_stack()            # fake tensors, functionalization, ...
                or torch._C._functorch.peek_interpreter_stack() is not None)


class FusedOp:
    """A custom op `mmfuse::<name>` with the eager route to its implementation. Use as the decorator
    `@FusedOp.define("mmfuse::name")`, then `.register_fake` and `.register_autograd` as on the custom op."""

    def __init__(self, qualname: str, impl: Callable):
        self.qualname = qualname
        self.impl = impl
        self.custom_op = torch.library.custom_op(qualname, mutates_args=())(impl)
        namespace, name = qualname.split("::")
        self._overload = getattr(getattr(torch.ops, namespace), name).default
        self._function: type[torch.autograd.Function] | None = None

    @classmethod
    def define(cls, qualname: str) -> Callable[[Callable], "FusedOp"]:
        return lambda impl: cls(qualname, impl)

    def register_fake(self, fn: Callable) -> Callable:
        return self.custom_op.register_fake(fn)

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        self.custom_op.register_autograd(backward, setup_context=setup_context)
        self._function = _function(self.qualname, self.impl, setup_context, backward)

    def __call__(self, *args: Any) -> Any:
        if _enabled and _plain_eager(args):
            if not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
                return self._run(self.impl, args)
            if self._function is not None:
                return self._run(self._function.apply, args)
        return self._overload(*args)

    def _run(self, fn: Callable, args: tuple) -> Any:
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.profiler.record_function(self.qualname):   # profiles keep the op's name
                return fn(*args)
        return fn(*args)


def _function(qualname: str, impl: Callable, setup_context: Callable, backward: Callable):
    """An autograd.Function doing what the custom op's autograd wrapper does, without the dispatcher."""

    def forward(ctx, *args):
        output = impl(*args)
        setup_context(ctx=ctx, inputs=args, output=output)
        return output

    name = "Eager_" + qualname.replace("::", "_")
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                     "backward": staticmethod(backward)})
