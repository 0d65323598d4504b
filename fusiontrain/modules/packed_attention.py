"""Packed attention: running a :class:`~fusiontrain.modules.packed.PackedLayout`, the attention of
packed rows computed per sample, not over the whole row.

How a layout runs (:func:`attend_packed`): the attention problems (one per segment, or per run of
tokens that see the same images) are grouped by length. Each group is gathered from the flattened
queries / keys into ``[count, n_h, length, h_d]``, padded at the end to the group's length, and
runs one ``F.scaled_dot_product_attention`` call; the outputs are gathered back into the tokens'
order. End padding needs no mask: in a causal segment, padded keys come after every real query,
so causality already hides them; padded queries attend to real keys (finite) and their outputs are
never read, so their gradient is exactly zero. Lengths are rounded up to a multiple of 32 (from
256 on, of 1/8 of the power of two at or below them: at most 12.5% longer), which keeps the number
of calls small (on a 2-core CPU, 10 calls over 32-multiples beat both one call per exact length and power-of-two
buckets; see ``benchmarks/attention.py``).

Shapes: b rows, s tokens, s_e encoder tokens, n_h query heads, n_kv key/value heads, h_d head
width; "flat" means rows and tokens flattened into one axis (``b * s``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fusiontrain.modules.packed import PackedLayout


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
