"""Saving and restoring training checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint (layout in :mod:`fusiontrain.checkpoint.layout`) holds:

- one DCP sub-checkpoint per model part (``fusion``, and ``decoder`` / ``encoder`` when they
  train or when everything is saved), keyed by canonical parameter names, so each part loads alone
  and DCP reshards it onto any number of ranks;
- ``train_state/optimizer``: the optimizer state (DCP, keyed by parameter names);
- ``train_state/rank_<r>.json``: each rank's own state (data position, RNG);
- ``manifest.json``: the step, the global training state (LR schedule, tokens seen, run id), where
  the frozen base weights come from and their fingerprint. It is written last.

Every save goes to a temporary folder that is renamed once complete, so a crash mid-save leaves the
previous checkpoint as the latest complete one. Saves may run asynchronously (``dcp.async_save``);
a pending save is finished before the next one starts and before training ends.

This module knows nothing of training: the trainer hands it tensors, a Stateful optimizer and
plain JSON-able state. Model parts are read back through :mod:`fusiontrain.checkpoint.parts`, the
reader that inference and export use too.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from fusiontrain.checkpoint.fingerprint import differences
from fusiontrain.checkpoint.layout import (
    CheckpointError,
    checkpoint_dir,
    checkpoints_root,
    latest_complete,
    list_complete,
    new_manifest,
    part_dir,
    read_manifest,
    tmp_dir,
    write_manifest,
    TMP_PREFIX,
)
from fusiontrain.checkpoint.parts import CheckpointPart, read_dcp_metadata

TRAIN_STATE = "train_state"
OPTIMIZER = "optimizer"


def verify(path: Path, *, with_optimizer: bool = True) -> dict[str, Any]:
    """Check that checkpoint ``path`` is whole before anything is loaded from it: a valid
    manifest, and for every DCP folder (model parts, and the optimizer unless
    ``with_optimizer=False``) its metadata and every data file it refers to, at least as long as
    the metadata says. Returns the manifest.

    Raises:
        CheckpointError: naming the folder and what is missing or short.
    """
    manifest = read_manifest(path)
    folders = [part_dir(path, part) for part in manifest["parts"]]
    if with_optimizer:
        folders.append(path / TRAIN_STATE / OPTIMIZER)
    for folder in folders:
        read_dcp_metadata(folder, Path(path))
    return manifest


class OptimizerState(Stateful):
    """The optimizer's state keyed by parameter names (sharded DTensors stay sharded), so DCP can
    save it and reload it onto another sharding."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


