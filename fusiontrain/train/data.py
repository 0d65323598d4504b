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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusiontrain.config import BatchConfig, DataConfig, DataSplitConfig, TrainConfig
from fusiontrain.data.conversations import CONVERSATION_FORMATS, ConversationLayout, conversation_layout
from fusiontrain.data.formats import RecordDataset, SampleBuilder
from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.loader import Dealing, PlannedLoader, PlannedStream, StreamConfig
from fusiontrain.data.row_plan import DataPosition, RowLimits, RowPlan
from fusiontrain.data.stream_sources import open_stream
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
from fusiontrain.train.model import build_meta_model
from fusiontrain.train.setup import build_batch_layout

logger = logging.getLogger("fusiontrain.data")

Dataset = RecordDataset | SyntheticImageText
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
) -> RecordDataset | SyntheticImageText | None:
    """The configured dataset for ``split`` ("train" or "eval"); None when no eval split is set.

    Args:
        config: the run config (``data``, ``batch.seq_len`` and ``seed`` are read).
        image_format: the encoder's image format.
        inputs: where the model's tokenizer and image processor are (its family says).
        model: the model (synthetic data reads its vocabulary; the image token is the first new
            embedding row unless the tokenizer has its own).
        split: "train" or "eval".
    """
    data = config.data
    source = data.train if split == "train" else data.eval
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
        )
    if source.path is None:
        return None
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
    )


def data_description(config: DataConfig, split: str) -> str:
    """Names the configured data of ``split`` ("train" or "eval") for people, in config terms:
    ``data.train.path=/data/train.jsonl (data.format=chat)``, or the synthetic set's size."""
    source = config.train if split == "train" else config.eval
    if source_format(config, source) == "synthetic":
        return f"the synthetic data (data.synthetic_samples={config.synthetic_samples})"
    hub_split = f", split {source.split!r}" if source.split != "train" else ""
    subset = f", subset {source.subset!r}" if source.subset is not None else ""
    format_key = f"data.{split}.format" if source.format is not None else "data.format"
    return f"data.{split}.path={source.path} ({format_key}={source_format(config, source)}{subset}{hub_split})"


def sizes_key_parts(config: TrainConfig, dataset: Dataset, image_format: ImageFormat, inputs: InputFolders) -> dict[str, Any]:
    """What the training split's sample sizes depend on (JSON-able): the data (files' names,
    sizes and mtimes, or the hub dataset's fingerprint), the sample format and ``batch.seq_len``,
    the tokenizer and image-processor files, and the image format."""
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
        return {"synthetic": synthetic, "encoder": encoder}
    records = dataset.records
    local = Path(data.train.path)
    source = {"name": records.name, "kind": records.kind, "split": data.train.split, "num_records": len(records)}
    if local.exists():
        source["files"] = files_identity(local)
    else:
        source["datasets_fingerprint"] = getattr(records.dataset, "_fingerprint", None)
    layout = record_layout(data, data.train)
    samples = {
        "format": source_format(data, data.train),
        "layout": None if layout is None else {**vars(layout)},
        "image_root": data.train.image_root,
        "train_on": data.train_on,
        "seq_len": config.batch.seq_len,
        "too_long": data.too_long,
        "image_token_id": inputs.image_token_id,
    }
    processors = {"text_dir": folder_digest(inputs.text_dir), "image_dir": folder_digest(inputs.image_dir)}
    return {"data": source, "samples": samples, "processors": processors, "encoder": encoder}


def _dirs(config: TrainConfig) -> list[Path]:
    synthetic = source_format(config.data, config.data.train) == "synthetic"
    return cache_dirs(None if synthetic else config.data.train.path, config.output_dir)


def prepare_sizes(
    config: TrainConfig, dataset: Dataset, image_format: ImageFormat, inputs: InputFolders
) -> tuple[SampleSizes, Path, float]:
    """Measure every training sample in this process and write the size cache.

    Returns:
        the table, the cache file written, and the seconds the measuring took.
    """
    parts = sizes_key_parts(config, dataset, image_format, inputs)
    started = time.perf_counter()
    sizes = SampleSizes(measure(dataset.size, len(dataset), range(len(dataset)), strict=config.data.strict))
    seconds = time.perf_counter() - started
    return sizes, save_cache(sizes, _dirs(config), fingerprint(parts), parts), seconds


