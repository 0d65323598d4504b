"""Run as one rank of a small world by tests/test_step_collectives.py: trains the tiny config with
the real Trainer and counts the collectives of each step.

Usage: ``python tests/helpers/step_collectives_probe.py OUT.json --config X.yaml [key=value ...]``.

A ``TorchDispatchMode`` sees every c10d op (``c10d.*`` from ``torch.distributed``, FSDP2 and
gloo; ``_c10d_functional.*`` from DTensor) dispatched while ``Trainer.run`` runs. The ops are
counted per step: from the start of one ``Trainer.train_step`` to the start of the next, so a
step's bucket holds its own collectives and whatever the loop does after it (eval, checkpoint,
the preemption check) before the next step. Rank 0 writes ``OUT.json``: a list with one
``{op name: count}`` per step.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

from fusiontrain.config import load_config
from fusiontrain.train.trainer import Trainer

COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")


class CollectiveCounter(TorchDispatchMode):
    """Counts the collective ops dispatched inside it, into the last of :attr:`steps`."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[Counter] = [Counter()]  # the first bucket: before the first step

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.namespace in COLLECTIVE_NAMESPACES:
            self.steps[-1][func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def main(out: str, argv: list[str]) -> None:
    config_path, overrides = argv[1], argv[2:]
    trainer = Trainer(load_config(config_path, overrides))
    counter = CollectiveCounter()
    step_once = trainer.train_step

    def counted_step(step: int, host_batches: Any = None) -> dict[str, Any]:
        counter.steps.append(Counter())
        return step_once(step, host_batches)

    trainer.train_step = counted_step  # the loop calls self.train_step: a new bucket per step
    with counter:
        trainer.run()
    if trainer.context.is_main:
        Path(out).write_text(json.dumps([dict(step) for step in counter.steps[1:]]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
