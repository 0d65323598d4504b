"""Builders of the training data pipeline from config: the sample size table (cached beside the
data), the global row plan, and each rank's loader of it.

``prepare_sizes`` is what ``python -m fusiontrain prepare`` runs: one pass over the data that
writes the size cache. ``build_train_loader`` is what the trainer calls: it loads the cache, or
has every rank measure ``1 / world`` of the samples and sums the tables over ranks (then rank 0
writes the cache), and returns the rank's :class:`~fusiontrain.data.loader.PlannedLoader`.
``build_streaming_train_loader`` is its counterpart for streamed data (``data.streaming``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusiontrain.config import BatchConfig, DataConfig, DataSplitConfig, TrainConfig, data_sources, source_key, source_name
from fusiontrain.data.conversations import CONVERSATION_FORMATS, ConversationLayout, conversation_layout
from fusiontrain.data.formats import SampleBuilder
from fusiontrain.data.record_dataset import RecordDataset
from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.loader import Dealing, PlannedLoader, PlannedStream, StreamConfig
from fusiontrain.data.mixture import MixedDataset, SourceBuilders, SourceMixture
from fusiontrain.data.row_plan import DataPosition, RowLimits, RowPlan
from fusiontrain.data.stream_sources import MixedStreamSource, open_stream
from fusiontrain.data.streaming import StreamingLoader, StreamingSampleStream, build_streaming_loader
from fusiontrain.data.sizes import (
    SampleSizes,
    cache_dirs,
    files_identity,
    fingerprint,
    folder_digest,
    load_cached,
    measure,
    save_cache,
)
from fusiontrain.data.sources import load_records
from fusiontrain.data.synthetic import SyntheticImageText
from fusiontrain.families import InputFolders
from fusiontrain.source.model_source import ModelSource
from fusiontrain.train.model_inputs import collate_formats, model_inputs, other_limits, other_names
from fusiontrain.train.model import build_meta_model
from fusiontrain.train.setup import build_batch_layout

logger = logging.getLogger("fusiontrain.data")

Dataset = RecordDataset | SyntheticImageText | MixedDataset
# Sums an int64 tensor over the data-parallel ranks (identity on one process).
Combine = Callable[[torch.Tensor], torch.Tensor]


def build_stream_config(
    data: DataConfig, batch: BatchConfig, image_format: ImageFormat, *, ignore_index: int
) -> StreamConfig:
    """How each rank turns samples into micro-batches (packing or padding, row sizes, the
    encoder-token capacity of a row, strictness)."""
    max_encoder_tokens = data.max_encoder_tokens_per_row
    if max_encoder_tokens is None:
        max_encoder_tokens = data.max_images_per_row * image_format.max_tokens_per_image
    return StreamConfig(
        seq_len=batch.seq_len,
        micro_batch_size=batch.micro_batch_size,
        packing=data.packing,
        padding_free=data.padding_free,
        max_images=data.max_images_per_row,
        max_open_rows=data.packing_open_rows,
        max_encoder_tokens=max_encoder_tokens,
        strict=data.strict,
        ignore_index=ignore_index,
    )


def build_dataset(
    config: TrainConfig, image_format: ImageFormat, inputs: InputFolders, model: nn.Module, *, split: str
) -> Dataset | None:
    """The configured dataset for ``split`` ("train" or "eval"); None when no eval split is set.
    A list of training sources gives their :class:`~fusiontrain.data.mixture.MixedDataset`; a list
    of eval sources is :func:`build_eval_sets`' business.

    Args:
        config: the run config (``data``, ``batch.seq_len`` and ``seed`` are read).
        image_format: the encoder's image format.
        inputs: where the model's tokenizer and image processor are (its family says).
        model: the model (synthetic data reads its vocabulary; the image token is the first new
            embedding row unless the tokenizer has its own).
        split: "train" or "eval".

    Synthetic data for a model with an encoder per modality holds items of every modality
    beside images too, each marked by its placeholder id (:attr:`InputFolders.others`).
    """
    data = config.data
    sources = data_sources(data, split)
    if len(sources) > 1:
        if split != "train":
            raise ValueError("several eval sources are evaluated one by one: use build_eval_sets")
        datasets = [_record_dataset(config, image_format, inputs, source) for source in sources]
        names = tuple(source_name(source) for source in sources)
        weights = None if sources[0].weight is None else tuple(float(source.weight) for source in sources)
        return MixedDataset(datasets, SourceMixture(names, tuple(len(d) for d in datasets), weights))
    source = sources[0]
    if source_format(data, source) == "synthetic":
        vocab_size = model.decoder.tok_embeddings.vocab_size
        num_samples = data.synthetic_samples if split == "train" else max(64, data.synthetic_samples // 8)
        return SyntheticImageText(
            num_samples,
            vocab_size=vocab_size,
            image_token_id=vocab_size,
            image_format=image_format,
            max_text=data.synthetic_max_text,
            lengths=data.synthetic_lengths,
            seed=config.seed if split == "train" else config.seed + 7919,
            others={other.name: (other.input_format, other.token_id) for other in inputs.others},
        )
    if source.path is None:
        return None
    return _record_dataset(config, image_format, inputs, source)


def build_eval_sets(
    config: TrainConfig, image_format: ImageFormat, inputs: InputFolders, model: nn.Module
) -> list[tuple[str, Dataset]]:
    """The eval sets, each with the name its loss is reported under: one (``eval_loss``) for a
    single source, none without one, else one per source of ``data.eval``."""
    sources = data_sources(config.data, "eval")
    if len(sources) == 1:
        dataset = build_dataset(config, image_format, inputs, model, split="eval")
        return [] if dataset is None else [(source_name(sources[0]), dataset)]
    return [(source_name(source), _record_dataset(config, image_format, inputs, source)) for source in sources]


def _record_dataset(
    config: TrainConfig, image_format: ImageFormat, inputs: InputFolders, source: DataSplitConfig
) -> RecordDataset:
    records = load_records(source.path, split=source.split, subset=source.subset, image_root=source.image_root)
    return RecordDataset(records, sample_builder(config, image_format, inputs, source))


def source_format(data: DataConfig, source: DataSplitConfig) -> str:
    """The record format of ``source``: its own, else ``data.format``."""
    return source.format or data.format


def record_layout(data: DataConfig, source: DataSplitConfig) -> ConversationLayout | None:
    """The conversation layout of ``source`` with its mapping (llava, sharegpt, cauldron), else None."""
    format = source_format(data, source)
    if format not in CONVERSATION_FORMATS:
        return None
    return conversation_layout(
        format, columns=vars(source.columns), tags=vars(source.tags), placeholder=source.placeholder
    )


def sample_builder(
    config: TrainConfig, image_format: ImageFormat, inputs: InputFolders, source: DataSplitConfig
) -> SampleBuilder:
    """Turns the records of ``source`` into samples (tokens, labels, images)."""
    data = config.data
    return SampleBuilder(
        inputs.text_dir,
        image_format,
        image_dir=inputs.image_dir,
        format=source_format(data, source),
        layout=record_layout(data, source),
        train_on=data.train_on,
        max_len=config.batch.seq_len,
        too_long=data.too_long,
        image_token_id=inputs.image_token_id,
        other_modalities=inputs.others,
    )


def data_description(config: DataConfig, split: str, index: int | None = None) -> str:
    """Names the configured data of ``split`` ("train" or "eval") for people, in config terms:
    ``data.train.path=/data/train.jsonl (data.format=chat)``, the synthetic set's size, or a
    mixture's sources; ``index`` names one source of a list."""
    sources = data_sources(config, split)
    if index is None and len(sources) > 1:
        return f"the mixture of {len(sources)} sources of data.{split} ({', '.join(source_name(s) for s in sources)})"
    index = index or 0
    source, key = sources[index], source_key(config, split, index)
    if source_format(config, source) == "synthetic":
        return f"the synthetic data (data.synthetic_samples={config.synthetic_samples})"
    hub_split = f", split {source.split!r}" if source.split != "train" else ""
    subset = f", subset {source.subset!r}" if source.subset is not None else ""
    format_key = f"{key}.format" if source.format is not None else "data.format"
    return f"{key}.path={source.path} ({format_key}={source_format(config, source)}{subset}{hub_split})"


