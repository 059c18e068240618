"""Host (Python) time of the ``triton`` backend's call path, with the kernels themselves not launched.

    python bench/host_overhead.py            # CPU is enough: Triton's interpreter is patched to skip kernel bodies

Small head ops are host-bound in an eager training step (see RESULTS.md), so the Python between ``cascade_clip.ops``
and the kernel launch matters. This measures it on CPU tensors, side by side in one run: a call through
``cascade_clip.ops`` (validation, backend resolution, then the eager path), the backend's eager path alone (an
``autograd.Function`` over the launchers) and its custom op alone (``torch.library.custom_op`` dispatch over the same
launchers, what ``torch.compile`` calls), forward and forward+backward, bf16, small shapes. Triton's own launch cost (argument binding, driver call) is not included: it needs a GPU.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before cascade_clip.kernels is imported

import torch  # noqa: E402

from cascade_clip import ops  # noqa: E402


def _skip_kernel_bodies() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    InterpretedFunction.run = lambda self, *args, grid, warmup, **kwargs: None


def _time_us(fn, calls: int = 300, rounds: int = 7) -> float:
    for _ in range(20):
        fn()
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_round.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(per_round)


def main() -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options; --help explains
    _skip_kernel_bodies()
    ops.available_backends()
    from cascade_clip.kernels import descriptor as d, mask_logits as m, nga as n

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    f, w = rnd(3, 3, 2, 32, 64), rnd(3, 3, dtype=torch.float32)
    text, gv, weight, bias = rnd(15, 64), rnd(2, 64), rnd(3, 64, 128), rnd(3, 64)
    q, k, scale = rnd(3, 2, 15, 64), rnd(3, 2, 32, 64), rnd(3, dtype=torch.float32)
    paths = {  # (through cascade_clip.ops, the backend's eager entry point, the custom op)
        "nga": (lambda: ops.nga(f, w, backend="triton"), lambda: n.nga(f, w), lambda: n.nga_op(f, w)),
        "descriptor": (lambda: ops.descriptor(text, gv, weight, bias, backend="triton"),
                       lambda: d.descriptor(text, gv, weight, bias), lambda: d.descriptor_op(text, gv, weight, bias)),
        "mask_logits": (lambda: ops.mask_logits(q, k, scale, backend="triton"),
                        lambda: m.mask_logits(q, k, scale, False), lambda: m.mask_logits_op(q, k, scale, False)),
    }
    print(f"# host time per call (us), kernels not launched; torch {torch.__version__}")
    print(f"{'op':12s} {'mode':8s} {'via ops.*':>10s} {'eager path':>11s} {'custom op':>10s} {'custom/eager':>13s}")
    for name, fns in paths.items():
        cot = torch.ones_like(fns[0]())
        for mode in ("fwd", "fwd+bwd"):
            times = []
            for fn in fns:
                if mode == "fwd":
                    def call(fn=fn):
                        with torch.no_grad():
                            fn()
                else:
                    def call(fn=fn):
                        fn().backward(cot)
                times.append(_time_us(call))
            print(f"{name:12s} {mode:8s} {times[0]:10.1f} {times[1]:11.1f} {times[2]:10.1f} {times[2] / times[1]:12.2f}x",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
