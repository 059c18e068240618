"""Per-mask sums of the official training loss: focal term, sigmoid mass, overlap, target count.

logits ``(B, C, H, W)``, labels ``(B, H, W)`` integers (255 = ignore) -> ``(B, C, 4)`` float32 holding, for every
image ``b`` and class channel ``c``, summed over pixels:

    [ sum focal(x, t),  sum p,  sum p * t,  sum t ]      p = sigmoid(x),  t = (label == c)

with ``focal = BCEWithLogits(x, t) * (1 - p_t)^2 * alpha_t`` (``p_t = p t + (1 - p)(1 - t)``,
``alpha_t = 0.25 t + 0.75 (1 - t)``). With ``ignore_pixels`` the first three sums skip pixels labelled 255 (the
documented deviation); otherwise those pixels are negatives of every class (official). The loss itself
(:mod:`cascade_clip.loss`) is a few operations on these ``(B, C)`` sums.

Why a kernel: the eager loss materialises about ten float32 ``(B, C, H, W)`` tensors at the label resolution
(one-hot targets, probabilities, BCE, p_t, alpha_t, ...) and as many again in its backward: 1.3 GB each for COCO-Stuff's
156 classes at B=8 and 512x512. Here each program owns one block of pixels of one image, reads its labels once, and
walks the classes, so the forward reads the logits once and writes four float32 partials per (image, class, block);
the backward reads the logits once more and writes their gradient. Partials are summed afterwards in a fixed order
(deterministic, no atomics).

Backward: with ``G = d out`` of shape ``(B, C, 4)`` (the target count has no gradient),

    d x = G[b, c, 0] * d focal / d x  +  (G[b, c, 1] + G[b, c, 2] * t) * p (1 - p)

    d focal / d x = 0.25 (1 - p)^2 (2 p log p - (1 - p))           where t = 1
                  = 0.75 p^2 (p - 2 (1 - p) log(1 - p))            where t = 0

multiplied by zero at ignored pixels when ``ignore_pixels``.

Special values land where the reference puts them: the BCE has the reference's terms,
``(1 - t) x - log sigmoid(x)`` (in a more accurate order); dropped pixels are multiplied by 0 (not selected away), so
a NaN or inf logit there still makes its sums NaN; and a non-finite logit has a NaN gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..catalog import IGNORE_INDEX as _IGNORE_LABEL
from .launch import cdiv, contiguous, elementwise_settings
from ..ops.first_order import first_order_only

IGNORE_INDEX = tl.constexpr(_IGNORE_LABEL)  # a constexpr: the compiler (unlike the interpreter) rejects plain globals
# Pixels per program (8 per thread at 8 warps): the labels are read once per block and reused for every class, and each
# class costs four block reductions, so larger blocks amortise them; 2048 keeps ~64 registers per thread live and still
# gives 128 programs per 512x512 image. The partial sums are 4 per (class, block): 1/512 of the logits.
_MAX_BLOCK = 2048


@triton.jit
def _log1p(u):
    """``log(1 + u)`` for ``0 <= u <= 1`` without losing the small values: Goldberg's ``log1p``
    (``libdevice.log1p`` does not run under the CPU interpreter), ``log(w) * u / (w - 1)`` with ``w = 1 + u``, exact to
    a few ulps."""
    w = 1.0 + u
    rounded_away = w == 1.0  # u below half an ulp of 1: log1p(u) = u to float32 precision
    return tl.where(rounded_away, u, tl.log(w) * (u / tl.where(rounded_away, 1.0, w - 1.0)))


@triton.jit
def _sigmoid_pair(x, u):
    """``p = sigmoid(x)`` and ``q = 1 - p = sigmoid(-x)`` from ``u = exp(-|x|)``, the exponential the BCE's tail
    needs anyway: ``1 / (1 + u)`` and ``u / (1 + u)``, each to float32's relative precision. ``1 - p`` would lose
    q's (a confident target's focal weight ``q^2`` and gradient are all round-off from |x| ~ 3, 0 from |x| ~ 17)."""
    r = 1.0 / (1.0 + u)
    ur = u * r
    nonneg = x >= 0  # False for NaN, whose u and r are NaN either way
    return tl.where(nonneg, r, ur), tl.where(nonneg, ur, r)


@triton.jit
def _pixel_block(labels_row_ptr, pid, HW, IGNORE_PIXELS: tl.constexpr, BLOCK: tl.constexpr):
    """Pixel block ``pid`` of one image: offsets, in-image mask, labels (int32; 255 past the end, a target of no
    class) and the mask of pixels that count in the sums (all in the image, or the non-255 ones)."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    in_image = offs < HW
    # compared as int64 before narrowing (once per block, for all classes): a value outside [0, 255] (int64 past
    # int32, a negative) matches no class and is not ignored, as in the reference; -2 keeps it so instead of truncating
    raw = tl.load(labels_row_ptr + offs, mask=in_image, other=IGNORE_INDEX)
    labels = tl.where((raw >= 0) & (raw <= IGNORE_INDEX), raw, -2).to(tl.int32)
    counted = in_image
    if IGNORE_PIXELS:
        counted = counted & (labels != IGNORE_INDEX)
    return offs, in_image, labels, counted


