"""The ops ignore ``torch.autocast``: inside an autocast region every backend returns what it returns outside it.

Training runs under bf16 autocast. Before the ops switched autocast off, the C++ backend's internal ATen matmuls were
recast to bf16 under CPU autocast and clashed with its float32 buffers ("expected scalar type Float but found
BFloat16"), and the reference backend silently computed in bf16 while the others computed in the inputs' dtype.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from cascade_clip import CascadeCLIP, ModelConfig, ops

# CPU tensors: the triton backend takes them only under Triton's interpreter (CPU-only machines)
BACKENDS = [b for b in ("reference", "cpp", "triton") if b in ops.available_backends()
            and (b != "triton" or os.environ.get("TRITON_INTERPRET") == "1")]


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt).requires_grad_(True)

    return {
        "nga": (rnd(2, 3, 2, 5, 8), rnd(2, 3, dt=torch.float32)),
        "descriptor": (rnd(5, 16), rnd(2, 16), rnd(3, 16, 32), rnd(3, 16)),
        "mask_logits": (rnd(3, 2, 5, 16), rnd(3, 2, 7, 16), rnd(3, dt=torch.float32)),
    }


def _run(op, backend, args, autocast: bool):
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = getattr(ops, op)(*leaves, backend=backend)
        loss = out.float().pow(2).sum()
    loss.backward()  # outside the region, as PyTorch recommends for autocast
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["nga", "descriptor", "mask_logits"])
def test_op_is_unchanged_by_autocast(op, backend, dtype):
    args = _inputs(dtype)[op]
    out, grads = _run(op, backend, args, autocast=False)
    out_ac, grads_ac = _run(op, backend, args, autocast=True)
    assert out_ac.dtype == out.dtype, f"{op}/{backend}: dtype {out_ac.dtype} under autocast, {out.dtype} outside"
    torch.testing.assert_close(out_ac, out, rtol=0, atol=0, msg=f"{op}/{backend}: output changed under autocast")
    for i, (a, b) in enumerate(zip(grads_ac, grads)):
        assert a is not None and b is not None, f"{op}/{backend}: input {i} got no gradient"
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{op}/{backend}: gradient {i} changed under autocast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_trains_under_bf16_autocast(backend):
    cfg = ModelConfig.preset("voc", clip_model="cascade-tiny", img_size=32, num_prompt_tokens=2)
    torch.manual_seed(0)
    model = CascadeCLIP(cfg).train()
    images = torch.randn(2, 3, 32, 32)
    text = F.normalize(torch.randn(len(cfg.seen), model.embed_dim), dim=-1)
    labels = torch.randint(0, len(cfg.seen), (2, 32, 32))
    ops.set_backend(backend)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(model(images, text), labels)["loss"]
        loss.backward()
    finally:
        ops.set_backend("auto")
    assert torch.isfinite(loss)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
