"""Every Triton kernel, as the launchers launch it, compiles for the GPUs we target (sm80 A100, sm90 H100/H200).

Runs on the CPU. The CPU interpreter executes kernels as Python, so it accepts code the real compiler refuses (a
plain Python float global inside ``@jit`` code passed every interpreter test here and failed on the first H200 run).
This test records each launch the ops make (forward and backward, ``normalize`` both ways; the dtypes, shapes
and targets of ``PLAN``) without running the kernels, adds every GPU autotune config of the autotuned forward, and
compiles each distinct launch to a cubin in a child process without ``TRITON_INTERPRET``
(``compile_kernels_for_gpu.py``). Whether the kernels are *correct* is
test_ops_triton's job; this one makes a GPU session's first run a measurement instead of a compile-error hunt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

triton = pytest.importorskip("triton")

from cascade_clip import ops  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CAPABILITIES = (80, 90)
TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
              torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas")

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="records launches through the CPU interpreter; on a GPU the gpu tests compile and run every kernel",
)


@contextmanager
def recorded_launches():
    """Patch the interpreter so a kernel launch is recorded instead of run; yields the list of launches.

    Every interpreted launch ends in ``GridExecutor.__call__`` on the kernel's rewritten function (Triton 3.5 builds
    ``run`` per instance, 3.6+ on the class), which ``InterpretedFunction.rewritten_fn`` maps back to the kernel."""
    from triton.runtime.interpreter import GridExecutor, InterpretedFunction

    ops.available_backends()  # the backend's load-time probe kernel must run, not be recorded
    launches = []
    original = GridExecutor.__call__

    def record(self, *args, **kwargs):
        kernels = [fn for fn, rewritten in InterpretedFunction.rewritten_fn.items() if rewritten is self.fn]
        assert len(kernels) == 1, f"launch of an unknown function {self.fn!r}"
        launches.append((kernels[0], args, kwargs))

    GridExecutor.__call__ = record
    try:
        yield launches
    finally:
        GridExecutor.__call__ = original


def _not_specialized(fn):
    """Names and indices of ``fn``'s parameters marked ``do_not_specialize`` (kept by the interpreter's wrapper)."""
    obj = getattr(sys.modules[fn.__module__], fn.__name__)
    while type(obj).__name__ != "InterpretedFunction" and hasattr(obj, "fn"):  # unwrap autotune
        obj = obj.fn
    return set(getattr(obj, "kwargs", {}).get("do_not_specialize") or ())


def _signature(fn, args, kwargs):
    """``(signature, constexprs, options)`` of one launch, in ``triton.compile``'s terms."""
    from triton.runtime.jit import JITFunction

    jit = JITFunction(fn)  # the interpreter's wrapper has no parameter metadata
    bound = dict(zip(jit.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in jit.arg_names})
    not_specialized = _not_specialized(fn)
    signature, constexprs = {}, {}
    for index, param in enumerate(jit.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            # a dtype constexpr (the descriptor's OPERAND) travels to the compile child by name
            constexprs[param.name] = {"tl_dtype": str(value)} if type(value).__name__ == "dtype" else value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TYPE_NAMES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int) and value == 1 and not {param.name, index} & not_specialized:
            # as on a GPU: Triton compiles an integer argument equal to 1 as the constant 1 (a variant of its own,
            # e.g. B = 1 or a one-block segment), so that variant must compile too
            signature[param.name] = "constexpr"
            constexprs[param.name] = 1
        elif isinstance(value, int):
            signature[param.name] = "i64" if not -2**31 <= value < 2**31 else "i32"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {param.name} has unsupported type {type(value).__name__}")
    options = {k: v for k, v in kwargs.items() if k in OPTION_NAMES and v is not None}
    return signature, constexprs, options


SMALL, REAL = "small", "real"