@triton.jit
def _loss_sums_fwd_kernel(
    logits_ptr,  # (B, C, HW), contiguous per channel
    labels_ptr,  # (B, HW) int64
    part_ptr,  # (B, C, 4, P) float32
    C,
    HW,
    P,
    stride_xb, stride_xc,  # logits
    stride_yb,  # labels
    IGNORE_PIXELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs, in_image, labels, counted = _pixel_block(labels_ptr + b * stride_yb, pid, HW, IGNORE_PIXELS, BLOCK)
    keep = counted.to(tl.float32)
    x_base = logits_ptr + b * stride_xb
    part_base = part_ptr + b * C * 4 * P + pid
    for c32 in range(C):
        c = tl.cast(c32, tl.int64)
        x = tl.load(x_base + c * stride_xc + offs, mask=in_image, other=0.0).to(tl.float32)
        is_target = labels == c32  # padded lanes hold 255: never a target
        t = is_target.to(tl.float32)
        u = tl.exp(-tl.abs(x))
        p, q = _sigmoid_pair(x, u)
        # BCE with logits from the reference's terms, (1 - t) x - log sigmoid(x) with log sigmoid(x) = min(x, 0) -
        # log(1 + exp(-|x|)), in another order: (1 - t) x - min(x, 0) is exact for finite x, so the tail added last
        # keeps a confident pixel's small BCE (the reference rounds it to 0 for |x| >= 17), and +-inf gives the
        # reference's inf and NaN
        bce = ((1.0 - t) * x - tl.minimum(x, 0.0)) + _log1p(u)
        one_minus_pt = tl.where(is_target, q, p)
        alpha = tl.where(is_target, 0.25, 0.75)
        # dropped pixels are multiplied by 0, as in the reference (a NaN or inf logit there still gives NaN); padded
        # lanes hold x = 0, so they add exact zeros
        focal = bce * one_minus_pt * one_minus_pt * alpha * keep
        p = p * keep
        base = part_base + c * 4 * P
        tl.store(base, tl.sum(focal, axis=0))
        tl.store(base + P, tl.sum(p, axis=0))
        tl.store(base + 2 * P, tl.sum(p * t, axis=0))
        tl.store(base + 3 * P, tl.sum(t, axis=0))


@triton.jit
def _loss_sums_bwd_kernel(
    logits_ptr,  # (B, C, HW)
    labels_ptr,  # (B, HW) int64
    grad_ptr,  # (B, C, 4) float32, contiguous
    dx_ptr,  # (B, C, HW) logits' dtype, contiguous
    C,
    HW,
    stride_xb, stride_xc,
    stride_yb,
    IGNORE_PIXELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs, in_image, labels, counted = _pixel_block(labels_ptr + b * stride_yb, pid, HW, IGNORE_PIXELS, BLOCK)
    keep = counted.to(tl.float32)
    x_base = logits_ptr + b * stride_xb
    dx_base = dx_ptr + b * C * HW
    for c32 in range(C):
        c = tl.cast(c32, tl.int64)
        g_focal = tl.load(grad_ptr + (b * C + c) * 4)
        g_prob = tl.load(grad_ptr + (b * C + c) * 4 + 1)
        g_overlap = tl.load(grad_ptr + (b * C + c) * 4 + 2)
        x = tl.load(x_base + c * stride_xc + offs, mask=in_image, other=0.0).to(tl.float32)
        is_target = labels == c32
        u = tl.exp(-tl.abs(x))
        p, q = _sigmoid_pair(x, u)
        softplus_tail = _log1p(u)
        log_p = tl.minimum(x, 0.0) - softplus_tail  # log sigmoid(x)
        log_q = tl.minimum(-x, 0.0) - softplus_tail  # log sigmoid(-x) = log(1 - p)
        d_focal = tl.where(is_target, 0.25 * q * q * (2.0 * p * log_p - q), 0.75 * p * p * (p - 2.0 * q * log_q))
        d_prob = g_prob + tl.where(is_target, g_overlap, 0.0)
        # x - x is 0 for finite x and NaN for +-inf and NaN, where the reference's gradient is NaN; dropped pixels are
        # multiplied by 0 as in the reference
        dx = (g_focal * d_focal + d_prob * (p * q) + (x - x)) * keep
        tl.store(dx_base + c * HW + offs, dx.to(dx_ptr.dtype.element_ty), mask=in_image)


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 4 or labels.dim() != 3 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"loss_sums: logits (B, C, H, W) and labels (B, H, W) expected, got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )


def _flat(logits: torch.Tensor, labels: torch.Tensor):
    """(B, C, HW) logits and (B, HW) int64 labels, each pixel row contiguous (a copy only when a view cannot do it)."""
    B, C, H, W = logits.shape
    x = logits.reshape(B, C, H * W)
    if x.stride(2) != 1:
        x = x.contiguous()
    if labels.dtype != torch.int64:
        # The kernels take the data pipeline's int64 labels only, so one compiled variant serves every label dtype;
        # others are widened (a copy of 1/C of the logits' size). int8 -1 is the ignore label: the reference compares
        # labels with the Python scalar 255, which wraps to -1 in int8 (loss.check_labels likewise); other negatives
        # stay negative (no class).
        widened = labels.to(torch.int64)
        labels = widened.masked_fill_(labels == -1, _IGNORE_LABEL) if labels.dtype == torch.int8 else widened
    y = labels.reshape(B, H * W)
    if y.stride(1) != 1:
        y = y.contiguous()
    return x, y


def loss_sums_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_pixels: bool) -> torch.Tensor:
    """logits ``(B, C, H, W)``, labels ``(B, H, W)`` -> ``(B, C, 4)`` float32 sums (see the module docstring)."""
    _check(logits, labels)
    B, C, H, W = logits.shape
    HW = H * W
    if B * C == 0 or HW == 0:
        return torch.zeros((B, C, 4), dtype=torch.float32, device=logits.device)
    x, y = _flat(logits, labels)
    block, warps = elementwise_settings(min(HW, _MAX_BLOCK))
    P = cdiv(HW, block)
    partial = torch.empty((B, C, 4, P), dtype=torch.float32, device=logits.device)
    _loss_sums_fwd_kernel[(P, B)](
        x, y, partial, C, HW, P, x.stride(0), x.stride(1), y.stride(0),
        IGNORE_PIXELS=bool(ignore_pixels), BLOCK=block, num_warps=warps,
    )
    return partial.sum(dim=3)  # fixed-order reduction of the per-block partials


def loss_sums_backward(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, ignore_pixels: bool):
    """grad ``(B, C, 4)`` -> d logits ``(B, C, H, W)`` in logits' dtype."""
    B, C, H, W = logits.shape
    HW = H * W
    d_logits = torch.empty((B, C, H, W), dtype=logits.dtype, device=logits.device)
    if d_logits.numel() == 0:
        return d_logits
    x, y = _flat(logits, labels)
    grad = contiguous(grad.to(torch.float32))  # an expanded (stride-0) gradient becomes dense
    block, warps = elementwise_settings(min(HW, _MAX_BLOCK))
    _loss_sums_bwd_kernel[(cdiv(HW, block), B)](
        x, y, grad, d_logits, C, HW, x.stride(0), x.stride(1), y.stride(0),
        IGNORE_PIXELS=bool(ignore_pixels), BLOCK=block, num_warps=warps,
    )
    return d_logits


# ---- custom-op layer ----

@torch.library.custom_op("cascade_clip_triton::loss_sums", mutates_args=())
def loss_sums_op(logits: torch.Tensor, labels: torch.Tensor, ignore_pixels: bool) -> torch.Tensor:
    return loss_sums_forward(logits, labels, ignore_pixels)


@loss_sums_op.register_fake
def _(logits, labels, ignore_pixels):
    return logits.new_empty((logits.shape[0], logits.shape[1], 4), dtype=torch.float32)


@torch.library.custom_op("cascade_clip_triton::loss_sums_backward", mutates_args=())
def loss_sums_backward_op(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                          ignore_pixels: bool) -> torch.Tensor:
    return loss_sums_backward(grad, logits, labels, ignore_pixels)


@loss_sums_backward_op.register_fake
def _(grad, logits, labels, ignore_pixels):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_pixels = inputs
    ctx.save_for_backward(logits, labels)
    ctx.ignore_pixels = ignore_pixels


@first_order_only("loss_sums", "triton")
def _backward(ctx, saved, grad):
    logits, labels = saved
    return loss_sums_backward_op(grad, logits, labels, ctx.ignore_pixels), None, None


loss_sums_op.register_autograd(_backward, setup_context=_setup_context)


class _LossSumsFunction(torch.autograd.Function):
    """The eager path: the same launchers as the custom op, without its dispatch (see :func:`loss_sums`)."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_pixels):
        ctx.save_for_backward(logits, labels)
        ctx.ignore_pixels = ignore_pixels
        return loss_sums_forward(logits, labels, ignore_pixels)

    @staticmethod
    @first_order_only("loss_sums", "triton")
    def backward(ctx, saved, grad):
        logits, labels = saved
        return loss_sums_backward(grad, logits, labels, ctx.ignore_pixels), None, None


def loss_sums(logits: torch.Tensor, labels: torch.Tensor, ignore_pixels: bool) -> torch.Tensor:
    """Backend entry point: logits ``(B, C, H, W)``, labels ``(B, H, W)`` -> ``(B, C, 4)`` float32.

    The custom op under ``torch.compile``, an ``autograd.Function`` over the same launchers in eager mode."""
    if torch.compiler.is_compiling():
        return loss_sums_op(logits, labels, ignore_pixels)
    return _LossSumsFunction.apply(logits, labels, ignore_pixels)
