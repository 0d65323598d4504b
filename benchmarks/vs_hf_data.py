"""The data side of ``benchmarks/vs_hf.py``: the Trainer configs, the padded batch stream that
(a) and (d) read, the batch conversions into HF's and torchtune's arguments, batch fingerprints,
and the model FLOPs of the samples a batch holds.

Shapes: b rows, s tokens per row, i image slots per row, t tiles per image, s_e encoder tokens
per row (``i * t * tokens_per_tile``).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusiontrain.source.model_source import ModelSource
from fusiontrain.train.data import build_dataset
from fusiontrain.train.model import build_meta_model
from fusiontrain.config import TrainConfig, load_config
from fusiontrain.data import Batch, ImageFormat
from fusiontrain.train.data import build_train_loader
from fusiontrain.flops.count import step_flops
from fusiontrain.models import encoder_mask_from_cross_attention_mask

SEQ_LEN = 1024
ROWS = 4  # samples per step for (a), (b), (d); packed rows per step for (c)
OPEN_ROWS = 8
MAX_IMAGES_PER_ROW = 16
NUM_SAMPLES = 4096  # far more than a run of (c) reads: no epoch wraps around
LOSS_CHUNKS = 8  # fusiontrain's chunked loss and torchtune's CEWithChunkedOutputLoss alike
LR, BETAS, EPS, MAX_GRAD_NORM = 1e-4, (0.9, 0.95), 1e-8, 1.0
IGNORE = -100


# -- configuration and the padded stream ----------------------------------------------------------


def train_config(
    folder: Path,
    output_dir: Path,
    *,
    packing: bool,
    steps: int,
    precision: str = "fp32",
    padding_free: bool = True,
    extra: Sequence[str] = (),
) -> TrainConfig:
    """The Trainer's config for (b) (``packing=False``, padding-free), (r) (``packing=False,
    padding_free=False``: padded rows) and (c) (``packing=True``); ``extra`` overrides go last
    (``compile_cpu.py`` adds ``parallel.compile``)."""
    overrides = [
        f"output_dir={output_dir}",
        f"max_steps={steps}",
        f"model.hf_mllama={folder}",
        "model.dtype=float32",
        "data.format=synthetic",
        "data.synthetic_lengths=long_tail",
        f"data.synthetic_max_text={SEQ_LEN}",
        f"data.synthetic_samples={NUM_SAMPLES}",
        f"data.packing={'true' if packing else 'false'}",
        f"data.padding_free={'true' if padding_free else 'false'}",
        f"data.packing_open_rows={OPEN_ROWS}",
        f"data.max_images_per_row={MAX_IMAGES_PER_ROW}",
        "data.num_workers=0",  # samples are built in the training loop, as the other loops do
        f"batch.seq_len={SEQ_LEN}",
        f"batch.micro_batch_size={ROWS}",
        f"batch.global_batch_size={ROWS}",
        f"optim.lr={LR}",
        f"optim.betas=[{BETAS[0]}, {BETAS[1]}]",
        f"optim.eps={EPS}",
        "optim.weight_decay=0.0",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        f"optim.max_grad_norm={MAX_GRAD_NORM}",
        f"parallel.mixed_precision={precision}",
        "parallel.activation_checkpointing=none",
        f"loss.num_output_chunks={LOSS_CHUNKS}",
        "eval.every_n_steps=0",
        "checkpoint.every_n_steps=0",
        "logging.every_n_steps=0",
        "logging.wandb.mode=disabled",
        *extra,
    ]
    return load_config(None, overrides)


def trainer_stream(config: TrainConfig) -> tuple[Iterator[Batch], ImageFormat]:
    """The batches the Trainer of ``config`` reads, built the way the Trainer builds them (same
    dataset, seed, row plan and collation); the script checks the equality batch by batch."""
    source = ModelSource.from_config(config.model)
    meta = build_meta_model(config.model, source)
    spec = source.family.image_format(meta)
    inputs = source.input_folders(meta)
    dataset = build_dataset(config, spec, inputs, meta, split="train")
    loader = build_train_loader(
        config, dataset, spec, inputs, rank=0, world=1, combine=lambda table: table, ignore_index=config.loss.ignore_index
    )
    return iter(loader), spec


def unshifted_labels(batch: Batch) -> torch.Tensor:
    """``[b, s]`` labels as HF and torchtune take them (position j is scored against
    ``labels[j + 1]``, both libraries shift themselves). Ours are already shifted, so theirs are
    ours moved one to the right; the last position of a padded row must have no target."""
    if not (batch.labels[:, -1] == IGNORE).all():
        raise AssertionError("the last position of a padded row has a target (the libraries' label shift would drop it)")
    labels = torch.full_like(batch.labels, IGNORE)
    labels[:, 1:] = batch.labels[:, :-1]
    return labels


def hf_inputs(batch: Batch, spec: ImageFormat, *, check: bool = False) -> dict[str, Any]:
    """Our padded batch as ``MllamaForConditionalGeneration`` keyword arguments.

    Our ``encoder_mask`` ``[b, s, i * t * tokens_per_tile]`` marks whole tiles, so it folds exactly
    into HF's ``cross_attention_mask`` ``[b, s, i, t]``; ``check`` verifies it (outside the timed
    steps).
    """
    b, s = batch.tokens.shape
    inputs: dict[str, Any] = {
        "input_ids": batch.tokens,
        "attention_mask": batch.is_real.long(),
        "labels": unshifted_labels(batch),
        "use_cache": False,
    }
    if batch.encoder_input is not None:
        tiles, per_tile = spec.max_num_tiles, spec.tokens_per_tile
        images = batch.encoder_input["aspect_ratio_ids"].shape[1]
        cross = batch.encoder_mask.view(b, s, images, tiles, per_tile).any(-1).long()
        if check and not torch.equal(encoder_mask_from_cross_attention_mask(cross, per_tile), batch.encoder_mask):
            raise AssertionError("encoder_mask does not fold into a per-tile cross_attention_mask")
        inputs.update(batch.encoder_input, cross_attention_mask=cross)
    return inputs


def torchtune_inputs(batch: Batch, aspect_ratios: torch.Tensor) -> dict[str, Any]:
    """Our padded batch as torchtune's vision collator (``padded_collate_tiled_images_and_mask``)
    hands it to its recipes: ``tokens`` ``[b, s]``, unshifted ``labels``, ``encoder_input`` with
    ``images`` ``[b, i, t, c, h, w]`` and ``aspect_ratio`` ``[b, i, 2]`` (tiles down, across; the
    padding slots get ``(1, 1)``, as that collator gives them) and ``encoder_mask``
    ``[b, s, i * t * tokens_per_tile]`` (the same layout as ours).

    Args:
        aspect_ratios: ``[1 + r, 2]``: row 0 for padding slots (aspect-ratio id 0), then the
            model's ``supported_aspect_ratios`` (ids are 1-based).
    """
    inputs: dict[str, Any] = {"tokens": batch.tokens, "labels": unshifted_labels(batch)}
    if batch.encoder_input is not None:
        ids = batch.encoder_input["aspect_ratio_ids"]
        inputs["encoder_input"] = {"images": batch.encoder_input["pixel_values"], "aspect_ratio": aspect_ratios[ids]}
        inputs["encoder_mask"] = batch.encoder_mask
    return inputs


def digest(batch: Batch) -> str:
    """A fingerprint of everything a batch feeds the model (tokens, targets, images, masks)."""
    h = hashlib.sha1()
    tensors = [batch.tokens, batch.labels, batch.is_real, batch.encoder_mask]
    tensors += list((batch.encoder_input or {}).values())
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def samples_digest(batch: Batch) -> str:
    """A fingerprint of the samples a batch holds, whatever their layout (padded rows or one
    padding-free row): their real tokens and targets in order, and their images (the real slots,
    aspect-ratio id > 0) in order."""
    h = hashlib.sha1()
    tensors = [batch.tokens[batch.is_real], batch.labels[batch.is_real]]
    if batch.encoder_input is not None:
        real = batch.encoder_input["aspect_ratio_ids"] > 0
        tensors += [batch.encoder_input[key][real] for key in sorted(batch.encoder_input) if key != "image_slots"]
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def images_in(batch: Batch) -> int:
    """Real images of a batch (padding slots have aspect-ratio id 0)."""
    if batch.encoder_input is None:
        return 0
    return int((batch.encoder_input["aspect_ratio_ids"] > 0).sum())


# -- the samples of a batch, and their model FLOPs ------------------------------------------------


@dataclass(frozen=True)
class SampleSize:
    """One sample's work: ``tokens`` real tokens and ``images`` images."""

    tokens: int
    images: int


