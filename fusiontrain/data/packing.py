"""Packing image-text samples into fixed-length rows that keep every sample to itself.

The packer is a streaming, bounded first-fit: each sample goes into the first open row with room
for its tokens and its images; when none has room and ``max_open_rows`` rows are open, the
fullest row is closed (emitted) first. Plain greedy packing (one open row) wastes the tail of a
row whenever the next sample is long; a few open rows let short samples fill those tails, which
matters for long-tailed length mixes (``benchmarks/packing.py`` compares them), while the state to
save on a checkpoint stays a handful of sample ids.

In a packed row, sample ``j`` occupies tokens ``[o_j, o_j + n_j)`` and image slots of its own:

- ``input_pos`` restarts at 0 for every sample;
- self-attention is block-diagonal causal (``segment_ids`` say which sample a token belongs to);
- a token sees only its own sample's images, within their spans (the Llama 3.2 rule);
- labels stay per sample (a sample's last token predicts nothing), so none crosses a boundary;
- padding at the end of a row is its own segment, has no label and sees no image.

Shapes: b rows, s tokens per row (``seq_len``), s_e = image slots x tokens per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fusiontrain.data.batch import Batch, ImageSpec, Sample, seen_columns, stack_images


@dataclass
class PackedRow:
    """Samples packed into one row, in order, with the ids that recreate them after a restart."""

    keys: list[Any] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(sample) for sample in self.samples)

    @property
    def num_images(self) -> int:
        return sum(len(sample.images) for sample in self.samples)

    def fits(self, sample: Sample, seq_len: int, max_images: int) -> bool:
        return self.num_tokens + len(sample) <= seq_len and self.num_images + len(sample.images) <= max_images

    def add(self, key: Any, sample: Sample) -> None:
        self.keys.append(key)
        self.samples.append(sample)


class FirstFitPacker:
    """Bounded first-fit packing (see the module docstring).

    Args:
        seq_len: tokens per row.
        max_images: image slots per row.
        max_open_rows: rows kept open at once (1 = plain greedy packing).
    """

    def __init__(self, seq_len: int, max_images: int, max_open_rows: int = 8) -> None:
        if max_open_rows < 1:
            raise ValueError(f"max_open_rows must be >= 1, got {max_open_rows}")
        self.seq_len = seq_len
        self.max_images = max_images
        self.max_open_rows = max_open_rows
        self.open_rows: list[PackedRow] = []

    def add(self, key: Any, sample: Sample) -> list[PackedRow]:
        """Place ``sample`` (identified by ``key``); returns the rows this closed, in order."""
        if len(sample) > self.seq_len or len(sample.images) > self.max_images:
            raise ValueError(
                f"sample {sample.origin or key} ({len(sample)} tokens, {len(sample.images)} images) cannot fit a row "
                f"of {self.seq_len} tokens and {self.max_images} images"
            )
        for row in self.open_rows:
            if row.fits(sample, self.seq_len, self.max_images):
                row.add(key, sample)
                return self._close_full_rows()
        closed = []
        if len(self.open_rows) == self.max_open_rows:
            fullest = max(self.open_rows, key=lambda row: row.num_tokens)
            self.open_rows.remove(fullest)
            closed.append(fullest)
        row = PackedRow()
        row.add(key, sample)
        self.open_rows.append(row)
        return closed + self._close_full_rows()

    def _close_full_rows(self) -> list[PackedRow]:
        """Rows that no sample can join any more (no token left) close at once."""
        full = [row for row in self.open_rows if row.num_tokens == self.seq_len]
        self.open_rows = [row for row in self.open_rows if row.num_tokens < self.seq_len]
        return full

    def flush(self) -> list[PackedRow]:
        """Close every open row."""
        rows, self.open_rows = self.open_rows, []
        return rows

    def state(self) -> list[list[Any]]:
        """The open rows, as lists of sample keys (samples are rebuilt from their keys)."""
        return [list(row.keys) for row in self.open_rows]


def collate_rows(
    rows: list[PackedRow], seq_len: int, spec: ImageSpec, *, pad_id: int = 0, ignore_index: int = -100
) -> Batch:
    """A batch of packed rows: ``segment_ids`` mark the samples, ``input_pos`` restarts per
    sample, ``encoder_mask`` keeps each token to its own sample's images."""
    b = len(rows)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), ignore_index, dtype=torch.long)
    input_pos = torch.zeros(b, seq_len, dtype=torch.long)
    segment_ids = torch.zeros(b, seq_len, dtype=torch.long)
    is_real = torch.zeros(b, seq_len, dtype=torch.bool)
    max_images = max(row.num_images for row in rows)
    width = spec.tokens_per_image
    encoder_mask = torch.zeros(b, seq_len, max_images * width, dtype=torch.bool) if max_images else None
    for r, row in enumerate(rows):
        offset, slot = 0, 0
        for segment, sample in enumerate(row.samples):
            n = len(sample)
            tokens[r, offset : offset + n] = sample.tokens
            labels[r, offset : offset + n] = sample.labels
            input_pos[r, offset : offset + n] = torch.arange(n)
            segment_ids[r, offset : offset + n] = segment
            is_real[r, offset : offset + n] = True
            for (start, end), image in zip(sample.image_spans, sample.images):
                encoder_mask[r, offset + start : offset + end, slot * width + seen_columns(image, spec)] = True
                slot += 1
            offset += n
        pad = seq_len - offset
        input_pos[r, offset:] = torch.arange(pad)
        segment_ids[r, offset:] = len(row.samples)  # padding: a segment of its own
    return Batch(
        tokens=tokens,
        labels=labels,
        input_pos=input_pos,
        is_real=is_real,
        segment_ids=segment_ids,
        encoder_input=stack_images([[img for s in row.samples for img in s.images] for row in rows], spec),
        encoder_mask=encoder_mask,
    )


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s, s]`` bool: token i attends to token j iff both are in the same segment and j <= i."""
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return same & causal


def block_causal_block_mask(segment_ids: torch.Tensor) -> Any:
    """The same pattern as a flex_attention ``BlockMask`` (the GPU path): sparse blocks are
    skipped instead of multiplied by a dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_sample_causal(b, h, q, kv):  # noqa: ANN001 - flex_attention's mask_mod signature
        return (segment_ids[b, q] == segment_ids[b, kv]) & (kv <= q)

    b, s = segment_ids.shape
    return create_block_mask(same_sample_causal, b, None, s, s, device=segment_ids.device)
