"""The batch the trainer feeds the model, and padded collation of token samples.

A model with one encoder takes one encoder input and mask; a model with an encoder per modality
takes them by modality (:class:`~fusiontrain.modules.DeepFusionModel`). The collators do the
latter when given the input formats by modality (``{"image": ImageFormat, "audio":
AudioFormat}``): a sample's images are the ``image`` modality's items, its other modalities' are in
:attr:`Sample.other_items`, and a modality with no item in a batch is absent from its mappings.

Shapes: b rows, s tokens per row, s_e encoder tokens per row, i images per row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.input_format import EncoderInputFormat, ItemInput, encoder_mask_rows
from fusiontrain.modules.masks import block_causal_block_mask, block_causal_mask, encoder_block_mask
from fusiontrain.modules.packed import CrossAttentionLayout, PackedLayout, cross_attention_layout, self_attention_layout



def target_positions(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Flat indices ``[n]`` (int64, ascending) into the ``b * s`` positions of ``labels`` ``[b, s]``
    whose label is not ``ignore_index``: the positions the loss projects. Its length depends on the
    values: call it on host labels (on an accelerator it waits for the device; on fake tensors it
    cannot run)."""
    return torch.nonzero(labels.reshape(-1) != ignore_index).squeeze(1)

@dataclass
class Sample:
    """One tokenized sample.

    Attributes:
        tokens: ``[n]`` token ids.
        labels: ``[n]`` target ids, already shifted (position j predicts ``labels[j]``), with
            the ignore index where nothing is trained.
        images: per image, the encoder's inputs (see :class:`~fusiontrain.data.image_format.ImageFormat`).
        image_spans: per image, the token range ``[start, end)`` that sees it (the Llama 3.2
            rule: from its image token until the next image token, consecutive image tokens
            sharing the later span); tokens outside every span see no image.
        origin: where the sample came from (``file:line``), for messages.
        source: the index of the data source it came from, in a mixture of sources
            (:mod:`fusiontrain.data.mixture`); 0 otherwise.
        other_items: for a model with an encoder per modality, the items of the modalities other
            than ``image`` (e.g. ``{"audio": [clip inputs, ...]}``), each processed by its
            modality's input format.
        other_spans: their token spans, by modality, by the same rule as ``image_spans``.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    images: list[dict[str, torch.Tensor]] = field(default_factory=list)
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    origin: str = ""
    source: int = 0
    other_items: dict[str, list[ItemInput]] = field(default_factory=dict)
    other_spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def items(self, modality: str) -> tuple[list[ItemInput], list[tuple[int, int]]]:
        """The sample's items of ``modality`` and their spans (``image``: :attr:`images`)."""
        if modality == IMAGE:
            return self.images, self.image_spans
        return self.other_items.get(modality, []), self.other_spans.get(modality, [])


#: The modality of a sample's :attr:`Sample.images`, and of a one-encoder model's encoder.
IMAGE = "image"
#: The input formats a collator is given: one encoder's, or one per modality.
InputFormats = EncoderInputFormat | Mapping[str, EncoderInputFormat]


def encoder_rows(
    per_row: list[list[tuple[Sample, int]]], input_formats: InputFormats, seq_len: int
) -> tuple[Any, Any]:
    """The encoder mask and inputs of ``b`` rows, each a list of ``(sample, offset in the row)``:
    for one format (one encoder), the ``[b, s, s_e]`` mask and the encoder's keyword arguments
    (both None without an image); for formats by modality, both as dicts by modality, holding the
    modalities with an item in these rows only (None when none has any)."""
    modalities = [IMAGE] if isinstance(input_formats, EncoderInputFormat) else list(input_formats)
    masks, inputs = {}, {}
    for modality in modalities:
        items = [[item for sample, _ in row for item in sample.items(modality)[0]] for row in per_row]
        spans = [[(offset + a, offset + b) for sample, offset in row for a, b in sample.items(modality)[1]] for row in per_row]
        fmt = input_formats if isinstance(input_formats, EncoderInputFormat) else input_formats[modality]
        mask, encoder_input = encoder_mask_rows(items, spans, fmt, seq_len)
        if encoder_input is not None:
            masks[modality], inputs[modality] = mask, encoder_input
    if isinstance(input_formats, EncoderInputFormat):
        return masks.get(IMAGE), inputs.get(IMAGE)
    return (masks or None), (inputs or None)


