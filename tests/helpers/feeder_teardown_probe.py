"""Run as a fresh interpreter by tests/test_workers.py: two spawned processes, each a dataloader
worker's last moments. Each puts one item on a multiprocessing queue whose pickling runs a
torch op of about a third of a second (torch's C++ code, the GIL released, as when a batch's storages are
shared), then closes the queue without waiting for it and returns while its feeder thread is
still inside that op, as the dataloader's worker loop does when the loader shuts down. The first
runs the worker init function of fusiontrain's loaders first, the second does not. Prints one
JSON line: both exit codes."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading

import torch  # imported before the feeder runs, as in a dataloader worker


#: Set by the feeder thread as it starts pickling (in the worker process).
PICKLING = threading.Event()


class SlowToPickle:
    """Pickling it multiplies matrices for about a third of a second on an idle machine (inside torch,
    the GIL released); it sets :data:`PICKLING` first."""

    def __reduce__(self) -> tuple:
        PICKLING.set()
        product = torch.ones(2000, 2000)
        for _ in range(4):
            product = product @ product / 2000
        return int, (0,)


def worker_exit(with_init: bool, training_pid: int) -> None:
    """A worker's end: one item put, the queue closed unwaited, the function returns."""
    if with_init:
        from fusiontrain.data.workers import end_with_the_training_process

        end_with_the_training_process(training_pid, 0)
    queue = multiprocessing.get_context("spawn").Queue()
    queue.put(SlowToPickle())
    PICKLING.wait(60)  # the feeder thread is inside the torch op now, for a while yet
    queue.cancel_join_thread()
    queue.close()


def main() -> None:
    context = multiprocessing.get_context("spawn")
    codes = {}
    for with_init in (True, False):
        process = context.Process(target=worker_exit, args=(with_init, os.getpid()))
        process.start()
        process.join(60)
        codes["with_init" if with_init else "without"] = process.exitcode
    print(json.dumps(codes), flush=True)


if __name__ == "__main__":
    main()
