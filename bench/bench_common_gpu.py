"""Shared setup of the GPU kernel benchmarks: cases, inputs, providers, work formulas, timing and CSV rows.

Used by ``bench/bench_gpu.py`` (the script that appends to a CSV) and ``bench/test_bench_gpu.py`` (the same cases as
pytest-benchmark tests), so both time exactly the same callables on the same inputs.

Providers: ``eager`` is the official formulation (``bench/official_ops.py``: Python sum over taps, concat + Linear,
per-head logits averaged over heads, the element-wise focal + dice loss), ``compile`` is ``torch.compile`` of it,
``triton`` is our backend through ``cascade_clip.ops`` (for the loss: ``cascade_clip.loss.segmentation_loss`` on the
fused ``loss_sums``). Modes: ``fwd`` and ``fwd+bwd`` (backward of a fixed random cotangent to every float input).

Every provider gets what its model gets, with the same values: ``triton`` the stacked tensors the model passes to
``cascade_clip.ops``, ``eager`` and ``compile`` the separate tensors the official head holds (each tap, each stage's
q and k, each stage's Linear) and per-stage outputs (:func:`official_inputs`). Slicing stacked inputs instead would
charge the baseline a full-size zero-filled gradient per slice in the backward, work the official code never does.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_ops  # noqa: E402  (bench/ is a folder of scripts, not a package)
import results_io  # noqa: E402
from results_io import git_commit  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's head shapes: 3 stages, 3 NGA taps, 32x32 patches, width 512, 8 heads in the decoder.
STAGES, TAPS, WIDTH, HEADS = 3, 3, 512, 8
GRID_N = 32 * 32
LOSS_SIDE = 512  # the loss runs on the (B, C, 512, 512) upsampled mask logits of a training crop
BATCHES = (4, 8, 16)
CLASSES = (15, 20, 59, 171)  # class counts of the paper's zero-shot benchmarks (unseen/seen splits, Context, COCO-Stuff)
DTYPES = ("bf16", "fp32")
PROVIDERS = ("eager", "compile", "triton")
MODES = ("fwd", "fwd+bwd")
# How a call is timed. "launch": triton.testing.do_bench, one Python call per timed iteration with L2 flushed before
# it, so host overhead (Python, dispatch, kernel launches) counts whenever it outlasts the GPU work, as in an eager
# training loop. "graph": the same calls captured in one CUDA graph and replayed, so only GPU time counts (no L2
# flush between the captured calls): the kernels' own speed, and what a CUDA-graphed or compiled loop would see.
TIMINGS = ("launch", "graph")
DTYPE_OF = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

CSV_FIELDS = [
    "date", "run", "card", "torch", "triton", "commit", "op", "variant", "provider", "mode", "timing", "shape", "dtype",
    "p50_ms", "p20_ms", "p80_ms", "gbps", "tflops", "frac_copy_bw", "frac_mm_peak", "peak_mem_mib",
    "copy_gbps_measured", "mm_tflops_measured",
]


@dataclass(frozen=True)
class Case:
    """One benchmark shape. ``variant`` only matters for mask_logits: ``attn`` (head-averaged attention logits,
    ``normalize=False``) or ``cos`` (cosine logits, ``normalize=True``, one head)."""

    op: str
    B: int
    dtype: str
    C: int = 0
    N: int = GRID_N
    D: int = WIDTH
    S: int = STAGES
    K: int = TAPS
    variant: str = ""

    @property
    def shape(self) -> str:
        if self.op == "loss":
            side = math.isqrt(self.N)
            return f"B{self.B},C{self.C},H{side},W{side}"
        if self.op == "nga":
            return f"S{self.S},K{self.K},B{self.B},N{self.N},D{self.D}"
        if self.op == "descriptor":
            return f"S{self.S},B{self.B},C{self.C},d{self.D},e{self.D}"
        return f"S{self.S},B{self.B},C{self.C},N{self.N},d{self.D}"

    @property
    def id(self) -> str:
        v = f"-{self.variant}" if self.variant else ""
        return f"{self.op}{v}-{self.shape}-{self.dtype}"


OPS = ("nga", "descriptor", "mask_logits", "loss")


def cases(batches: Sequence[int] = BATCHES, classes: Sequence[int] = CLASSES, dtypes: Sequence[str] = DTYPES,
          N: int = GRID_N, D: int = WIDTH, ops: Sequence[str] = OPS, loss_side: int = LOSS_SIDE) -> List[Case]:
    """All cases, most important first (B=8 in every dtype leads: the issue's targets; the loss comes after the head
    ops), so a run cut short by a timeout has already measured them."""
    out: List[Case] = []
    order_b = sorted(batches, key=lambda b: (b != 8, b))
    for B in order_b:
        for dtype in dtypes:
            if "nga" in ops:
                out.append(Case("nga", B, dtype, N=N, D=D))
            for C in classes:
                if "descriptor" in ops:
                    out.append(Case("descriptor", B, dtype, C=C, N=N, D=D))
                if "mask_logits" in ops:
                    out.append(Case("mask_logits", B, dtype, C=C, N=N, D=D, variant="attn"))
                    if B == 8:
                        out.append(Case("mask_logits", B, dtype, C=C, N=N, D=D, variant="cos"))
        if "loss" in ops:
            out += [Case("loss", B, dtype, C=C, N=loss_side**2) for dtype in dtypes for C in classes]
    return out


# ------------------------------------------------------------------ inputs and providers

def make_inputs(case: Case, device: str, requires_grad: bool) -> List[torch.Tensor]:
    """The op's inputs, random, in the case's dtype (NGA weights float32, as in the model)."""
    g = torch.Generator(device=device).manual_seed(0)
    dt = DTYPE_OF[case.dtype]

    def rnd(*shape, scale=1.0, dtype=dt):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype).requires_grad_(requires_grad)

    if case.op == "loss":  # upsampled mask logits and labels with 10% ignore pixels
        side = math.isqrt(case.N)
        labels = torch.randint(0, case.C, (case.B, side, side), generator=g, device=device)
        labels[torch.rand(labels.shape, generator=g, device=device) < 0.1] = 255
        return [rnd(case.B, case.C, side, side, scale=3.0), labels]
    if case.op == "nga":
        return [rnd(case.S, case.K, case.B, case.N, case.D), rnd(case.S, case.K, dtype=torch.float32, scale=0.3)]
    if case.op == "descriptor":
        d = case.D
        return [rnd(case.C, d), rnd(case.B, d), rnd(case.S, d, 2 * d, scale=(2 * d) ** -0.5), rnd(case.S, d, scale=0.1)]
    return [rnd(case.S, case.B, case.C, case.D), rnd(case.S, case.B, case.N, case.D)]


def _mask_params(case: Case):
    heads = HEADS if case.variant == "attn" else 1
    normalize = case.variant == "cos"
    scale = (case.D // heads) ** -0.5 / heads
    return heads, normalize, scale


def official_inputs(case: Case, stacked: Sequence[torch.Tensor], requires_grad: bool) -> List[torch.Tensor]:
    """The inputs of :func:`make_inputs` laid out as the official head holds them (``official_ops.split_stacked``);
    the loss's unchanged."""
    return list(stacked) if case.op == "loss" else official_ops.split_stacked(case.op, stacked, requires_grad)


