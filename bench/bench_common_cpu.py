"""Shared setup of the CPU benchmark: inputs at the VOC training shapes and the providers to compare.

Used by ``bench/bench_cpu.py`` (the CSV/RESULTS.md script) and ``bench/test_bench_cpu.py`` (pytest-benchmark), so both
time exactly the same calls.

Shapes (VOC training: B=2 images, 32x32 grid -> N=1024 tokens, width D=512, C=15 classes):

* ``nga``:         feats ``(S=2, K=3, B=2, N=1024, D=512)``, weights ``(2, 3)``
* ``descriptor``:  text ``(C=15, d=512)``, g ``(B=2, 512)``, weight ``(S=3, e=512, 1024)``, bias ``(3, 512)``
* ``mask_logits``: q ``(S=3, B=2, C=15, d=512)``, k ``(3, 2, N=1024, 512)``, heads=8 -> scale ``64**-0.5 / 8``
* ``loss``:        the training loss (focal x100 + dice) of upsampled mask logits ``(B=2, C=15, 512, 512)`` and labels
  ``(2, 512, 512)`` with 10% ignore pixels; ``reference`` and ``cpp`` are ``cascade_clip.loss.segmentation_loss`` on
  that backend's ``ops.loss_sums``

Providers: ``eager`` (the official formulation, ``bench/official_ops.py``), ``compile`` (``torch.compile`` of it),
``reference`` (our reference backend) and ``cpp`` (the C++ extension), each in mode ``fwd`` (inference, no autograd)
and ``fwd+bwd`` (forward, then backward of a fixed random output gradient into every input).

``eager`` and ``compile`` get the inputs as the official head holds them: every tap, every stage's q and k and every
stage's parameters as separate tensors, with per-stage outputs (the ``*_stages`` functions of ``official_ops``).
Slicing the stacked tensors of the ``cascade_clip.ops`` API instead would charge the baseline a zero-filled gradient
of the whole stacked tensor per slice in the backward (the rows of ``results_cpu.csv`` before commit 608de6b did that).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_ops  # noqa: E402  (bench/ is not a package)

from cascade_clip import ops  # noqa: E402

HEADS = 8
LOSS_SIDE = 512  # the loss runs on the mask logits upsampled to the 512 x 512 training crop
OPS = ("nga", "descriptor", "mask_logits", "loss")
PROVIDERS = ("eager", "compile", "reference", "cpp")
MODES = ("fwd", "fwd+bwd")


@dataclass
class Case:
    """One op at one shape: ``inputs`` are the tensor arguments, ``grad`` the output gradient used by fwd+bwd."""

    op: str
    shape: str
    inputs: Tuple[torch.Tensor, ...]
    grad: torch.Tensor
    extra: dict


def make_case(op: str, dtype: torch.dtype = torch.float32, requires_grad: bool = False, seed: int = 0) -> Case:
    """Inputs of ``op`` at the VOC training shapes (float32 by default)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_(requires_grad)

    if op == "nga":
        S, K, B, N, D = 2, 3, 2, 1024, 512
        weights = torch.softmax(torch.randn(S, K, generator=gen), dim=1).requires_grad_(requires_grad)
        inputs = (rand(S, K, B, N, D), weights)
        out_shape, shape = (S, B, N, D), f"S={S} K={K} B={B} N={N} D={D}"
        extra = {}
    elif op == "descriptor":
        S, C, B, d, e = 3, 15, 2, 512, 512
        inputs = (rand(C, d), rand(B, d), rand(S, e, 2 * d, scale=(2 * d) ** -0.5), rand(S, e, scale=0.02))
        out_shape, shape = (S, B, C, e), f"S={S} C={C} B={B} d={d} e={e}"
        extra = {}
    elif op == "mask_logits":
        S, B, C, N, d = 3, 2, 15, 1024, 512
        inputs = (rand(S, B, C, d), rand(S, B, N, d))
        out_shape, shape = (B, C, N), f"S={S} B={B} C={C} N={N} d={d} heads={HEADS}"
        extra = {"heads": HEADS, "scale": (d // HEADS) ** -0.5 / HEADS}
    elif op == "loss":
        B, C, side = 2, 15, LOSS_SIDE
        labels = torch.randint(0, C, (B, side, side), generator=gen)
        labels[torch.rand(B, side, side, generator=gen) < 0.1] = 255
        inputs = (rand(B, C, side, side, scale=3.0), labels)
        out_shape, shape = (), f"B={B} C={C} H=W={side}"
        extra = {}
    else:
        raise ValueError(f"unknown op {op!r}")
    grad = torch.randn(out_shape, generator=gen).to(dtype)
    return Case(op, shape, inputs, grad, extra)


_compiled: Dict[str, Callable] = {}


def official_layout(case: Case, requires_grad: bool) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``(inputs, output gradients)`` as the official head has them: ``official_ops.split_stacked`` of the case's
    inputs and one gradient per official output."""
    if case.op == "loss":  # one scalar output; the logits come as the loss gets them
        return list(case.inputs), [case.grad]
    inputs = official_ops.split_stacked(case.op, case.inputs, requires_grad)
    return inputs, ([case.grad] if case.op == "mask_logits" else list(case.grad))


def official_fn(case: Case) -> Callable[..., List[torch.Tensor]]:
    """The official formulation over :func:`official_layout`'s inputs (flat arguments), returning a list."""
    if case.op == "loss":
        return lambda logits, labels: [official_ops.seg_loss(logits, labels)]
    if case.op == "mask_logits":
        return official_ops.flat_stages_fn("mask_logits", case.inputs[0].shape[0], heads=case.extra["heads"])
    if case.op == "nga":
        stages, taps = case.inputs[1].shape
        return official_ops.flat_stages_fn("nga", stages, taps=taps)
    return official_ops.flat_stages_fn("descriptor", case.inputs[2].shape[0])


def provider_fn(op: str, provider: str, case: Case) -> Callable[..., torch.Tensor]:
    """A function of the case's input tensors computing ``op`` with ``provider`` (``eager`` and ``compile``: of the
    inputs of :func:`official_layout`, returning a list of outputs)."""
    if provider in ("eager", "compile"):
        fn = official_fn(case)
        if provider == "compile":
            if op not in _compiled:
                _compiled[op] = torch.compile(fn)
            fn = _compiled[op]
        return fn
    if provider in ("reference", "cpp"):
        if op == "loss":
            from cascade_clip.loss import segmentation_loss

            # labels are valid by construction; the check (a full pass over them) is the same for every provider
            return lambda x, y: segmentation_loss(x, y, backend=provider, validate_labels=False)["loss"]
        if op == "mask_logits":
            scale = case.extra["scale"]

            def fn(q, k):
                return ops.mask_logits(q, k, scale, backend=provider)

            return fn
        op_fn = getattr(ops, op)
        return lambda *args: op_fn(*args, backend=provider)
    raise ValueError(f"unknown provider {provider!r}")


def available_providers() -> List[str]:
    """The providers this process can run (``cpp`` needs the built extension)."""
    return [p for p in PROVIDERS if p != "cpp" or "cpp" in ops.available_backends()]


def make_step(op: str, provider: str, mode: str, dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """A zero-argument callable that runs one timed iteration of ``op``/``provider``/``mode``."""
    case = make_case(op, dtype, requires_grad=(mode == "fwd+bwd"))
    fn = provider_fn(op, provider, case)
    if provider in ("eager", "compile"):
        inputs, grads = official_layout(case, requires_grad=(mode == "fwd+bwd"))
    else:
        inputs, grads = case.inputs, [case.grad]
    def clear_grads():
        for t in inputs:
            if t.is_floating_point():
                t.grad = None

    if mode == "fwd":

        def step():
            with torch.no_grad():
                fn(*inputs)

    elif mode == "fwd+bwd":

        def step():
            clear_grads()
            out = fn(*inputs)
            torch.autograd.backward(out if isinstance(out, list) else [out], grads)

    else:
        raise ValueError(f"unknown mode {mode!r}")
    # the memory passes call this first, so that a step's peak counts the gradients it returns (a timed step frees the
    # previous step's gradients as it starts, which would offset them)
    step.clear_grads = clear_grads
    return step


def case_shape(op: str) -> str:
    return make_case(op).shape
