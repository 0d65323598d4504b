"""Each rank's micro-batches of the global row plan, resumable at any world size.

The rows of the whole run come from :class:`~fusiontrain.data.row_plan.RowPlan`, computed from
sample sizes the same way on every rank, so the batches do not depend on the number of ranks.
Dealing: optimizer step ``k`` takes the next ``G = global_batch_size`` rows of the plan; with
``W`` ranks, rank ``r`` gets rows ``[r * G / W, (r + 1) * G / W)`` of the step, in order, and its
micro-batch ``m`` is the ``m``-th run of ``micro_batch_size`` rows of that slice. So the step's
rows, their order and their samples are the same at any ``W``; only which rank computes which
row changes (and the loss is normalised by the global target count, so the step's gradient is the
same sum).

Each rank builds only the samples of its own rows (decoding their images), in dataloader worker
processes: with ``w`` workers, worker ``i`` builds the rank's micro-batches ``i, i + w, ...``,
which is the order ``StatefulDataLoader`` collects them in, so the order is deterministic.

A sample that turns out bad only when built (an image that does not decode, ...) is skipped and
counted (or raised with ``strict``): its row is collated without it, shorter; a row left with no
sample is all padding and trains nothing (without packing: one padding token, no target). Which
samples those are depends only on the data, so this too is the same at any world size. Samples
the planner dropped (unusable from their sizes) are counted once per epoch, on the micro-batch
that holds the epoch's first row. A dataloader worker that builds two epochs' worth of rows in a
row, none with a usable sample (say every image file is missing), raises
:class:`NoUsableSampleError` rather than feed padding for ever.

The state is global and tiny: the position in the row stream (``epoch``, ``row``, ``step``) plus
what the plan depends on (seed, size fingerprint, row limits, rows per step), checked on restore.
It is the same on every rank, so a run saved on N ranks resumes on M ranks and continues with
exactly the next global rows.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from fusiontrain.data.batch import Batch, InputFormats, Sample, collate_padded
from fusiontrain.data.errors import BadSample
from fusiontrain.data.packing import PackedRow, collate_padding_free, collate_rows
from fusiontrain.data.row_plan import DataPosition, NoUsableSampleError, PlannedRow, RowPlan
from fusiontrain.data.sizes import SKIP_REASONS
from fusiontrain.data.workers import (
    WORKER_START_METHODS,
    ClosableLoader,
    build_loader,
    prepare_worker_server,
)

__all__ = ["SKIP_REASONS", "NoUsableSampleError", "Dealing", "PlannedStream", "PlannedLoader", "StreamConfig"]

logger = logging.getLogger("fusiontrain.data")


@dataclass(frozen=True)
class StreamConfig:
    """How a rank collates its rows.

    Attributes:
        seq_len: tokens per row.
        micro_batch_size: rows per yielded batch.
        packing: several samples per row (else one sample per row, padded to the batch's longest).
        padding_free: without packing, a micro-batch's samples share one row, back to back
            (:func:`~fusiontrain.data.packing.collate_padding_free`) instead of a padded row each.
        max_images: image slots per packed row.
        max_open_rows: rows the first-fit planner keeps open.
        max_encoder_tokens: encoder tokens a packed row may hold (images yield different counts
            with variable-resolution encoders); None: only ``max_images`` limits a row.
        strict: raise on the first bad sample instead of skipping it.
        pad_id: token id of padding.
        ignore_index: label of positions without a target.
    """

    seq_len: int
    micro_batch_size: int
    packing: bool = True
    padding_free: bool = True
    max_images: int = 4
    max_open_rows: int = 8
    max_encoder_tokens: int | None = None
    strict: bool = False
    pad_id: int = 0
    ignore_index: int = -100


def collate_micro_batch(rows: list[PackedRow], config: StreamConfig, image_format: InputFormats) -> Batch:
    """A micro-batch of planned rows, laid out as ``config`` says: packed rows; or without packing
    (one sample per planned row) padding-free, all samples in one row, or one padded row each.

    A row whose sample was bad holds none: padded, it stays a row of padding only (no real token,
    no target); padding-free, it is left out, and a micro-batch of such rows only becomes one
    padding token."""
    options = {"pad_id": config.pad_id, "ignore_index": config.ignore_index}
    if config.packing:
        return collate_rows(rows, config.seq_len, image_format, **options)
    blank = Sample(torch.full((1,), config.pad_id), torch.full((1,), config.ignore_index), origin="padding")
    if config.padding_free:
        samples = [row.samples[0] for row in rows if row.samples]
        batch = collate_padding_free(samples or [blank], config.seq_len, image_format, **options)
        if not samples:
            batch.is_real[:] = False
        return batch
    batch = collate_padded([row.samples[0] if row.samples else blank for row in rows], config.seq_len, image_format, **options)
    for index, row in enumerate(rows):
        if not row.samples:  # a bad sample's row: padding only
            batch.is_real[index] = False
    return batch


@dataclass(frozen=True)
class Dealing:
    """Which rows of each step a rank gets (see the module docstring).

    Attributes:
        rows_per_step: ``G``, rows of one optimizer step over all ranks.
        rank, world: this rank and the number of data-parallel ranks.
        micro_batch_size: rows per micro-batch.
    """

    rows_per_step: int
    rank: int
    world: int
    micro_batch_size: int

    def __post_init__(self) -> None:
        if self.rows_per_step % (self.world * self.micro_batch_size):
            raise ValueError(
                f"{self.rows_per_step} rows per step (batch.global_batch_size) do not split into micro-batches of "
                f"{self.micro_batch_size} rows over {self.world} ranks: use a world size that divides "
                f"{self.rows_per_step // self.micro_batch_size} (or change batch.global_batch_size)"
            )

    @property
    def rows_per_rank(self) -> int:
        return self.rows_per_step // self.world

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step on each rank (gradient accumulation)."""
        return self.rows_per_rank // self.micro_batch_size

    def micro_batch(self, step_rows: list[PlannedRow], index: int) -> list[PlannedRow]:
        """This rank's micro-batch ``index`` of a step's rows."""
        first = self.rank * self.rows_per_rank + index * self.micro_batch_size
        return step_rows[first : first + self.micro_batch_size]


@dataclass
class Delivery:
    """A micro-batch and where it sits in the run.

    Attributes:
        batch: the collated micro-batch.
        step: the optimizer step it belongs to.
        micro_batch: its index within the rank's micro-batches of that step.
        rows: per row, ``(index of the row within the step, its sample ids)``.
        after: for the step's last micro-batch, the position after the step; else None.
    """

    batch: Batch
    step: int
    micro_batch: int
    rows: list[tuple[int, tuple[int, ...]]]
    after: DataPosition | None


class PlannedStream(IterableDataset):
    """One rank's infinite stream of :class:`Delivery` s from ``start`` on.

    Args:
        plan: the global row plan.
        fetch: ``fetch(i)`` builds sample ``i`` (raises :class:`BadSample`); runs in workers.
        image_format: the encoder's image format, or the input formats by modality (a model with
            an encoder per modality: the batches then hold each modality's inputs and masks).
        config: collation.
        dealing: which rows of a step are this rank's.
        start: where in the row stream to begin.
    """

    def __init__(
        self,
        plan: RowPlan,
        fetch: Callable[[int], Sample],
        image_format: InputFormats,
        config: StreamConfig,
        dealing: Dealing,
        start: DataPosition,
    ) -> None:
        self.plan = plan
        self.fetch = fetch
        self.image_format = image_format
        self.config = config
        self.dealing = dealing
        self.start = start

    def __iter__(self) -> Iterator[Delivery]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._where = f"rank {self.dealing.rank} of {self.dealing.world}, dataloader worker {worker} of {num_workers}"
        self._empty_rows, self._empty_skips = 0, Counter()
        position, count = self.start, 0
        dealing = self.dealing
        while True:
            step_rows, after = self.plan.take(position, dealing.rows_per_step)
            for index in range(dealing.micro_batches):
                if count % num_workers == worker:
                    rows = dealing.micro_batch(step_rows, index)
                    last = index == dealing.micro_batches - 1
                    yield self._deliver(rows, position.step, index, after if last else None)
                count += 1
            position = after

    def _deliver(self, rows: list[PlannedRow], step: int, index: int, after: DataPosition | None) -> Delivery:
        skipped: Counter[str] = Counter()
        for row in rows:
            if row.index == 0:  # the epoch's first row reports what its planning dropped
                skipped.update(self.plan.epoch(row.epoch).skipped)
        built = [self._build_row(row, skipped) for row in rows]
        batch = self._collate(built)
        batch.skipped = dict(skipped)
        first = self.dealing.rank * self.dealing.rows_per_rank + index * self.dealing.micro_batch_size
        return Delivery(batch, step, index, [(first + k, row.ids) for k, row in enumerate(rows)], after)

    def _build_row(self, row: PlannedRow, skipped: Counter) -> PackedRow:
        built, failed = PackedRow(), Counter()
        for key in row.ids:
            try:
                sample = self.fetch(key)
            except BadSample as error:
                if self.config.strict:
                    raise
                failed[error.reason] += 1
                logger.warning("skipping a sample (%s): %s", error.reason, error)
                continue
            built.add(key, sample)
        skipped.update(failed)
        self._check_progress(row, built, failed)
        return built

    def _check_progress(self, row: PlannedRow, built: PackedRow, failed: Counter) -> None:
        """Raise once this worker has built twice as many rows in a row as an epoch holds, every
        one without a usable sample: the data fails only when built (every image missing or
        corrupt), and the run would train on padding for ever. (Twice: one usable sample per
        epoch still ends every streak.)"""
        if built.samples:
            self._empty_rows, self._empty_skips = 0, Counter()
            return
        self._empty_rows += 1
        self._empty_skips.update(failed)
        epoch_rows = len(self.plan.epoch(row.epoch).rows)
        if self._empty_rows >= 2 * epoch_rows:
            counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self._empty_skips.items()))
            raise NoUsableSampleError(
                f"{self._where}: the last {self._empty_rows} rows it built from {self.plan.name} (two epochs' worth) "
                f"held no usable sample ({counts}); training would only see padding. Fix or filter the data "
                "(each skipped sample is logged above with its file and line)"
            )

    def _collate(self, rows: list[PackedRow]) -> Batch:
        return collate_micro_batch(rows, self.config, self.image_format)


