"""The ops ignore ``torch.autocast``: inside an autocast region every backend returns what it returns outside it.

Training runs under bf16 autocast. Before the ops switched autocast off, the C++ backend's internal ATen matmuls were
recast to bf16 under CPU autocast and clashed with its float32 buffers ("expected scalar type Float but found
BFloat16"), and the reference backend silently computed in bf16 while the others computed in the inputs' dtype.

Each case runs on one device under that device's autocast: CPU tensors through the reference and C++ backends (and
Triton where it takes CPU tensors: under its interpreter, on CPU-only machines); CUDA tensors (``gpu``-marked) through
the reference and Triton backends under CUDA autocast, the default GPU training setup.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from cascade_clip import CascadeCLIP, ModelConfig, ops

gpu = pytest.mark.gpu
CASES = [
    pytest.param("cpu", "reference", id="cpu-reference"),
    pytest.param("cpu", "cpp", id="cpu-cpp"),
    *([pytest.param("cpu", "triton", id="cpu-triton")] if os.environ.get("TRITON_INTERPRET") == "1" else []),
    pytest.param("cuda", "reference", marks=gpu, id="cuda-reference"),
    pytest.param("cuda", "triton", marks=gpu, id="cuda-triton"),
]
OPS = ["nga", "descriptor", "mask_logits", "mask_logits_cosine", "loss_sums", "loss_sums_ignore_pixels"]


def _require(backend: str) -> None:
    """Skip, with the load error, a backend this machine lacks (`make test` requires cpp and triton up front)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend not in ops.available_backends():
            pytest.skip(f"{backend} backend unavailable: {ops.unavailable_reason(backend)}")


def _call(op, args, backend):
    if op.startswith("mask_logits"):
        return ops.mask_logits(*args, normalize=op == "mask_logits_cosine", backend=backend)
    if op.startswith("loss_sums"):
        return ops.loss_sums(*args, ignore_pixels=op == "loss_sums_ignore_pixels", backend=backend)
    return getattr(ops, op)(*args, backend=backend)


def _inputs(op, dtype, device):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dt=dtype):  # drawn on the CPU: the same values on every device
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    if op == "nga":
        return rnd(2, 3, 2, 5, 8), rnd(2, 3, dt=torch.float32)
    if op == "descriptor":
        return rnd(5, 16), rnd(2, 16), rnd(3, 16, 32), rnd(3, 16)
    if op.startswith("mask_logits"):
        return rnd(3, 2, 5, 16), rnd(3, 2, 7, 16), rnd(3, dt=torch.float32)
    labels = torch.randint(0, 4, (2, 5, 6), generator=g)
    labels[:, 0] = 255  # ignored pixels: both loss_sums modes differ on them
    return rnd(2, 4, 5, 6) * 3, labels.to(device)


def _run(op, backend, args, device, autocast: bool):
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = _call(op, leaves, backend)
        loss = out.float().pow(2).sum()
    loss.backward()  # outside the region, as PyTorch recommends for autocast
    return out.detach(), [leaf.grad for leaf in leaves if leaf.is_floating_point()]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_op_is_unchanged_by_autocast(op, device, backend, dtype):
    _require(backend)
    args = _inputs(op, dtype, device)
    out, grads = _run(op, backend, args, device, autocast=False)
    out_ac, grads_ac = _run(op, backend, args, device, autocast=True)
    assert out.device.type == device
    assert out_ac.dtype == out.dtype, f"{op}/{backend}: dtype {out_ac.dtype} under autocast, {out.dtype} outside"
    torch.testing.assert_close(out_ac, out, rtol=0, atol=0, msg=f"{op}/{backend}: output changed under autocast")
    for i, (a, b) in enumerate(zip(grads_ac, grads)):
        assert a is not None and b is not None, f"{op}/{backend}: input {i} got no gradient"
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{op}/{backend}: gradient {i} changed under autocast")


@pytest.mark.parametrize("device,backend", CASES)
def test_model_trains_under_bf16_autocast(device, backend):
    _require(backend)
    cfg = ModelConfig.preset("voc", clip_model="cascade-tiny", img_size=32, num_prompt_tokens=2)
    torch.manual_seed(0)
    model = CascadeCLIP(cfg).train().to(device)
    images = torch.randn(2, 3, 32, 32).to(device)
    text = F.normalize(torch.randn(len(cfg.seen), model.embed_dim), dim=-1).to(device)
    labels = torch.randint(0, len(cfg.seen), (2, 32, 32)).to(device)
    ops.set_backend(backend)
    try:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model.loss(model(images, text), labels)["loss"]
        loss.backward()
    finally:
        ops.set_backend("auto")
    assert torch.isfinite(loss)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