def sizes_key_parts(
    config: TrainConfig,
    dataset: Dataset,
    image_format: ImageFormat,
    inputs: InputFolders,
    source: DataSplitConfig | None = None,
) -> dict[str, Any]:
    """What one source's sample sizes depend on (JSON-able): the data (files' names, sizes and
    mtimes, or the hub dataset's fingerprint), the sample format and its layout, ``batch.seq_len``,
    the tokenizer and image-processor files, and the image format. ``source``: the source's config
    (default: the single ``data.train``)."""
    encoder = {
        "image_format": type(image_format).__name__,
        "describe": image_format.describe(),
        "max_tokens_per_image": image_format.max_tokens_per_image,
        "tokens_vary": image_format.tokens_vary,
    }
    data = config.data
    if isinstance(dataset, SyntheticImageText):
        synthetic = {
            "num_samples": len(dataset),
            "max_text": dataset.max_text,
            "lengths": dataset.lengths,
            "seed": dataset.seed,
            "vocab_size": dataset.vocab_size,
        }
        if dataset.others:  # only then: the keys of image-text synthetic data stay what they were
            synthetic["others"] = [
                {"name": name, "format": input_format.describe(), "token_id": token_id}
                for name, (input_format, token_id) in dataset.others.items()
            ]
        return {"synthetic": synthetic, "encoder": encoder}
    source = source or data_sources(data, "train")[0]
    records = dataset.records
    local = Path(source.path)
    identity = {"name": records.name, "kind": records.kind, "split": source.split, "num_records": len(records)}
    if local.exists():
        identity["files"] = files_identity(local)
    else:
        identity["datasets_fingerprint"] = getattr(records.dataset, "_fingerprint", None)
    layout = record_layout(data, source)
    samples = {
        "format": source_format(data, source),
        "layout": None if layout is None else {**vars(layout)},
        "image_root": source.image_root,
        "train_on": data.train_on,
        "seq_len": config.batch.seq_len,
        "too_long": data.too_long,
        "image_token_id": inputs.image_token_id,
    }
    processors = {"text_dir": folder_digest(inputs.text_dir), "image_dir": folder_digest(inputs.image_dir)}
    parts = {"data": identity, "samples": samples, "processors": processors, "encoder": encoder}
    if inputs.others:  # only then: the keys of one-encoder runs stay what they were
        parts["others"] = [
            {"name": o.name, "format": o.input_format.describe(), "token_id": o.token_id, "folder": folder_digest(o.folder)}
            for o in inputs.others
        ]
    return parts


