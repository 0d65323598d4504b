"""Each rank's stream of micro-batches, resumable exactly, through torchdata's StatefulDataLoader.

:class:`SampleStream` is an ``IterableDataset`` for one data-parallel rank. Per epoch it shuffles
all sample ids with a seed of ``(seed, epoch)``, keeps every ``world``-th (its shard), splits that
among dataloader workers, builds each sample (decoding images) in the worker, skips bad ones
(counted, logged with file and line; or raised with ``strict``), packs samples into rows (or pads
one per row) and yields collated micro-batches. A stream (or a dataloader worker's part of it) that
reads a whole epoch of its share without one usable sample raises :class:`NoUsableSampleError`,
naming the data and the skips per reason: it could never yield, and the other ranks would wait for
it in a collective.

Its state is small and exact: the epoch, the position within the epoch's shard, the ids of the
samples in the packer's open rows and in rows not yet yielded, and the skip counts. A restored
stream rebuilds those samples from their ids and continues with exactly the next sample.
``StatefulDataLoader`` gathers the state of every worker.

For unpacked (padded) batches with every sample good, the shards interleave so that the samples
of step k over all ranks are the same at any world size.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from fusiontrain.data.batch import Batch, Sample, collate_padded
from fusiontrain.data.errors import REASONS, BadSample
from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.packing import FirstFitPacker, PackedRow, collate_rows

logger = logging.getLogger("fusiontrain.data")

# Why samples get skipped; metrics count them in this order.
SKIP_REASONS = tuple(sorted(REASONS))

# What to change when every sample of a share is skipped for one reason.
_FIXES = {
    "too_long": "raise batch.seq_len or set data.too_long=truncate",
    "too_many_images": "raise data.max_images_per_row or data.max_encoder_tokens_per_row",
}


class NoUsableSampleError(RuntimeError):
    """A rank's share of the data (or a dataloader worker's part of it) held no usable sample in a
    whole epoch. The message names the data, the rank and worker, and the skips per reason."""


@dataclass(frozen=True)
class StreamConfig:
    """How a rank's stream batches its samples.

    Attributes:
        seq_len: tokens per row.
        micro_batch_size: rows per yielded batch.
        packing: pack several samples per row (else one sample per row, padded).
        max_images: image slots per packed row.
        max_open_rows: rows the first-fit packer keeps open.
        max_encoder_tokens: encoder tokens a packed row may hold (images yield different counts
            with variable-resolution encoders); None: only ``max_images`` limits a row.
        strict: raise on the first bad sample instead of skipping it.
        pad_id: token id of padding.
        ignore_index: label of positions without a target.
    """

    seq_len: int
    micro_batch_size: int
    packing: bool = True
    max_images: int = 4
    max_open_rows: int = 8
    max_encoder_tokens: int | None = None
    strict: bool = False
    pad_id: int = 0
    ignore_index: int = -100


class SampleStream(IterableDataset):
    """One rank's infinite stream of micro-batches (see the module docstring).

    Args:
        num_samples: size of the dataset.
        fetch: ``fetch(i)`` builds sample ``i`` (raises :class:`BadSample`); runs in workers.
        image_format: the encoder's image format.
        config: batching.
        rank, world: this rank's data-parallel coordinate and the number of ranks.
        seed: shuffle seed.
        name: what the data is, for error messages (e.g. ``data.train.path=... (data.format=chat)``).
    """

    def __init__(
        self,
        num_samples: int,
        fetch: Callable[[int], Sample],
        image_format: ImageFormat,
        config: StreamConfig,
        *,
        rank: int,
        world: int,
        seed: int,
        name: str = "",
    ) -> None:
        if num_samples < world:
            raise ValueError(f"{num_samples} samples cannot feed {world} ranks")
        self.num_samples = num_samples
        self.fetch = fetch
        self.image_format = image_format
        self.config = config
        self.rank = rank
        self.world = world
        self.seed = seed
        self.name = name or f"a dataset of {num_samples} samples"
        self._restored: dict[str, Any] | None = None
        self._live: dict[str, Any] | None = None

    # -- order --------------------------------------------------------------------------------

    def shard(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[int]:
        """The sample ids this rank (and worker) reads in ``epoch``, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        return order[self.rank :: self.world][worker::num_workers].tolist()

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position of the stream (taken by StatefulDataLoader in the worker)."""
        state = self._live if self._live is not None else self._restored
        if state is None:
            state = {"epoch": 0, "position": 0, "open_rows": [], "ready_rows": [], "skipped": {}}
        return {**state, "rank": self.rank, "world": self.world, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state from another world size, seed or dataset."""
        saved = (state["world"], state["seed"], state["num_samples"])
        if saved != (self.world, self.seed, self.num_samples):
            raise ValueError(
                f"the data position was saved with world size {state['world']}, seed {state['seed']} and "
                f"{state['num_samples']} samples; this run has {self.world}, {self.seed} and {self.num_samples}. "
                "Packed per-rank streams cannot be re-split: resume with the same world size and data"
            )
        self._restored = {k: state[k] for k in ("epoch", "position", "open_rows", "ready_rows", "skipped")}

    # -- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        state = self._restored or {"epoch": 0, "position": 0, "open_rows": [], "ready_rows": [], "skipped": {}}
        config = self.config
        packer = self._packer()
        packer.open_rows = [self._rebuild(keys, packer) for keys in state["open_rows"]]
        ready = [self._rebuild(keys, packer) for keys in state["ready_rows"]]
        skipped = Counter(state["skipped"])
        reported = Counter(skipped)
        epoch, position = state["epoch"], state["position"]
        while True:
            shard = self.shard(epoch, worker, num_workers)
            whole_epoch, usable, skipped_before = position == 0, 0, Counter(skipped)
            while position < len(shard):
                key = shard[position]
                position += 1
                sample = self._build(key, skipped)
                if sample is not None:
                    usable += 1
                    ready += packer.add(key, sample) if config.packing else [PackedRow([key], [sample])]
                while len(ready) >= config.micro_batch_size:
                    rows, ready = ready[: config.micro_batch_size], ready[config.micro_batch_size :]
                    batch = self._collate(rows)
                    batch.skipped = dict(skipped - reported)
                    reported = Counter(skipped)
                    self._live = {
                        "epoch": epoch,
                        "position": position,
                        "open_rows": packer.state(),
                        "ready_rows": [list(row.keys) for row in ready],
                        "skipped": dict(skipped),
                    }
                    yield batch
            if whole_epoch and not usable:  # the next epochs are the same records: it would never yield
                raise NoUsableSampleError(self._no_usable_sample(epoch, len(shard), skipped - skipped_before, worker, num_workers))
            epoch, position = epoch + 1, 0

    def _no_usable_sample(self, epoch: int, size: int, skips: Counter, worker: int, num_workers: int) -> str:
        where = f"rank {self.rank} of {self.world}"
        if num_workers > 1:
            where += f", dataloader worker {worker} of {num_workers}"
        if size == 0:
            return (
                f"{where} has no sample of {self.name} to read: {self.num_samples} samples over {self.world} ranks x "
                f"{num_workers} dataloader workers leave this one none; lower data.num_workers or use more data"
            )
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(skips.items()))
        fixes = [_FIXES[reason] for reason in sorted(skips) if reason in _FIXES]
        fix = f"; {' / '.join(fixes)}" if fixes else ""
        return (
            f"{where} found no usable sample in its share of {self.name}: all {size} samples of epoch {epoch} were "
            f"skipped ({counts}). It could never yield a batch, and the other ranks would wait for it. Fix or filter "
            f"the data (each skipped sample is logged above with its file and line){fix}"
        )

    def _packer(self) -> FirstFitPacker:
        config = self.config
        return FirstFitPacker(
            config.seq_len,
            config.max_images,
            config.max_open_rows,
            image_format=self.image_format,
            max_encoder_tokens=config.max_encoder_tokens,
        )

    def _build(self, key: int, skipped: Counter) -> Sample | None:
        try:
            sample = self.fetch(key)
        except BadSample as error:
            if self.config.strict:
                raise
            skipped[error.reason] += 1
            logger.warning("skipping a sample (%s): %s", error.reason, error)
            return None
        config = self.config
        encoder_tokens = sum(self.image_format.num_tokens(image) for image in sample.images)
        too_many_encoder_tokens = config.max_encoder_tokens is not None and encoder_tokens > config.max_encoder_tokens
        if len(sample) > config.seq_len or len(sample.images) > config.max_images or too_many_encoder_tokens:
            reason = "too_long" if len(sample) > config.seq_len else "too_many_images"
            message = (
                f"{sample.origin or key}: {len(sample)} tokens, {len(sample.images)} images and {encoder_tokens} "
                f"encoder tokens do not fit a row of {config.seq_len} tokens, {config.max_images} images and "
                f"{config.max_encoder_tokens} encoder tokens (data.max_encoder_tokens_per_row)"
            )
            if self.config.strict:
                raise BadSample(reason, message)
            skipped[reason] += 1
            logger.warning("skipping a sample (%s): %s", reason, message)
            return None
        return sample

    def _rebuild(self, keys: list[int], packer: FirstFitPacker) -> PackedRow:
        row = PackedRow()
        for key in keys:
            sample = self.fetch(key)
            row.add(key, sample, packer.encoder_tokens(sample))
        return row

    def _collate(self, rows: list[PackedRow]) -> Batch:
        config = self.config
        if config.packing:
            return collate_rows(rows, config.seq_len, self.image_format, pad_id=config.pad_id, ignore_index=config.ignore_index)
        samples = [row.samples[0] for row in rows]
        return collate_padded(samples, config.seq_len, self.image_format, pad_id=config.pad_id, ignore_index=config.ignore_index)


