"""A 2-process gloo DDP run (torchrun --nproc_per_node 2) on the CPU equals a single-process run with the same global
batch: same metrics, same weights up to float summation order; and the sharded DDP evaluation is exact."""

import json
import os
import subprocess
import sys

import torch

from cascade_clip import evaluate, train
from cascade_clip.synthetic import write_voc_layout

from test_train import ROOT, SPEC, tiny_overrides


def _eval_record(work_dir):
    records = [json.loads(line) for line in open(os.path.join(work_dir, "metrics.jsonl"))]
    (record,) = [r for r in records if r.get("eval") == "after training"]
    return {k: record[k] for k in ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "aAcc", "per_class")}


def _torchrun_train(overrides, env=None):
    """``cascade-clip train`` under torchrun with 2 gloo processes, through ddp_entry.py (which reports the DDP
    objects alive when the process group is destroyed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_entry.py"),
           "train", "--config", "voc", *sum((["--set", o] for o in overrides), [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def test_two_process_gloo_equals_single_process(tmp_path):
    root = str(tmp_path / "data")
    write_voc_layout(root, SPEC)
    common = ["train.eval_at_end=true", "train.checkpoint_interval=4", "optim.warmup_iters=1"]
    ddp_dir, single_dir = str(tmp_path / "ddp"), str(tmp_path / "single")

    ddp_args = tiny_overrides(root, ddp_dir, iters=4) + common + ["train.batch_size=2"]
    proc = _torchrun_train(ddp_args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu, 4 images/iteration" in proc.stdout
    assert "broadcast_buffers" not in proc.stderr  # torch >= 2.13 deprecates the name; distributed.wrap_ddp avoids it
    # both ranks free the DDP wrapper before the process group (else torch 2.11's gloo hangs at exit)
    assert proc.stdout.count("DDP objects alive at process-group teardown: 0") == 2, proc.stdout[-3000:]

    # One process, batch 4 = the two ranks' batches of 2 together (the sampler interleaves ranks).
    single_args = tiny_overrides(root, single_dir, iters=4) + common + ["train.batch_size=4"]
    train.main(["--config", "voc", *sum((["--set", o] for o in single_args), [])])

    a = torch.load(os.path.join(ddp_dir, "latest.pt"), weights_only=False)["model"]
    b = torch.load(os.path.join(single_dir, "latest.pt"), weights_only=False)["model"]
    for key in a:
        # The key bias of a softmax attention layer has an exactly-zero gradient (softmax ignores a per-query
        # constant); AdamW turns its rounding noise into lr-sized steps, so only a loose bound holds there. The last
        # layer's key bias feeds the mask logits and is compared tightly.
        noise_only = key.endswith("multihead_attn.k.bias") and ".layers.2." not in key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3 if noise_only else 2e-5, msg=key)
    assert _eval_record(ddp_dir) == _eval_record(single_dir)

    # The DDP run's sharded evaluation equals a single-process evaluation of its checkpoint exactly.
    alone = evaluate.main(["--checkpoint", os.path.join(ddp_dir, "latest.pt"), "--data-root", root, "--kernels",
                           "reference", "--num-workers", "0", "--short-side", "32"])
    assert {k: alone[k] for k in _eval_record(ddp_dir)} == _eval_record(ddp_dir)


def test_a_rank_failing_inside_the_ddp_forward_exits(tmp_path):
    # the error's traceback holds DDP.forward's frame (its self); unless train clears it, the DDP outlives the group,
    # and torch 2.11's gloo hangs at exit instead of letting torchrun report the failure
    root = str(tmp_path / "data")
    write_voc_layout(root, SPEC)
    overrides = tiny_overrides(root, str(tmp_path / "ddp"), iters=3) + ["train.batch_size=2"]
    proc = _torchrun_train(overrides, env={"DDP_ENTRY_FAIL_AT": "2"})
    assert proc.returncode != 0
    assert "injected failure inside the DDP forward" in proc.stdout + proc.stderr
    assert proc.stdout.count("DDP objects alive at process-group teardown: 0") == 2, proc.stdout[-3000:]
