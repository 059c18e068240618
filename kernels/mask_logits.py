"""Stage-summed (cosine) mask logits: ``out[b] = sum_s scale[s] * q_hat[s, b] @ k_hat[s, b].T``.

q ``(S, B, C, d)``, k ``(S, B, N, d)``, scale ``(S,)`` -> ``(B, C, N)`` in q's dtype; ``x_hat = x / max(|x|, 1e-12)``
along ``d`` when ``normalize`` else ``x``.

Forward: one main kernel, one ``(BLOCK_C, BLOCK_N)`` output tile per program. The program walks the concatenated
``(S * d)`` axis: for each stage it accumulates ``q[s] @ k[s].T`` over ``d`` in float32, then folds the stage's partial
product into the output accumulator as ``scale[s] / (|q| |k|) * partial`` - normalising the product instead of the
operands keeps the tensor-core inputs exactly as stored. No per-stage or per-head logits tensor is ever written.
When normalising, the row norms of q and k come from one small row-norm kernel run first (one more read of q and k).
Summing the squares of the very tiles the dot loads, the first design, avoided that read but cost more: on an H200
(bf16, B=8, C=15, N=1024) the cosine forward took 3.1x the attention forward's time, 0.78x `torch.compile`, most
likely because the element-wise use of the dot's operand tiles took them out of the pipelined shared-memory path (not
profiled); with the separate norms it took 0.77x its old time.

Backward, with ``G = d out`` ``(B, C, N)``, ``P_q = G @ k_hat[s]`` ``(C, d)`` and ``P_k = G.T @ q_hat[s]`` ``(N, d)``:

* unnormalised: ``dq[s] = scale[s] * P_q``, ``dk[s] = scale[s] * P_k``;
* normalised: ``dq[s] = scale[s] / |q| * (P_q - q_hat * <q_hat, P_q>)`` (likewise for k), where the row dot
  ``<q_hat_c, P_q,c> = sum_n G[c, n] L_s[c, n]`` and ``<k_hat_n, P_k,n> = sum_c G[c, n] L_s[c, n]`` come from the
  per-stage logits ``L_s`` recomputed tile by tile in a pre-pass kernel (so every later kernel can work on
  ``d``-slices independently); below the 1e-12 clamp the projection term vanishes, as in ``F.normalize``;
* ``d scale[s] = sum <q_hat[s], P_q>`` reduced from per-program float32 partials of the dq kernel.
Row norms for the backward come from the same row-norm kernel. Everything is reduced in a fixed order (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import autotune, block_size, cdiv, contiguous, dot_precision, next_power_of_2, num_warps
from ..ops.first_order import first_order_only

# a tl.constexpr global: compiled Triton (unlike its interpreter) refuses plain Python globals inside @jit code
EPS = tl.constexpr(1e-12)
# Caps of the backward tiles (and of the interpreter's forward tile); the GPU forward is autotuned.
_CAP_C, _CAP_N, _CAP_D = 64, 64, 64


def _fwd_configs():
    """Every forward config tried on a GPU (the autotuner gets only the first under the interpreter)."""
    configs = []
    # few configs: each is a compile per (shape key, dtype, normalize); these cover C from 1 to 171
    for bc, bn, bd, warps, stages in (
        (64, 64, 64, 4, 3),  # first: the only config under the interpreter (and a safe default on sm80)
        (64, 128, 64, 8, 3),
        (32, 128, 64, 4, 3),
        (16, 128, 64, 4, 3),  # C = 15-20: one class block, more programs along N
    ):
        configs.append(triton.Config({"BLOCK_C": bc, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=warps, num_stages=stages))
    return configs


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (C is often 15-20): they only waste MMA work."""
    C, D = named_args["C"], named_args["D"]
    keep = [
        cfg for cfg in configs
        if cfg.kwargs["BLOCK_C"] <= max(16, next_power_of_2(C)) and cfg.kwargs["BLOCK_D"] <= max(16, next_power_of_2(D))
    ]
    return keep or configs[-1:]


