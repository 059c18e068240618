"""torchrun entry for test_ddp: ``cascade-clip`` itself, plus one report of the teardown order.

Just before the process group is destroyed it prints how many DistributedDataParallel objects are still alive. A live
one (its Reducer holds the group) outlives the group and is freed later, as the group's last owner: with gloo on torch
2.11 that destructor deadlocks on the GIL, and the run never exits. ``DDP_ENTRY_FAIL_AT`` makes a run fail mid-step.
"""

import gc
import os
import sys

import torch

from cascade_clip import cli, distributed

_cleanup = distributed.cleanup


def _reporting_cleanup() -> None:
    alive = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    print(f"DDP objects alive at process-group teardown: {alive}", flush=True)
    _cleanup()


distributed.cleanup = _reporting_cleanup

# DDP_ENTRY_FAIL_AT=N: the model's N-th training forward raises, inside DDP's forward (a rank that fails mid-step)
_fail_at = int(os.environ.get("DDP_ENTRY_FAIL_AT", "0"))
if _fail_at:
    from cascade_clip.model import CascadeCLIP

    _forward = CascadeCLIP.forward
    _calls = [0]

    def _failing_forward(self, *args, **kwargs):
        if self.training:
            _calls[0] += 1
            if _calls[0] == _fail_at:
                raise RuntimeError("injected failure inside the DDP forward")
        return _forward(self, *args, **kwargs)

    CascadeCLIP.forward = _failing_forward

if __name__ == "__main__":
    sys.exit(cli.main())
