"""Run as a fresh interpreter by tests/test_workers.py: does what the trainer does before its
first loader (block the preemption signals, unblock them when the run starts), then, for each
start method named on the command line, iterates a 1-worker loader (which starts the worker
server), and prints one JSON line: where the items of each were built, and what this process
still blocks."""

from __future__ import annotations

import json
import os
import signal
import sys

from fusiontrain.data.workers import build_loader
from fusiontrain.train.preemption import PreemptionWatcher
from tests.helpers.worker_probe import WhereBuilt


def main(methods: list[str]) -> None:
    watcher = PreemptionWatcher().install()  # blocks SIGTERM / SIGUSR1, as Trainer.__init__ does
    watcher.start()  # unblocks them in this process, as Trainer.run does
    items = {method: list(build_loader(WhereBuilt(), num_workers=1, worker_start=method)) for method in methods}
    still_blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    watcher.uninstall()
    blocked = sorted(sig.name for sig in watcher.signals if sig in still_blocked)
    print(json.dumps({"rank_pid": os.getpid(), "items": items, "training_process_blocks": blocked}))


if __name__ == "__main__":
    main(sys.argv[1:])