@triton.jit
def _clamped_norm(norm):
    """``max(norm, eps)`` as ``F.normalize`` clamps, keeping NaN (a NaN row must give NaN, not 1/eps; the hardware
    max returns the other operand)."""
    return tl.maximum(norm, EPS, propagate_nan=tl.PropagateNan.ALL)


@autotune(_fwd_configs(), key=["C", "N", "D", "S", "NORMALIZE", "PRECISION"], prune=_prune_configs)
@triton.jit
def _mask_logits_fwd_kernel(
    q_ptr,  # (S, B, C, d) contiguous
    k_ptr,  # (S, B, N, d) contiguous
    scale_ptr,  # (S,) any float dtype
    qn_ptr,  # (S, B, C) float32 row norms of q (unused unless NORMALIZE)
    kn_ptr,  # (S, B, N) float32 row norms of k (unused unless NORMALIZE)
    out_ptr,  # (B, C, N) q's dtype, contiguous
    S,
    B,
    C,
    N,
    D,
    NORMALIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    num_c = tl.cdiv(C, BLOCK_C)
    # class blocks vary fastest: the programs that share one k tile run together and hit it in L2
    pid_c = pid % num_c
    pid_n = pid // num_c
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_c = offs_c < C
    mask_n = offs_n < N

    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    for s in range(S):
        sb = s * B + b  # int64 since b is
        q_base = q_ptr + (sb * C) * D
        k_base = k_ptr + (sb * N) * D
        part = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            mask_d = dd < D
            qt = tl.load(q_base + offs_c[:, None] * D + dd[None, :], mask=mask_c[:, None] & mask_d[None, :], other=0.0)
            kt = tl.load(k_base + offs_n[None, :] * D + dd[:, None], mask=mask_d[:, None] & mask_n[None, :], other=0.0)
            part = tl.dot(qt, kt, part, input_precision=PRECISION)
        sc = tl.load(scale_ptr + s).to(tl.float32)
        if NORMALIZE:
            rq = 1.0 / _clamped_norm(tl.load(qn_ptr + sb * C + offs_c, mask=mask_c, other=1.0))
            rk = 1.0 / _clamped_norm(tl.load(kn_ptr + sb * N + offs_n, mask=mask_n, other=1.0))
            acc += part * ((sc * rq)[:, None] * rk[None, :])
        else:
            acc += part * sc
    out_ptrs = out_ptr + (b * C + offs_c[:, None]) * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_n[None, :])


