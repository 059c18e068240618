"""Launch settings for every kernel in this package: block sizes, warps, dot precision, autotune configs.

All kernels pick their tile sizes here so that one place decides how sizes map to blocks (Liger's
``calculate_settings``): a block is the next power of two of the extent, clamped between a floor and a cap. The floor
is 16 for any axis that feeds ``tl.dot`` (the smallest MMA tile Triton accepts); caps keep register use bounded on
A100 (sm80) as well as H100.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

# Largest block of an elementwise kernel (elements per program). 4096 fp32 in 8 warps is 16 per thread: wide enough
# for 16-byte vector loads of every dtype without spilling.
MAX_ELEMENTWISE_BLOCK = 4096
# Smallest extent tl.dot accepts on each of M, N and K.
MIN_DOT_BLOCK = 16


def cdiv(a: int, b: int) -> int:
    """Ceiling division of Python ints. Launchers use this, not ``triton.cdiv``: in Triton 3.x that is a constexpr
    function whose Python-side call unwraps its arguments, several microseconds per call, and the launchers make
    about twenty such calls per forward + backward."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``); a plain-Python ``triton.next_power_of_2``."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def is_interpreter() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``), where autotuning is switched off."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _interpreter_probe_kernel(out_ptr, n):
    total = 0
    for i in range(n):  # a loop bound read from a scalar argument, as every kernel here has
        total += i
    tl.store(out_ptr, total)


def check_interpreter() -> None:
    """Under the CPU interpreter, run one tiny kernel; RuntimeError naming the versions if this Triton's interpreter
    cannot run kernels with the installed numpy. Triton <= 3.6 converts one-element arrays to loop bounds with
    ``int()``, which numpy >= 2.4 refuses (triton-lang/triton#9171): every kernel here then fails at its first loop."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _interpreter_probe_kernel[(1,)](out, 3)
    except Exception as exc:  # the interpreter wraps the numpy error in its own InterpreterError
        import numpy

        raise RuntimeError(
            f"Triton {triton.__version__}'s CPU interpreter cannot run kernels with numpy {numpy.__version__} "
            f"({type(exc).__name__}: {exc}); with Triton <= 3.6 use numpy < 2.4 (triton-lang/triton#9171), or a "
            "newer Triton"
        ) from exc
    if int(out[0]) != 3:
        raise RuntimeError(f"Triton {triton.__version__}'s CPU interpreter computed {int(out[0])} for 0+1+2")


def block_size(n: int, cap: int, floor: int = MIN_DOT_BLOCK) -> int:
    """Next power of two of ``n``, clamped to ``[floor, cap]`` (both powers of two)."""
    return max(floor, min(cap, next_power_of_2(max(int(n), 1))))


def num_warps(tile_elements: int) -> int:
    """Warps for a program that holds ``tile_elements`` fp32 values live: about 32 per thread, 1 to 8 warps.

    Never more than 8: 16 or 32 warps hurt occupancy on sm80 and are not portable (Liger removed its hard-coded 32).
    """
    warps = next_power_of_2(max(1, tile_elements // (32 * 32)))
    return max(1, min(8, warps))


def elementwise_settings(n: int) -> tuple:
    """``(BLOCK, num_warps)`` for a 1-D streaming kernel over ``n`` elements."""
    block = block_size(n, MAX_ELEMENTWISE_BLOCK, floor=128)
    return block, num_warps(block * 4)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``: float32 inputs use TF32 only when torch itself would (matmul precision
    "high"/"medium"), so the fp32 kernels match eager fp32 matmuls; fp16/bf16 ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def autotune_configs(configs: List["triton.Config"]) -> List["triton.Config"]:
    """The candidate configs on a GPU, only the first one under the interpreter (autotuning fails there)."""
    return configs[:1] if is_interpreter() else configs


# Triton >= 3.4 can keep each tuned choice in its cache folder (``cache_results``); older versions lack the argument.
_AUTOTUNE_PARAMETERS = inspect.signature(triton.autotune).parameters
_AUTOTUNE_CAN_CACHE = "cache_results" in _AUTOTUNE_PARAMETERS

# Timing of one autotune candidate, in ms. Triton's default (25 ms warm-up, 100 ms of repetitions) is sized for large
# kernels; ours run 5-200 us, so 20 ms is still a hundred or more timed runs each (do_bench flushes the L2 cache
# between runs), and the first call at a new shape tunes ~25 candidates in about a second instead of three.
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 20


def _bench_candidate(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


# (module, kernel name) -> every GPU candidate of a kernel decorated with :func:`autotune`, also under the interpreter
# (which keeps only the first): the tests compile and check each candidate from here.
AUTOTUNE_CANDIDATES: Dict[Tuple[str, str], List["triton.Config"]] = {}


def autotune(configs: List["triton.Config"], key: Sequence[str], prune: Optional[Callable] = None):
    """``triton.autotune`` over ``configs`` (the first one only under the interpreter), with the chosen config kept on
    disk where Triton can: a later process on the same machine (a resumed run, the other DDP ranks once one rank has
    tuned) then runs the same tiles, hence the same float summation order and the same numbers. Ranks that tune at
    the same moment may each choose other tiles (round-off differences only)."""
    kwargs = {"cache_results": True} if _AUTOTUNE_CAN_CACHE else {}
    if "do_bench" in _AUTOTUNE_PARAMETERS:  # Triton >= 3.2; older ones keep their default timing
        kwargs["do_bench"] = _bench_candidate
    if prune is not None:
        kwargs["prune_configs_by"] = {"early_config_prune": prune}
    decorate = triton.autotune(configs=autotune_configs(configs), key=list(key), **kwargs)

    def register(kernel):
        python_fn = kernel.fn  # the @triton.jit function (compiled or interpreted) wraps the Python function
        AUTOTUNE_CANDIDATES[(python_fn.__module__, python_fn.__name__)] = list(configs)
        return decorate(kernel)

    return register


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """Contiguous view or copy: expanded (stride-0) gradients and transposed inputs become dense row-major."""
    return t if t.is_contiguous() else t.contiguous()