class ClosableLoader(StatefulDataLoader):
    """A StatefulDataLoader whose worker processes :meth:`close` ends at once.

    After an error the iterator (and its workers) usually stays alive, held by the traceback, until
    the interpreter exits; then multiprocessing's exit hook SIGTERMs the daemon workers and joins
    them. Workers that block SIGTERM (fusiontrain.preemption blocks it before they fork) never end,
    and the process hangs at exit. :meth:`close` shuts them down the dataloader's own way instead
    (the done event and a ``None`` task, which an idle worker obeys), and the process can leave.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._live_iterators: weakref.WeakSet = weakref.WeakSet()

    def _get_iterator(self) -> Any:
        iterator = super()._get_iterator()
        self._live_iterators.add(iterator)
        return iterator

    def close(self) -> None:
        """End the worker processes of every iterator made so far (no-op with 0 workers)."""
        for iterator in list(self._live_iterators):
            shutdown = getattr(iterator, "_shutdown_workers", None)  # multiprocess iterators only
            if shutdown is not None:
                shutdown()


def build_loader(stream: SampleStream, *, num_workers: int = 0) -> ClosableLoader:
    """A StatefulDataLoader over ``stream``: samples are built in ``num_workers`` processes (in
    this process when 0), and ``state_dict()`` / ``load_state_dict()`` save and restore the
    position of every worker. ``close()`` ends the workers (call it after an error)."""
    return ClosableLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        persistent_workers=False,
    )
