"""torchrun entry for test_ddp: ``cascade-clip`` itself, plus one report of the teardown order.

Just before the process group is destroyed it prints how many DistributedDataParallel objects are still alive. A live
one (its Reducer holds the group) outlives the group and is freed later, as the group's last owner: with gloo on torch
2.11 that destructor deadlocks on the GIL, and the run never exits.
"""

import gc
import sys

import torch

from cascade_clip import cli, distributed

_cleanup = distributed.cleanup


def _reporting_cleanup() -> None:
    alive = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    print(f"DDP objects alive at process-group teardown: {alive}", flush=True)
    _cleanup()


distributed.cleanup = _reporting_cleanup

if __name__ == "__main__":
    sys.exit(cli.main())
