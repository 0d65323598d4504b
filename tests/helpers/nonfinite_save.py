"""Checks the refusal to checkpoint non-finite weights, under torchrun.

Usage: ``python tests/helpers/nonfinite_save.py OUT_DIR --config X.yaml [key=value ...]``.

Trains the configured run (checkpointing as configured), then puts a NaN into rank 1's local shard
of the first trainable parameter it holds a piece of (one rank only: the check must be all-reduced) and asks every
rank to save the next checkpoint. Each rank writes ``OUT_DIR/rank_<r>.json``: the error it got
(``null`` if none) and the checkpoints on disk afterwards.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fusiontrain.parallel import distributed
from fusiontrain.config import load_config
from fusiontrain.train.nonfinite import NonFiniteError
from fusiontrain.train.trainer import Trainer


def main() -> None:
    out_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    config_path = argv[argv.index("--config") + 1]
    overrides = [a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")]
    trainer = Trainer(load_config(config_path, overrides))
    history = trainer.run()
    rank = trainer.context.rank
    name = None
    if rank == 1:
        for name, param in trainer.model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            if param.requires_grad and local.numel() > 0:
                with torch.no_grad():
                    local.view(-1)[0] = float("nan")
                break
    error = None
    try:
        trainer.save_checkpoint(len(history) + 1)
    except NonFiniteError as caught:
        error = str(caught)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = Path(trainer.config.output_dir) / "checkpoints"
    (out_dir / f"rank_{rank}.json").write_text(
        json.dumps({"error": error, "corrupted": name, "on_disk": sorted(p.name for p in checkpoints.iterdir())})
    )
    trainer.close()
    # No interpreter teardown after the group is gone: it now and then aborts a finished worker
    # ("terminate called without an active exception"), as the train command avoids too.
    distributed.exit_promptly(0)


if __name__ == "__main__":
    main()
