"""Runs the real Trainer (under torchrun or alone) and dumps what the distributed tests compare.

Usage: ``python tests/helpers/train_harness.py OUT_DIR --config X.yaml [key=value ...]``.

Rank 0 writes ``OUT_DIR/trainable.safetensors`` (full trainable weights after training),
``OUT_DIR/initial.safetensors`` (the same before the first step) and
``OUT_DIR/report.json``: per-step losses and grad norms, whether every frozen parameter's local
shard is bitwise unchanged on every rank, each FSDP unit's stored dtypes (trained and frozen),
which parameters have optimizer state, and which trainable parameters moved. With ``--dump-every-step``, rank 0 also writes
``OUT_DIR/steps/after_<s>.safetensors``: the full trainable weights and AdamW state
(``optimizer/<name>/<key>``) after each step ``s`` (0-based).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule

from fusiontrain.parallel import distributed
from fusiontrain.config import load_config
from fusiontrain.parallel.fsdp import canonical_parameters
from fusiontrain.train.trainer import Trainer


def _local(param: torch.Tensor) -> torch.Tensor:
    return (param.to_local() if hasattr(param, "to_local") else param).detach().clone()


def _unit_dtypes(model: torch.nn.Module) -> dict[str, list[str]]:
    """Each FSDP unit (by its first module's path) -> the kinds of shards it manages, sorted, as
    ``"<dtype> trained"`` / ``"<dtype> frozen"``."""
    units: dict[int, tuple[str, list[str]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None and id(group) not in units:
                kinds = {f"{p.sharded_param.dtype} {'trained' if p.sharded_param.requires_grad else 'frozen'}" for p in group.fsdp_params}
                units[id(group)] = (name or "<root>", sorted(kinds))
    return dict(units.values())


def _optimizer_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """AdamW's full state per trainable parameter (``optimizer/<name>/<exp_avg|exp_avg_sq|step>``),
    on the CPU (a collective: sharded state is gathered)."""
    state = {}
    for name, param in canonical_parameters(trainer.model).items():
        for key, value in trainer.optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                full = value.full_tensor() if hasattr(value, "full_tensor") else value
                state[f"optimizer/{name}/{key}"] = full.detach().cpu().clone().reshape(full.shape)
    return state


def main() -> None:
    out_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    dump_every_step = "--dump-every-step" in argv
    argv = [a for a in argv if a != "--dump-every-step"]
    config_path = argv[argv.index("--config") + 1]
    overrides = [a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")]
    trainer = Trainer(load_config(config_path, overrides))
    params = canonical_parameters(trainer.model)
    frozen_before = {name: _local(p) for name, p in params.items() if not p.requires_grad}
    trainable_before = trainer.trainable_state()
    if dump_every_step:
        train_step = trainer.train_step

        def train_and_dump(step: int) -> dict:
            metrics = train_step(step)
            state = {**trainer.trainable_state(), **_optimizer_state(trainer)}  # collectives: every rank gathers
            if trainer.context.is_main:
                (out_dir / "steps").mkdir(parents=True, exist_ok=True)
                save_file(state, out_dir / "steps" / f"after_{step}.safetensors")
            return metrics

        trainer.train_step = train_and_dump
    history = trainer.run()
    frozen_unchanged = all(torch.equal(frozen_before[name], _local(params[name])) for name in frozen_before)
    flag = torch.tensor(int(frozen_unchanged))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    trainable_after = trainer.trainable_state()
    by_param = {id(p): name for name, p in params.items()}
    with_state = sorted(by_param[id(p)] for p in trainer.optimizer.state if trainer.optimizer.state[p])
    if trainer.context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(trainable_after, out_dir / "trainable.safetensors")
        save_file(trainable_before, out_dir / "initial.safetensors")
        report = {
            "losses": [row["loss"] for row in history],
            "grad_norms": [row["grad_norm"] for row in history],
            "eval_losses": [row["eval_loss"] for row in history if "eval_loss" in row],
            "frozen_unchanged": bool(flag.item()),
            "unit_dtypes": _unit_dtypes(trainer.model),
            "num_frozen": len(frozen_before),
            "optimizer_state_params": with_state,
            "trainable": sorted(trainable_after),
            "unmoved_trainable": sorted(
                name for name in trainable_after if torch.equal(trainable_after[name], trainable_before[name])
            ),
        }
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    trainer.close()
    # No interpreter teardown after the group is gone: it now and then aborts a finished worker
    # ("terminate called without an active exception"), as the train command avoids too.
    distributed.exit_promptly(0)


if __name__ == "__main__":
    main()
