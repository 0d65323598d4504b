"""Each rank's stream of micro-batches from a streamed source (webdataset shards, a hub dataset with
``streaming=True``), resumable exactly, through torchdata's StatefulDataLoader.

:class:`StreamingSampleStream` is the streaming counterpart of :class:`~fusiontrain.data.loader.SampleStream`:
an ``IterableDataset`` for one data-parallel rank that builds samples (decoding images) in the
dataloader workers, skips bad ones (counted per reason and logged with the shard file and key;
raised with ``strict``), packs them into rows with the same :class:`~fusiontrain.data.packing.FirstFitPacker`
(or pads one per row) and yields collated micro-batches.

Order. The source's shards are split over ranks with ``datasets.distributed.split_dataset_by_node``
(``data.stream_split``), then over this rank's dataloader workers by ``datasets`` itself (worker
``w`` of ``n`` reads every ``n``-th of the rank's shards). Each worker reads its shards pass after
pass ("epochs" of its own share); every pass visits the shards in an order shuffled by
``(seed, pass)`` (``IterableDataset.set_epoch``, which permutes the shards before they are split,
the same way on every rank). Within a shard, records come in file order: there is no sample-level
shuffle buffer, because ``datasets`` does not save a buffer's contents and a resumed run would
differ (write shards already shuffled).

- ``stream_split="shards"`` (default): rank ``r`` reads the shards ``r, r + world, ...`` of each
  pass's order. Every rank needs at least ``num_workers`` (at least 1) shards: fewer is refused when
  the stream is built. With a shard count that ``world`` does not divide, some ranks hold one shard
  more, so the others start their next pass sooner (their records are seen more often).
- ``stream_split="examples"``: every rank reads every shard and keeps every ``world``-th record
  (even shares for any shard count, at ``world`` times the reading). Needs at least ``num_workers``
  shards.

The union over ranks and workers of one pass is the data, each record once.

A model with an encoder per modality (audio beside images) streams with the same builder as its
record files: each sample carries its clips (``Sample.other_items``), a bad clip is a skip counted
under its reason (``missing_audio``, ``corrupt_audio``, ...), the packer holds each modality to its
own row limits (``other_limits``; a sample over them on its own is a ``too_many_items`` skip), and
the batches hold each modality's inputs and masks (the input formats by modality). The position
below stores record keys only, so a resumed worker rebuilds the clips with the rest of the sample.

Several sources (a mixture, :class:`~fusiontrain.data.stream_sources.MixedStreamSource`) are split
over the ranks one by one and interleaved on each rank by ``datasets.interleave_datasets``, seeded
per pass; a pass then ends when every source has run out once, and the smaller sources' records
come more than once in it. The interleaving's state is part of ``datasets``' state, so the resume
below is exact for a mixture too.

Exact resume. The position of a worker is the ``datasets`` state (``IterableDataset.state_dict()``:
shard index and record index within the shard) plus our own count of records. Samples waiting in
the packer's open rows or in rows not yet yielded are not stored: the state keeps the ``datasets``
state from just before the oldest of them (the anchor) and their keys ``[pass, index]``; a resumed
worker reads again from the anchor, rebuilds exactly those samples (skipping the others, which are
already trained on or were bad), and continues with the next record. ``StatefulDataLoader`` gathers
the state of every worker.

What streaming cannot do (each refused at resume time with the saved and current values):

- resume with another world size, rank, number of dataloader workers, ``data.stream_split``, seed,
  data path or shard count: the per-worker positions belong to one split of the shards; or under
  other row limits (:mod:`fusiontrain.data.stream_position`);
- global, world-size-independent packing (map-style data can do it): each worker packs its own
  records;
- know the epoch length (the number of records) in advance: a pass ends when its shards do.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

from torch.utils.data import IterableDataset, get_worker_info

from fusiontrain.data.batch import IMAGE, Batch, InputFormats, Sample
from fusiontrain.data.errors import BadSample
from fusiontrain.data.loader import NoUsableSampleError, StreamConfig, collate_micro_batch
from fusiontrain.data.workers import WORKER_START_METHODS, ClosableLoader
from fusiontrain.data.packing import FirstFitPacker, OtherLimits, PackedRow, misfit_reason
from fusiontrain.data.sources import Record
from fusiontrain.data.stream_position import check_resumable, start_state, worker_states
from fusiontrain.data.stream_sources import MixedStreamSource, StreamSource

logger = logging.getLogger("fusiontrain.data")

StreamSplit = Literal["shards", "examples"]
Key = tuple[int, int]  # (pass, index of the record in this worker's pass)


def _pass_seed(seed: int, epoch: int) -> int:
    """The ``datasets`` epoch of pass ``epoch``: never 0 (``datasets`` shuffles the shard order only
    for a non-zero epoch), different for every pass and seed."""
    return 1 + (seed * 1_000_003 + epoch) % (2**62)


class _RecordCursor:
    """Reads one worker's share of the records pass after pass, from a given position.

    Attributes:
        epoch, index: the position of the next record (its pass and index within the pass).
    """

    def __init__(self, open_pass: Callable[[int, dict | None], Any], epoch: int, index: int, state: dict | None) -> None:
        self._open_pass = open_pass
        self.epoch, self.index = epoch, index
        self._start_state = state
        self._dataset: Any = None
        self._examples: Iterator[dict] | None = None

    def _state(self) -> dict | None:
        """The ``datasets`` state that resumes at the next record (None: the start of the pass)."""
        if self._examples is None or (self.index == 0 and self._start_state is None):
            return self._start_state
        return self._dataset.state_dict()

    def next(self) -> tuple[Key, dict, dict | None]:
        """The next record: its key, the raw example, and the datasets state just before it.

        Raises:
            NoUsableSampleError: a whole pass of this worker's share held no record.
        """
        while True:
            if self._examples is None:
                self._dataset = self._open_pass(self.epoch, self._start_state)
                self._examples = iter(self._dataset)
                before = self._start_state
            else:
                before = self._state()
            example = next(self._examples, None)
            if example is not None:
                key = (self.epoch, self.index)
                self.index += 1
                return key, example, before
            if self.index == 0:
                raise NoUsableSampleError("no record")
            self.epoch, self.index, self._start_state = self.epoch + 1, 0, None
            self._dataset = self._examples = None

    def position(self) -> tuple[Key, dict | None]:
        """The next record's key and the datasets state that resumes there."""
        return (self.epoch, self.index), self._state()


