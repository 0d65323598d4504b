"""Packed layouts: how the attention of packed rows is computed per sample, not over the whole row.

A packed row of ``s`` tokens holds several samples (segments). Under a dense block-diagonal mask,
self-attention costs ``s^2`` per row whatever the segments; here it costs about the sum of the
segments' ``s_i^2``. Likewise, a token cross-attends only to its own images' encoder tokens, and
tokens that see no image are not computed at all.

The layouts are built once per micro-batch on the host (numpy, from ``segment_ids`` and the
encoder mask; no device, no dispatcher, so they also build inside the planner's fake-tensor mode)
and carried to the device as a few index tensors. Their shapes (group sizes and lengths) are
Python ints, so running them needs no device sync.

How a layout runs is :mod:`fusiontrain.modules.packed_attention`. This module holds no kernel and
no compiler hook, so the data code that builds layouts (:mod:`fusiontrain.data.batch`) imports
neither torch's compiler (about 0.9 s per process) nor the model's attention.

Shapes: b rows, s tokens, s_e encoder tokens, n_h query heads, n_kv key/value heads, h_d head
width; "flat" means rows and tokens flattened into one axis (``b * s``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

_ROUND_TO = 32  # group lengths are multiples of this...
_STEPS_PER_OCTAVE = 8  # ...or of 1/8 of their power of two, whichever is larger


@dataclass(frozen=True)
class AttentionGroup:
    """``count`` attention problems of the same padded shape, run in one SDPA call.

    Attributes:
        count: problems in the group.
        query_len: padded queries per problem.
        key_len: keys per problem (equal to ``query_len`` for causal self-attention).
    """

    count: int
    query_len: int
    key_len: int


@dataclass(frozen=True)
class PackedLayout:
    """Which queries attend which keys, as groups of equal-shaped dense problems.

    The groups' query slots are laid end to end (group after group, problem after problem), and so
    are their key slots: each of q, k and v is gathered once, then split into the groups.

    Attributes:
        groups: the problems, grouped by shape.
        query_index: ``[sum count * query_len]`` flat query position of each query slot; a
            padding slot repeats its problem's first query.
        key_index: ``[sum count * key_len]`` flat key position of each key slot (the same tensor
            as ``query_index`` for causal self-attention).
        output_index: ``[num_queries]`` for each flat query, its (real) query slot.
        num_queries: flat queries the layout was built for (``b * s``, or the gathered tokens).
        num_keys: flat keys (``b * s`` for self-attention, ``b * s_e`` for cross-attention).
        causal: each problem is causal (self-attention over a segment) or not (cross-attention).
    """

    groups: tuple[AttentionGroup, ...]
    query_index: torch.Tensor
    key_index: torch.Tensor
    output_index: torch.Tensor
    num_queries: int
    num_keys: int
    causal: bool

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedLayout:
        """A copy with ``fn`` applied to every index tensor (e.g. a move to a device)."""
        query_index = fn(self.query_index)
        key_index = query_index if self.key_index is self.query_index else fn(self.key_index)
        return replace(self, query_index=query_index, key_index=key_index, output_index=fn(self.output_index))


@dataclass(frozen=True)
class CrossAttentionLayout:
    """Cross-attention of a micro-batch's tokens to their own images' encoder tokens.

    Only the tokens that see an image are computed: the layer gathers them (``token_index``),
    runs attention and MLP on them, and scatters them back; every other token passes through
    unchanged, which is exactly the zero output the dense path gives it.

    Attributes:
        token_index: ``[n]`` flat positions (of ``b * s``) of the tokens that see an image.
        attention: over those ``n`` gathered tokens (queries) and the ``b * s_e`` flat encoder
            tokens (keys).
    """

    token_index: torch.Tensor
    attention: PackedLayout

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CrossAttentionLayout:
        """A copy with ``fn`` applied to every index tensor."""
        return CrossAttentionLayout(fn(self.token_index), self.attention.map(fn))


# -- building layouts (host side) -------------------------------------------------------------


def padded_length(lengths: np.ndarray) -> np.ndarray:
    """Each length rounded up to its group length (see the module docstring)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    octave = np.left_shift(1, np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64))  # power of two <= n
    step = np.maximum(_ROUND_TO, octave // _STEPS_PER_OCTAVE)
    return -(-lengths // step) * step


def self_attention_layout(segment_ids: torch.Tensor) -> PackedLayout:
    """The block-diagonal causal self-attention of packed rows (what
    :func:`~fusiontrain.modules.masks.block_causal_mask` says) as per-segment problems.

    Args:
        segment_ids: ``[b, s]`` (host) which segment each token is in; each segment must be one
            contiguous run of its row (padding is a segment of its own).

    Raises:
        ValueError: a segment id comes back after another segment in the same row (the dense
            mask would join the two runs; a packed row never has that).
    """
    ids = segment_ids.detach().cpu().numpy()
    b, s = ids.shape
    starts_row = np.ones((b, s), dtype=bool)
    starts_row[:, 1:] = ids[:, 1:] != ids[:, :-1]
    distinct = (np.diff(np.sort(ids, axis=1), axis=1) != 0).sum(axis=1) + 1
    broken = np.flatnonzero(starts_row.sum(axis=1) != distinct)
    if broken.size:
        raise ValueError(
            f"segment_ids row {int(broken[0])}: a segment id recurs after another segment; each packed "
            "sample must be one contiguous run of tokens"
        )
    starts = np.flatnonzero(starts_row.ravel())
    lengths = np.diff(np.append(starts, b * s))
    return _build(starts, lengths, None, num_queries=b * s, num_keys=b * s, causal=True)


def cross_attention_layout(encoder_mask: torch.Tensor) -> CrossAttentionLayout:
    """Cross-attention restricted to what each token sees, skipping tokens that see nothing.

    Tokens that see the same encoder tokens and follow one another in a row form one problem
    (a run: normally the text of one image's span).

    Args:
        encoder_mask: ``[b, s, s_e]`` (host) bool, True where token i may attend encoder token j.
    """
    mask = encoder_mask.detach().cpu().numpy().astype(bool, copy=False)
    b, s, s_e = mask.shape
    flat = mask.reshape(b * s, s_e)
    token_index = np.flatnonzero(flat.any(axis=1))
    new_run = _differs_from_previous_row(flat)  # a position whose mask row differs from the previous one
    new_run[::s] = True  # every row starts afresh
    run_starts = np.flatnonzero(new_run[token_index])  # in gathered positions
    run_lengths = np.diff(np.append(run_starts, len(token_index)))
    first_tokens = token_index[run_starts]
    rows = first_tokens // s
    keys = [row * s_e + np.flatnonzero(flat[token]) for row, token in zip(rows, first_tokens)]
    if not keys:
        # No token sees an image (e.g. a rank's blank placeholder). One problem with no query and
        # row 0's encoder tokens as keys keeps the key/value projections (and the encoder) in the
        # autograd graph: every parameter gets its (zero) gradient, as FSDP needs on every rank.
        return CrossAttentionLayout(
            torch.from_numpy(token_index),
            _build(np.zeros(1, np.int64), np.zeros(1, np.int64), [np.arange(s_e)], num_queries=0, num_keys=b * s_e, causal=False),
        )
    attention = _build(run_starts, run_lengths, keys, num_queries=len(token_index), num_keys=b * s_e, causal=False)
    return CrossAttentionLayout(torch.from_numpy(token_index), attention)


def _differs_from_previous_row(flat: np.ndarray) -> np.ndarray:
    """``[n]`` bool: whether each row of ``flat`` ``[n, s_e]`` differs from the row before it
    (the first row does).

    Compared a block of rows at a time: at real sizes (4096 tokens against eight 4-tile images,
    s_e about 51k) one whole-mask comparison allocates a 210 MB temporary, and a fresh allocation
    that size took seconds on a CPU host where the blocks take milliseconds."""
    n, s_e = flat.shape
    differs = np.ones(n, dtype=bool)
    rows_per_block = max(1, (1 << 20) // max(s_e, 1))  # about 1 MB of comparisons at a time
    for start in range(1, n, rows_per_block):
        stop = min(n, start + rows_per_block)
        differs[start:stop] = (flat[start:stop] != flat[start - 1 : stop - 1]).any(axis=1)
    return differs


def _build(
    starts: np.ndarray,
    lengths: np.ndarray,
    keys: list[np.ndarray] | None,
    *,
    num_queries: int,
    num_keys: int,
    causal: bool,
) -> PackedLayout:
    """Group problems (queries ``[start, start + length)``; keys ``keys[i]``, or, when None,
    the queries themselves, causally) by padded query length and key count, and index them."""
    query_lens = padded_length(lengths)
    key_lens = query_lens if keys is None else np.array([len(k) for k in keys], dtype=np.int64)
    output_index = np.zeros(num_queries, dtype=np.int64)
    groups, query_slots, key_slots = [], [], []
    offset = 0
    for query_len, key_len in sorted(set(zip(query_lens.tolist(), key_lens.tolist()))):
        members = np.flatnonzero((query_lens == query_len) & (key_lens == key_len))
        count = len(members)
        slot = np.arange(query_len)
        real = slot[None, :] < lengths[members, None]  # [count, query_len]
        query_index = np.where(real, starts[members, None] + slot[None, :], starts[members, None])
        slots = offset + np.arange(count * query_len).reshape(count, query_len)
        output_index[query_index[real]] = slots[real]
        query_slots.append(query_index.reshape(-1))
        if keys is not None:
            key_slots += [keys[m] for m in members]
        groups.append(AttentionGroup(count, query_len, key_len))
        offset += count * query_len
    query_index_t = torch.from_numpy(np.concatenate(query_slots).astype(np.int64))
    key_index_t = query_index_t if keys is None else torch.from_numpy(np.concatenate(key_slots).astype(np.int64))
    return PackedLayout(
        tuple(groups), query_index_t, key_index_t, torch.from_numpy(output_index), num_queries, num_keys, causal
    )