@dataclass(frozen=True)
class SizedSource:
    """One source whose sizes are measured and cached on their own (so that adding a source to a
    mixture measures that source only): its dataset, key parts and cache folders."""

    name: str
    dataset: Dataset
    parts: dict[str, Any]
    dirs: list[Path]

    @property
    def key(self) -> str:
        return fingerprint(self.parts)


def sized_sources(config: TrainConfig, dataset: Dataset, image_format: ImageFormat, inputs: InputFolders) -> list[SizedSource]:
    """The training data's sources, one for a single source (synthetic included)."""
    data = config.data
    if isinstance(dataset, MixedDataset):
        pairs = list(zip(dataset.datasets, data_sources(data, "train")))
    else:
        pairs = [(dataset, data_sources(data, "train")[0])]
    out = []
    for part, source in pairs:
        synthetic = isinstance(part, SyntheticImageText)
        out.append(
            SizedSource(
                name=source_name(source),
                dataset=part,
                parts=sizes_key_parts(config, part, image_format, inputs, None if synthetic else source),
                dirs=cache_dirs(None if synthetic else source.path, config.output_dir),
            )
        )
    return out


def data_fingerprint(config: TrainConfig, sources: list[SizedSource], dataset: Dataset) -> str:
    """The key of the training data's sizes: the source's own, or for a mixture one over the
    sources' keys, names and weights (what the row plan depends on besides the seed and limits)."""
    if not isinstance(dataset, MixedDataset):
        return sources[0].key
    mixture = dataset.mixture
    return fingerprint({"sources": [s.key for s in sources], "names": list(mixture.names), "weights": mixture.weights})


