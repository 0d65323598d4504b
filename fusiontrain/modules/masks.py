"""Self-attention masks of packed rows, built from segment ids (which sample each token is in).

Boolean, True meaning "may attend", as everywhere in :mod:`fusiontrain.modules.attention`.

Shapes: b rows, s tokens per row.
"""

from __future__ import annotations

from typing import Any

import torch


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s, s]`` bool from ``[b, s]`` segment ids: token i attends to token j iff both are in
    the same segment and j <= i."""
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return same & causal


def block_causal_block_mask(segment_ids: torch.Tensor) -> Any:
    """The same pattern as a flex_attention ``BlockMask`` (the GPU path): blocks with no attended
    pair are skipped instead of multiplied by a dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_sample_causal(b, h, q, kv):  # noqa: ANN001 - flex_attention's mask_mod signature
        return (segment_ids[b, q] == segment_ids[b, kv]) & (kv <= q)

    b, s = segment_ids.shape
    return create_block_mask(same_sample_causal, b, None, s, s, device=segment_ids.device)
