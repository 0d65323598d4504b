"""Saving and restoring training checkpoints with ``torch.distributed.checkpoint`` (DCP), in
safetensors and JSON only.

A checkpoint (layout in :mod:`fusiontrain.checkpoint.layout`) holds:

- one safetensors DCP folder per model part (``fusion``, ``lora`` with LoRA, and ``decoder`` /
  ``encoder`` when they train or when everything is saved), keyed by canonical parameter names, so each part loads alone
  and DCP reshards it onto any number of ranks (:func:`~fusiontrain.checkpoint.parts.save_tensors`);
- ``train_state/optimizer/``: the optimizer state's tensors the same way, and its non-tensor rest
  (param groups, hyper-parameters) as ``optimizer.json``, with each tensor's place marked
  ``{"__tensor__": name}``;
- ``train_state/rank_<r>.json``: each rank's own state (its RNG; read back only at the same
  world size);
- ``manifest.json``: the step, the global training state (LR schedule, tokens seen, run id), where
  the frozen base weights come from and their fingerprint, and every other file's size and
  sha256 checksum. It is written last.

Every save goes to a temporary folder; once every rank's files are written, they are checksummed
(the ranks share the files), fsynced, the manifest is written, the folder renamed and its parent
fsynced, so a crash mid-save leaves the previous checkpoint as the latest complete one. Saves may
run asynchronously (``checkpoint.async_save``): the tensors are staged to host copies on the
calling thread, then one background thread writes the parts one after the other, the same order on
every rank, over a process group of its own (gloo: ``distributed.checkpoint_group``), never the
group the training loop's collectives use; a pending save is finished (its result waited on)
before the next one starts and before training ends. ``resume: auto`` takes the newest checkpoint whose files all match the
manifest (checksums read), skipping and logging damaged newer ones; pruning never removes it.

This module knows nothing of training: the trainer hands it tensors, a Stateful optimizer and
plain JSON-able state. Model parts are read back through :mod:`fusiontrain.checkpoint.parts`, the
reader that inference and export use too. Nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from fusiontrain.checkpoint.fingerprint import differences
from fusiontrain.checkpoint.layout import (
    CheckpointError,
    checkpoint_dir,
    checkpoints_root,
    checksum,
    fsync_dir,
    list_complete,
    new_manifest,
    list_step_folders,
    part_dir,
    step_of,
    tmp_dir,
    verify_checkpoint,
    write_manifest,
    TMP_PREFIX,
)
from fusiontrain.checkpoint.parts import (
    CheckpointPart,
    PartMismatch,
    load_tensors,
    read_part_metadata,
    save_tensors,
    stage_tensors,
)
from fusiontrain.checkpoint.optimizer_state import join_tensors, split_tensors, tensor_names
from fusiontrain.parallel import distributed
from fusiontrain.weights.lora import LoraSettings

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state"
OPTIMIZER = "optimizer"
OPTIMIZER_JSON = "optimizer.json"


def verify(path: Path, *, with_optimizer: bool = True, checksums: bool = True, workers: int = 1) -> dict[str, Any]:
    """Check that checkpoint ``path`` is safe and whole before anything is loaded from it: only
    JSON and safetensors files, a valid manifest, every file it records present with its size
    (and, with ``checksums``, its contents), and readable safetensors headers for every model
    part (and the optimizer unless ``with_optimizer=False``). Checksums are read on ``workers``
    processes. Returns the manifest.

    Raises:
        CheckpointError: naming the folder and what is missing, short or changed.
    """
    manifest = verify_checkpoint(path, checksums=checksums, workers=workers)
    folders = [part_dir(path, part) for part in manifest["parts"]]
    if with_optimizer:
        folders.append(Path(path) / TRAIN_STATE / OPTIMIZER)
    for folder in folders:
        read_part_metadata(folder, Path(path))
    return manifest


@dataclass
class _Pending:
    """A save whose files are written (or, asynchronously, still being written) but not yet
    checksummed and recorded in a manifest.

    Attributes:
        step: the step saved.
        written: the files (relative to the staging folder) this rank wrote itself so far.
        futures: the background writes still running; each returns more such files.
        manifest: the manifest to complete with every rank's files.
    """

    step: int
    written: list[str]
    futures: list[Future]
    manifest: dict[str, Any]


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _write_parts(
    writes: list[tuple[Path, dict[str, torch.Tensor]]], group: dist.ProcessGroup | None, staging: Path
) -> list[str]:
    """Write each ``(folder, tensors)`` in order, each a collective over ``group``; returns the
    files this rank wrote, relative to ``staging``."""
    written = []
    for folder, tensors in writes:
        relative = folder.relative_to(staging)
        written += [(relative / name).as_posix() for name in save_tensors(tensors, folder, process_group=group)]
    return written


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _verify_together(path: Path) -> CheckpointError | None:
    """What is wrong with checkpoint ``path`` (None when intact), the same answer on every rank:
    rank 0 checks it without reading the data (:func:`verify` without checksums), then each rank
    reads the checksums of every ``world``-th of its files (a collective)."""
    rank, world = _rank_world()
    found: list[Any] = [None, None]  # (the recorded files, rank 0's CheckpointError)
    if rank == 0:
        try:
            found[0] = verify(path, checksums=False)["files"]
        except CheckpointError as error:  # sent to every rank (UnsafeCheckpoint included), raised there
            found[1] = error
        except Exception as error:  # noqa: BLE001 - an unreadable folder, say: the same on every rank
            found[1] = CheckpointError(f"checkpoint {path} cannot be read: {type(error).__name__}: {error}")
    files, problem = _broadcast(found)
    if problem is not None:
        return problem
    mine = [
        f"{name} has other contents than when it was saved (sha256 differs)"
        for name in sorted(files)[rank::world]
        if checksum(path / name) != files[name]["sha256"]
    ]
    if world > 1:
        gathered: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, mine)
        mine = sorted(problem for part in gathered for problem in part)
    if not mine:
        return None
    more = f" (and {len(mine) - 3} more)" if len(mine) > 3 else ""
    return CheckpointError(f"checkpoint {path} is damaged: {'; '.join(mine[:3])}{more}")


class CheckpointManager:
    """Writes checkpoints under ``output_dir/checkpoints`` and finds the one to resume from.

    Args:
        output_dir: the run folder.
        base: where the frozen weights come from (``{"family", "folders", ...}``).
        fingerprint: the base files' fingerprint (see :mod:`fusiontrain.checkpoint.fingerprint`).
        keep_last_n: complete checkpoints to keep (0 keeps all).
        async_save: write with ``dcp.async_save``.
        lora: the model's LoRA, recorded in each manifest under ``lora`` (None: no LoRA).
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        base: dict[str, Any],
        fingerprint: dict[str, Any],
        keep_last_n: int = 3,
        async_save: bool = False,
        lora: LoraSettings | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.lora = lora
        self.base = base
        self.fingerprint = fingerprint
        self.keep_last_n = keep_last_n
        self.async_save = async_save
        self._pending: _Pending | None = None
        self._executor: ThreadPoolExecutor | None = None

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
            rank_state: this rank's JSON-able state (RNG).
            global_state: JSON-able state shared by all ranks (LR schedule, counters, data position).
        """
        self.wait()
        rank, world = _rank_world()
        staging = tmp_dir(self.output_dir, step)
        skeleton, optimizer_tensors = split_tensors(optimizer.state_dict())
        written = [f"{TRAIN_STATE}/rank_{rank}.json"]
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            (staging / TRAIN_STATE / OPTIMIZER).mkdir(parents=True)
            (staging / TRAIN_STATE / OPTIMIZER / OPTIMIZER_JSON).write_text(json.dumps(skeleton))
            written.append(f"{TRAIN_STATE}/{OPTIMIZER}/{OPTIMIZER_JSON}")
        _barrier()
        writes = [(part_dir(staging, part), tensors) for part, tensors in model_parts.items()]
        writes.append((staging / TRAIN_STATE / OPTIMIZER, optimizer_tensors))
        group = distributed.checkpoint_group()
        if self.async_save:
            staged = [(folder, stage_tensors(tensors)) for folder, tensors in writes]
            futures = [self._writer().submit(_write_parts, staged, group, staging)]
        else:
            written += _write_parts(writes, group, staging)
            futures = []
        (staging / TRAIN_STATE / f"rank_{rank}.json").write_text(json.dumps(rank_state))
        manifest = new_manifest(
            step,
            sorted(model_parts),
            self.base,
            fingerprint=self.fingerprint,
            world_size=world,
            state=global_state,
            **({} if self.lora is None else {"lora": self.lora.to_dict()}),
        )
        pending = _Pending(step, written, futures, manifest)
        if self.async_save:
            self._pending = pending
        else:
            self._finish(pending)

    def wait(self) -> None:
        """Finish a pending asynchronous save (a collective)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._finish(pending)

    def _writer(self) -> ThreadPoolExecutor:
        """The one background thread asynchronous saves are written on (made at the first)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusiontrain-checkpoint")
        return self._executor

    def close(self) -> None:
        """Finish a pending save and end the background writer (a collective)."""
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _finish(self, pending: _Pending) -> None:
        written = list(pending.written)
        for future in pending.futures:
            written += future.result()
        _barrier()  # every rank's data is on disk
        rank, world = _rank_world()
        staging = tmp_dir(self.output_dir, pending.step)
        # Every rank checksums and fsyncs the files it wrote itself, and the manifest records what
        # the ranks report: no rank trusts its listing of a shared folder (on NFS or an object
        # store mount, two ranks' listings can differ for a while).
        records = {}
        for name in sorted(written):
            path = staging / name
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            records[name] = {"size": path.stat().st_size, "sha256": checksum(path)}
        if world > 1:
            gathered: list[dict] = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(gathered, records)
            records = {name: entry for part in gathered for name, entry in part.items()}
        if rank == 0:
            for folder in sorted({(staging / name).parent for name in records} | {staging}, reverse=True):
                fsync_dir(folder)  # the folders' entries (the files were fsynced by their writers)
            write_manifest(staging, pending.manifest, files=dict(sorted(records.items())))
            final = checkpoint_dir(self.output_dir, pending.step)
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            fsync_dir(final.parent)
            self._prune(final)
        _barrier()

    def _prune(self, saved: Path) -> None:
        """Keep the newest ``keep_last_n`` complete checkpoints, and always the newest intact one;
        drop abandoned temporary folders. ``saved`` was just written and checksummed: it is intact,
        so only checkpoints of a higher step (left by an earlier run) are verified here."""
        root = checkpoints_root(self.output_dir)
        for entry in root.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
        if self.keep_last_n > 0:
            complete = list_complete(self.output_dir)  # sizes checked, not checksums
            keep = {path for _, path in complete[-self.keep_last_n :]} | {saved}
            saved_step = step_of(saved)
            for step, path in reversed(complete):  # the newest intact one may be newer than saved
                if saved_step is not None and step <= saved_step:
                    break
                try:
                    verify_checkpoint(path, checksums=True)
                except CheckpointError:
                    continue
                keep.add(path)
                break
            for _, path in complete:
                if path not in keep:
                    shutil.rmtree(path, ignore_errors=True)

    # -- resuming ---------------------------------------------------------------------------------

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: None (start fresh), ``"auto"`` (the newest intact one
        under ``output_dir``, or None), or a path (which must be an intact checkpoint).

        Rank 0 checks each candidate's manifest, files, sizes and safetensors headers and
        broadcasts what it found; then every rank reads the checksums of its share of the files
        (``1 / world`` of the bytes) and the ranks pool their findings, so every rank takes the
        same decision, and verifying takes ``1 / world`` of one reader's time.

        Raises:
            CheckpointError: on every rank, when the given path is not an intact checkpoint.
        """
        if resume is None:
            return None
        if resume == "auto":
            candidates = _broadcast([str(folder) for _, folder in reversed(list_step_folders(self.output_dir))])
        else:
            candidates = [str(resume)]
        for index, candidate in enumerate(candidates):
            problem = _verify_together(Path(candidate))
            if problem is None:
                if index > 0:
                    logger.warning("resuming from %s, the newest intact checkpoint", candidate)
                return Path(candidate)
            if resume != "auto":
                raise problem
            logger.warning("skipping checkpoint %s: %s", candidate, problem)
        return None

    def load(
        self,
        path: Path,
        *,
        model_parts: dict[str, dict[str, torch.Tensor]],
        optimizer: Stateful,
        allow_base_mismatch: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Restore ``path`` into the given tensors and optimizer, in place, at any world size.

        Every part the checkpoint holds is loaded (parts it lacks keep the base weights the model
        was built from). Refuses a checkpoint whose base differs from this run's, unless
        ``allow_base_mismatch``.

        Returns:
            ``(global_state, rank_state)`` as saved: ``rank_state`` of this rank, or None when the
            checkpoint was saved by another number of ranks.
        """
        manifest = verify(path, checksums=False)  # sizes; resolve() read the checksums
        changed = differences(manifest.get("fingerprint", {}), self.fingerprint)
        if changed and not allow_base_mismatch:
            raise CheckpointError(
                f"checkpoint {path} was trained on other base weights than {sorted(self.base['folders'].values())}: "
                f"{'; '.join(changed[:3])}. Point the model at the original base, or set "
                "checkpoint.allow_base_mismatch=true to go ahead"
            )
        rank, world = _rank_world()
        if "lora" in model_parts and "lora" not in manifest["parts"]:
            raise CheckpointError(f"checkpoint {path} holds no LoRA and this model has LoRA (model.lora): resume without it")
        # DCP reshards the weights and the optimizer onto any number of ranks, and the row plan's
        # data position is global state; only the per-rank state (RNG, a stream's position) belongs
        # to the saving world size.
        rank_file = path / TRAIN_STATE / f"rank_{rank}.json"
        rank_state = json.loads(rank_file.read_text()) if manifest["world_size"] == world else None
        for part in manifest["parts"]:
            if part not in model_parts:
                raise CheckpointError(f"checkpoint {path} holds part {part!r}, which this model does not have")
            CheckpointPart(path, part).load(model_parts[part])
        self._load_optimizer(path, optimizer)
        return manifest["state"], rank_state

    @staticmethod
    def _load_optimizer(path: Path, optimizer: Stateful) -> None:
        """The optimizer's tensors (resharded by DCP) into the ones its current state dict holds,
        then its JSON rest; ``load_state_dict`` of the joined state."""
        folder = path / TRAIN_STATE / OPTIMIZER
        saved = json.loads((folder / OPTIMIZER_JSON).read_text())
        _, targets = split_tensors(optimizer.state_dict())
        wanted = tensor_names(saved)
        entries = read_part_metadata(folder, path).state_dict_metadata
        if set(entries) != wanted or not wanted <= set(targets):
            raise PartMismatch(
                f"checkpoint {path}: the optimizer state does not fit this run's optimizer (tensors "
                f"{sorted(wanted ^ set(entries))[:3] or sorted(wanted - set(targets))[:3]} differ)"
            )
        chosen = {name: targets[name] for name in wanted}
        for name, tensor in chosen.items():
            if tuple(entries[name].size) != tuple(tensor.shape):
                raise PartMismatch(f"checkpoint {path}: optimizer tensor {name} has shape {tuple(entries[name].size)}, this run's {tuple(tensor.shape)}")
        load_tensors(chosen, folder)
        optimizer.load_state_dict(join_tensors(saved, chosen))
