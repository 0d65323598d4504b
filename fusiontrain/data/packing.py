"""Packing image-text samples into fixed-length rows that keep every sample to itself.

The packer is a streaming, bounded first-fit: each sample goes into the first open row with room
for its tokens and its images; when none has room and ``max_open_rows`` rows are open, the
fullest row is closed (emitted) first. Plain greedy packing (one open row) wastes the tail of a
row whenever the next sample is long; a few open rows let short samples fill those tails, which
matters for long-tailed length mixes (``benchmarks/packing.py`` compares them). The training
loader runs it on sample sizes alone (:meth:`FirstFitPacker.add_sized`), once for the whole
dataset per epoch, the same on every rank (:mod:`fusiontrain.data.row_plan`); :meth:`add` packs
built samples (tests, and streams that cannot know sizes up front).

In a packed row, sample ``j`` occupies tokens ``[o_j, o_j + n_j)`` and image slots of its own:

- ``input_pos`` restarts at 0 for every sample;
- self-attention is block-diagonal causal (``segment_ids`` say which sample a token belongs to);
- a token sees only its own sample's images, within their spans (the Llama 3.2 rule);
- labels stay per sample (a sample's last token predicts nothing), so none crosses a boundary;
- padding at the end of a row is its own segment, has no label and sees no image.

Shapes: b rows, s tokens per row (``seq_len``), s_e = image slots x tokens per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fusiontrain.data.batch import PAD_TO_MULTIPLE, Batch, InputFormats, Sample, encoder_rows
from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.input_format import EncoderInputFormat


#: Per other modality (audio), what one row holds: ``(items, encoder tokens or None for no limit)``.
OtherLimits = Sequence[tuple[int, int | None]]
#: Per other modality, a sample's or a row's ``(items, encoder tokens)``.
OtherSizes = Sequence[tuple[int, int]]


def misfit_reason(
    num_tokens: int,
    num_images: int,
    encoder_tokens: int,
    *,
    seq_len: int,
    max_images: int,
    max_encoder_tokens: int | None,
    others: OtherSizes = (),
    other_limits: OtherLimits = (),
) -> str | None:
    """Why a sample of these sizes cannot fit even an empty row (a skip reason of
    :mod:`fusiontrain.data.errors`: ``"too_long"``, ``"too_many_images"``, the latter also for
    too many encoder tokens, or ``"too_many_items"`` for another modality's, ``others`` against
    ``other_limits``), or None when it fits."""
    if num_tokens > seq_len:
        return "too_long"
    if num_images > max_images or (max_encoder_tokens is not None and encoder_tokens > max_encoder_tokens):
        return "too_many_images"
    if not _others_fit(others, other_limits):
        return "too_many_items"
    return None


def _others_fit(others: OtherSizes, limits: OtherLimits) -> bool:
    """Whether every other modality's ``(items, encoder tokens)`` is within its limits (a
    modality past the sizes given counts as none)."""
    for (items, tokens), (max_items, max_tokens) in zip(others, limits):
        if items > max_items or (max_tokens is not None and tokens > max_tokens):
            return False
    return True


@dataclass
class PackedRow:
    """Samples packed into one row, in order, with the ids that recreate them after a restart.

    A row planned from sizes alone (:mod:`fusiontrain.data.row_plan`) holds keys and counts and no
    samples yet; the loader builds its samples later. ``encoder_tokens`` counts the encoder-token
    columns of the row's images (see :meth:`ImageFormat.num_tokens`); it is what the row's
    cross-attention attends over.
    """

    keys: list[Any] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    encoder_tokens: int = 0
    num_tokens: int = 0
    num_images: int = 0
    others: list[tuple[int, int]] = field(default_factory=list)  # per other modality: (items, encoder tokens)

    def add(self, key: Any, sample: Sample, encoder_tokens: int = 0, others: OtherSizes = ()) -> None:
        """Append ``sample`` (identified by ``key``)."""
        self.add_sized(key, len(sample), len(sample.images), encoder_tokens, others)
        self.samples.append(sample)

    def add_sized(self, key: Any, num_tokens: int, num_images: int, encoder_tokens: int, others: OtherSizes = ()) -> None:
        """Append the sample ``key`` by its sizes only (its sample is built later)."""
        self.keys.append(key)
        self.num_tokens += num_tokens
        self.num_images += num_images
        self.encoder_tokens += encoder_tokens
        self.others = self.with_sample(others)

    def with_sample(self, others: OtherSizes) -> list[tuple[int, int]]:
        """The row's other-modality sizes with a sample's ``others`` added."""
        width = max(len(self.others), len(others))
        mine, theirs = [*self.others, *[(0, 0)] * width], [*others, *[(0, 0)] * width]
        return [(mine[k][0] + theirs[k][0], mine[k][1] + theirs[k][1]) for k in range(width)]


class FirstFitPacker:
    """Bounded first-fit packing (see the module docstring).

    Args:
        seq_len: tokens per row.
        max_images: image slots per row.
        max_open_rows: rows kept open at once (1 = plain greedy packing).
        image_format: the encoder's image format; with ``max_encoder_tokens`` it counts each
            image's encoder tokens, which may differ from image to image (needed by :meth:`add`
            only; :meth:`add_sized` is given the counts).
        max_encoder_tokens: encoder-token capacity of a row (``s_e``); None for no limit beyond
            ``max_images``.
        other_limits: for a model with an encoder per modality, each other modality's row
            capacity, ``(items, encoder tokens or None)``, in the order the sizes give them.
        other_formats: those modalities' ``(name, input format)``, to size built samples
            (:meth:`add`; :meth:`add_sized` is given the sizes).
    """

    def __init__(
        self,
        seq_len: int,
        max_images: int,
        max_open_rows: int = 8,
        *,
        image_format: ImageFormat | None = None,
        max_encoder_tokens: int | None = None,
        other_limits: OtherLimits = (),
        other_formats: Sequence[tuple[str, EncoderInputFormat]] = (),
    ) -> None:
        if max_open_rows < 1:
            raise ValueError(f"max_open_rows must be >= 1, got {max_open_rows}")
        if other_formats and len(other_formats) != len(other_limits):
            raise ValueError(f"{len(other_formats)} other formats for {len(other_limits)} other modalities' limits")
        self.seq_len = seq_len
        self.max_images = max_images
        self.max_open_rows = max_open_rows
        self.image_format = image_format
        self.max_encoder_tokens = max_encoder_tokens
        self.other_limits = tuple(other_limits)
        self.other_formats = tuple(other_formats)
        self.open_rows: list[PackedRow] = []

    def encoder_tokens(self, sample: Sample) -> int:
        """Encoder-token columns ``sample``'s images take in a row (0 when not counted)."""
        if self.max_encoder_tokens is None:
            return 0
        if self.image_format is None:
            raise ValueError("max_encoder_tokens needs the image_format that counts each image's tokens (or use add_sized)")
        return sum(self.image_format.num_tokens(image) for image in sample.images)

    def other_sizes(self, sample: Sample) -> list[tuple[int, int]]:
        """``(items, encoder tokens)`` of ``sample`` in each other modality (:attr:`other_formats`)."""
        return [
            (len(items), sum(fmt.num_tokens(item) for item in items))
            for name, fmt in self.other_formats
            for items in [sample.items(name)[0]]
        ]

    def _fits(self, row: PackedRow, num_tokens: int, num_images: int, encoder_tokens: int, others: OtherSizes = ()) -> bool:
        return (
            row.num_tokens + num_tokens <= self.seq_len
            and row.num_images + num_images <= self.max_images
            and (self.max_encoder_tokens is None or row.encoder_tokens + encoder_tokens <= self.max_encoder_tokens)
            and _others_fit(row.with_sample(others), self.other_limits)
        )

    def fits_alone(self, num_tokens: int, num_images: int, encoder_tokens: int, others: OtherSizes = ()) -> bool:
        """Whether a sample of these sizes fits an empty row."""
        return self._fits(PackedRow(), num_tokens, num_images, encoder_tokens, others)

    def add(self, key: Any, sample: Sample) -> list[PackedRow]:
        """Place ``sample`` (identified by ``key``); returns the rows this closed, in order."""
        encoder_tokens = self.encoder_tokens(sample)
        others = self.other_sizes(sample)
        return self._place(key, len(sample), len(sample.images), encoder_tokens, others, sample, sample.origin or key)

    def add_sized(
        self, key: Any, num_tokens: int, num_images: int, encoder_tokens: int, others: OtherSizes = ()
    ) -> list[PackedRow]:
        """Place sample ``key`` by its sizes alone (rows hold keys, no samples); returns the rows
        this closed, in order. Same rule as :meth:`add`."""
        return self._place(key, num_tokens, num_images, encoder_tokens, others, None, key)

    def _place(
        self,
        key: Any,
        num_tokens: int,
        num_images: int,
        encoder_tokens: int,
        others: OtherSizes,
        sample: Sample | None,
        name: Any,
    ) -> list[PackedRow]:
        if not self.fits_alone(num_tokens, num_images, encoder_tokens, others):
            raise ValueError(
                f"sample {name} ({num_tokens} tokens, {num_images} images, {encoder_tokens} "
                f"encoder tokens, other modalities' (items, encoder tokens) {list(others)}) cannot fit a row of "
                f"{self.seq_len} tokens, {self.max_images} images, {self.max_encoder_tokens} encoder tokens and "
                f"{list(self.other_limits)}"
            )
        target = next(
            (row for row in self.open_rows if self._fits(row, num_tokens, num_images, encoder_tokens, others)), None
        )
        closed = []
        if target is None:
            if len(self.open_rows) == self.max_open_rows:
                fullest = max(self.open_rows, key=lambda row: row.num_tokens)
                self.open_rows.remove(fullest)
                closed.append(fullest)
            target = PackedRow()
            self.open_rows.append(target)
        if sample is None:
            target.add_sized(key, num_tokens, num_images, encoder_tokens, others)
        else:
            target.add(key, sample, encoder_tokens, others)
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
        """The open rows, as lists of sample keys."""
        return [list(row.keys) for row in self.open_rows]


