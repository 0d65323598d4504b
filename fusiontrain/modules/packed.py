"""Packed attention: the attention of packed rows computed per sample, not over the whole row.

A packed row of ``s`` tokens holds several samples (segments). Under a dense block-diagonal mask,
self-attention costs ``s^2`` per row whatever the segments; here it costs about the sum of the
segments' ``s_i^2``. Likewise, a token cross-attends only to its own images' encoder tokens, and
tokens that see no image are not computed at all.

The layouts are built once per micro-batch on the host (numpy, from ``segment_ids`` and the
encoder mask; no device, no dispatcher, so they also build inside the planner's fake-tensor mode)
and carried to the device as a few index tensors. Their shapes (group sizes and lengths) are
Python ints, so running them needs no device sync.

How a layout runs (:func:`attend_packed`): the attention problems (one per segment, or per run of
tokens that see the same images) are grouped by length. Each group is gathered from the flattened
queries / keys into ``[count, n_h, length, h_d]``, padded at the end to the group's length, and
runs one ``F.scaled_dot_product_attention`` call; the outputs are gathered back into the tokens'
order. End padding needs no mask: in a causal segment, padded keys come after every real query,
so causality already hides them; padded queries attend to real keys (finite) and their outputs are
never read, so their gradient is exactly zero. Lengths are rounded up to a multiple of 32 (from
256 on, of 1/8 of the power of two at or below them: at most 12.5% longer), which keeps the number
of calls small
(on a 2-core CPU, 10 calls over 32-multiples beat both one call per exact length and power-of-two
buckets; see ``benchmarks/attention.py``).

Shapes: b rows, s tokens, s_e encoder tokens, n_h query heads, n_kv key/value heads, h_d head
width; "flat" means rows and tokens flattened into one axis (``b * s``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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
    new_run = np.ones(b * s, dtype=bool)  # a position whose mask row differs from the previous one
    new_run[1:] = (flat[1:] != flat[:-1]).any(axis=1)
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


# -- running a layout -------------------------------------------------------------------------


class _GatherSlots(torch.autograd.Function):
    """``rows.index_select(0, slot_rows)`` ``[slots, ...]`` from ``rows`` ``[n, ...]``, where each
    row has one real slot (``real_slot[row]``) and every other slot that repeats it is padding.

    The backward reads each row's gradient from its real slot: one gather, where index_select's
    backward zero-fills ``[n, ...]`` and scatter-adds every slot. Exact because a padding slot's
    gradient is exactly zero: padded queries' outputs are never read (so their output gradient
    is 0, hence their query gradient and their attention-score gradients are 0), and padded keys
    / values follow every real query of their causal segment, which gives them weight exactly 0.
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, slot_rows: torch.Tensor, real_slot: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(real_slot)
        return rows.index_select(0, slot_rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (real_slot,) = ctx.saved_tensors
        return grad.index_select(0, real_slot), None, None


@torch.compiler.disable
def attend_packed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, *, dropout_p: float = 0.0
) -> torch.Tensor:
    """Attention under ``layout``: the same result as SDPA under the dense mask it stands for.

    Opaque to ``torch.compile`` (a graph break): the group structure changes from batch to batch,
    and traced, it would recompile a compiled block for every new one.

    Args:
        q: ``[b, n_h, s, h_d]``, with ``b * s == layout.num_queries``.
        k: ``[b_k, n_kv, s_k, h_d]``, with ``b_k * s_k == layout.num_keys``; ``n_h`` a multiple
            of ``n_kv`` (GQA).
        v: like ``k``.
        layout: from :func:`self_attention_layout` or :func:`cross_attention_layout`.
        dropout_p: attention dropout probability.

    Returns:
        ``[b, n_h, s, h_d]``.
    """
    b, n_h, s, h_d = q.shape
    b_k, n_kv, s_k, _ = k.shape
    if b * s != layout.num_queries or b_k * s_k != layout.num_keys:
        raise ValueError(
            f"packed layout for {layout.num_queries} queries and {layout.num_keys} keys, given "
            f"{b} x {s} queries and {b_k} x {s_k} keys: build the layout from this micro-batch"
        )
    # One gather per tensor, then a split into the groups. Queries (and causal keys / values)
    # have one real slot each, so their gradient is read back from it (_GatherSlots); cross-
    # attention keys may serve several problems, so theirs is summed (index_select's backward).
    queries = _GatherSlots.apply(q.transpose(1, 2).reshape(b * s, n_h, h_d), layout.query_index, layout.output_index)
    keys = k.transpose(1, 2).reshape(b_k * s_k, n_kv, h_d)
    values = v.transpose(1, 2).reshape(b_k * s_k, n_kv, h_d)
    if layout.causal:
        keys = _GatherSlots.apply(keys, layout.key_index, layout.output_index)
        values = _GatherSlots.apply(values, layout.key_index, layout.output_index)
    else:
        keys, values = keys.index_select(0, layout.key_index), values.index_select(0, layout.key_index)
    query_sizes = [g.count * g.query_len for g in layout.groups]
    key_sizes = [g.count * g.key_len for g in layout.groups]
    outputs = []
    for group, q_g, k_g, v_g in zip(
        layout.groups, queries.split(query_sizes), keys.split(key_sizes), values.split(key_sizes)
    ):
        out = F.scaled_dot_product_attention(
            q_g.view(group.count, group.query_len, n_h, h_d).transpose(1, 2),
            k_g.view(group.count, group.key_len, n_kv, h_d).transpose(1, 2),
            v_g.view(group.count, group.key_len, n_kv, h_d).transpose(1, 2),
            is_causal=layout.causal,
            dropout_p=dropout_p,
            enable_gqa=n_h != n_kv,
        )
        outputs.append(out.transpose(1, 2).reshape(group.count * group.query_len, n_h, h_d))
    out = torch.cat(outputs).index_select(0, layout.output_index)
    return out.view(b, s, n_h, h_d).transpose(1, 2)