def _run_all_ops(dtype: torch.dtype, shapes: str):
    """Forward + backward of every op, at small odd shapes (the smallest tiles) or the paper's shapes (the largest)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=dtype):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)

    nga_shapes = ((3, 3, 2, 5, 7),) if shapes == SMALL else ((3, 3, 2, 1024, 512),)
    descriptor_shapes = ((5, 16, 2),) if shapes == SMALL else ((15, 512, 2), (171, 512, 8))
    mask_shapes = ((5, 7, 16),) if shapes == SMALL else ((15, 1024, 512), (171, 1024, 512), (20, 4099, 64))
    for S, K, B, N, D in nga_shapes:
        ops.nga(rnd(S, K, B, N, D), rnd(S, K, dtype=torch.float32), backend="triton").sum().backward()
    for C, d, B in descriptor_shapes:
        out = ops.descriptor(rnd(C, d), rnd(B, d), rnd(3, d, 2 * d), rnd(3, d), backend="triton")
        out.sum().backward()
    for C, N, d in mask_shapes:
        for normalize in (False, True):
            ops.mask_logits(rnd(3, 2, C, d), rnd(3, 2, N, d), 0.125, normalize=normalize, backend="triton").sum().backward()
    # the loss sums: labels as the data pipeline gives them (int64) and as uint8 masks
    loss_shapes = ((2, 3, 5, 7),) if shapes == SMALL else ((2, 15, 512, 512), (1, 171, 64, 64))
    for (B, C, H, W), label_dtype in zip(loss_shapes * 2, (torch.int64,) * len(loss_shapes) + (torch.uint8,)):
        labels = torch.randint(0, C, (B, H, W), generator=g).to(label_dtype)
        for ignore_pixels in (False, True):
            ops.loss_sums(rnd(B, C, H, W), labels, ignore_pixels=ignore_pixels, backend="triton").sum().backward()


# (dtype, fp32 matmul precision, shapes, capabilities, with every GPU autotune config). Chosen to cover each code
# path once and keep the test near a minute on two cores: bf16 is the training dtype and has the most lowering rules;
# fp16 mostly takes bf16's path with another element type, but the descriptor feeds its dots float32 operands there
# (TF32 dots beside float16 loads), so fp16 compiles at the smallest tiles; fp32 dots as IEEE at the smallest tiles
# and as TF32 at the paper's shapes; sm80 (mma v2) and sm90 (wgmma) lower dots differently, so both see the paper
# shapes with every autotune candidate, in bf16 and in fp32 (whose tiles take twice the shared memory).
PLAN = (
    (torch.bfloat16, "highest", REAL, (80, 90), True),
    (torch.bfloat16, "highest", SMALL, (90,), False),
    (torch.float16, "highest", SMALL, (80, 90), False),
    (torch.float32, "highest", SMALL, (80, 90), False),
    (torch.float32, "high", REAL, (80, 90), True),
)


def _gpu_autotune_configs():
    """The full GPU config list of each autotuned kernel, by kernel name (the interpreter's autotuner holds only the
    first; ``launch.autotune`` records them all)."""
    from cascade_clip.kernels import launch

    ops.available_backends()  # imports the kernel modules, which registers their candidates
    return {name: configs for (_, name), configs in launch.AUTOTUNE_CANDIDATES.items()}


def collect_jobs():
    jobs, seen = [], set()
    autotuned = _gpu_autotune_configs()

    def add(fn, signature, constexprs, options, capabilities):
        for capability in capabilities:
            job = {"module": fn.__module__, "name": fn.__name__, "signature": signature, "constexprs": constexprs,
                   "options": options, "capability": capability}
            key = json.dumps(job, sort_keys=True)
            if key not in seen:
                seen.add(key)
                jobs.append(job)

    previous = torch.get_float32_matmul_precision()
    try:
        for dtype, precision, shapes, capabilities, all_configs in PLAN:
            torch.set_float32_matmul_precision(precision)
            with recorded_launches() as launches:
                _run_all_ops(dtype, shapes)
            assert launches, "no kernel launch was recorded: is the triton backend routed through the interpreter?"
            for fn, args, kwargs in launches:
                signature, constexprs, options = _signature(fn, args, kwargs)
                add(fn, signature, constexprs, options, capabilities)
                for config in autotuned.get(fn.__name__, ()) if all_configs else ():
                    # the launch with this config's values, classified as the launch's own (a runtime argument a
                    # config sets, the descriptor's IMAGE_GROUPS, stays a runtime argument)
                    signature, constexprs, _ = _signature(fn, args, {**kwargs, **config.kwargs})
                    add(fn, signature, constexprs,
                        {"num_warps": config.num_warps, "num_stages": config.num_stages}, capabilities)
    finally:
        torch.set_float32_matmul_precision(previous)
    return jobs


# Shared memory a block may use (opt-in maximum): A100 (sm80) 163 KiB, H100/H200 (sm90) 227 KiB.
SHARED_MEMORY_LIMITS = {80: 166912, 90: 232448}


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    jobs = collect_jobs()
    names = {job["name"] for job in jobs}
    # every kernel of the package is exercised (a new kernel that no op launches would be missed silently); the
    # other @jit functions are device helpers, compiled inside the kernels that call them
    from cascade_clip.kernels import descriptor, loss_sums, mask_logits, nga

    defined = {
        name for module in (nga, descriptor, mask_logits, loss_sums) for name, value in vars(module).items()
        if (isinstance(value, (triton.runtime.jit.JITFunction, triton.runtime.autotuner.Autotuner))
            or type(value).__name__ == "InterpretedFunction") and name.endswith("_kernel")
    }
    assert defined and defined <= names, f"kernels never launched by the recorded ops: {sorted(defined - names)}"

    # compile in two child processes (the CI machine has two cores), jobs split round-robin
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = 2
    children = []
    for w in range(workers):
        jobs_path, results_path = tmp_path / f"jobs{w}.json", tmp_path / f"results{w}.json"
        jobs_path.write_text(json.dumps(jobs[w::workers]))
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "compile_kernels_for_gpu.py"), str(jobs_path),
                                 str(results_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        children.append((proc, results_path))
    failures = []
    for w, (proc, results_path) in enumerate(children):
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"compile child {w} failed:\n{out[-2000:]}\n{err[-4000:]}"
        results = json.loads(results_path.read_text())
        if isinstance(results, dict):
            pytest.skip(f"no ptxas for an offline compile: {results['unavailable']}")
        mine = jobs[w::workers]
        assert len(results) == len(mine)
        failures += [
            f"{mine[r['job']]['name']} sm{mine[r['job']]['capability']} {mine[r['job']]['signature']} "
            f"{mine[r['job']]['constexprs']} {mine[r['job']]['options']}:\n{r['error']}"
            for r in results if not r["ok"]
        ]
        # a launch that compiles can still fail to load: every candidate must fit the smallest card of its arch
        failures += [
            f"{mine[r['job']]['name']} sm{mine[r['job']]['capability']} {mine[r['job']]['signature']} "
            f"{mine[r['job']]['constexprs']} {mine[r['job']]['options']}:\nneeds {r['shared']} bytes of shared "
            f"memory, sm{mine[r['job']]['capability']} allows {SHARED_MEMORY_LIMITS[mine[r['job']]['capability']]}"
            for r in results if r["ok"] and r["shared"] > SHARED_MEMORY_LIMITS[mine[r["job"]]["capability"]]
        ]
    assert not failures, f"{len(failures)}/{len(jobs)} launches do not compile:\n\n" + "\n\n".join(failures[:5])
