"""What the data pipeline needs to know about an encoder's input, for any modality: the
:class:`EncoderInputFormat` contract.

An *item* is what one placeholder token of the text stands for: an image
(:class:`~fusiontrain.data.image_format.ImageFormat`) or an audio clip
(:class:`~fusiontrain.data.audio_format.AudioFormat`). Those two say how one item is processed;
this base says what a batch of processed items is, which is the same for every modality.

One item, once processed, is a dict of tensors (the encoder's inputs for that item alone). In a
batch row, item ``k`` owns the encoder-token columns ``offsets[k] .. offsets[k] + num_tokens(k)``
of the row's ``s_e`` columns (:meth:`EncoderInputFormat.layout`); of those, text may attend only
to :meth:`EncoderInputFormat.seen_columns` (Mllama hides padding tiles, a variable-length encoder
its padding positions).

Shapes: b rows, i items per row, s_e encoder tokens per row, s text tokens per row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property
from typing import ClassVar

import torch

ItemInput = dict[str, torch.Tensor]


class EncoderInputFormat(ABC):
    """How one encoder takes its items, batch-wise.

    Attributes:
        max_tokens_per_item: the most encoder tokens one item can yield (the planner's worst
            case, and the default column stride).
        tokens_vary: True when :meth:`num_tokens` differs from item to item (measuring a sample's
            size then decodes its items); False when every item yields ``max_tokens_per_item``.
        slots_key: the :meth:`collate` key that lists the real item slots (``image_slots``,
            ``clip_slots``): the encoder's keyword argument of that name.
    """

    max_tokens_per_item: int
    # Whether items yield different token counts (then a sample's size needs its items decoded).
    tokens_vary: bool = False
    slots_key: ClassVar[str]

    # -- one processed item -------------------------------------------------------------------------

    def num_tokens(self, item: ItemInput) -> int:
        """Encoder-token columns ``item`` occupies in its row (default: the maximum)."""
        return self.max_tokens_per_item

    def seen_columns(self, item: ItemInput) -> torch.Tensor:
        """Indices, among the item's :meth:`num_tokens` columns, that text may attend to."""
        return torch.arange(self.num_tokens(item))

    @abstractmethod
    def blank(self) -> ItemInput:
        """A placeholder item that no token attends to (a rank with a text-only micro-batch still
        runs the encoder, so FSDP's collectives match across ranks)."""

    @abstractmethod
    def synthetic(self, generator: torch.Generator, shift: float) -> ItemInput:
        """A random item for synthetic data: its input values normal times 0.5 plus ``shift``
        (the synthetic task reads the item's mean)."""

    def worst_case(self) -> ItemInput:
        """The most expensive item the encoder can be given (the planner's worst case): by
        default :meth:`blank`, which for fixed-size encoders costs the same as any item."""
        return self.blank()

    # -- a batch ------------------------------------------------------------------------------------

    def layout(self, per_row: list[list[ItemInput]]) -> tuple[list[list[int]], int]:
        """Column offset of every item in its row, and ``s_e``, the columns per row.

        The default gives each item slot ``max_tokens_per_item`` columns: item ``k`` starts at
        ``k * max_tokens_per_item``, and ``s_e`` covers the most items of any row (the encoder
        runs on the zero-padded slots too). Formats whose encoder packs a row's tokens override it
        (:func:`packed_layout`).
        """
        stride = self.max_tokens_per_item
        offsets = [[k * stride for k in range(len(items))] for items in per_row]
        return offsets, max((len(items) for items in per_row), default=0) * stride

    def collate(self, per_row: list[list[ItemInput]]) -> dict[str, torch.Tensor] | None:
        """The encoder's keyword arguments for ``b`` rows of items, or None without any item.

        The default stacks each key into ``[b, i, ...]``, zero-padding rows with fewer items
        (:meth:`pad_slot` fills a padding slot). When some slot is padding, :attr:`slots_key`
        lists the real ones, ``[n]`` int64 flat indices ``row * i + k``: the encoder runs on those
        only (:mod:`fusiontrain.modules.image_slots`; the key is absent when every slot holds an
        item).
        """
        max_items = max((len(items) for items in per_row), default=0)
        if max_items == 0:
            return None
        template = self.pad_slot()
        stacked = {key: value.expand(len(per_row), max_items, *value.shape).clone() for key, value in template.items()}
        for row, items in enumerate(per_row):
            for index, item in enumerate(items):
                for key, value in item.items():
                    stacked[key][row, index] = value
        if any(len(items) < max_items for items in per_row):
            stacked[self.slots_key] = torch.tensor(
                [row * max_items + k for row, items in enumerate(per_row) for k in range(len(items))],
                dtype=torch.int64,
            )
        return stacked

    def item_count(self, collated: dict[str, torch.Tensor]) -> int:
        """Items a :meth:`collate` result holds: the slots its :attr:`slots_key` lists when some
        slot is padding, else every slot (``b * i``)."""
        if self.slots_key in collated:
            return int(collated[self.slots_key].numel())
        b, i = collated[self._item_key].shape[:2]
        return b * i

    @cached_property
    def _item_key(self) -> str:
        """A key that :meth:`collate` stacks as ``[b, i, ...]``: one of an item's own."""
        return next(iter(self.blank()))

    def pad_slot(self) -> ItemInput:
        """What fills an item slot that holds no item: zeros shaped like :meth:`blank`."""
        return {key: torch.zeros_like(value) for key, value in self.blank().items()}

    def describe(self) -> str:
        """A few words for messages and the plan, e.g. ``'up to 4 tiles of 560 px'``."""
        return f"{self.max_tokens_per_item} tokens"


