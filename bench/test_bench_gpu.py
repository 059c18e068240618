"""The GPU benchmark cases of ``bench/bench_gpu.py`` as pytest-benchmark tests (skipped without CUDA).

    pytest bench/test_bench_gpu.py --benchmark-only --benchmark-save=h100
    pytest bench/test_bench_gpu.py --benchmark-only --benchmark-compare

The cases, inputs and callables come from ``bench_common_gpu`` (the same as the script). The torch.compile provider
runs at B=8 only, as in the script (every shape is a fresh compile). Each test synchronises the device inside the
timed call so pytest-benchmark's wall clock measures the GPU work.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the GPU kernel benchmarks need a CUDA device", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common_gpu as common  # noqa: E402

CASES = common.cases()
PARAMS = [
    pytest.param(case, provider, mode, id=f"{case.id}-{provider}-{mode}")
    for case in CASES
    for provider in common.PROVIDERS
    if provider != "compile" or case.B == 8
    for mode in common.MODES
]


@pytest.mark.gpu
@pytest.mark.parametrize("case,provider,mode", PARAMS)
def test_bench(benchmark, case, provider, mode):
    fn, inputs = common.runner(case, provider, mode, "cuda")
    fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()

    def timed():
        for t in inputs:
            t.grad = None
        fn()
        torch.cuda.synchronize()

    nbytes, flops = common.work(case, mode)
    benchmark.extra_info.update(op=case.op, variant=case.variant, shape=case.shape, dtype=case.dtype,
                                provider=provider, mode=mode, bytes=nbytes, flops=flops)
    benchmark.pedantic(timed, rounds=20, iterations=5, warmup_rounds=2)
