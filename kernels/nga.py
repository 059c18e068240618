"""Neighborhood Gaussian Aggregation: ``out[s] = sum_k weights[s, k] * feats[s, k]``.

feats ``(S, K, B, N, D)``, weights ``(S, K)`` -> ``(S, B, N, D)`` in feats' dtype, float32 accumulation.

The op is pure bandwidth: each stage's ``K`` taps are flattened to rows of ``M = B * N * D`` elements and every
program streams one ``BLOCK`` of all ``K`` taps of one stage, so all stages run in one launch and each tap element is
read exactly once. The backward reads the incoming gradient and the taps once, writes the tap gradients, and reduces
the weight gradients into per-program float32 partials that are summed afterwards in a fixed order (no atomics, so
the result is bitwise reproducible).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, contiguous, elementwise_settings
from ..ops.first_order import first_order_only


@triton.jit
def _nga_fwd_kernel(
    feats_ptr,  # (S, K, M) contiguous, M = B * N * D
    w_ptr,  # (S, K) any float dtype
    out_ptr,  # (S, M) feats' dtype
    K,
    M,
    stride_fs,  # = K * M
    stride_fk,  # = M
    stride_ws,
    stride_wk,
    stride_os,  # = M
    BLOCK: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    offs = pid_m * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    f_base = feats_ptr + s * stride_fs
    for k32 in range(K):
        k = tl.cast(k32, tl.int64)  # k * stride_fk passes 2^31 for large taps
        w = tl.load(w_ptr + s * stride_ws + k * stride_wk).to(tl.float32)
        x = tl.load(f_base + k * stride_fk + offs, mask=mask, other=0.0).to(tl.float32)
        acc += w * x
    tl.store(out_ptr + s * stride_os + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nga_bwd_kernel(
    grad_ptr,  # (S, M) contiguous, feats' dtype
    feats_ptr,  # (S, K, M) contiguous
    w_ptr,  # (S, K)
    dfeats_ptr,  # (S, K, M) feats' dtype
    dw_part_ptr,  # (S, K, P) float32, P = number of programs along M
    K,
    M,
    P,
    stride_gs,  # = M
    stride_fs,  # = K * M
    stride_fk,  # = M
    stride_ws,
    stride_wk,
    BLOCK: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    offs = pid_m * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    grad = tl.load(grad_ptr + s * stride_gs + offs, mask=mask, other=0.0).to(tl.float32)
    f_base = feats_ptr + s * stride_fs
    df_base = dfeats_ptr + s * stride_fs
    for k32 in range(K):
        k = tl.cast(k32, tl.int64)
        w = tl.load(w_ptr + s * stride_ws + k * stride_wk).to(tl.float32)
        x = tl.load(f_base + k * stride_fk + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(df_base + k * stride_fk + offs, (w * grad).to(dfeats_ptr.dtype.element_ty), mask=mask)
        # masked lanes loaded 0 for both operands, so they add nothing to the partial
        tl.store(dw_part_ptr + (s * K + k) * P + pid_m, tl.sum(grad * x, axis=0))


def nga_forward(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """feats ``(S, K, B, N, D)``, weights ``(S, K)`` -> ``(S, B, N, D)``."""
    if feats.dim() != 5 or weights.shape != feats.shape[:2]:
        raise ValueError(f"nga: feats (S, K, B, N, D) and weights (S, K), got {tuple(feats.shape)}, {tuple(weights.shape)}")
    S, K, B, N, D = feats.shape
    out = torch.empty((S, B, N, D), dtype=feats.dtype, device=feats.device)
    M = B * N * D
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()
    feats = contiguous(feats)
    weights = contiguous(weights)
    block, warps = elementwise_settings(M)
    grid = (cdiv(M, block), S)
    _nga_fwd_kernel[grid](
        feats, weights, out, K, M, K * M, M, weights.stride(0), weights.stride(1), M,
        BLOCK=block, num_warps=warps,
    )
    return out


def nga_backward(grad: torch.Tensor, feats: torch.Tensor, weights: torch.Tensor):
    """grad ``(S, B, N, D)`` -> (d_feats ``(S, K, B, N, D)``, d_weights ``(S, K)`` in weights' dtype)."""
    S, K, B, N, D = feats.shape
    M = B * N * D
    d_feats = torch.empty(feats.shape, dtype=feats.dtype, device=feats.device)
    if d_feats.numel() == 0 or M == 0:
        return d_feats.zero_(), torch.zeros_like(weights)
    grad = contiguous(grad.to(feats.dtype))
    feats = contiguous(feats)
    weights = contiguous(weights)
    block, warps = elementwise_settings(M)
    P = cdiv(M, block)
    partial = torch.empty((S, K, P), dtype=torch.float32, device=feats.device)
    _nga_bwd_kernel[(P, S)](
        grad, feats, weights, d_feats, partial, K, M, P, M, K * M, M, weights.stride(0), weights.stride(1),
        BLOCK=block, num_warps=warps,
    )
    # fixed-order reduction of the per-program partials: deterministic, unlike atomics
    d_weights = partial.sum(dim=2).to(weights.dtype)
    return d_feats, d_weights


# ---- custom-op layer: opaque to torch.compile, differentiable through register_autograd ----

@torch.library.custom_op("cascade_clip_triton::nga", mutates_args=())
def nga_op(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return nga_forward(feats, weights)


@nga_op.register_fake
def _(feats, weights):
    S, K, B, N, D = feats.shape
    return feats.new_empty((S, B, N, D))


@torch.library.custom_op("cascade_clip_triton::nga_backward", mutates_args=())
def nga_backward_op(grad: torch.Tensor, feats: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return nga_backward(grad, feats, weights)


@nga_backward_op.register_fake
def _(grad, feats, weights):
    return feats.new_empty(feats.shape), weights.new_empty(weights.shape)


def _setup_context(ctx, inputs, output):
    feats, weights = inputs
    ctx.save_for_backward(feats, weights)


@first_order_only("nga", "triton")
def _backward(ctx, saved, grad):
    feats, weights = saved
    d_feats, d_weights = nga_backward_op(grad, feats, weights)
    return d_feats, d_weights


nga_op.register_autograd(_backward, setup_context=_setup_context)


class _NGAFunction(torch.autograd.Function):
    """The eager path: the same launchers as the custom op, without its dispatch (see :func:`nga`)."""

    @staticmethod
    def forward(ctx, feats, weights):
        ctx.save_for_backward(feats, weights)
        return nga_forward(feats, weights)

    @staticmethod
    @first_order_only("nga", "triton")
    def backward(ctx, saved, grad):
        feats, weights = saved
        return nga_backward(grad, feats, weights)


def nga(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Backend entry point: feats ``(S, K, B, N, D)``, weights ``(S, K)`` -> ``(S, B, N, D)``.

    Under ``torch.compile`` the custom op (opaque to dynamo, with its fake kernel); in eager mode an
    ``autograd.Function`` over the same launchers, which skips the custom-op dispatch (tens of microseconds of host
    time per forward + backward: these ops are small enough for that to show)."""
    if torch.compiler.is_compiling():
        return nga_op(feats, weights)
    return _NGAFunction.apply(feats, weights)