class PlannedLoader:
    """This rank's micro-batches (an iterable of :class:`Batch`), built by ``num_workers``
    dataloader processes, with a global, world-size independent position.

    Args:
        make_stream: the rank's stream from a position.
        num_workers: dataloader worker processes (0: in this process).
        worker_start: how they start (:data:`~fusiontrain.data.workers.WORKER_START_METHODS`).
        identity: what the plan depends on (seed, size fingerprint, limits, rows per step); a
            saved state must match it to be loaded.
        sample_log: a JSON Lines file to append each micro-batch's sample ids to (``step``,
            ``rank``, ``rows``: ``[index of the row in the step, [sample ids]]``), or None.
        rank: for the sample log.
    """

    def __init__(
        self,
        make_stream: Callable[[DataPosition], PlannedStream],
        *,
        num_workers: int,
        worker_start: str = WORKER_START_METHODS[0],
        identity: dict[str, Any],
        sample_log: Path | None = None,
        rank: int = 0,
    ) -> None:
        self.make_stream = make_stream
        self.num_workers = num_workers
        self.worker_start = worker_start
        self.identity = identity
        self.sample_log = sample_log
        self.rank = rank
        self.start = DataPosition()
        self.position = self.start
        self._loaders: list[ClosableLoader] = []
        self._handed_out: weakref.WeakSet = weakref.WeakSet()  # the iterators __iter__ returned
        if num_workers:  # now, so that the helper's imports overlap with the rest of the trainer's setup
            prepare_worker_server(make_stream(self.start), worker_start)

    def __iter__(self) -> Iterator[Batch]:
        """The micro-batches from the current start on. The dataloader's workers start here, at
        once (not at the first ``next``); see :mod:`fusiontrain.data.workers` for the signal mask
        they are born with."""
        loader = build_loader(self.make_stream(self.start), num_workers=self.num_workers, worker_start=self.worker_start)
        self._loaders.append(loader)
        batches = self._batches(iter(loader))
        self._handed_out.add(batches)
        return batches

    def _batches(self, deliveries: Iterator[Delivery]) -> Iterator[Batch]:
        for delivery in deliveries:
            if self.sample_log is not None:
                self._log(delivery)
            if delivery.after is not None:
                self.position = delivery.after
            yield delivery.batch

    def _log(self, delivery: Delivery) -> None:
        line = {"step": delivery.step, "rank": self.rank, "micro_batch": delivery.micro_batch, "rows": delivery.rows}
        self.sample_log.parent.mkdir(parents=True, exist_ok=True)
        with self.sample_log.open("a") as handle:
            handle.write(json.dumps(line) + "\n")

    def state_dict(self) -> dict[str, Any]:
        """The position after the last whole step handed out, with the plan's identity."""
        return {"position": self.position.to_dict(), **self.identity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (call before iterating). Refuses a state whose plan differs."""
        changed = [f"{key}: saved {state.get(key)!r}, now {value!r}" for key, value in self.identity.items() if state.get(key) != value]
        if changed:
            raise ValueError(
                "the data position of the checkpoint belongs to another row plan, so it cannot be continued: "
                + "; ".join(changed)
                + ". Resume with the data, seed and batch settings it was saved with (batch.global_batch_size keeps "
                "the rows per step at another world size), or start a fresh run"
            )
        self.start = self.position = DataPosition.from_dict(state["position"])

    def close(self) -> None:
        """End the worker processes of every dataloader made so far, and let go of them: the
        iterators handed out end (their next ``next`` stops), and the dataloaders' queues and
        events are freed now, which unlinks their semaphores. A process that then leaves without
        the interpreter's teardown (``distributed.exit_promptly``) would otherwise leave them to
        multiprocessing's resource tracker, which warns of "leaked semaphore objects"."""
        for loader in self._loaders:
            loader.close()
        for batches in list(self._handed_out):
            batches.close()
        self._loaders.clear()  # nothing else holds them: freed at once, no collection needed
