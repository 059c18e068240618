"""Compile recorded Triton launches for a GPU architecture, on a machine without one (used by test_kernels_compile).

    python tests/compile_kernels_for_gpu.py JOBS.json RESULTS.json

Each job names a kernel (module and attribute), its signature (``"*bf16"``, ``"i32"``, ``"constexpr"``...), the
constexpr values, launch options and a compute capability. Every job is compiled with ``triton.compile`` down to a
cubin for that target (Triton ships its own ``ptxas``), which runs the whole front end and the NVIDIA back end: it
catches what the CPU interpreter accepts but the compiler does not (plain Python globals in ``@jit`` code, dot shapes,
dtype rules). Must run without ``TRITON_INTERPRET``: the interpreter patches ``triton.language`` for its own use.
RESULTS.json gets one ``{"job": i, "ok": bool, "error": str, "shared": bytes}`` per job (``shared``: the kernel's
shared memory, which only a GPU checks against its limit when it loads the kernel), or ``{"unavailable": reason}``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def _jit_function(module: str, name: str):
    import triton

    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # unwrap @triton.autotune / @triton.heuristics
        fn = fn.fn
    return fn


def main(argv) -> int:
    jobs_path, results_path = argv
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with open(jobs_path) as f:
        jobs = json.load(f)
    results = []
    for i, job in enumerate(jobs):
        try:
            fn = _jit_function(job["module"], job["name"])
            constexprs = {name: triton.language.dtype(value["tl_dtype"]) if isinstance(value, dict) else value
                          for name, value in job["constexprs"].items()}
            source = ASTSource(fn, job["signature"], constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", job["capability"], 32), options=job["options"])
            results.append({"job": i, "ok": True, "error": "", "shared": int(compiled.metadata.shared)})
        except Exception as exc:  # reported per job by the test
            message = f"{type(exc).__name__}: {exc}"
            if i == 0 and "ptxas" in message.lower() and "not found" in message.lower():
                results = {"unavailable": message}
                break
            results.append({"job": i, "ok": False, "error": message[-3000:], "shared": 0})
    tmp = results_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, results_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
