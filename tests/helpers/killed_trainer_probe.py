"""Run as a fresh interpreter by tests/test_workers.py, to be SIGKILLed: like a training process,
it blocks the preemption signals, starts a loader with one worker by the method named on the
command line, takes one item, prints one JSON line (the worker's pid and its parent's) and waits."""

from __future__ import annotations

import json
import sys
import time

from fusiontrain.data.workers import build_loader
from fusiontrain.train.preemption import PreemptionWatcher
from tests.helpers.worker_probe import WhereBuilt


def main(method: str) -> None:
    watcher = PreemptionWatcher().install()
    watcher.start()
    iterator = iter(build_loader(WhereBuilt(items=1000), num_workers=1, worker_start=method))
    item = next(iterator)
    print(json.dumps({"worker": item["pid"], "parent": item["parent"]}), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1])