def sample_sizes(batch: Batch, image_token_id: int) -> list[SampleSize]:
    """The samples a batch holds: one per non-empty row when padded, the packed segments
    otherwise; a sample's images are its image tokens (one per image for Mllama), checked against
    the batch's real image slots."""
    sizes = []
    for r in range(batch.tokens.shape[0]):
        real = batch.is_real[r]
        if not real.any():
            continue
        tokens = batch.tokens[r][real]
        segments = [tokens] if batch.segment_ids is None else [
            tokens[ids == segment] for ids in [batch.segment_ids[r][real]] for segment in ids.unique()
        ]
        sizes += [SampleSize(len(t), int((t == image_token_id).sum())) for t in segments]
    if sum(s.images for s in sizes) != images_in(batch):
        raise AssertionError(
            f"the samples hold {sum(s.images for s in sizes)} image tokens, the batch {images_in(batch)} images"
        )
    return sizes


class SampleFlops:
    """Model FLOPs of the samples' work (fusiontrain's counter, :func:`fusiontrain.flops.count.step_flops`):
    each sample counted as a row of its own, its real tokens only (causal self-attention over
    them), cross-attention to and the encoder over its own images only. Padding, padding image
    slots and attention across packed samples are not work of the samples, so no variant is
    credited for them, and every variant that trains on the same samples gets the same count.

    Args:
        model: the fusiontrain model whose sizes and trainable parameters are counted (one
            model for every variant: the same definition for all).
        image_token_id: the token id that marks an image.
    """

    def __init__(self, model: nn.Module, image_token_id: int) -> None:
        self.model = model
        self.image_token_id = image_token_id

    @functools.lru_cache(maxsize=None)
    def of_sample(self, size: SampleSize) -> float:
        """Forward + backward FLOPs of one sample."""
        return step_flops(self.model, num_rows=1, seq_len=size.tokens, images=size.images).total

    def of_sizes(self, sizes: list[SampleSize]) -> float:
        """Forward + backward FLOPs of the samples ``sizes`` (one step's, :func:`sample_sizes`)."""
        return sum(self.of_sample(size) for size in sizes)