def prepare_from_config(config: TrainConfig) -> str:
    """``python -m fusiontrain prepare``: build the model on the meta device (for its image
    format, tokenizer folders and vocabulary; no weights are read), measure every training sample
    and write the size cache. Returns a report for people."""
    source = ModelSource.from_config(config.model)
    model = build_meta_model(config.model, source)
    image_format = source.family.image_format(model)
    inputs = source.input_folders(model)
    dataset = build_dataset(config, image_format, inputs, model, split="train")
    if dataset is None:
        raise ValueError("prepare needs training data: set data.train.path (or data.format=synthetic)")
    sizes, path, seconds = prepare_sizes(config, dataset, image_format, inputs)
    skipped = sizes.skip_counts()
    usable = len(sizes) - sum(skipped.values())
    rate = len(sizes) / seconds if seconds > 0 else float("inf")
    return (
        f"measured {len(sizes)} samples of {data_description(config.data, 'train')} in {seconds:.2f} s "
        f"({rate:.0f} samples/s, one process); {usable} usable, skipped {skipped or 'none'}\n"
        f"size cache: {path}"
    )


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
    """The training split's size table and its fingerprint: from the cache when every rank finds
    it, else measured by all ranks together (rank ``r`` measures samples ``r, r + world, ...``;
    the tables are summed over ranks), then written by rank 0."""
    parts = sizes_key_parts(config, dataset, image_format, inputs)
    key = fingerprint(parts)
    dirs = _dirs(config)
    cached = load_cached(dirs, key, len(dataset))
    found = combine(torch.tensor([int(cached is not None)], dtype=torch.long))
    if int(found) == world:
        logger.info("sample sizes from %s", cached[1])
        return cached[0], key
    started = time.perf_counter()
    local = measure(dataset.size, len(dataset), range(rank, len(dataset), world), strict=config.data.strict)
    sizes = SampleSizes(combine(local))
    if rank == 0:
        path = save_cache(sizes, dirs, key, parts)
        logger.warning(
            "measured the sizes of %d samples in %.1f s on %d ranks (no cache; `python -m fusiontrain prepare` "
            "writes it ahead of time); cached in %s",
            len(dataset), time.perf_counter() - started, world, path,
        )
    return sizes, key


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
    )
    name = data_description(config.data, "train")
    plan = RowPlan(sizes, limits, config.seed, name=name, strict=config.data.strict)
    plan.epoch(0)  # fails early (on every rank alike) when no sample is usable
    layout = build_batch_layout(config.batch, config.parallel, world)  # the one place of the global-batch arithmetic
    dealing = Dealing(layout.global_batch_size, rank, world, config.batch.micro_batch_size)
    identity = {
        "seed": config.seed,
        "data_fingerprint": key,
        "limits": {**vars(limits)},
        "rows_per_step": dealing.rows_per_step,
    }
    log = Path(config.output_dir) / "sample_ids" / f"rank_{rank}.jsonl" if config.data.log_sample_ids else None

    def make_stream(start: DataPosition) -> PlannedStream:
        return PlannedStream(plan, dataset.__getitem__, image_format, stream_config, dealing, start)

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
    :mod:`fusiontrain.data.streaming`). Its position is per rank, unlike the row plan's."""
    data = config.data
    stream = StreamingSampleStream(
        open_stream(data.train.path, split=data.train.split, subset=data.train.subset, image_root=data.train.image_root),
        sample_builder(config, image_format, inputs, data.train),
        image_format,
        build_stream_config(data, config.batch, image_format, ignore_index=ignore_index),
        rank=rank,
        world=world,
        num_workers=data.num_workers,
        seed=config.seed,
        stream_split=data.stream_split,
        name=data_description(data, "train"),
    )
    return build_streaming_loader(stream, config.data.worker_start)