def collate_rows(
    rows: list[PackedRow], seq_len: int, image_format: InputFormats, *, pad_id: int = 0, ignore_index: int = -100
) -> Batch:
    """A batch of packed rows: ``segment_ids`` mark the samples, ``input_pos`` restarts per
    sample, ``encoder_mask`` keeps each token to its own sample's images (with formats by
    modality, each modality's mask keeps it to its own sample's items of that modality)."""
    b = len(rows)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), ignore_index, dtype=torch.long)
    input_pos = torch.zeros(b, seq_len, dtype=torch.long)
    segment_ids = torch.zeros(b, seq_len, dtype=torch.long)
    is_real = torch.zeros(b, seq_len, dtype=torch.bool)
    source_ids = torch.full((b, seq_len), -1, dtype=torch.long)
    sample_sources: list[int] = []
    placed: list[list[tuple[Sample, int]]] = []  # each row's samples with their offsets
    for r, row in enumerate(rows):
        offset = 0
        placed.append([])
        for segment, sample in enumerate(row.samples):
            n = len(sample)
            tokens[r, offset : offset + n] = sample.tokens
            labels[r, offset : offset + n] = sample.labels
            input_pos[r, offset : offset + n] = torch.arange(n)
            segment_ids[r, offset : offset + n] = segment
            is_real[r, offset : offset + n] = True
            source_ids[r, offset : offset + n] = sample.source
            sample_sources.append(sample.source)
            placed[r].append((sample, offset))
            offset += n
        pad = seq_len - offset
        input_pos[r, offset:] = torch.arange(pad)
        segment_ids[r, offset:] = len(row.samples)  # padding: a segment of its own
    encoder_mask, encoder_input = encoder_rows(placed, image_format, seq_len)
    return Batch(
        tokens=tokens,
        labels=labels,
        input_pos=input_pos,
        is_real=is_real,
        segment_ids=segment_ids,
        encoder_input=encoder_input,
        encoder_mask=encoder_mask,
        sample_sources=tuple(sample_sources),
        source_ids=source_ids if any(sample_sources) else None,
    )


def collate_padding_free(
    samples: list[Sample], seq_len: int, image_format: InputFormats, *, pad_id: int = 0, ignore_index: int = -100
) -> Batch:
    """The samples a padded micro-batch would give one row each, back to back in a single row
    instead (the padding-free layout of ``data.padding_free``): the same samples per step and the
    same loss, but no token, attention pair or image slot is spent on padding, save the row's tail
    up to a multiple of 8. Each sample keeps its own positions, self-attention segment and images,
    as in a packed row.

    Raises:
        ValueError: a sample is longer than ``seq_len`` (the limit is per sample, as when padded).
    """
    longest = max(len(sample) for sample in samples)
    if longest > seq_len:
        raise ValueError(f"a sample of {longest} tokens does not fit batch.seq_len={seq_len}")
    row = PackedRow()
    for index, sample in enumerate(samples):
        row.add(index, sample)
    length = -(-row.num_tokens // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    return collate_rows([row], length, image_format, pad_id=pad_id, ignore_index=ignore_index)