def eager_fn(case: Case) -> Callable:
    """The official formulation of the case's op, taking the inputs of :func:`official_inputs`
    (``official_ops.flat_stages_fn``: a list of per-stage outputs, as the official head uses them)."""
    if case.op == "loss":
        return official_ops.seg_loss
    if case.op == "mask_logits":
        heads, normalize, _ = _mask_params(case)
        return official_ops.flat_stages_fn("mask_logits", case.S, heads=heads, normalize=normalize)
    return official_ops.flat_stages_fn(case.op, case.S, taps=case.K)


_COMPILED: Dict[str, Callable] = {}


def _configure_dynamo() -> None:
    # every case is a new static shape: lift the recompile limit so dynamo never silently falls back to eager
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)


def provider_fn(case: Case, provider: str, device: str) -> Callable:
    """The callable of ``provider``: ``eager`` and ``compile`` take :func:`official_inputs`, ``triton`` takes
    :func:`make_inputs`."""
    if provider == "eager":
        return eager_fn(case)
    if provider == "compile":
        _configure_dynamo()
        key = f"{case.op}-{case.variant}-S{case.S}-K{case.K}"  # the eager function's argument layout depends on S, K
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(eager_fn(case), dynamic=False)
        return _COMPILED[key]
    if provider == "triton":
        from cascade_clip import ops

        if case.op == "nga":
            return lambda f, w: ops.nga(f, w, backend="triton")
        if case.op == "descriptor":
            return lambda t, g, w, b: ops.descriptor(t, g, w, b, backend="triton")
        if case.op == "loss":
            from cascade_clip.loss import segmentation_loss

            # labels are valid by construction: no validation (it waits for the GPU, and a CUDA graph cannot)
            return lambda x, y: segmentation_loss(x, y, backend="triton", validate_labels=False)["loss"]
        _, normalize, scale = _mask_params(case)
        scale_t = torch.full((case.S,), scale, dtype=torch.float32, device=device)
        return lambda q, k: ops.mask_logits(q, k, scale_t, normalize=normalize, backend="triton")
    raise ValueError(f"unknown provider {provider!r}")