def prepare_sizes(
    config: TrainConfig, dataset: Dataset, image_format: ImageFormat, inputs: InputFolders
) -> tuple[list[tuple[SizedSource, SampleSizes, Path]], float]:
    """Measure every training sample in this process and write each source's size cache.

    Returns:
        per source, its table and the cache file written; and the seconds the measuring took.
    """
    started = time.perf_counter()
    out = []
    for source in sized_sources(config, dataset, image_format, inputs):
        part = source.dataset
        names = other_names(inputs)
        sizes = SampleSizes(measure(part.size, len(part), range(len(part)), strict=config.data.strict, others=names), names)
        out.append((source, sizes, save_cache(sizes, source.dirs, source.key, source.parts)))
    return out, time.perf_counter() - started


def prepare_from_config(config: TrainConfig) -> str:
    """``python -m fusiontrain prepare``: build the model on the meta device (for its image
    format, tokenizer folders and vocabulary; no weights are read), measure every training sample
    and write the size caches. Returns a report for people: per source, its records, bad records
    by reason, tokens, images, and (in a mixture) its share of each epoch."""
    source = ModelSource.from_config(config.model)
    model = build_meta_model(config.model, source)
    image_format, inputs, _ = model_inputs(config, source, model)
    dataset = build_dataset(config, image_format, inputs, model, split="train")
    if dataset is None:
        raise ValueError("prepare needs training data: set data.train.path (or data.format=synthetic)")
    measured, seconds = prepare_sizes(config, dataset, image_format, inputs)
    total = sum(len(sizes) for _, sizes, _ in measured)
    rate = total / seconds if seconds > 0 else float("inf")
    lines = [f"measured {total} samples of {data_description(config.data, 'train')} in {seconds:.2f} s ({rate:.0f} samples/s, one process)"]
    per_epoch = dataset.mixture.counts_per_epoch() if isinstance(dataset, MixedDataset) else None
    epoch_total = sum(per_epoch.values()) if per_epoch else 0
    for index, (sized, sizes, path) in enumerate(measured):
        skipped = sizes.skip_counts()
        usable = sizes.table[:, 3] == 0
        tokens, images = int(sizes.table[usable, 0].sum()), int(sizes.table[usable, 1].sum())
        line = (
            f"{sized.name}: {len(sizes)} records, {int(usable.sum())} usable, bad {skipped or 'none'}; "
            f"{tokens} tokens and {images} images in the usable ones"
        )
        if per_epoch is not None:
            count = per_epoch[sized.name]
            line += f"; {count} samples per epoch ({count / epoch_total:.1%} of the mixture, {count / len(sizes):.2f}x its records)"
        where = data_description(config.data, "train", index if per_epoch is not None else None)
        lines += [f"  {line}", f"    {where}; size cache: {path}"]
    return "\n".join(lines)


def load_or_measure_sizes(
    config: TrainConfig,
    dataset: Dataset,
    image_format: ImageFormat,
    inputs: InputFolders,
    *,
    rank: int,
    world: int,
    combine: Combine,
) -> tuple[SampleSizes, str]:
    """The training data's size table and its fingerprint (:func:`data_fingerprint`): per source,
    from its cache when every rank finds it, else measured by all ranks together (rank ``r``
    measures samples ``r, r + world, ...``; the tables are summed over ranks) and written by rank
    0; a mixture's tables end to end, in its id order."""
    sources = sized_sources(config, dataset, image_format, inputs)
    names = other_names(inputs)
    tables = []
    for source in sources:
        part = source.dataset
        cached = load_cached(source.dirs, source.key, len(part), names)
        found = combine(torch.tensor([int(cached is not None)], dtype=torch.long))
        if int(found) == world:
            logger.info("sample sizes of %s from %s", source.name, cached[1])
            tables.append(cached[0].table)
            continue
        started = time.perf_counter()
        local = measure(part.size, len(part), range(rank, len(part), world), strict=config.data.strict, others=names)
        sizes = SampleSizes(combine(local), names)
        tables.append(sizes.table)
        if rank == 0:
            path = save_cache(sizes, source.dirs, source.key, source.parts)
            logger.warning(
                "measured the sizes of %d samples of %s in %.1f s on %d ranks (no cache; `python -m fusiontrain "
                "prepare` writes it ahead of time); cached in %s",
                len(part), source.name, time.perf_counter() - started, world, path,
            )
    table = tables[0] if len(tables) == 1 else torch.cat(tables)
    return SampleSizes(table, names), data_fingerprint(config, sources, dataset)


