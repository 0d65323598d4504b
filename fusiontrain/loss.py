"""Cross-entropy computed chunk by chunk over the output projection.

The decoder returns its final hidden states ``[b, s, d]`` (``set_skip_output_projection``); the
loss projects one chunk of positions at a time, upcasts that chunk's logits to fp32, takes its
cross-entropy and frees it. Each chunk runs under non-reentrant activation checkpointing, so
backward recomputes the chunk's logits instead of keeping them: at most one chunk of fp32 logits
``[b, s / k, v]`` exists at any time, never the whole ``[b, s, v]``.

Losses are *sums* over target tokens; the caller divides by the global number of target tokens
(over ranks and accumulation steps), so gradients do not depend on how tokens are split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, output: nn.Module, ignore_index: int) -> torch.Tensor:
    # 2-D input: the projection takes the same matmul path in forward and in the checkpoint's
    # recompute, whatever the chunk's strides (3-D inputs may fold into mm once and bmm once).
    logits = output(hidden.reshape(-1, hidden.shape[-1])).float()
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    output: nn.Module,
    *,
    num_chunks: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Summed cross-entropy of ``output(hidden)`` against ``labels``.

    Args:
        hidden: final-normed hidden states ``[b, s, d]``.
        labels: target ids ``[b, s]`` (already shifted: position i predicts ``labels[:, i]``);
            ``ignore_index`` marks prompt and padding positions.
        output: the output projection ``d -> v``.
        num_chunks: chunks along s; 0 or 1 computes the full logits at once (the reference).
        ignore_index: label value that contributes nothing.

    Returns:
        A 0-dim fp32 tensor: the sum of per-token losses.
    """
    if num_chunks <= 1:
        return _chunk_loss_sum(hidden, labels, output, ignore_index)
    total = hidden.new_zeros((), dtype=torch.float32)
    for hidden_chunk, label_chunk in zip(hidden.chunk(num_chunks, dim=1), labels.chunk(num_chunks, dim=1)):
        total = total + checkpoint(
            _chunk_loss_sum, hidden_chunk, label_chunk, output, ignore_index, use_reentrant=False
        )
    return total


def count_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Number of positions that contribute to the loss (a 0-dim int64 tensor)."""
    return (labels != ignore_index).sum()