@dataclass
class _Pending:
    """An asynchronous save whose data is still being written."""

    step: int
    futures: list[Future]
    manifest: dict[str, Any]


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class CheckpointManager:
    """Writes checkpoints under ``output_dir/checkpoints`` and finds the one to resume from.

    Args:
        output_dir: the run folder.
        base: where the frozen weights come from (``{"family", "folders", ...}``).
        fingerprint: the base files' fingerprint (see :mod:`fusiontrain.checkpoint.fingerprint`).
        keep_last_n: complete checkpoints to keep (0 keeps all).
        async_save: write with ``dcp.async_save``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        base: dict[str, Any],
        fingerprint: dict[str, Any],
        keep_last_n: int = 3,
        async_save: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.base = base
        self.fingerprint = fingerprint
        self.keep_last_n = keep_last_n
        self.async_save = async_save
        self._pending: _Pending | None = None

    # -- saving ---------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        model_parts: dict[str, dict[str, torch.Tensor]],
        optimizer: Stateful,
        rank_state: dict[str, Any],
        global_state: dict[str, Any],
    ) -> None:
        """Write the checkpoint of ``step`` (a collective: every rank calls it).

        Args:
            step: optimizer steps done.
            model_parts: part name -> {canonical parameter name: tensor or DTensor}.
            optimizer: the optimizer's Stateful.
            rank_state: this rank's JSON-able state (data position, RNG).
            global_state: JSON-able state shared by all ranks (LR schedule, counters).
        """
        self.wait()
        rank, world = _rank_world()
        staging = tmp_dir(self.output_dir, step)
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            (staging / TRAIN_STATE).mkdir(parents=True)
        _barrier()
        save = dcp.async_save if self.async_save else dcp.save
        results = [save(tensors, checkpoint_id=part_dir(staging, part)) for part, tensors in model_parts.items()]
        results.append(save({OPTIMIZER: optimizer}, checkpoint_id=staging / TRAIN_STATE / OPTIMIZER))
        (staging / TRAIN_STATE / f"rank_{rank}.json").write_text(json.dumps(rank_state))
        manifest = new_manifest(
            step,
            sorted(model_parts),
            self.base,
            fingerprint=self.fingerprint,
            world_size=world,
            state=global_state,
        )
        pending = _Pending(step, [r for r in results if isinstance(r, Future)], manifest)
        if self.async_save:
            self._pending = pending
        else:
            self._finish(pending)

    def wait(self) -> None:
        """Finish a pending asynchronous save (a collective)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._finish(pending)

    def _finish(self, pending: _Pending) -> None:
        for future in pending.futures:
            future.result()
        _barrier()  # every rank's data is on disk
        rank, _ = _rank_world()
        if rank == 0:
            staging = tmp_dir(self.output_dir, pending.step)
            write_manifest(staging, pending.manifest)
            final = checkpoint_dir(self.output_dir, pending.step)
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            self._prune()
        _barrier()

    def _prune(self) -> None:
        """Keep the newest ``keep_last_n`` complete checkpoints; drop abandoned temporary folders."""
        root = checkpoints_root(self.output_dir)
        for entry in root.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
        if self.keep_last_n > 0:
            for _, path in list_complete(self.output_dir)[: -self.keep_last_n]:
                shutil.rmtree(path, ignore_errors=True)

    # -- resuming ---------------------------------------------------------------------------------

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: None (start fresh), ``"auto"`` (the latest complete
        one under ``output_dir``, or None), or a path (which must be a complete checkpoint)."""
        if resume is None:
            return None
        if resume == "auto":
            latest = latest_complete(self.output_dir)
            return None if latest is None else latest[1]
        path = Path(resume)
        verify(path)  # raises CheckpointError naming the folder, before anything is loaded
        return path

    def load(
        self,
        path: Path,
        *,
        model_parts: dict[str, dict[str, torch.Tensor]],
        optimizer: Stateful,
        allow_base_mismatch: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore ``path`` into the given tensors and optimizer, in place.

        Every part the checkpoint holds is loaded (parts it lacks keep the base weights the model
        was built from). Refuses a checkpoint whose base differs from this run's, unless
        ``allow_base_mismatch``.

        Returns:
            ``(global_state, rank_state)`` as saved (``rank_state`` of this rank).
        """
        manifest = verify(path)
        changed = differences(manifest.get("fingerprint", {}), self.fingerprint)
        if changed and not allow_base_mismatch:
            raise CheckpointError(
                f"checkpoint {path} was trained on other base weights than {sorted(self.base['folders'].values())}: "
                f"{'; '.join(changed[:3])}. Point the model at the original base, or set "
                "checkpoint.allow_base_mismatch=true to go ahead"
            )
        rank, world = _rank_world()
        if manifest["world_size"] != world:
            # DCP could reshard the weights and optimizer, but each rank's data stream (its shard,
            # packer and position) belongs to that world size and cannot be re-split exactly.
            raise CheckpointError(
                f"checkpoint {path} was saved by {manifest['world_size']} ranks and this run has {world}: resume on "
                f"{manifest['world_size']} ranks (per-rank data positions cannot be re-split exactly)"
            )
        rank_file = path / TRAIN_STATE / f"rank_{rank}.json"
        for part in manifest["parts"]:
            if part not in model_parts:
                raise CheckpointError(f"checkpoint {path} holds part {part!r}, which this model does not have")
            CheckpointPart(path, part).load(model_parts[part])
        dcp.load({OPTIMIZER: optimizer}, checkpoint_id=path / TRAIN_STATE / OPTIMIZER)
        return manifest["state"], json.loads(rank_file.read_text())
