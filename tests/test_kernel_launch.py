"""The launch-settings helpers of ``cascade_clip.kernels.launch`` (plain Python, no kernel runs)."""

import pytest

triton = pytest.importorskip("triton")

from cascade_clip.kernels import launch  # noqa: E402


def test_cdiv_and_next_power_of_2_match_triton():
    # the launchers' plain-Python versions must agree with Triton's (slower) constexpr functions
    for n in range(1, 5000):
        assert launch.next_power_of_2(n) == triton.next_power_of_2(n), n
    for a in range(0, 300):
        for b in range(1, 40):
            assert launch.cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert launch.cdiv(2**40 + 1, 2**20) == 2**20 + 1  # 64-bit sizes stay exact
    assert launch.next_power_of_2(2**33 + 1) == 2**34


def test_block_size_and_warps():
    assert launch.block_size(1, 64) == 16  # the tl.dot floor
    assert launch.block_size(17, 64) == 32
    assert launch.block_size(10_000, 64) == 64  # the cap
    assert launch.block_size(3, 4096, floor=128) == 128
    assert launch.num_warps(1) == 1 and launch.num_warps(64 * 64) == 4 and launch.num_warps(1 << 20) == 8
    block, warps = launch.elementwise_settings(1 << 22)
    assert block == launch.MAX_ELEMENTWISE_BLOCK and warps == 8


def test_autotuned_kernels_time_candidates_briefly():
    """Every autotuned kernel times its candidates with the package's short do_bench (where this Triton takes one),
    not Triton's 125 ms per candidate, and caches its choice on disk (where it can: not under the interpreter)."""
    import inspect

    import triton

    from cascade_clip import ops

    ops.available_backends()  # imports the kernel modules
    from cascade_clip.kernels import descriptor, mask_logits, nga

    tuners = [value for module in (nga, descriptor, mask_logits) for value in vars(module).values()
              if isinstance(value, triton.runtime.autotuner.Autotuner)]
    assert tuners, "no autotuned kernel found"
    params = inspect.signature(triton.autotune).parameters
    for tuner in tuners:
        if "do_bench" in params:
            assert tuner.do_bench is launch._bench_candidate
        if "cache_results" in params and not launch.is_interpreter():
            assert tuner.cache_results


@pytest.mark.skipif(not launch.is_interpreter(), reason="the probe is for Triton's CPU interpreter")
def test_interpreter_probe_runs_and_names_an_unusable_interpreter(monkeypatch):
    launch.check_interpreter()  # this Triton/numpy pair runs kernels: no error

    class BrokenInterpreter:  # as Triton <= 3.6's interpreter fails beside numpy >= 2.4
        def __getitem__(self, grid):
            def launch_kernel(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch_kernel

    monkeypatch.setattr(launch, "_interpreter_probe_kernel", BrokenInterpreter())
    with pytest.raises(RuntimeError, match=r"CPU interpreter cannot run kernels with numpy .*triton-lang/triton#9171"):
        launch.check_interpreter()