def _as_list(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def cotangents(case: Case, official: Sequence[torch.Tensor], device: str) -> List[torch.Tensor]:
    """One fixed random output gradient per official output (seeded, so every provider gets the same values). The
    shapes come from one eager forward without autograd: running the compiled function for them would compile a
    no-grad graph that is never timed."""
    with torch.no_grad():
        outs = _as_list(eager_fn(case)(*official))
    g = torch.Generator(device=device).manual_seed(1)
    return [torch.randn(o.shape, generator=g, device=device, dtype=torch.float32).to(o.dtype) for o in outs]


def runner(case: Case, provider: str, mode: str, device: str):
    """``(callable, inputs)``: the callable runs one timed iteration of ``mode`` on inputs made once (the stacked
    ones for triton, the separate official ones otherwise, same values). fwd+bwd backpropagates the outputs with
    ``torch.autograd.backward``: the per-stage outputs of the official code each get their own cotangent, and
    triton's stacked output the stack of the same cotangents."""
    bwd = mode == "fwd+bwd"
    stacked = make_inputs(case, device, requires_grad=bwd)
    official = official_inputs(case, stacked, requires_grad=bwd) if provider != "triton" or bwd else None
    cots = cotangents(case, official, device) if bwd else []
    if provider == "triton":
        inputs = stacked
        if len(cots) > 1:
            cots = [torch.stack(cots)]
    else:
        inputs = official
    del stacked, official
    fn = provider_fn(case, provider, device)
    if not bwd:
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run, inputs

    def run_bwd():
        torch.autograd.backward(_as_list(fn(*inputs)), cots)
    return run_bwd, inputs


# ------------------------------------------------------------------ work formulas

def work(case: Case, mode: str):
    """``(bytes, flops)`` of one call: the minimum traffic (every input read once, every output written once) and
    the official formulation's multiply-adds x2. The same numbers serve every provider, so GB/s and TFLOP/s compare
    time only."""
    es = torch.empty(0, dtype=DTYPE_OF[case.dtype]).element_size()
    S, K, B, N, D, C = case.S, case.K, case.B, case.N, case.D, case.C
    if case.op == "loss":
        # fwd: read the logits B*C*N and the int64 labels B*N; bwd: read both again, write d logits. No matmul.
        logits, labels = B * C * N * es, B * N * 8
        return (logits + labels if mode == "fwd" else 3 * logits + 2 * labels), 0
    if case.op == "nga":
        M = B * N * D
        # fwd: read S*K*M taps, write S*M; bwd: read grad S*M and taps S*K*M, write S*K*M tap grads
        elems = S * K * M + S * M if mode == "fwd" else 3 * S * K * M + 2 * S * M
        flops = 2 * S * K * M * (1 if mode == "fwd" else 2)
        return elems * es, flops
    if case.op == "descriptor":
        # fwd: read text C*d, g B*d, weight S*e*2d, bias S*e; write S*B*C*e.  flops: [T*g, T] (B*C x 2d) @ (2d x e)
        ins, out = C * D + B * D + S * D * 2 * D + S * D, S * B * C * D
        fwd_flops = 2 * S * B * C * D * 2 * D
        if mode == "fwd":
            return (ins + out) * es, fwd_flops
        # bwd: read the output grad, read the inputs again, write the four grads (same sizes as the inputs): 3*in +
        # 2*out. flops: d relation + d weight. The flops are the official [T*g, T] GEMM's: our kernel computes the
        # text half once per image group, so fewer; its TFLOP/s is an official-equivalent rate.
        return (3 * ins + 2 * out) * es, 3 * fwd_flops
    # mask_logits fwd: read q S*B*C*d and k S*B*N*d, write B*C*N; flops 2*S*B*C*N*d
    ins, out = S * B * C * D + S * B * N * D, B * C * N
    fwd_flops = 2 * S * B * C * N * D
    if mode == "fwd":
        return (ins + out) * es, fwd_flops
    # bwd: read the output grad and q, k again, write dq, dk: 3*in + 2*out; flops dq + dk
    return (3 * ins + 2 * out) * es, 3 * fwd_flops


# ------------------------------------------------------------------ timing

def time_fn(fn: Callable, inputs: Sequence[torch.Tensor], device: str, warmup_ms: int = 25, rep_ms: int = 100,
            calls: int = 10):
    """``(p50, p20, p80)`` in milliseconds per call, "launch" timing: ``calls`` Python calls issued back to back
    between two CUDA events (after a synchronize), repeated for ``rep_ms``; a plain timer on the CPU.

    The GPU reaches the end event only after the host has issued every call, so a call costs the larger of its host
    time and its GPU time, as in a training loop. (``triton.testing.do_bench``, used for runs 1-2, flushes the L2 with
    a ~64 us memset before each call and starts its timer after it: the host issues the call while the GPU is still
    flushing, so up to ~64 us of host time per call went unseen.) Gradients are reset to None before each call."""
    grads = [t for t in inputs if t.requires_grad]

    def one_call():
        for t in grads:
            t.grad = None
        fn()

    if device == "cuda":
        deadline = time.perf_counter() + warmup_ms / 1e3
        one_call()
        while time.perf_counter() < deadline:
            one_call()
        torch.cuda.synchronize()
        samples = []
        deadline = time.perf_counter() + rep_ms / 1e3
        while not samples or (time.perf_counter() < deadline and len(samples) < 1000):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                one_call()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / calls)
        for t in grads:
            t.grad = None
        samples.sort()
        pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]  # noqa: E731
        return pick(0.5), pick(0.2), pick(0.8)
    one_call()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        one_call()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[1], times[0], times[2]


