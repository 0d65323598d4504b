"""Run as one rank of a small world by tests/test_step_collectives.py: trains the tiny config with
the real Trainer and counts the collectives of each step.

Usage: ``python tests/helpers/step_collectives_probe.py OUT.json --config X.yaml [key=value ...]``.

A ``TorchDispatchMode`` sees every c10d op (``c10d.*`` from ``torch.distributed``, FSDP2 and
gloo; ``_c10d_functional.*`` from DTensor) dispatched while ``Trainer.run`` runs. The ops are
counted per step: from the start of one ``Trainer.train_step`` to the start of the next, so a
step's bucket holds its own collectives and whatever the loop does after it (eval, checkpoint,
the preemption check) before the next step. Rank 0 writes ``OUT.json``: ``steps``, a list with
one ``{op name: count}`` per step; ``output_unit_gathers`` and ``embedding_unit_gathers``, per
step, the all-gathers of the size of the decoder's norm + output projection unit and of its token
embeddings' unit (each parameter's first dimension padded to a multiple of the world size, as
FSDP2 does); ``gathered_bytes``, per step, the bytes of all FSDP all-gathers' outputs.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

from fusiontrain.config import load_config
from fusiontrain.parallel import distributed
from fusiontrain.train.trainer import Trainer

COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")


class CollectiveCounter(TorchDispatchMode):
    """Counts the collective ops dispatched inside it, into the last of :attr:`steps`."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[Counter] = [Counter()]  # the first bucket: before the first step
        self.gather_sizes: list[Counter] = [Counter()]  # numel of each FSDP all-gather's output
        self.gathered_bytes: list[int] = [0]  # bytes of all FSDP all-gathers' outputs

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.namespace in COLLECTIVE_NAMESPACES:
            name = func.__name__.split(".")[0]
            self.steps[-1][name] += 1
            if name == "_allgather_base_":
                self.gather_sizes[-1][args[0].numel()] += 1
                self.gathered_bytes[-1] += args[0].numel() * args[0].element_size()
        return func(*args, **(kwargs or {}))


def main(out: str, argv: list[str]) -> None:
    config_path, overrides = argv[1], argv[2:]
    trainer = Trainer(load_config(config_path, overrides))
    counter = CollectiveCounter()
    step_once = trainer.train_step

    def counted_step(step: int, host_batches: Any = None) -> dict[str, Any]:
        counter.steps.append(Counter())
        counter.gather_sizes.append(Counter())
        counter.gathered_bytes.append(0)
        return step_once(step, host_batches)

    world = trainer.context.world_size
    decoder = trainer.model.decoder

    def gathered_size(*modules: Any) -> int:
        return sum(
            math.ceil(p.shape[0] / world) * world * math.prod(p.shape[1:]) for module in modules for p in module.parameters()
        )

    output_unit, embedding_unit = gathered_size(decoder.norm, decoder.output), gathered_size(decoder.tok_embeddings)
    assert output_unit != embedding_unit, "two units of one size: their gathers cannot be told apart"

    trainer.train_step = counted_step  # the loop calls self.train_step: a new bucket per step
    with counter:
        trainer.run()
    if trainer.context.is_main:
        Path(out).write_text(
            json.dumps(
                {
                    "steps": [dict(step) for step in counter.steps[1:]],
                    "output_unit_gathers": [sizes[output_unit] for sizes in counter.gather_sizes[1:]],
                    "embedding_unit_gathers": [sizes[embedding_unit] for sizes in counter.gather_sizes[1:]],
                    "gathered_bytes": counter.gathered_bytes[1:],
                }
            )
        )
    trainer.close()
    # As the train command ends: no interpreter teardown after the group is gone (it now and then
    # aborts a finished worker, "terminate called without an active exception").
    distributed.exit_promptly(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