@triton.jit
def _row_norm_block(x_ptr, norm_ptr, R, D, block, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """float32 L2 norms of rows ``[block * BLOCK_R, (block + 1) * BLOCK_R)`` of the contiguous ``(R, d)`` x."""
    offs_r = block * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: block is
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = offs_r < R
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        x = tl.load(x_ptr + offs_r[:, None] * D + dd[None, :], mask=mask_r[:, None] & (dd < D)[None, :], other=0.0)
        x = x.to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    tl.store(norm_ptr + offs_r, tl.sqrt(ss), mask=mask_r)


@triton.jit
def _row_norms_kernel(
    q_ptr,  # (S, B, C, d) contiguous
    qn_ptr,  # (S, B, C) float32
    k_ptr,  # (S, B, N, d) contiguous
    kn_ptr,  # (S, B, N) float32
    RQ,
    RK,
    D,
    BLOCKS_Q,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # the rows of q and of k in one launch (the first BLOCKS_Q programs take q's): a launch is a host cost per call
    pid = tl.program_id(0).to(tl.int64)
    if pid < BLOCKS_Q:
        _row_norm_block(q_ptr, qn_ptr, RQ, D, pid, BLOCK_R, BLOCK_D)
    else:
        _row_norm_block(k_ptr, kn_ptr, RK, D, pid - BLOCKS_Q, BLOCK_R, BLOCK_D)


@triton.jit
def _rowdot_kernel(
    grad_ptr,  # (B, C, N) compute dtype, contiguous
    q_ptr,  # (S, B, C, d)
    k_ptr,  # (S, B, N, d)
    qn_ptr,  # (S, B, C) float32 row norms of q
    kn_ptr,  # (S, B, N) float32 row norms of k
    rdq_part_ptr,  # (S, B, num_n, C) float32: sum over this block's n of G * L_s
    rdk_ptr,  # (S, B, N) float32: sum over all c of G * L_s
    B,
    C,
    N,
    D,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    sb = tl.program_id(1).to(tl.int64)  # s * B + b
    b = sb % B
    num_n = tl.cdiv(N, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c0 = tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    k_base = k_ptr + (sb * N) * D
    rk = 1.0 / _clamped_norm(tl.load(kn_ptr + sb * N + offs_n, mask=mask_n, other=1.0))
    rdk = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + offs_c0
        mask_c = offs_c < C
        q_base = q_ptr + (sb * C) * D
        logits = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            mask_d = dd < D
            qt = tl.load(q_base + offs_c[:, None] * D + dd[None, :], mask=mask_c[:, None] & mask_d[None, :], other=0.0)
            kt = tl.load(k_base + offs_n[None, :] * D + dd[:, None], mask=mask_d[:, None] & mask_n[None, :], other=0.0)
            logits = tl.dot(qt, kt, logits, input_precision=PRECISION)
        rq = 1.0 / _clamped_norm(tl.load(qn_ptr + sb * C + offs_c, mask=mask_c, other=1.0))
        gt = tl.load(grad_ptr + (b * C + offs_c[:, None]) * N + offs_n[None, :],
                     mask=mask_c[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        gl = gt * logits * (rq[:, None] * rk[None, :])  # padded entries are 0 through gt
        rdk += tl.sum(gl, axis=0)
        tl.store(rdq_part_ptr + (sb * num_n + pid_n) * C + offs_c, tl.sum(gl, axis=1), mask=mask_c)
    tl.store(rdk_ptr + sb * N + offs_n, rdk, mask=mask_n)


@triton.jit
def _mask_logits_bwd_q_kernel(
    grad_ptr,  # (B, C, N) compute dtype
    q_ptr,  # (S, B, C, d)
    k_ptr,  # (S, B, N, d)
    scale_ptr,  # (S,)
    qn_ptr,  # (S, B, C) float32 (unused unless NORMALIZE)
    kn_ptr,  # (S, B, N) float32 (unused unless NORMALIZE)
    rdq_ptr,  # (S, B, C) float32 row dots <q_hat, P_q> (unused unless NORMALIZE)
    dq_ptr,  # (S, B, C, d) q's dtype
    dscale_part_ptr,  # (S, B * num_c * num_d) float32
    B,
    C,
    N,
    D,
    NORMALIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    sb = tl.program_id(1).to(tl.int64)
    s = sb // B
    b = sb % B
    num_c = tl.cdiv(C, BLOCK_C)
    num_d = tl.cdiv(D, BLOCK_D)
    pid_c = pid % num_c
    pid_d = pid // num_c
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    mask_c = offs_c < C
    mask_d = offs_d < D
    k_base = k_ptr + (sb * N) * D
    dtype = k_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)  # P_q = G @ k_hat
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + offs_n0).to(tl.int64)  # offs_n * D may pass 2^31 within one (s, b) slice
        mask_n = offs_n < N
        gt = tl.load(grad_ptr + (b * C + offs_c[:, None]) * N + offs_n[None, :],
                     mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        kt = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if NORMALIZE:
            # normalise k (|k_hat| <= 1), not the gradient: G / |k| overflows fp16 for short or zero k rows, and an
            # inf meeting a zero of k in the dot turns the whole tile into NaN
            rk = 1.0 / _clamped_norm(tl.load(kn_ptr + sb * N + offs_n, mask=mask_n, other=1.0))
            kt = (kt.to(tl.float32) * rk[:, None]).to(dtype)
        acc = tl.dot(gt, kt, acc, input_precision=PRECISION)

    sc = tl.load(scale_ptr + s).to(tl.float32)
    mask = mask_c[:, None] & mask_d[None, :]
    q_offs = (sb * C + offs_c[:, None]) * D + offs_d[None, :]
    qt = tl.load(q_ptr + q_offs, mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        qn = tl.load(qn_ptr + sb * C + offs_c, mask=mask_c, other=1.0)
        rq = 1.0 / _clamped_norm(qn)
        q_hat = qt * rq[:, None]
        rdq = tl.load(rdq_ptr + sb * C + offs_c, mask=mask_c, other=0.0)
        rdq = tl.where(qn > EPS, rdq, 0.0)  # below the clamp F.normalize is linear: no projection
        dq = (sc * rq)[:, None] * (acc - q_hat * rdq[:, None])
    else:
        q_hat = qt
        dq = sc * acc
    tl.store(dq_ptr + q_offs, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    num_part = B * num_c * num_d
    # padded rows of acc can be NaN (a zero gradient row times an inf of k in the dot): keep them out of the sum
    tl.store(dscale_part_ptr + s * num_part + (b * num_c + pid_c) * num_d + pid_d, tl.sum(tl.sum(tl.where(mask, q_hat * acc, 0.0), axis=1), axis=0))


@triton.jit
def _mask_logits_bwd_k_kernel(
    grad_ptr,  # (B, C, N) compute dtype
    q_ptr,  # (S, B, C, d)
    k_ptr,  # (S, B, N, d)
    scale_ptr,  # (S,)
    qn_ptr,  # (S, B, C) float32 (unused unless NORMALIZE)
    kn_ptr,  # (S, B, N) float32 (unused unless NORMALIZE)
    rdk_ptr,  # (S, B, N) float32 row dots <k_hat, P_k> (unused unless NORMALIZE)
    dk_ptr,  # (S, B, N, d) k's dtype
    B,
    C,
    N,
    D,
    NORMALIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    sb = tl.program_id(1).to(tl.int64)
    s = sb // B
    b = sb % B
    num_d = tl.cdiv(D, BLOCK_D)
    # d slices vary fastest: the programs sharing one grad tile run together
    pid_d = pid % num_d
    pid_n = pid // num_d
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_c0 = tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_d = offs_d < D
    q_base = q_ptr + (sb * C) * D
    dtype = q_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # P_k = G.T @ q_hat
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + offs_c0
        mask_c = offs_c < C
        gT = tl.load(grad_ptr + (b * C + offs_c[None, :]) * N + offs_n[:, None],
                     mask=mask_n[:, None] & mask_c[None, :], other=0.0)  # (BLOCK_N, BLOCK_C)
        qt = tl.load(q_base + offs_c[:, None] * D + offs_d[None, :], mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        if NORMALIZE:  # normalise q, not the gradient (see the q kernel)
            rq = 1.0 / _clamped_norm(tl.load(qn_ptr + sb * C + offs_c, mask=mask_c, other=1.0))
            qt = (qt.to(tl.float32) * rq[:, None]).to(dtype)
        acc = tl.dot(gT, qt, acc, input_precision=PRECISION)

    sc = tl.load(scale_ptr + s).to(tl.float32)
    mask = mask_n[:, None] & mask_d[None, :]
    k_offs = (sb * N + offs_n[:, None]) * D + offs_d[None, :]
    if NORMALIZE:
        kt = tl.load(k_ptr + k_offs, mask=mask, other=0.0).to(tl.float32)
        kn = tl.load(kn_ptr + sb * N + offs_n, mask=mask_n, other=1.0)
        rk = 1.0 / _clamped_norm(kn)
        rdk = tl.load(rdk_ptr + sb * N + offs_n, mask=mask_n, other=0.0)
        rdk = tl.where(kn > EPS, rdk, 0.0)
        dk = (sc * rk)[:, None] * (acc - kt * (rk * rdk)[:, None])
    else:
        dk = sc * acc
    tl.store(dk_ptr + k_offs, dk.to(dk_ptr.dtype.element_ty), mask=mask)


def _check(q, k, scale):
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"mask_logits: q (S, B, C, d) and k (S, B, N, d) expected, got {tuple(q.shape)}, {tuple(k.shape)}")
    if scale.shape != (q.shape[0],):
        raise ValueError(f"mask_logits: scale must be (S,) = ({q.shape[0]},), got {tuple(scale.shape)}")


def _row_norms(q: torch.Tensor, k: torch.Tensor):
    """q ``(S, B, C, d)``, k ``(S, B, N, d)`` contiguous, one dtype -> their float32 L2 row norms ``(S, B, C)``,
    ``(S, B, N)``, from one launch."""
    D = q.shape[-1]
    RQ, RK = q.numel() // D, k.numel() // D
    qn = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    kn = torch.empty(k.shape[:-1], dtype=torch.float32, device=k.device)
    bd = block_size(D, 128)
    br = block_size(max(RQ, RK), max(16, 4096 // bd))
    blocks_q = cdiv(RQ, br)
    _row_norms_kernel[(blocks_q + cdiv(RK, br),)](
        q, qn, k, kn, RQ, RK, D, blocks_q, BLOCK_R=br, BLOCK_D=bd, num_warps=num_warps(br * bd),
    )
    return qn, kn


def mask_logits_forward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, normalize: bool) -> torch.Tensor:
    """q ``(S, B, C, d)``, k ``(S, B, N, d)``, scale ``(S,)`` -> ``(B, C, N)`` in q's dtype."""
    _check(q, k, scale)
    S, B, C, D = q.shape
    N = k.shape[2]
    out = torch.empty((B, C, N), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if S == 0 or D == 0:
        return out.zero_()
    cd = torch.promote_types(q.dtype, k.dtype)
    q, k, scale = contiguous(q.to(cd)), contiguous(k.to(cd)), contiguous(scale)

    def grid(meta):
        return (cdiv(C, meta["BLOCK_C"]) * cdiv(N, meta["BLOCK_N"]), B)

    if normalize:
        qn, kn = _row_norms(q, k)
    else:  # the kernel skips these loads; any float32 buffer will do as the pointer
        qn = kn = torch.empty(1, dtype=torch.float32, device=q.device)
    _mask_logits_fwd_kernel[grid](
        q, k, scale, qn, kn, out, S, B, C, N, D, NORMALIZE=bool(normalize), PRECISION=dot_precision(cd),
    )
    return out


def mask_logits_backward(grad, q, k, scale, normalize: bool):
    """grad ``(B, C, N)`` -> (dq ``(S, B, C, d)``, dk ``(S, B, N, d)``, d scale ``(S,)``)."""
    S, B, C, D = q.shape
    N = k.shape[2]
    dev = q.device
    if grad.numel() == 0 or S == 0 or D == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(scale)
    cd = torch.promote_types(q.dtype, k.dtype)
    q_c, k_c, scale_c = contiguous(q.to(cd)), contiguous(k.to(cd)), contiguous(scale)
    grad = contiguous(grad.to(cd))
    bc, bn, bd = block_size(C, _CAP_C), block_size(N, _CAP_N), block_size(D, _CAP_D)
    precision = dot_precision(cd)
    if normalize:
        qn, kn = _row_norms(q_c, k_c)
        num_n = cdiv(N, bn)
        rdq_part = torch.empty((S, B, num_n, C), dtype=torch.float32, device=dev)
        rdk = torch.empty((S, B, N), dtype=torch.float32, device=dev)
        _rowdot_kernel[(num_n, S * B)](
            grad, q_c, k_c, qn, kn, rdq_part, rdk, B, C, N, D,
            PRECISION=precision, BLOCK_C=bc, BLOCK_N=bn, BLOCK_D=bd, num_warps=num_warps(bc * bn),
        )
        rdq = rdq_part.sum(dim=2)
    else:  # the kernels skip these loads; any float32 buffer will do as the pointer
        qn = kn = rdq = rdk = torch.empty(1, dtype=torch.float32, device=dev)

    num_c, num_d = cdiv(C, bc), cdiv(D, bd)
    dq = torch.empty((S, B, C, D), dtype=q.dtype, device=dev)
    dscale_part = torch.empty((S, B * num_c * num_d), dtype=torch.float32, device=dev)
    _mask_logits_bwd_q_kernel[(num_c * num_d, S * B)](
        grad, q_c, k_c, scale_c, qn, kn, rdq, dq, dscale_part, B, C, N, D,
        NORMALIZE=bool(normalize), PRECISION=precision, BLOCK_C=bc, BLOCK_N=bn, BLOCK_D=bd,
        num_warps=num_warps(bc * bd),
    )
    dk = torch.empty((S, B, N, D), dtype=k.dtype, device=dev)
    _mask_logits_bwd_k_kernel[(cdiv(N, bn) * num_d, S * B)](
        grad, q_c, k_c, scale_c, qn, kn, rdk, dk, B, C, N, D,
        NORMALIZE=bool(normalize), PRECISION=precision, BLOCK_C=bc, BLOCK_N=bn, BLOCK_D=bd,
        num_warps=num_warps(bn * bd),
    )
    d_scale = dscale_part.sum(dim=1).to(scale.dtype)
    return dq, dk, d_scale


# ---- custom-op layer ----

@torch.library.custom_op("cascade_clip_triton::mask_logits", mutates_args=())
def mask_logits_op(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, normalize: bool) -> torch.Tensor:
    return mask_logits_forward(q, k, scale, normalize)


@mask_logits_op.register_fake
def _(q, k, scale, normalize):
    return q.new_empty((q.shape[1], q.shape[2], k.shape[2]))


@torch.library.custom_op("cascade_clip_triton::mask_logits_backward", mutates_args=())
def mask_logits_backward_op(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mask_logits_backward(grad, q, k, scale, normalize)


@mask_logits_backward_op.register_fake
def _(grad, q, k, scale, normalize):
    return q.new_empty(q.shape), k.new_empty(k.shape), scale.new_empty(scale.shape)


def _setup_context(ctx, inputs, output):
    q, k, scale, normalize = inputs
    ctx.save_for_backward(q, k, scale)
    ctx.normalize = normalize


@first_order_only("mask_logits", "triton")
def _backward(ctx, saved, grad):
    q, k, scale = saved
    dq, dk, d_scale = mask_logits_backward_op(grad, q, k, scale, ctx.normalize)
    return dq, dk, d_scale, None


mask_logits_op.register_autograd(_backward, setup_context=_setup_context)


class _MaskLogitsFunction(torch.autograd.Function):
    """The eager path: the same launchers as the custom op, without its dispatch (see :func:`mask_logits`)."""

    @staticmethod
    def forward(ctx, q, k, scale, normalize):
        ctx.save_for_backward(q, k, scale)
        ctx.normalize = normalize
        return mask_logits_forward(q, k, scale, normalize)

    @staticmethod
    @first_order_only("mask_logits", "triton")
    def backward(ctx, saved, grad):
        q, k, scale = saved
        dq, dk, d_scale = mask_logits_backward(grad, q, k, scale, ctx.normalize)
        return dq, dk, d_scale, None


def mask_logits(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Backend entry point: q ``(S, B, C, d)``, k ``(S, B, N, d)``, scale ``(S,)`` -> ``(B, C, N)``.

    The custom op under ``torch.compile``, an ``autograd.Function`` over the same launchers in eager mode (no
    custom-op dispatch on the host)."""
    if torch.compiler.is_compiling():
        return mask_logits_op(q, k, scale, bool(normalize))
    return _MaskLogitsFunction.apply(q, k, scale, bool(normalize))
