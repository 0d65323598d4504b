"""Cross-entropy computed chunk by chunk over the output projection.

The decoder returns its final hidden states ``[b, s, d]`` (``set_skip_output_projection``); the
loss projects one chunk of positions at a time, upcasts that chunk's logits to fp32 and takes its
cross-entropy, so at most one chunk of fp32 logits ``[b * s / k, v]`` exists at any time, never
the whole ``[b, s, v]``. Two ways, chosen by whether the projection trains:

- **frozen projection** (fusion-only training, the default): the gradient with respect to the
  hidden states is computed in the forward pass, chunk by chunk (``softmax - one_hot``, times the
  weight), and kept (``[b, s, d]``, the size of the hidden states); backward only scales it. No
  logits are kept and none are recomputed. A weight sharded as a DTensor (FSDP2) is gathered once
  per call, in the compute dtype of the hidden states.
- **trainable projection**: each chunk runs through the ``output`` module under non-reentrant
  activation checkpointing, so backward recomputes the chunk's logits (one extra projection).

Losses are *sums* over target tokens; the caller divides by the global number of target tokens
(over ranks and accumulation steps), so gradients do not depend on how tokens are split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, output: nn.Module, ignore_index: int) -> torch.Tensor:
    # 2-D input: the projection takes the same matmul path in forward and in the checkpoint's
    # recompute, whatever the chunk's strides (3-D inputs may fold into mm once and bmm once).
    logits = output(hidden.reshape(-1, hidden.shape[-1])).float()
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")


class _FrozenProjectionCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` for a frozen ``weight``, whose gradient with
    respect to ``hidden`` is computed during forward, one chunk of positions at a time."""

    @staticmethod
    def forward(  # noqa: ANN205 - autograd.Function protocol
        ctx: Any, hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, num_chunks: int, ignore_index: int
    ) -> torch.Tensor:
        shape = hidden.shape
        flat, targets = hidden.reshape(-1, shape[-1]), labels.reshape(-1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        size = -(-flat.shape[0] // num_chunks)
        for start in range(0, flat.shape[0], size):
            rows = slice(start, start + size)
            logits = (flat[rows] @ weight.T).float()  # [n, v], fp32
            valid = targets[rows] != ignore_index
            target = torch.where(valid, targets[rows], 0)
            log_norm = torch.logsumexp(logits, dim=-1)
            total += ((log_norm - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum()
            if grad is not None:  # d loss / d logits = softmax - one_hot, on valid rows only
                probs = logits.sub_(log_norm[:, None]).exp_()
                probs[torch.arange(len(target), device=probs.device), target] -= 1.0
                probs *= valid[:, None]
                grad[rows] = probs.to(flat.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.shape = shape
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        (grad,) = ctx.saved_tensors
        grad_hidden = None if grad is None else (grad * grad_total.to(grad.dtype)).view(ctx.shape)
        return grad_hidden, None, None, None, None


def _full_weight(output: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``output.weight`` whole, detached, in ``dtype``: a sharded DTensor (FSDP2) is cast shard by
    shard, then gathered, so the all-gather moves the compute dtype."""
    weight = output.weight.detach().to(dtype)
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


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
        num_chunks: chunks of the ``b * s`` positions (frozen projection) or along s (trainable);
            0 or 1 computes the full logits at once (the reference).
        ignore_index: label value that contributes nothing.

    Returns:
        A 0-dim fp32 tensor: the sum of per-token losses.
    """
    if num_chunks <= 1:
        return _chunk_loss_sum(hidden, labels, output, ignore_index)
    if not output.weight.requires_grad and getattr(output, "bias", None) is None:
        weight = _full_weight(output, hidden.dtype)
        return _FrozenProjectionCrossEntropy.apply(hidden, labels, weight, num_chunks, ignore_index)
    total = hidden.new_zeros((), dtype=torch.float32)
    for hidden_chunk, label_chunk in zip(hidden.chunk(num_chunks, dim=1), labels.chunk(num_chunks, dim=1)):
        total = total + checkpoint(
            _chunk_loss_sum, hidden_chunk, label_chunk, output, ignore_index, use_reentrant=False
        )
    return total


def count_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Number of positions that contribute to the loss (a 0-dim int64 tensor)."""
    return (labels != ignore_index).sum()
