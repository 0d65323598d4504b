"""Run under torchrun with 2 ranks: rank 1 is stuck (sleeps), rank 0 sums a tensor over the ranks.

``python collective_timeout_probe.py TIMEOUT_S``: rank 0's all_reduce must end after TIMEOUT_S
seconds with fusiontrain's CollectiveError (the process exits non-zero and the traceback holds
its message), not hang.
"""

from __future__ import annotations

import sys
import time

import torch

from fusiontrain.parallel import distributed


def main() -> None:
    context = distributed.init_distributed(timeout_s=float(sys.argv[1]))
    try:
        if context.rank == 1:
            time.sleep(300)  # stuck; torchrun ends it once rank 0 has failed
        started = time.monotonic()
        try:
            distributed.all_reduce_sum(torch.ones(1), "the probe's value")
        finally:
            print(f"rank {context.rank}: all_reduce returned or failed after {time.monotonic() - started:.1f} s", flush=True)
    except BaseException:
        distributed.leave_after_failure()
        raise
    distributed.shutdown()
    distributed.exit_promptly(0)


if __name__ == "__main__":
    main()