@dataclass(frozen=True)
class PackedLayouts:
    """A micro-batch's packed attention layouts (:mod:`fusiontrain.modules.packed`) and the
    tensors they were built from: a layout belongs to those tensors only."""

    segment_ids: torch.Tensor | None
    encoder_mask: torch.Tensor | dict[str, torch.Tensor] | None
    self_attention: PackedLayout | None
    cross_attention: CrossAttentionLayout | dict[str, CrossAttentionLayout] | None

    def belongs_to(self, batch: Batch) -> bool:
        return self.segment_ids is batch.segment_ids and self.encoder_mask is batch.encoder_mask


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
        encoder_input: the encoder's keyword arguments, or None (no image in the batch); for a
            model with an encoder per modality, a dict of them by modality.
        encoder_mask: ``[b, s, s_e]`` bool, or None; by modality as ``encoder_input`` is.
        skipped: bad samples skipped while producing this batch, by reason.
        layouts: the packed attention layouts (the CPU path), built from the host tensors by
            :meth:`packed_layouts` (:meth:`to` a CPU device builds them) and carried along by
            :meth:`map`.
        target_index: ``[n]`` int64 flat indices into the ``b * s`` positions whose label is not
            the ignore index (the loss projects only those), or None; set from the host labels by
            :meth:`with_target_index` and carried by :meth:`map` and :meth:`to`. It belongs to
            ``labels``: a batch whose labels are replaced needs a new one.
        sample_sources: the source index of each sample in the micro-batch (host metadata, for
            per-source metrics; all 0 without a mixture).
        source_ids: ``[b, s]`` int64, the source index of each position's sample (-1 on
            padding), or None when every sample is of source 0 (always so for one source).
        target_sources: ``[n]`` int64, the source of each position of ``target_index``; set with
            it from the host ``source_ids`` (None without them).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    input_pos: torch.Tensor
    is_real: torch.Tensor
    segment_ids: torch.Tensor | None = None
    encoder_input: dict[str, Any] | None = None
    encoder_mask: torch.Tensor | dict[str, torch.Tensor] | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    layouts: PackedLayouts | None = field(default=None, repr=False, compare=False)
    target_index: torch.Tensor | None = field(default=None, repr=False, compare=False)
    sample_sources: tuple[int, ...] = ()
    source_ids: torch.Tensor | None = None
    target_sources: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def self_attention_mask(self, *, flex: bool = False) -> Any:
        """None (causal) for unpacked rows; for packed rows the block-diagonal causal mask, dense
        ``[b, s, s]`` bool, or a flex_attention ``BlockMask`` when ``flex``."""
        if self.segment_ids is None:
            return None
        return block_causal_block_mask(self.segment_ids) if flex else block_causal_mask(self.segment_ids)

    def packed_layouts(self) -> PackedLayouts:
        """The packed attention layouts of this batch, built on first use from its tensors, which
        should be on the host (from a GPU this costs a copy back). Rebuilt when ``segment_ids`` or
        ``encoder_mask`` is replaced.

        Raises:
            ValueError: the tensors hold no values (fake or meta): build the layouts on the host
                batch first, then map it (as the planner does).
        """
        if self.layouts is None or not self.layouts.belongs_to(self):
            masks = list(self.encoder_mask.values()) if isinstance(self.encoder_mask, dict) else [self.encoder_mask]
            sources = [t for t in (self.segment_ids, *masks) if t is not None]
            if any(type(t) is not torch.Tensor or t.is_meta for t in sources):
                raise ValueError(
                    "packed layouts are built from real host values; call packed_layouts() on the host batch "
                    "before mapping it to fake or meta tensors"
                )
            self.layouts = PackedLayouts(
                self.segment_ids,
                self.encoder_mask,
                None if self.segment_ids is None else self_attention_layout(self.segment_ids),
                _by_modality(self.encoder_mask, cross_attention_layout),
            )
        return self.layouts

    def model_inputs(self, *, flex: bool = False) -> dict[str, Any]:
        """The keyword arguments of ``DeepFusionModel.forward`` besides ``tokens``.

        Without ``flex`` (CPU), attention runs per sample through the packed layouts (see
        :meth:`packed_layouts`): self-attention over each packed segment (None, plain causal, for
        unpacked rows) and cross-attention over the tokens that see an image, each to its own
        images. With ``flex`` (CUDA), flex_attention ``BlockMask``s built on the device from
        ``segment_ids`` and ``encoder_mask``. Then encoder inputs and positions."""
        if flex:
            mask = self.self_attention_mask(flex=True)
            encoder_mask = _by_modality(self.encoder_mask, encoder_block_mask)
        else:
            layouts = self.packed_layouts()
            mask, encoder_mask = layouts.self_attention, layouts.cross_attention
        return {
            "mask": mask,
            "encoder_input": self.encoder_input,
            "encoder_mask": encoder_mask,
            "input_pos": self.input_pos,
        }

    def with_target_index(self, ignore_index: int) -> Batch:
        """A copy carrying ``target_index`` for ``ignore_index``, computed from the host labels
        (so that its length, the number of targets, never has to be read back from a device).

        Raises:
            ValueError: ``labels`` are not a real CPU tensor (fake, meta or on an accelerator):
                call this on the host batch, before :meth:`to` or :meth:`map`.
        """
        labels = self.labels
        if type(labels) is not torch.Tensor or labels.device.type != "cpu":
            raise ValueError(
                f"the target index is computed from the host labels, and these are a {type(labels).__name__} on "
                f"{labels.device}; call with_target_index() on the host batch before moving or mapping it"
            )
        index = target_positions(labels, ignore_index)
        sources = None if self.source_ids is None else self.source_ids.reshape(-1).index_select(0, index)
        return replace(self, target_index=index, target_sources=sources)

    def to(self, device: torch.device | str) -> Batch:
        """A copy on ``device``. For a CPU device the packed layouts are built first; CUDA steps
        attend through block masks built on the device instead (see :meth:`model_inputs`)."""
        if torch.device(device).type == "cpu":
            self.packed_layouts()
        return self.map(lambda t: t.to(device, non_blocking=True))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """A copy with ``fn`` applied to every tensor (the encoder's inputs and, once built, the
        packed layouts' indices included)."""
        apply = lambda t: None if t is None else fn(t)  # noqa: E731
        layouts = self.layouts if self.layouts is not None and self.layouts.belongs_to(self) else None
        encoder_input = None
        if self.encoder_input is not None:  # one encoder's keyword arguments, or a dict of them by modality
            encoder_input = {
                k: {key: apply(t) for key, t in v.items()} if isinstance(v, dict) else apply(v)
                for k, v in self.encoder_input.items()
            }
        segment_ids, encoder_mask = apply(self.segment_ids), _by_modality(self.encoder_mask, fn)
        return replace(
            self,
            tokens=apply(self.tokens),
            labels=apply(self.labels),
            input_pos=apply(self.input_pos),
            is_real=apply(self.is_real),
            segment_ids=segment_ids,
            encoder_input=encoder_input,
            encoder_mask=encoder_mask,
            target_index=apply(self.target_index),
            source_ids=apply(self.source_ids),
            target_sources=apply(self.target_sources),
            layouts=None
            if layouts is None
            else PackedLayouts(
                segment_ids,
                encoder_mask,
                None if layouts.self_attention is None else layouts.self_attention.map(fn),
                _by_modality(layouts.cross_attention, lambda layout: layout.map(fn)),
            ),
        )