def build_train_loader(
    config: TrainConfig,
    dataset: Dataset,
    image_format: ImageFormat,
    inputs: InputFolders,
    *,
    rank: int,
    world: int,
    combine: Combine,
    ignore_index: int,
) -> PlannedLoader:
    """This rank's loader of the global row plan (see :mod:`fusiontrain.data.loader`).

    Raises:
        ValueError: the global batch does not split into micro-batches over ``world`` ranks.
    """
    sizes, key = load_or_measure_sizes(config, dataset, image_format, inputs, rank=rank, world=world, combine=combine)
    stream_config = build_stream_config(config.data, config.batch, image_format, ignore_index=ignore_index)
    limits = RowLimits(
        seq_len=stream_config.seq_len,
        max_images=stream_config.max_images,
        max_encoder_tokens=stream_config.max_encoder_tokens,
        packing=stream_config.packing,
        open_rows=stream_config.max_open_rows,
        other_limits=other_limits(config.data, inputs),
    )
    name = data_description(config.data, "train")
    # picklable: the plan travels to the dataloader workers
    order = partial(dataset.mixture.order, seed=config.seed) if isinstance(dataset, MixedDataset) else None
    plan = RowPlan(sizes, limits, config.seed, name=name, strict=config.data.strict, order=order)
    plan.epoch(0)  # fails early (on every rank alike) when no sample is usable
    layout = build_batch_layout(config.batch, config.parallel, world)  # the one place of the global-batch arithmetic
    dealing = Dealing(layout.global_batch_size, rank, world, config.batch.micro_batch_size)
    identity = {
        "seed": config.seed,
        "data_fingerprint": key,
        "limits": limits.identity(),
        "rows_per_step": dealing.rows_per_step,
    }
    log = Path(config.output_dir) / "sample_ids" / f"rank_{rank}.jsonl" if config.data.log_sample_ids else None

    def make_stream(start: DataPosition) -> PlannedStream:
        return PlannedStream(plan, dataset.__getitem__, collate_formats(image_format, inputs), stream_config, dealing, start)

    return PlannedLoader(
        make_stream,
        num_workers=config.data.num_workers,
        worker_start=config.data.worker_start,
        identity=identity,
        sample_log=log,
        rank=rank,
    )


def build_streaming_train_loader(
    config: TrainConfig, image_format: ImageFormat, inputs: InputFolders, *, rank: int, world: int, ignore_index: int
) -> StreamingLoader:
    """This rank's loader of the streamed ``data.train`` (``data.streaming``): its shards split
    over ranks (``data.stream_split``) and ``data.num_workers`` workers, packed per worker (see
    :mod:`fusiontrain.data.streaming`), each modality beside images held to its row limits. Its
    position is per rank, unlike the row plan's."""
    data = config.data
    sources = data_sources(data, "train")
    streams = [
        open_stream(source.path, split=source.split, subset=source.subset, image_root=source.image_root)
        for source in sources
    ]
    builders = [sample_builder(config, image_format, inputs, source) for source in sources]
    if len(sources) > 1:
        weights = None if sources[0].weight is None else tuple(float(source.weight) for source in sources)
        stream_source = MixedStreamSource(streams, tuple(source_name(source) for source in sources), weights)
        build = SourceBuilders(builders)
    else:
        stream_source, build = streams[0], builders[0]
    stream = StreamingSampleStream(
        stream_source,
        build,
        collate_formats(image_format, inputs),
        build_stream_config(data, config.batch, image_format, ignore_index=ignore_index),
        rank=rank,
        world=world,
        num_workers=data.num_workers,
        seed=config.seed,
        stream_split=data.stream_split,
        name=data_description(data, "train"),
        other_limits=other_limits(data, inputs),
    )
    return build_streaming_loader(stream, config.data.worker_start)
