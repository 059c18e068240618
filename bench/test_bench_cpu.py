"""pytest-benchmark cases of the CPU benchmark: ``pytest bench --benchmark-only``.

Same inputs and providers as ``bench/bench_cpu.py`` (both come from ``bench_common_cpu.py``); the script is the one
that writes ``results_cpu.csv`` and the RESULTS.md table.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common_cpu as common  # noqa: E402


@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("provider", common.PROVIDERS)
@pytest.mark.parametrize("op", common.OPS)
def test_cpu_op(benchmark, op, provider, mode):
    if provider not in common.available_providers():
        pytest.skip(f"provider {provider!r} unavailable (cpp needs the built extension)")
    step = common.make_step(op, provider, mode)
    step()  # warm-up outside the timing (compiles the torch.compile provider)
    benchmark.group = f"{op} {mode} ({common.case_shape(op)})"
    benchmark(step)