def _by_modality(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn(value)``, or ``fn`` of each value of a dict by modality; None stays None."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {modality: fn(v) for modality, v in value.items()}
    return fn(value)


def with_placeholder_items(batch: Batch, input_formats: Mapping[str, EncoderInputFormat]) -> Batch:
    """:func:`with_placeholder_image` for a model with an encoder per modality: one blank,
    fully masked slot per row for every modality the batch has no item of."""
    b, s = batch.tokens.shape
    inputs, masks = dict(batch.encoder_input or {}), dict(batch.encoder_mask or {})
    for modality, fmt in input_formats.items():
        if modality in inputs:
            continue
        per_row = [[fmt.blank()] for _ in range(b)]
        _, width = fmt.layout(per_row)
        inputs[modality] = fmt.collate(per_row)
        masks[modality] = torch.zeros(b, s, width, dtype=torch.bool)
    # in the formats' order on every rank, whichever modalities the batch held
    batch.encoder_input = {m: inputs[m] for m in input_formats}
    batch.encoder_mask = {m: masks[m] for m in input_formats}
    return batch


def with_placeholder_image(batch: Batch, image_format: ImageFormat) -> Batch:
    """``batch`` with one blank image slot per row that no token attends to, when it has no image.

    Under FSDP every rank must run the same modules: a rank whose micro-batch is text-only while
    another rank's has images would skip the encoder and the cross-attention layers and so miss
    their collectives. A blank, fully masked slot keeps them running, and changes no output: a
    token that sees no image gets exactly zero from every cross-attention layer.
    """
    if batch.encoder_input is not None:
        return batch
    b, s = batch.tokens.shape
    per_row = [[image_format.blank()] for _ in range(b)]
    _, width = image_format.layout(per_row)
    batch.encoder_input = image_format.collate(per_row)
    batch.encoder_mask = torch.zeros(b, s, width, dtype=torch.bool)
    return batch


PAD_TO_MULTIPLE = 8


def collate_padded(
    samples: list[Sample], seq_len: int, image_format: InputFormats, *, pad_id: int = 0, ignore_index: int = -100
) -> Batch:
    """One sample per row, right-padded to the longest sample of the batch (rounded up to a
    multiple of 8, at most ``seq_len``), as a padding collator does. Padding is masked from the
    loss and sees no image; causal attention keeps it from affecting real tokens.
    ``image_format``: the encoder's input format, or the formats by modality (see the module
    docstring)."""
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
    encoder_mask, encoder_input = encoder_rows([[(sample, 0)] for sample in samples], image_format, seq_len)
    input_pos = torch.arange(seq_len).expand(b, seq_len).clone()
    sources = tuple(sample.source for sample in samples)
    source_ids = None
    if any(sources):
        source_ids = torch.where(is_real, torch.tensor(sources, dtype=torch.long)[:, None], -1)
    return Batch(
        tokens=tokens,
        labels=labels,
        input_pos=input_pos,
        is_real=is_real,
        encoder_input=encoder_input,
        encoder_mask=encoder_mask,
        sample_sources=sources,
        source_ids=source_ids,
    )