def time_graph(fn: Callable, inputs: Sequence[torch.Tensor], calls: int = 20, replays: int = 15):
    """``(p50, p20, p80)`` in milliseconds per call, "graph" timing: ``calls`` calls captured in one CUDA graph,
    replayed ``replays`` times between CUDA events. Gradients are reset to None before each captured call, so every
    backward writes fresh gradients instead of accumulating (an extra add) into the previous ones."""
    grads = [t for t in inputs if t.requires_grad]

    def one_call():
        for t in grads:
            t.grad = None
        fn()

    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph requires for autograd and allocators
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            one_call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            one_call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    for t in grads:
        t.grad = None
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def peak_memory_mib(fn: Callable, inputs: Sequence[torch.Tensor], device: str) -> float:
    """Memory allocated above the inputs during one call (MiB); NaN off CUDA."""
    if device != "cuda":
        return float("nan")
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_peaks(device: str) -> Dict[str, float]:
    """The card's measured device-to-device copy bandwidth (GB/s, read + write) and matmul peak (TFLOP/s) per dtype."""
    if device != "cuda":
        return {"copy_gbps": float("nan"), "mm_bf16": float("nan"), "mm_fp32": float("nan")}
    import triton.testing

    src = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    copy_gbps = 2 * src.numel() * 4 / ms / 1e6
    del src, dst
    peaks = {"copy_gbps": copy_gbps}
    # the best of a few square sizes: one size can sit on a poor cuBLAS tile choice (8192 alone gave ~680 TFLOP/s
    # in bf16 on an H200 that reaches more), and the fraction of peak would then read high
    for name, dt, sizes in (("mm_bf16", torch.bfloat16, (4096, 8192, 16384)), ("mm_fp32", torch.float32, (4096, 8192))):
        best = 0.0
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
            best = max(best, 2 * n**3 / ms / 1e9)
            del a, b
        peaks[name] = best
    torch.cuda.empty_cache()
    return peaks


# ------------------------------------------------------------------ CSV

def environment(device: str) -> Dict[str, str]:
    """The columns every row of one invocation shares. ``run`` is ``$CASCADE_CLIP_RUN_ID`` when set (``gpu_check.sh``
    sets one for all its invocations), else made here: the renderer computes ratios only within one run."""
    import triton

    commit = git_commit()
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu-interpreter"
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run": results_io.run_id(now),
        "card": card,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit,
    }


def make_row(env: Dict[str, str], peaks: Dict[str, float], case: Case, provider: str, mode: str, timing: str,
             times, peak_mib: float) -> Dict[str, str]:
    p50, p20, p80 = times
    nbytes, flops = work(case, mode)
    gbps = nbytes / p50 / 1e6
    tflops = flops / p50 / 1e9
    mm_peak = peaks["mm_bf16"] if case.dtype in ("bf16", "fp16") else peaks["mm_fp32"]
    row = dict(env)
    row.update(
        op=case.op, variant=case.variant, provider=provider, mode=mode, timing=timing, shape=case.shape,
        dtype=case.dtype,
        p50_ms=f"{p50:.5f}", p20_ms=f"{p20:.5f}", p80_ms=f"{p80:.5f}", gbps=f"{gbps:.2f}", tflops=f"{tflops:.3f}",
        frac_copy_bw=f"{gbps / peaks['copy_gbps']:.3f}", frac_mm_peak=f"{tflops / mm_peak:.3f}",
        peak_mem_mib=f"{peak_mib:.1f}", copy_gbps_measured=f"{peaks['copy_gbps']:.1f}",
        mm_tflops_measured=f"{mm_peak:.1f}",
    )
    return row


def append_rows(path: str, rows: List[Dict[str, str]]) -> None:
    """Append rows to ``path`` (header written only when the file is new); never rewrites earlier rows."""
    results_io.append_rows(path, CSV_FIELDS, rows)
