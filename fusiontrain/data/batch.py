"""The batch the trainer feeds the model, and padded collation of token samples.

Shapes: b rows, s tokens per row, s_e encoder tokens per row, i images per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from collections.abc import Callable
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class ImageSpec:
    """What one image looks like to the model's encoder.

    Attributes:
        kind: "mllama" (tiled: ``pixel_values`` ``[t, 3, H, W]`` plus aspect-ratio id and tile
            mask) or "tower" (a CLIP / SigLIP tower: ``pixel_values`` ``[3, H, W]``).
        image_size: tile (or image) height and width in pixels.
        tokens_per_image: encoder tokens per image: ``t * p`` for Mllama, ``n_tok`` for a tower.
        max_num_tiles: tiles per image (Mllama; 1 for a tower).
    """

    kind: Literal["mllama", "tower"]
    image_size: int
    tokens_per_image: int
    max_num_tiles: int = 1


@dataclass
class Sample:
    """One tokenized sample.

    Attributes:
        tokens: ``[n]`` token ids.
        labels: ``[n]`` target ids, already shifted (position j predicts ``labels[j]``), with
            the ignore index where nothing is trained.
        images: per image, the encoder's inputs (see :class:`ImageSpec`).
        image_spans: per image, the token range ``[start, end)`` that sees it (the Llama 3.2
            rule: from its image token until the next image token, consecutive image tokens
            sharing the later span); tokens outside every span see no image.
        origin: where the sample came from (``file:line``), for messages.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    images: list[dict[str, torch.Tensor]] = field(default_factory=list)
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    origin: str = ""

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Batch:
    """Model inputs and targets for one micro-batch.

    Attributes:
        tokens: ``[b, s]``.
        labels: ``[b, s]``, ignore index on prompt and padding.
        input_pos: ``[b, s]`` positions, restarting at 0 per sample.
        is_real: ``[b, s]`` bool, False on padding.
        segment_ids: ``[b, s]`` which packed sample each token belongs to (padding is a segment
            of its own), or None for one sample per row (plain causal attention).
        encoder_input: the encoder's keyword arguments, or None (no image in the batch).
        encoder_mask: ``[b, s, s_e]`` bool, or None.
        skipped: bad samples skipped while producing this batch, by reason.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    input_pos: torch.Tensor
    is_real: torch.Tensor
    segment_ids: torch.Tensor | None = None
    encoder_input: dict[str, torch.Tensor] | None = None
    encoder_mask: torch.Tensor | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def self_attention_mask(self, *, flex: bool = False) -> Any:
        """None (causal) for unpacked rows; for packed rows the block-diagonal causal mask, dense
        ``[b, s, s]`` bool, or a flex_attention ``BlockMask`` when ``flex``."""
        if self.segment_ids is None:
            return None
        from fusiontrain.data.packing import block_causal_block_mask, block_causal_mask

        return block_causal_block_mask(self.segment_ids) if flex else block_causal_mask(self.segment_ids)

    def model_inputs(self, *, flex: bool = False) -> dict[str, Any]:
        """The keyword arguments of ``DeepFusionModel.forward`` besides ``tokens``: the
        self-attention mask (see :meth:`self_attention_mask`), encoder inputs and mask, positions."""
        return {
            "mask": self.self_attention_mask(flex=flex),
            "encoder_input": self.encoder_input,
            "encoder_mask": self.encoder_mask,
            "input_pos": self.input_pos,
        }

    def to(self, device: torch.device) -> Batch:
        """A copy on ``device``."""
        return self.map(lambda t: t.to(device, non_blocking=True))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """A copy with ``fn`` applied to every tensor (the encoder's inputs included)."""
        apply = lambda t: None if t is None else fn(t)  # noqa: E731
        encoder_input = None if self.encoder_input is None else {k: apply(v) for k, v in self.encoder_input.items()}
        return replace(
            self,
            tokens=apply(self.tokens),
            labels=apply(self.labels),
            input_pos=apply(self.input_pos),
            is_real=apply(self.is_real),
            segment_ids=apply(self.segment_ids),
            encoder_input=encoder_input,
            encoder_mask=apply(self.encoder_mask),
        )


def seen_columns(image: dict[str, torch.Tensor], spec: ImageSpec) -> torch.Tensor:
    """Indices, among an image's ``tokens_per_image`` encoder tokens, that text may attend to:
    all of them for a tower; for Mllama only the tokens of its real tiles (``aspect_ratio_mask``),
    as MllamaProcessor's cross_attention_mask does; padding tiles are never seen."""
    if spec.kind == "tower":
        return torch.arange(spec.tokens_per_image)
    per_tile = spec.tokens_per_image // spec.max_num_tiles
    real_tiles = image["aspect_ratio_mask"].nonzero().flatten()
    return (real_tiles[:, None] * per_tile + torch.arange(per_tile)).flatten()


def with_placeholder_image(batch: Batch, spec: ImageSpec) -> Batch:
    """``batch`` with one blank image slot per row that no token attends to, when it has no image.

    Under FSDP every rank must run the same modules: a rank whose micro-batch is text-only while
    another rank's has images would skip the encoder and the cross-attention layers and so miss
    their collectives. A blank, fully masked slot keeps them running, and changes no output: a
    token that sees no image gets exactly zero from every cross-attention layer.
    """
    if batch.encoder_input is not None:
        return batch
    b, s = batch.tokens.shape
    batch.encoder_input = stack_images([[_blank_image(spec)] for _ in range(b)], spec)
    batch.encoder_mask = torch.zeros(b, s, spec.tokens_per_image, dtype=torch.bool)
    return batch


def _blank_image(spec: ImageSpec) -> dict[str, torch.Tensor]:
    if spec.kind == "tower":
        return {"pixel_values": torch.zeros(3, spec.image_size, spec.image_size)}
    tile_mask = torch.zeros(spec.max_num_tiles, dtype=torch.long)
    tile_mask[0] = 1
    return {
        "pixel_values": torch.zeros(spec.max_num_tiles, 3, spec.image_size, spec.image_size),
        "aspect_ratio_ids": torch.tensor(0),
        "aspect_ratio_mask": tile_mask,
    }


def stack_images(per_row: list[list[dict[str, torch.Tensor]]], spec: ImageSpec) -> dict[str, torch.Tensor] | None:
    """Encoder inputs for ``b`` rows with up to ``i`` images each, zero-padded to the longest row.

    Mllama: ``pixel_values`` ``[b, i, t, 3, H, W]``, ``aspect_ratio_ids`` ``[b, i]`` (0 = padding),
    ``aspect_ratio_mask`` ``[b, i, t]``. Tower: ``pixel_values`` ``[b, i, 3, H, W]``.
    """
    max_images = max((len(images) for images in per_row), default=0)
    if max_images == 0:
        return None
    b, h = len(per_row), spec.image_size
    if spec.kind == "mllama":
        t = spec.max_num_tiles
        stacked = {
            "pixel_values": torch.zeros(b, max_images, t, 3, h, h),
            "aspect_ratio_ids": torch.zeros(b, max_images, dtype=torch.long),
            "aspect_ratio_mask": torch.zeros(b, max_images, t, dtype=torch.long),
        }
        # A padding slot keeps one "real" tile, as MllamaImageProcessor does: its vision attention
        # then has keys to attend to (no fully masked row, hence no NaN). No token attends to it.
        stacked["aspect_ratio_mask"][:, :, 0] = 1
    else:
        stacked = {"pixel_values": torch.zeros(b, max_images, 3, h, h)}
    for row, images in enumerate(per_row):
        for index, image in enumerate(images):
            for key, value in image.items():
                stacked[key][row, index] = value
    return stacked


PAD_TO_MULTIPLE = 8


def collate_padded(samples: list[Sample], seq_len: int, spec: ImageSpec, *, pad_id: int = 0, ignore_index: int = -100) -> Batch:
    """One sample per row, right-padded to the longest sample of the batch (rounded up to a
    multiple of 8, at most ``seq_len``), as a padding collator does. Padding is masked from the
    loss and sees no image; causal attention keeps it from affecting real tokens."""
    b = len(samples)
    longest = max(len(sample.tokens) for sample in samples)
    if longest > seq_len:
        raise ValueError(f"a sample of {longest} tokens does not fit batch.seq_len={seq_len}")
    seq_len = min(seq_len, -(-longest // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), ignore_index, dtype=torch.long)
    is_real = torch.zeros(b, seq_len, dtype=torch.bool)
    for row, sample in enumerate(samples):
        n = len(sample.tokens)
        tokens[row, :n], labels[row, :n], is_real[row, :n] = sample.tokens, sample.labels, True
    max_images = max(len(sample.images) for sample in samples)
    encoder_mask = None
    if max_images:
        encoder_mask = torch.zeros(b, seq_len, max_images * spec.tokens_per_image, dtype=torch.bool)
        for row, sample in enumerate(samples):
            n = len(sample.tokens)
            for index, ((start, end), image) in enumerate(zip(sample.image_spans, sample.images)):
                columns = index * spec.tokens_per_image + seen_columns(image, spec)
                encoder_mask[row, start:end, columns] = True
    input_pos = torch.arange(seq_len).expand(b, seq_len).clone()
    return Batch(
        tokens=tokens,
        labels=labels,
        input_pos=input_pos,
        is_real=is_real,
        encoder_input=stack_images([s.images for s in samples], spec),
        encoder_mask=encoder_mask,
    )
