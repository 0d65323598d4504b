"""A dataset whose items say where they were built: for the tests of how dataloader workers start
(tests/test_workers.py). It lives here, importable by module path, so that a worker started by
``forkserver`` or ``spawn`` can unpickle it."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator

from torch.utils.data import IterableDataset


class WhereBuilt(IterableDataset):
    """Yields one dict per item: the building process's pid, its parent's pid, whether SIGTERM and
    SIGUSR1 are blocked there, and which of the libraries that this stream does not need (but a
    real-data stream would) are imported there."""

    def __init__(self, items: int = 2) -> None:
        self.items = items

    def __iter__(self) -> Iterator[dict]:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        for _ in range(self.items):
            yield {
                "pid": os.getpid(),
                "parent": os.getppid(),
                "sigterm_blocked": signal.SIGTERM in blocked,
                "sigusr1_blocked": signal.SIGUSR1 in blocked,
                "unneeded_imports": sorted({"transformers", "datasets", "torch._dynamo"} & set(sys.modules)),
            }
