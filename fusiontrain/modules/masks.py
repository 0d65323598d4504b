"""Attention masks of packed rows: dense bool masks and flex_attention ``BlockMask``s.

Self-attention masks come from segment ids (which sample each token is in); the cross-attention
block mask from the dense encoder mask. Boolean, True meaning "may attend", as everywhere in
:mod:`fusiontrain.modules.attention`. The CPU path for packed rows does not use the dense masks:
see :mod:`fusiontrain.modules.packed`.

Shapes: b rows, s tokens per row, s_e encoder tokens per row.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class EncoderBlockMask:
    """The encoder mask for the flex_attention (CUDA) path of cross-attention.

    Attributes:
        dense: ``[b, s, s_e]`` bool, True where token i may attend encoder token j (the layer
            reads which tokens see nothing from it).
        block_mask: the same pattern as a ``BlockMask``: blocks no token attends are skipped,
            and a fully masked row (a token that sees no image) gets 0.
    """

    dense: torch.Tensor
    block_mask: Any


def encoder_block_mask(encoder_mask: torch.Tensor) -> EncoderBlockMask:
    """``encoder_mask`` ``[b, s, s_e]`` bool with its flex_attention ``BlockMask``, built on the
    mask's device."""
    from torch.nn.attention.flex_attention import create_block_mask

    def sees(b, h, q, kv):  # noqa: ANN001 - flex_attention's mask_mod signature
        return encoder_mask[b, q, kv]

    b, s, s_e = encoder_mask.shape
    return EncoderBlockMask(encoder_mask, create_block_mask(sees, b, None, s, s_e, device=encoder_mask.device))