class StreamingSampleStream(IterableDataset):
    """One rank's infinite stream of micro-batches from a streamed source (see the module docstring).

    Args:
        source: the records, as shards (or several sources interleaved: a mixture).
        build: turns a record into a sample (raises :class:`BadSample`); runs in the workers.
        image_format: the encoder's image format, or (a model with an encoder per modality) the
            input formats by modality: ``"image"``'s, then the others' in ``other_limits``' order.
        config: batching (the same as map-style data's).
        rank, world: this rank's data-parallel coordinate and the number of ranks.
        num_workers: the dataloader workers of this rank (0: in the training process).
        seed: the shard-order shuffle seed.
        stream_split: how ranks divide the shards (``"shards"`` or ``"examples"``).
        name: what the data is, for messages.
        other_limits: each modality beside images' row limits, ``(items, encoder tokens or
            None)`` (:func:`~fusiontrain.train.model_inputs.other_limits`).

    Raises:
        ValueError: too few shards for the ranks and workers, naming the counts and the fix; input
            formats without ``"image"``, or not one row limit per other modality.
    """

    def __init__(
        self,
        source: StreamSource | MixedStreamSource,
        build: Callable[[Record], Sample],
        image_format: InputFormats,
        config: StreamConfig,
        *,
        rank: int,
        world: int,
        num_workers: int,
        seed: int,
        stream_split: StreamSplit = "shards",
        name: str = "",
        other_limits: OtherLimits = (),
    ) -> None:
        readers = max(1, num_workers)
        shards = source.num_shards
        per_rank = shards // world if stream_split == "shards" else shards
        if per_rank < readers:
            raise ValueError(
                f"{name or source.name} has {shards} shards; with data.stream_split={stream_split}, {world} ranks and "
                f"{readers} reader(s) per rank (data.num_workers={num_workers}) some reader would have none. Write "
                f"the data in more shards, lower data.num_workers"
                + (", or set data.stream_split=examples" if stream_split == "shards" else "")
            )
        formats = dict(image_format) if isinstance(image_format, Mapping) else {IMAGE: image_format}
        others = tuple((modality, fmt) for modality, fmt in formats.items() if modality != IMAGE)
        if IMAGE not in formats or len(others) != len(other_limits):
            raise ValueError(
                f"streaming needs an 'image' input format and one row limit per other modality; got the formats "
                f"{sorted(formats)} and {len(other_limits)} other modalities' limits"
            )
        self.source = source
        self.build = build
        self.input_formats, self.image_format = image_format, formats[IMAGE]
        self.other_formats, self.other_limits = others, tuple(other_limits)
        self.config = config
        self.rank, self.world, self.num_workers = rank, world, num_workers
        self.seed = seed
        self.stream_split = stream_split
        self.name = name or source.name
        self._restored: dict[str, Any] | None = None
        self._live: dict[str, Any] | None = None

    # -- state ------------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What a saved position must match to be resumed here (see :func:`check_resumable`)."""
        others = {"other_limits": [list(limit) for limit in self.other_limits]} if self.other_limits else {}
        return {
            "world": self.world,
            "rank": self.rank,
            "num_workers": self.num_workers,
            "stream_split": self.stream_split,
            "seed": self.seed,
            "source": self.source.name,
            "num_shards": self.source.num_shards,
            "rows": {
                "seq_len": self.config.seq_len,
                "max_images": self.config.max_images,
                "max_encoder_tokens": self.config.max_encoder_tokens,
                "max_open_rows": self.config.max_open_rows,
                "packing": self.config.packing,
            },
            **others,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position of this worker (taken by StatefulDataLoader in the worker); JSON-able."""
        state = self._live if self._live is not None else self._restored
        if state is None:
            state = start_state()
        return {**state, **self.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; raises :class:`~fusiontrain.data.stream_position.StreamResumeError` for a state of another split."""
        check_resumable(state, self.identity())
        self._restored = {key: state[key] for key in start_state()}

    # -- iteration --------------------------------------------------------------------------------

    def _open_pass(self, epoch: int, state: dict | None) -> Any:
        """This rank's records of pass ``epoch`` as a ``datasets.IterableDataset``, from ``state``
        (a ``datasets`` state of this pass) or from the start. Iterated in a dataloader worker,
        ``datasets`` keeps the worker's shards."""
        dataset = self.source.split(self.rank, self.world, self.stream_split, seed=_pass_seed(self.seed, epoch))
        dataset.set_epoch(_pass_seed(self.seed, epoch))
        if state is not None:
            dataset.load_state_dict(state)
        return dataset

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, readers = (info.id, info.num_workers) if info is not None else (0, 1)
        if readers != max(1, self.num_workers):
            raise RuntimeError(f"the stream was built for {self.num_workers} workers but runs in {readers}")
        state = self._restored or start_state()
        anchor = state["anchor"]
        cursor = _RecordCursor(self._open_pass, anchor["epoch"], anchor["index"], anchor["datasets_state"])
        packer = self._packer()
        befores: dict[Key, dict | None] = {}
        open_rows, ready = self._replay(cursor, state, packer, befores, worker)
        packer.open_rows = open_rows
        skipped = Counter(state["skipped"])
        reported = Counter(skipped)
        epoch, usable = state["position"][0], state["usable"]
        config = self.config
        while True:
            try:
                key, example, before = cursor.next()
            except NoUsableSampleError:
                raise NoUsableSampleError(self._no_record(worker, readers)) from None
            if key[0] != epoch:  # a pass ended
                if not usable:  # the next passes are the same records: it would never yield
                    raise NoUsableSampleError(self._no_usable_sample(epoch, skipped, worker, readers))
                epoch, usable = key[0], 0
            sample = self._build(self._record(key, example, worker), skipped, packer)
            if sample is not None:
                usable += 1
                befores[key] = before
                ready += packer.add(key, sample) if config.packing else [PackedRow([key], [sample])]
            while len(ready) >= config.micro_batch_size:
                rows, ready = ready[: config.micro_batch_size], ready[config.micro_batch_size :]
                for row in rows:
                    for done in row.keys:
                        del befores[done]
                batch = self._collate(rows)
                batch.skipped = dict(skipped - reported)
                reported = Counter(skipped)
                self._live = self._position(cursor, befores, packer, ready, skipped, usable)
                yield batch

    def _replay(
        self, cursor: _RecordCursor, state: dict, packer: FirstFitPacker, befores: dict, worker: int
    ) -> tuple[list[PackedRow], list[PackedRow]]:
        """Read from the anchor up to the saved position, rebuilding the samples of the saved open
        and ready rows (and their anchors in ``befores``); returns those rows."""
        wanted = {tuple(key) for row in state["open_rows"] + state["ready_rows"] for key in row}
        samples: dict[Key, Sample] = {}
        target = tuple(state["position"])
        while (cursor.epoch, cursor.index) < target:
            key, example, before = cursor.next()
            if key not in wanted:
                continue
            record = self._record(key, example, worker)
            try:
                samples[key] = self.build(record)
            except BadSample as error:
                raise RuntimeError(
                    f"resuming {self.name}: {record.origin} was a usable sample when the position was saved and is "
                    f"now bad ({error}); the data changed since. Resume with the same data"
                ) from error
            befores[key] = before
        if set(samples) != wanted:
            missing = sorted(wanted - set(samples))[:3]
            raise RuntimeError(f"resuming {self.name}: the records {missing} of the saved position were not found")

        def row(keys: list) -> PackedRow:
            packed = PackedRow()
            for key in map(tuple, keys):
                sample = samples[key]
                packed.add(key, sample, packer.encoder_tokens(sample), packer.other_sizes(sample))
            return packed

        return [row(keys) for keys in state["open_rows"]], [row(keys) for keys in state["ready_rows"]]

    def _position(
        self, cursor: _RecordCursor, befores: dict, packer: FirstFitPacker, ready: list[PackedRow], skipped: Counter, usable: int
    ) -> dict[str, Any]:
        """The JSON-able position after the batch about to be yielded."""
        position, state = cursor.position()
        anchor_key = min(befores) if befores else position
        anchor_state = befores[anchor_key] if befores else state
        return {
            "anchor": {"epoch": anchor_key[0], "index": anchor_key[1], "datasets_state": anchor_state},
            "position": list(position),
            "usable": usable,
            "open_rows": [[list(key) for key in row.keys] for row in packer.open_rows],
            "ready_rows": [[list(key) for key in row.keys] for row in ready],
            "skipped": dict(skipped),
        }

    def _record(self, key: Key, example: dict, worker: int) -> Record:
        where = f"pass {key[0]}, record {key[1]} of rank {self.rank} worker {worker}"
        return self.source.record(example, where)

    def _build(self, record: Record, skipped: Counter, packer: FirstFitPacker) -> Sample | None:
        """The sample of ``record``, or None when it is bad or does not fit a row (counted, logged
        with its origin; raised with ``strict``); ``packer`` sizes its other modalities' items."""
        config = self.config
        try:
            sample = self.build(record)
            encoder_tokens = sum(self.image_format.num_tokens(image) for image in sample.images)
            others = packer.other_sizes(sample)
            reason = misfit_reason(
                len(sample), len(sample.images), encoder_tokens, seq_len=config.seq_len,
                max_images=config.max_images, max_encoder_tokens=config.max_encoder_tokens,
                others=others, other_limits=self.other_limits,
            )
            if reason is not None:
                names = [modality for modality, _ in self.other_formats]
                per_modality = (
                    f"; (items, encoder tokens) {dict(zip(names, others))} against the row's "
                    f"{dict(zip(names, self.other_limits))} (data.max_items_per_row, data.max_item_tokens_per_row)"
                )
                raise BadSample(
                    reason,
                    f"{len(sample)} tokens, {len(sample.images)} images and {encoder_tokens} encoder tokens do not "
                    f"fit a row of {config.seq_len} tokens, {config.max_images} images and {config.max_encoder_tokens} "
                    "encoder tokens (data.max_encoder_tokens_per_row)" + (per_modality if names else ""),
                    origin=record.origin,
                )
        except BadSample as error:
            if config.strict:
                raise
            skipped[error.reason] += 1
            logger.warning("skipping a sample (%s): %s", error.reason, error)
            return None
        return sample

    def _packer(self) -> FirstFitPacker:
        config = self.config
        return FirstFitPacker(
            config.seq_len,
            config.max_images,
            config.max_open_rows,
            image_format=self.image_format,
            max_encoder_tokens=config.max_encoder_tokens,
            other_limits=self.other_limits,
            other_formats=self.other_formats,
        )

    def _collate(self, rows: list[PackedRow]) -> Batch:
        return collate_micro_batch(rows, self.config, self.input_formats)

    def _where(self, worker: int, readers: int) -> str:
        where = f"rank {self.rank} of {self.world}"
        return where + (f", dataloader worker {worker} of {readers}" if readers > 1 else "")

    def _no_record(self, worker: int, readers: int) -> str:
        return (
            f"{self._where(worker, readers)} read no record of {self.name} in a whole pass over its shards "
            f"({self.source.num_shards} shards, data.stream_split={self.stream_split}): its shards are empty. "
            "Check the data, or lower data.num_workers"
        )

    def _no_usable_sample(self, epoch: int, skipped: Counter, worker: int, readers: int) -> str:
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
        return (
            f"{self._where(worker, readers)} found no usable sample in pass {epoch} over its shards of {self.name} "
            f"(skipped so far: {counts}). It could never yield a batch, and the other ranks would wait for it. Fix "
            "or filter the data (each skipped sample is logged above with its shard and key)"
        )


class StreamingLoader(ClosableLoader):
    """The StatefulDataLoader of a :class:`StreamingSampleStream`: :meth:`load_state_dict` checks
    the saved positions against this run (world size, workers, split, seed, data) in the training
    process, before any worker starts, and raises :class:`~fusiontrain.data.stream_position.StreamResumeError` naming both."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        current = self.dataset.identity()
        for saved in worker_states(state_dict):
            check_resumable(saved, current)
        super().load_state_dict(state_dict)


def build_streaming_loader(stream: StreamingSampleStream, worker_start: str = WORKER_START_METHODS[0]) -> StreamingLoader:
    """A StatefulDataLoader over ``stream`` with the stream's ``num_workers`` worker processes,
    started by ``worker_start``."""
    return StreamingLoader(stream, num_workers=stream.num_workers, worker_start=worker_start)