# -- packed rows ------------------------------------------------------------------------------------


def packed_layout(counts: list[list[int]]) -> tuple[list[list[int]], int]:
    """The layout of rows whose items' tokens are packed: item ``k`` of a row starts at the sum of
    the previous items' token counts, and ``s_e`` is the longest row's sum.

    Args:
        counts: each row's items' :meth:`~EncoderInputFormat.num_tokens`.

    Returns:
        ``(offsets, s_e)`` as :meth:`EncoderInputFormat.layout` gives them.
    """
    offsets: list[list[int]] = []
    width = 0
    for row in counts:
        starts, total = [], 0
        for count in row:
            starts.append(total)
            total += count
        offsets.append(starts)
        width = max(width, total)
    return offsets, width


def packed_token_index(counts: list[list[int]], stride: int) -> torch.Tensor:
    """Where each packed column's token is in its row's encoder outputs: ``[b, s_e]`` int64.

    The encoder runs each item slot to ``stride`` output positions, of which item ``k``'s valid
    tokens are the first ``counts[row][k]``; a row's outputs flattened are ``[i * stride]``, and
    packed column ``offsets[k] + j`` takes position ``k * stride + j``. Padding columns (past a
    row's total) point at 0.

    Args:
        counts: each row's items' token counts (each at most ``stride``).
        stride: output positions per item slot.
    """
    offsets, width = packed_layout(counts)
    index = torch.zeros(len(counts), width, dtype=torch.long)
    for row, row_counts in enumerate(counts):
        for k, count in enumerate(row_counts):
            if not 0 <= count <= stride:
                raise ValueError(f"item {k} of row {row} has {count} tokens, more than the {stride} its slot holds")
            index[row, offsets[row][k] : offsets[row][k] + count] = k * stride + torch.arange(count)
    return index


# -- the text's view of the items -------------------------------------------------------------------


def encoder_mask_rows(
    per_row: list[list[ItemInput]],
    spans_per_row: list[list[tuple[int, int]]],
    input_format: EncoderInputFormat,
    seq_len: int,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """The ``[b, s, s_e]`` encoder mask and the encoder inputs of ``b`` rows.

    Args:
        per_row: each row's items, in order.
        spans_per_row: for each row, each item's token span ``[start, end)`` in the row (its
            tokens may see it).
        input_format: the encoder's format.
        seq_len: ``s``.

    Returns:
        ``(encoder_mask, encoder_input)``, both None when no row has an item.
    """
    encoder_input = input_format.collate(per_row)
    if encoder_input is None:
        return None, None
    offsets, width = input_format.layout(per_row)
    mask = torch.zeros(len(per_row), seq_len, width, dtype=torch.bool)
    for row, (items, spans) in enumerate(zip(per_row, spans_per_row)):
        for item, (start, end), offset in zip(items, spans, offsets[row], strict=True):
            mask[row, start:end, offset + input_format.seen_columns(item)] = True
    return mask, encoder_input
