"""Convergence check, as kernel projects do: two short training runs from one seed, reference ops vs the fused backend
of this machine (C++ on CPU, Triton on GPU); the per-step losses must agree.

Tolerance: relative 1e-4 per step. The fused kernels sum in another order than PyTorch (fp32 rounding, ~1e-7
relative per op); over 10 AdamW steps that drift stays orders of magnitude below 1e-4, while a wrong gradient in any
kernel changes the losses from the second step on by far more.
"""

import pytest
import torch

from cascade_clip import ops, train
from cascade_clip.synthetic import write_voc_layout

from test_train import SPEC, tiny_overrides

FUSED = "triton" if torch.cuda.is_available() else "cpp"
RTOL = 1e-4


@pytest.mark.skipif(FUSED not in ops.available_backends(), reason=f"{FUSED} backend not available: {ops.unavailable_reason(FUSED)}")
def test_reference_and_fused_losses_agree(tmp_path):
    root = str(tmp_path / "data")
    write_voc_layout(root, SPEC)
    losses = {}
    for backend in ("reference", FUSED):
        overrides = tiny_overrides(root, str(tmp_path / backend), iters=10) + [
            f"train.kernels={backend}", "train.precision=fp32", "train.checkpoint_interval=10",
            "optim.warmup_iters=2",  # real steps from the start, so the backends' gradients matter
        ]
        result = train.main(["--config", "voc", *sum((["--set", o] for o in overrides), [])])
        losses[backend] = torch.tensor([loss for _, loss in result["losses"]], dtype=torch.float64)
    ops.set_backend("auto")
    ref, fused = losses["reference"], losses[FUSED]
    assert len(ref) == 10
    assert not torch.equal(ref[:1].repeat(10), ref)  # the runs do train
    rel = ((ref - fused).abs() / ref.abs()).max().item()
    assert rel < RTOL, f"per-step losses differ by {rel:.2e} (relative); reference {ref.tolist()} vs {FUSED} {fused.tolist()}"
