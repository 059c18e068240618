"""First-order-only backward formulas of the fused backends.

The Triton and C++ backward kernels compute first derivatives only. Without a guard, a backward run with
``create_graph=True`` (a gradient penalty, a Hessian-vector product) would silently return wrong second derivatives:
the C++ backward ops carry no autograd formula (PyTorch only warns and treats them as constants, so the second
derivative is zero), and the host-side sums around the Triton kernels are differentiable, so part of it would appear.
:func:`first_order_only` makes every such second derivative an error that names the op and the backend to use
instead; a plain backward (no ``create_graph``) is unaffected, as is tracing under ``torch.compile`` (AOTAutograd
traces the backward with grad mode off).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


class _SecondOrderUnsupported(torch.autograd.Function):
    """Passes the gradients through unchanged; differentiating them raises (like ``once_differentiable``, but the
    node also hangs off the op's saved inputs, so a second derivative towards any of them raises as well)."""

    @staticmethod
    def forward(ctx, message: str, count: int, *tensors: torch.Tensor):
        ctx.message = message
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def first_order_only(op: str, backend: str) -> Callable:
    """Decorate a backward formula ``fn(ctx, saved, *grads) -> grads of the inputs`` of ``op`` in ``backend`` (``saved``:
    ``ctx.saved_tensors``) into the ``fn(ctx, *grads)`` autograd calls: it runs with grad mode off, and under
    ``create_graph=True`` its results raise when differentiated. The saved tensors are unpacked once, here:
    non-reentrant activation checkpointing refuses a second unpack."""
    message = (
        f"cascade_clip.ops.{op}: the {backend!r} backend computes first derivatives only; a second derivative "
        f"(backward with create_graph=True, then differentiating the gradients) needs backend='reference'"
    )

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            saved = ctx.saved_tensors
            if not torch.is_grad_enabled():  # a plain backward: autograd runs formulas with grad mode off
                return backward(ctx, saved, *grads)
            with torch.no_grad():
                results = backward(ctx, saved, *grads)
            sources = [t for t in (*grads, *saved) if isinstance(t, torch.Tensor) and t.requires_grad]
            present = [r for r in results if isinstance(r, torch.Tensor)]
            if not sources or not present:
                return results
            guarded = iter(_SecondOrderUnsupported.apply(message, len(present), *present, *sources))
            return tuple(next(guarded) if isinstance(r, torch.Tensor) else r for r in results)

        return wrapper

    return decorate
