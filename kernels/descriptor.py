"""Relationship descriptor: ``out[s, b] = concat(text * g[b], text) @ weight[s].T + bias[s]``.

text ``(C, d)``, g ``(B, d)``, weight ``(S, e, 2d)``, bias ``(S, e)`` -> ``(S, B, C, e)`` in g's dtype.

Split the projection at the concatenation: ``weight[s] = [W1 | W2]`` with ``W1, W2`` of shape ``(e, d)``, so

    out[s, b] = (text * g[b]) @ W1.T  +  (text @ W2.T + bias[s])

The second term does not depend on the image ``b``. Each program owns one ``(C, e)`` tile of one stage and one group
of images: it computes the text term once, then for every image of its group adds the ``text * g[b]`` term (the
product is formed in registers, one ``(BLOCK_C, BLOCK_K)`` slice at a time) and stores. The ``(B, C, 2d)``
concatenation is never built, the text half costs ``C*e*d`` per image group instead of ``C*e*d`` per image, and all
stages run in one launch.

Backward, with ``G = d out`` of shape ``(S, B, C, e)`` and ``Gsum[s] = sum_b G[s, b]`` (``(S, C, e)``, float32):

* ``H[s, b] = G[s, b] @ W1[s]`` (``(C, d)``) is the gradient of ``text * g[b]``; ``d text = sum_{s,b} g[b] * H[s, b] +
  sum_s Gsum[s] @ W2[s]`` and ``d g[b] = sum_{s,c} text * H[s, b]``: one kernel, per-stage float32 partials.
* ``d W1[s] = sum_b G[s, b].T @ (text * g[b])`` (one product over the joint ``(b, c)`` axis, again without the
  concatenation) and ``d W2[s] = Gsum[s].T @ text``: one kernel over ``(e, 2d)`` tiles.
* ``d bias[s] = sum_c Gsum[s]``.
All reductions are fixed-order sums of float32 partials (deterministic, no atomics). The last ones (the partials of
d text and d g over stages and program blocks, d bias over classes) and the casts to the inputs' dtypes run as one
small kernel: as separate PyTorch sums and casts they were six more launches in a backward that takes tens of
microseconds on the GPU (H200, B=8, C=15: about 0.031 ms, forward+backward less forward; two kernels and seven
small ops), where each launch costs a few.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import autotune, block_size, cdiv, contiguous, dot_precision, next_power_of_2, num_warps
from ..ops.first_order import first_order_only

# Tile caps of the launch heuristic (the interpreter's tiles, and the first candidates on a GPU): (C, e) tiles of
# 64x64 with K-slices of 64 keep the fp32 accumulator at 16 registers/thread at 8 warps.
_CAP_C, _CAP_E, _CAP_K = 64, 64, 64
# Elements per program of the finishing reductions (each program sums its block over a few dozen partials at most).
_FINISH_BLOCK = 1024


def _config(warps: int, stages: int = 3, **blocks) -> "triton.Config":
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


# IMAGE_GROUPS of a forward config: 0 lets the launcher's heuristic split the images (_image_groups); a positive
# value asks for that many groups of programs (at most B), so ONE_IMAGE_PER_PROGRAM gives each program one image.
ONE_IMAGE_PER_PROGRAM = 1 << 16


def _fwd_configs():
    """Forward candidates on a GPU (the interpreter gets only the first). The first three are the launch heuristic's
    tiles (16, 32, 64 class rows at 1, 2, 4 warps), so the untuned kernel is always a candidate; then wider e-tiles,
    longer K-slices and 128-row class tiles for Context/COCO-Stuff's 59-171 classes. The last five change only how
    the images are split over programs, the trade the heuristic makes blind: more groups run more programs at once
    but recompute the image-independent text term once per group (C=20 and C=171 missed the target with the
    heuristic's split on the H200)."""
    return [
        _fwd_config(4, BLOCK_C=64, BLOCK_E=64, BLOCK_K=64),
        _fwd_config(1, BLOCK_C=16, BLOCK_E=64, BLOCK_K=64),
        _fwd_config(2, BLOCK_C=32, BLOCK_E=64, BLOCK_K=64),
        _fwd_config(4, BLOCK_C=16, BLOCK_E=128, BLOCK_K=64),
        _fwd_config(4, BLOCK_C=32, BLOCK_E=128, BLOCK_K=64),
        _fwd_config(4, BLOCK_C=32, BLOCK_E=64, BLOCK_K=128),
        _fwd_config(4, BLOCK_C=64, BLOCK_E=128, BLOCK_K=64),
        _fwd_config(8, BLOCK_C=64, BLOCK_E=128, BLOCK_K=64),
        _fwd_config(4, BLOCK_C=64, BLOCK_E=64, BLOCK_K=128),
        _fwd_config(8, BLOCK_C=128, BLOCK_E=64, BLOCK_K=64),
        _fwd_config(8, BLOCK_C=128, BLOCK_E=128, BLOCK_K=64),
        _fwd_config(1, groups=2, BLOCK_C=16, BLOCK_E=64, BLOCK_K=64),
        _fwd_config(2, groups=2, BLOCK_C=32, BLOCK_E=64, BLOCK_K=64),
        _fwd_config(4, groups=1, BLOCK_C=64, BLOCK_E=64, BLOCK_K=64),
        _fwd_config(4, groups=ONE_IMAGE_PER_PROGRAM, BLOCK_C=64, BLOCK_E=64, BLOCK_K=64),
        _fwd_config(8, groups=ONE_IMAGE_PER_PROGRAM, BLOCK_C=128, BLOCK_E=64, BLOCK_K=64),
    ]


def _fwd_config(warps: int, groups: int = 0, **blocks) -> "triton.Config":
    return _config(warps, IMAGE_GROUPS=groups, **blocks)


def _bwd_x_configs():
    """d text / d g candidates. BLOCK_C is not tuned here: the per-class-block partials of d g are sized by it before
    the launch, so it stays the launcher's heuristic value (a plain argument below)."""
    return [
        _config(4, BLOCK_E=64, BLOCK_K=64),
        _config(1, BLOCK_E=64, BLOCK_K=64),
        _config(2, BLOCK_E=64, BLOCK_K=64),
        _config(4, BLOCK_E=128, BLOCK_K=64),
        _config(4, BLOCK_E=64, BLOCK_K=128),
        # two stages: three of these tiles in float32 need 192 KiB of shared memory on sm80 (A100 has 163)
        _config(8, stages=2, BLOCK_E=128, BLOCK_K=128),
    ]


def _bwd_w_configs():
    """d weight candidates: (e, d) output tiles, reduced over classes (and images, for the W1 half) in BLOCK_C steps;
    the heuristic's tiles (class rows 16/32/64, 64x64 outputs, 4 warps) first."""
    return [
        _config(4, BLOCK_C=64, BLOCK_E=64, BLOCK_K=64),
        _config(4, BLOCK_C=16, BLOCK_E=64, BLOCK_K=64),
        _config(4, BLOCK_C=32, BLOCK_E=64, BLOCK_K=64),
        _config(8, BLOCK_C=32, BLOCK_E=128, BLOCK_K=64),
        _config(4, BLOCK_C=64, BLOCK_E=128, BLOCK_K=64),
        _config(8, BLOCK_C=64, BLOCK_E=128, BLOCK_K=128),
        _config(8, BLOCK_C=128, BLOCK_E=64, BLOCK_K=64),
    ]


def _prune_class_blocks(configs, named_args, **kwargs):
    """Keep class tiles between a quarter of and the padded class count (C is 15-20 for VOC, 59-171 otherwise):
    larger ones only waste MMA rows, much smaller ones multiply the programs that recompute the text half."""
    top = max(16, next_power_of_2(named_args["C"]))
    keep = [cfg for cfg in configs if "BLOCK_C" not in cfg.kwargs or top // 4 <= cfg.kwargs["BLOCK_C"] <= top]
    return keep or configs[:1]


@autotune(_fwd_configs(), key=["B", "C", "E", "D", "PRECISION"], prune=_prune_class_blocks)
@triton.jit(do_not_specialize=["IMAGE_GROUPS"])  # one binary for every split: candidates differing only there share it
def _descriptor_fwd_kernel(
    text_ptr,  # (C, d)
    g_ptr,  # (B, d)
    w_ptr,  # (S, e, 2d)
    bias_ptr,  # (S, e)
    out_ptr,  # (S, B, C, e), g's dtype
    B,
    C,
    E,
    D,  # d, the width of text and g
    stride_tc, stride_td,  # text (C, d)
    stride_gb, stride_gd,  # g (B, d)
    stride_ws, stride_we, stride_wk,  # weight (S, e, 2d)
    stride_bs, stride_be,  # bias (S, e)
    stride_os, stride_ob, stride_oc, stride_oe,  # out (S, B, C, e)
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    OPERAND: tl.constexpr,  # dtype of the tl.dot operands formed in the kernel (see _operand_dtype)
    IMAGE_GROUPS,  # a tuning choice read by the launcher's grid only (grid axis 2); the kernel works with any split
):
    pid = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    num_c = tl.cdiv(C, BLOCK_C)
    pid_c = pid % num_c
    pid_e = pid // num_c
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    mask_c = offs_c < C
    mask_e = offs_e < E
    w_base = w_ptr + s * stride_ws

    # text term: text @ W2.T + bias, once for all images
    acc_text = tl.zeros([BLOCK_C, BLOCK_E], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < D
        t = tl.load(text_ptr + offs_c[:, None] * stride_tc + kk[None, :] * stride_td,
                    mask=mask_c[:, None] & mask_k[None, :], other=0.0)
        w2 = tl.load(w_base + offs_e[None, :] * stride_we + (D + kk)[:, None] * stride_wk,
                     mask=mask_k[:, None] & mask_e[None, :], other=0.0)  # (BLOCK_K, BLOCK_E) = W2.T slice
        acc_text = tl.dot(t, w2, acc_text, input_precision=PRECISION)
    bias = tl.load(bias_ptr + s * stride_bs + offs_e * stride_be, mask=mask_e, other=0.0).to(tl.float32)
    acc_text += bias[None, :]

    # grid axis 2 splits the images into groups; any group count covers all B images
    images_per_program = tl.cdiv(B, tl.num_programs(2))
    b_start = tl.program_id(2) * images_per_program
    b_stop = tl.minimum(b_start + images_per_program, B)
    for b32 in range(b_start, b_stop):
        b = tl.cast(b32, tl.int64)
        acc = acc_text
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < D
            t = tl.load(text_ptr + offs_c[:, None] * stride_tc + kk[None, :] * stride_td,
                        mask=mask_c[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            gv = tl.load(g_ptr + b * stride_gb + kk * stride_gd, mask=mask_k, other=0.0).to(tl.float32)
            x = (t * gv[None, :]).to(OPERAND)  # one slice of text * g[b]; the concat never exists
            w1 = tl.load(w_base + offs_e[None, :] * stride_we + kk[:, None] * stride_wk,
                         mask=mask_k[:, None] & mask_e[None, :], other=0.0).to(OPERAND)
            acc = tl.dot(x, w1, acc, input_precision=PRECISION)
        out_ptrs = out_ptr + s * stride_os + b * stride_ob + offs_c[:, None] * stride_oc + offs_e[None, :] * stride_oe
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_e[None, :])


@autotune(_bwd_x_configs(), key=["B", "C", "E", "D", "PRECISION"])
@triton.jit
def _descriptor_bwd_x_kernel(
    grad_ptr,  # (S, B, C, e) compute dtype
    gsum_ptr,  # (S, C, e) float32, sum over b of grad
    text_ptr,  # (C, d)
    g_ptr,  # (B, d)
    w_ptr,  # (S, e, 2d)
    dtext_part_ptr,  # (S, G, C, d) float32: the share of d text of this stage and image group
    dg_part_ptr,  # (S, num_c, B, d) float32: this stage's and this class block's share of d g
    B,
    C,
    E,
    D,
    stride_gs, stride_gb, stride_gc, stride_ge,  # grad (S, B, C, e)
    stride_ss, stride_sc, stride_se,  # gsum (S, C, e)
    stride_tc, stride_td,  # text (C, d)
    stride_bb, stride_bd,  # g (B, d)
    stride_ws, stride_we, stride_wk,  # weight (S, e, 2d)
    BLOCK_C: tl.constexpr,  # from the launcher, not tuned: it sizes the d g partials
    PRECISION: tl.constexpr,
    OPERAND: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    grp = tl.program_id(2).to(tl.int64)
    num_grp = tl.num_programs(2)
    num_c = tl.cdiv(C, BLOCK_C)
    pid_c = pid % num_c
    pid_k = pid // num_c
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_e = tl.arange(0, BLOCK_E)
    mask_c = offs_c < C
    mask_k = offs_k < D
    w_base = w_ptr + s * stride_ws

    # text half: Gsum[s] @ W2[s], added by the first image group only
    acc_text = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.float32)
    e_stop = tl.where(grp == 0, E, 0)
    for e0 in range(0, e_stop, BLOCK_E):
        ee = e0 + offs_e
        mask_e = ee < E
        gs = tl.load(gsum_ptr + s * stride_ss + offs_c[:, None] * stride_sc + ee[None, :] * stride_se,
                     mask=mask_c[:, None] & mask_e[None, :], other=0.0)
        w2 = tl.load(w_base + ee[:, None] * stride_we + (D + offs_k)[None, :] * stride_wk,
                     mask=mask_e[:, None] & mask_k[None, :], other=0.0)
        acc_text = tl.dot(gs.to(OPERAND), w2.to(OPERAND), acc_text, input_precision=PRECISION)

    t = tl.load(text_ptr + offs_c[:, None] * stride_tc + offs_k[None, :] * stride_td,
                mask=mask_c[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    images_per_program = tl.cdiv(B, num_grp)
    b_start = grp * images_per_program
    b_stop = tl.minimum(b_start + images_per_program, B)
    for b32 in range(b_start, b_stop):
        b = tl.cast(b32, tl.int64)
        h = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            ee = e0 + offs_e
            mask_e = ee < E
            gt = tl.load(grad_ptr + s * stride_gs + b * stride_gb + offs_c[:, None] * stride_gc + ee[None, :] * stride_ge,
                         mask=mask_c[:, None] & mask_e[None, :], other=0.0)
            w1 = tl.load(w_base + ee[:, None] * stride_we + offs_k[None, :] * stride_wk,
                         mask=mask_e[:, None] & mask_k[None, :], other=0.0)
            h = tl.dot(gt, w1, h, input_precision=PRECISION)  # H[s, b] tile: gradient of text * g[b]
        gv = tl.load(g_ptr + b * stride_bb + offs_k * stride_bd, mask=mask_k, other=0.0).to(tl.float32)
        acc_text += h * gv[None, :]
        # padded rows of t are 0, so they add nothing to the class-sum
        dg = tl.sum(h * t, axis=0)
        tl.store(dg_part_ptr + ((s * num_c + pid_c) * B + b) * D + offs_k, dg, mask=mask_k)
    tl.store(dtext_part_ptr + (s * num_grp + grp) * C * D + offs_c[:, None] * D + offs_k[None, :], acc_text,
             mask=mask_c[:, None] & mask_k[None, :])


@autotune(_bwd_w_configs(), key=["B", "C", "E", "D", "PRECISION"], prune=_prune_class_blocks)
@triton.jit
def _descriptor_bwd_w_kernel(
    grad_ptr,  # (S, B, C, e) compute dtype
    gsum_ptr,  # (S, C, e) float32
    text_ptr,  # (C, d)
    g_ptr,  # (B, d)
    dw_ptr,  # (S, e, 2d) weight's dtype, contiguous
    B,
    C,
    E,
    D,
    stride_gs, stride_gb, stride_gc, stride_ge,  # grad (S, B, C, e)
    stride_ss, stride_sc, stride_se,  # gsum (S, C, e)
    stride_tc, stride_td,  # text (C, d)
    stride_bb, stride_bd,  # g (B, d)
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    OPERAND: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    num_e = tl.cdiv(E, BLOCK_E)
    num_k = tl.cdiv(D, BLOCK_K)
    pid_e = pid % num_e
    pid_k2 = pid // num_e  # in [0, 2 * num_k): first the W1 half, then the W2 half
    half = pid_k2 // num_k
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_k = (pid_k2 % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
    mask_e = offs_e < E
    mask_k = offs_k < D

    acc = tl.zeros([BLOCK_E, BLOCK_K], dtype=tl.float32)
    if half == 0:
        # d W1[s] = sum over the joint (b, c) axis of G.T @ (text * g[b])
        for b32 in range(B):
            b = tl.cast(b32, tl.int64)
            gv = tl.load(g_ptr + b * stride_bb + offs_k * stride_bd, mask=mask_k, other=0.0).to(tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + offs_c
                mask_c = cc < C
                gT = tl.load(grad_ptr + s * stride_gs + b * stride_gb + cc[None, :] * stride_gc + offs_e[:, None] * stride_ge,
                             mask=mask_e[:, None] & mask_c[None, :], other=0.0)  # (BLOCK_E, BLOCK_C)
                t = tl.load(text_ptr + cc[:, None] * stride_tc + offs_k[None, :] * stride_td,
                            mask=mask_c[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                acc = tl.dot(gT.to(OPERAND), (t * gv[None, :]).to(OPERAND), acc, input_precision=PRECISION)
    else:
        # d W2[s] = Gsum[s].T @ text
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            mask_c = cc < C
            gsT = tl.load(gsum_ptr + s * stride_ss + cc[None, :] * stride_sc + offs_e[:, None] * stride_se,
                          mask=mask_e[:, None] & mask_c[None, :], other=0.0)
            t = tl.load(text_ptr + cc[:, None] * stride_tc + offs_k[None, :] * stride_td,
                        mask=mask_c[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(gsT.to(OPERAND), t.to(OPERAND), acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + s * E * 2 * D + offs_e[:, None] * (2 * D) + (half * D + offs_k)[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_e[:, None] & mask_k[None, :])


@triton.jit
def _sum_block(part_ptr, out_ptr, M, P, INNER, block, BLOCK: tl.constexpr):
    """``out[m] = sum_p part[(m // INNER) * P * INNER + p * INNER + m % INNER]`` for this block of ``m``, p in order."""
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    ptrs = part_ptr + (offs // INNER) * P * INNER + offs % INNER  # offs is int64 (block is): 64-bit offsets
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(P):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += INNER
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _descriptor_bwd_finish_kernel(
    dtext_part_ptr, dtext_ptr, M_TEXT, P_TEXT,  # (P_TEXT, C*d) float32 -> (C, d) text's dtype
    dg_part_ptr, dg_ptr, M_G, P_G,  # (P_G, B*d) float32 -> (B, d) g's dtype
    gsum_ptr, dbias_ptr, M_BIAS, C, E,  # (S, C, e) float32 -> (S, e) bias's dtype, summed over C
    BLOCKS_TEXT,
    BLOCKS_G,
    BLOCK: tl.constexpr,
):
    # one launch for three reductions: the programs are the blocks of d text, then of d g, then of d bias
    pid = tl.program_id(0).to(tl.int64)
    if pid < BLOCKS_TEXT:
        _sum_block(dtext_part_ptr, dtext_ptr, M_TEXT, P_TEXT, M_TEXT, pid, BLOCK)
    elif pid < BLOCKS_TEXT + BLOCKS_G:
        _sum_block(dg_part_ptr, dg_ptr, M_G, P_G, M_G, pid - BLOCKS_TEXT, BLOCK)
    else:
        _sum_block(gsum_ptr, dbias_ptr, M_BIAS, C, E, pid - BLOCKS_TEXT - BLOCKS_G, BLOCK)


def _check(text, g, weight, bias):
    if text.dim() != 2 or g.dim() != 2 or weight.dim() != 3 or bias.dim() != 2:
        raise ValueError("descriptor: text (C, d), g (B, d), weight (S, e, 2d), bias (S, e) expected")
    d = text.shape[1]
    if g.shape[1] != d or weight.shape[2] != 2 * d or bias.shape != weight.shape[:2]:
        raise ValueError(
            f"descriptor: shapes disagree: text {tuple(text.shape)}, g {tuple(g.shape)}, "
            f"weight {tuple(weight.shape)}, bias {tuple(bias.shape)}"
        )


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _operand_dtype(compute: torch.dtype):
    """The dtype of the ``tl.dot`` operands the kernels form themselves (``text * g[b]``, the image-summed gradient):
    the compute dtype, except float32 for float16, whose range (65504) such products and sums leave long before the
    reference (float32 throughout) does - fp16 loss scaling makes the gradient sum reach it. Their dots then run as
    TF32, whose 10-bit mantissa is float16's; the operands loaded as stored stay float16."""
    return {torch.float16: tl.float32, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[compute]


def _blocks(C, E, D):
    bc, be, bk = block_size(C, _CAP_C), block_size(E, _CAP_E), block_size(D, _CAP_K)
    return bc, be, bk


# Programs to aim for: about two waves of a 132-SM H100 (108 SMs on A100). The op is small (C is often 15-20), so
# the images are split into groups over a third grid axis until there is enough parallelism; each group recomputes
# the image-independent text term, which costs one extra (C, e, d) product per group instead of one per image.
_TARGET_PROGRAMS = 256


def _image_groups(tiles: int, B: int, requested: int = 0) -> int:
    """Image groups (grid axis 2) for ``tiles`` programs per group: ``requested`` ones (at most ``B``), or with 0 the
    heuristic's count. The kernels give each group ``cdiv(B, groups)`` images, so the count is rounded to one that
    leaves no group empty."""
    wanted = requested if requested > 0 else cdiv(_TARGET_PROGRAMS, max(tiles, 1))
    groups = max(1, min(B, wanted))
    return cdiv(B, cdiv(B, groups))


def descriptor_forward(text: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """text ``(C, d)``, g ``(B, d)``, weight ``(S, e, 2d)``, bias ``(S, e)`` -> ``(S, B, C, e)`` in g's dtype."""
    _check(text, g, weight, bias)
    C, D = text.shape
    B = g.shape[0]
    S, E = bias.shape
    out = torch.empty((S, B, C, E), dtype=g.dtype, device=g.device)
    if out.numel() == 0:
        return out
    cd = _compute_dtype(text, g, weight)
    # the bias is read in its own dtype (the kernel adds it in float32): a float32 bias beside float16 operands may
    # lie outside float16's range while the output does not
    text, g, weight = (contiguous(t.to(cd)) for t in (text, g, weight))
    bias = contiguous(bias)

    def grid(meta):
        # each candidate splits the images for its own tiles: 128x128 tiles at C=171 make a third of the programs
        # of 64x64 ones, so they need more image groups to fill the GPU (the kernel derives the group size)
        tiles = cdiv(C, meta["BLOCK_C"]) * cdiv(E, meta["BLOCK_E"])
        return (tiles, S, _image_groups(tiles * S, B, meta["IMAGE_GROUPS"]))

    _descriptor_fwd_kernel[grid](
        text, g, weight, bias, out, B, C, E, D,
        *text.stride(), *g.stride(), *weight.stride(), *bias.stride(), *out.stride(),
        PRECISION=dot_precision(cd), OPERAND=_operand_dtype(cd),
    )
    return out


def descriptor_backward(grad, text, g, weight, bias):
    """grad ``(S, B, C, e)`` -> (d text ``(C, d)``, d g ``(B, d)``, d weight ``(S, e, 2d)``, d bias ``(S, e)``)."""
    C, D = text.shape
    B = g.shape[0]
    S, E = bias.shape
    dev = g.device
    if grad.numel() == 0 or D == 0:  # with d = 0 the output is the bias alone, which still gets its gradient
        d_bias = grad.sum(dim=(1, 2), dtype=torch.float32).to(bias.dtype)
        return (torch.zeros_like(text), torch.zeros_like(g), torch.zeros_like(weight), d_bias)
    cd = _compute_dtype(text, g, weight)
    grad = contiguous(grad.to(cd))
    text_c, g_c, weight_c = (contiguous(t.to(cd)) for t in (text, g, weight))
    gsum = grad.sum(dim=1, dtype=torch.float32)  # (S, C, e): the text half sees the sum over images
    bc, _, bk = _blocks(C, E, D)
    num_c = cdiv(C, bc)
    precision, operand = dot_precision(cd), _operand_dtype(cd)

    # class tile and image split from the heuristic (they size the partial buffers); the rest is autotuned
    groups = _image_groups(num_c * cdiv(D, bk) * S, B)
    dtext_part = torch.empty((S, groups, C, D), dtype=torch.float32, device=dev)
    dg_part = torch.empty((S, num_c, B, D), dtype=torch.float32, device=dev)

    def grid_x(meta):
        return (num_c * cdiv(D, meta["BLOCK_K"]), S, groups)

    _descriptor_bwd_x_kernel[grid_x](
        grad, gsum, text_c, g_c, weight_c, dtext_part, dg_part, B, C, E, D,
        *grad.stride(), *gsum.stride(), *text_c.stride(), *g_c.stride(), *weight_c.stride(), bc,
        PRECISION=precision, OPERAND=operand,
    )
    d_text = torch.empty((C, D), dtype=text.dtype, device=dev)
    d_g = torch.empty((B, D), dtype=g.dtype, device=dev)
    d_bias = torch.empty((S, E), dtype=bias.dtype, device=dev)
    block = block_size(max(C * D, B * D, S * E), _FINISH_BLOCK)
    blocks_text, blocks_g, blocks_bias = cdiv(C * D, block), cdiv(B * D, block), cdiv(S * E, block)
    _descriptor_bwd_finish_kernel[(blocks_text + blocks_g + blocks_bias,)](
        dtext_part, d_text, C * D, S * groups,
        dg_part, d_g, B * D, S * num_c,
        gsum, d_bias, S * E, C, E,
        blocks_text, blocks_g, BLOCK=block, num_warps=num_warps(block),
    )

    d_weight = torch.empty((S, E, 2 * D), dtype=weight.dtype, device=dev)

    def grid_w(meta):
        return (cdiv(E, meta["BLOCK_E"]) * 2 * cdiv(D, meta["BLOCK_K"]), S)

    _descriptor_bwd_w_kernel[grid_w](
        grad, gsum, text_c, g_c, d_weight, B, C, E, D,
        *grad.stride(), *gsum.stride(), *text_c.stride(), *g_c.stride(),
        PRECISION=precision, OPERAND=operand,
    )
    return d_text, d_g, d_weight, d_bias


# ---- custom-op layer ----

@torch.library.custom_op("cascade_clip_triton::descriptor", mutates_args=())
def descriptor_op(text: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return descriptor_forward(text, g, weight, bias)


@descriptor_op.register_fake
def _(text, g, weight, bias):
    return g.new_empty((weight.shape[0], g.shape[0], text.shape[0], weight.shape[1]))


@torch.library.custom_op("cascade_clip_triton::descriptor_backward", mutates_args=())
def descriptor_backward_op(
    grad: torch.Tensor, text: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return descriptor_backward(grad, text, g, weight, bias)


@descriptor_backward_op.register_fake
def _(grad, text, g, weight, bias):
    return text.new_empty(text.shape), g.new_empty(g.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@first_order_only("descriptor", "triton")
def _backward(ctx, saved, grad):
    text, g, weight, bias = saved
    return descriptor_backward_op(grad, text, g, weight, bias)


descriptor_op.register_autograd(_backward, setup_context=_setup_context)


class _DescriptorFunction(torch.autograd.Function):
    """The eager path: the same launchers as the custom op, without its dispatch (see :func:`descriptor`)."""

    @staticmethod
    def forward(ctx, text, g, weight, bias):
        ctx.save_for_backward(text, g, weight, bias)
        return descriptor_forward(text, g, weight, bias)

    @staticmethod
    @first_order_only("descriptor", "triton")
    def backward(ctx, saved, grad):
        return descriptor_backward(grad, *saved)


def descriptor(text: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Backend entry point: text ``(C, d)``, g ``(B, d)``, weight ``(S, e, 2d)``, bias ``(S, e)`` -> ``(S, B, C, e)``.

    The custom op under ``torch.compile``, an ``autograd.Function`` over the same launchers in eager mode (no
    custom-op dispatch on the host)."""
    if torch.compiler.is_compiling():
        return descriptor_op(text, g, weight, bias)
    return _DescriptorFunction.apply(text, g, weight, bias)
