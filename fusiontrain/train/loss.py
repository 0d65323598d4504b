"""Cross-entropy over the target positions only, computed chunk by chunk over the output projection.

The decoder returns its final hidden states ``[b, s, d]`` (``set_skip_output_projection``). The
loss gathers the rows of the ``n`` target positions (label != ignore index; prompt, image-token
and padding positions are dropped) and projects only those: the projection costs ``2 n d v``
rather than ``2 b s d v``. It projects one chunk of those rows at a time, upcasts that chunk's
logits to fp32 and takes its cross-entropy, so at most one chunk of fp32 logits ``[n / k, v]``
exists at any time, never the whole ``[n, v]``. In training a chunk has the rows ``k`` chunks
give a micro-batch whose every slot is a target (:func:`loss_chunk_rows`), so a micro-batch with
fewer targets (short padding-free rows, prompts) takes fewer, larger chunks under the same bound
(on the CPU, 8 chunks of ~44 rows cost ~11% of a padding-free step of ``benchmarks/vs_hf.py``
against 2). Two ways, chosen by whether the projection trains:

- **frozen projection** (fusion-only training, the default): each chunk gathers its own rows;
  the gradient with respect to them is computed in the forward pass (``softmax - one_hot``, times
  the weight) and kept (``[n, d]``: no gathered copy of all n rows ever exists); backward scales
  it and scatters it to ``[b, s, d]`` (zeros at non-target positions). No logits are kept and
  none are recomputed. In training the weight comes unsharded from its FSDP unit, which keeps it
  from the norm's forward to its backward (``fusiontrain.parallel.fsdp.OUTPUT_UNIT``); a weight
  still sharded as a DTensor (FSDP2) is gathered once per call, in the compute dtype of the
  hidden states.
- **trainable projection**: the n rows are gathered (``[n, d]``, kept until backward, like an
  activation), and each chunk of them runs through the ``output`` module under non-reentrant
  activation checkpointing, so backward recomputes the chunk's logits (one extra projection).

``num_chunks <= 1`` takes the gathered rows' logits ``[n, v]`` at once, under plain autograd.
:func:`full_cross_entropy_sum` is the reference: every position projected, no gather, no chunks.

The target positions are a flat int64 index ``[n]`` into the ``b * s`` positions
(:func:`~fusiontrain.data.batch.target_positions`). Its length depends on the label values, so it is computed from the
host copy of the labels (``Batch.with_target_index``) and travels to the device with the batch:
the step never waits for the device to count targets, and the planner's fake tensors get the
index's shape from the host. Without one, the loss computes it from ``labels`` (a device-to-host
sync on an accelerator; impossible on fake tensors).

Losses are *sums* over target tokens; the caller divides by the global number of target tokens
(over ranks and accumulation steps), so gradients do not depend on how tokens are split.

Per source (a mixture of data sources, :mod:`fusiontrain.data.mixture`): given the source of each
target row (``target_sources``, from the host like the index) and an accumulator ``per_source``
``[k]``, each chunk adds its rows' losses to their sources' sums as it computes them (detached: a
metric, no extra pass and no extra projection).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fusiontrain.data.batch import target_positions


def _row_chunks(n: int, num_chunks: int, chunk_rows: int | None = None) -> list[slice]:
    """Consecutive row ranges covering ``n`` rows: of ``chunk_rows`` rows each when given, else
    ``num_chunks`` (or fewer); at least one (maybe empty), so that a micro-batch without targets
    still runs the projection once."""
    size = max(1, chunk_rows if chunk_rows else -(-n // num_chunks))
    return [slice(start, start + size) for start in range(0, max(n, 1), size)]


def _chunk_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, output: nn.Module, ignore_index: int) -> torch.Tensor:
    # 2-D input: the projection takes the same matmul path in forward and in the checkpoint's
    # recompute, whatever the chunk's strides (3-D inputs may fold into mm once and bmm once).
    logits = output(hidden.reshape(-1, hidden.shape[-1])).float()
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")


class _FrozenProjectionCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``flat[index] @ weight.T`` for a frozen ``weight``: the rows of
    ``index`` ``[n]`` are gathered from ``flat`` ``[b * s, d]`` one chunk at a time, and their
    gradient ``[n, d]`` is computed during forward; backward scatters it to ``[b * s, d]``."""

    @staticmethod
    def forward(  # noqa: ANN205 - autograd.Function protocol
        ctx: Any,
        flat: torch.Tensor,
        targets: torch.Tensor,
        index: torch.Tensor,
        weight: torch.Tensor,
        num_chunks: int,
        chunk_rows: int | None,
        ignore_index: int,
        target_sources: torch.Tensor | None,
        per_source: torch.Tensor | None,
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=flat.device)
        n = index.shape[0]
        grad = flat.new_empty(n, flat.shape[1]) if ctx.needs_input_grad[0] else None
        chunks = _row_chunks(n, num_chunks, chunk_rows)
        # One fp32 buffer [rows of the largest chunk, v] holds every chunk's logits in turn: a
        # large allocation on the CPU is a fresh mmap whose pages fault in at first touch.
        buffer = flat.new_empty(min(chunks[0].stop, n), weight.shape[0], dtype=torch.float32)
        for chunk in chunks:
            rows = flat.index_select(0, index[chunk])  # [m, d]
            log_probs = buffer[: rows.shape[0]]  # [m, v]
            if rows.dtype == torch.float32:
                torch.mm(rows, weight.T, out=log_probs)
            else:
                log_probs.copy_(rows @ weight.T)
            # log_softmax in place: its kernels read a row whole (max, then sum of exp) before
            # writing it, one row per thread block on a GPU.
            torch.log_softmax(log_probs, dim=-1, out=log_probs)
            # an index may hold ignored positions too (a superset of the targets): they count nothing
            valid = targets[chunk] != ignore_index
            target = torch.where(valid, targets[chunk], 0)
            row_losses = -log_probs.gather(1, target[:, None]).squeeze(1) * valid
            total += row_losses.sum()
            if per_source is not None:
                _add_per_source(per_source, row_losses, target_sources, chunk)
            if grad is not None:  # d loss / d logits = softmax - one_hot, on valid rows only
                probs = log_probs.exp_()
                probs[torch.arange(len(target), device=probs.device), target] -= 1.0
                # rows of ignored positions are zeroed after the projection: [m, d], not [m, v]
                grad[chunk] = (probs.to(flat.dtype) @ weight) * valid[:, None]
        ctx.save_for_backward(grad, index)
        ctx.flat_shape = flat.shape
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        grad, index = ctx.saved_tensors
        grad_flat = None
        if grad is not None:  # zeros at every position that is not a target
            grad_flat = grad.new_zeros(ctx.flat_shape).index_add_(0, index, grad * grad_total.to(grad.dtype))
        return grad_flat, None, None, None, None, None, None, None, None


def _add_per_source(
    per_source: torch.Tensor, row_losses: torch.Tensor, target_sources: torch.Tensor | None, chunk: slice
) -> None:
    """Add one chunk's per-row losses ``[rows]`` (detached) to their sources' sums ``[k]``; rows
    without a source map (every sample of source 0) all go to source 0."""
    losses = row_losses.detach().float()
    if target_sources is None:
        per_source[0] += losses.sum()
    else:
        per_source.index_add_(0, target_sources[chunk], losses)


def _chunk_losses(hidden: torch.Tensor, labels: torch.Tensor, output: nn.Module, ignore_index: int) -> torch.Tensor:
    """Per-row cross-entropy ``[rows]`` (0 at ignored rows) of ``output(hidden)``: what
    :func:`_chunk_loss_sum` sums, kept per row for per-source sums."""
    logits = output(hidden.reshape(-1, hidden.shape[-1])).float()
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="none")


def loss_chunk_rows(slots: int, num_chunks: int) -> int | None:
    """Rows per chunk of the output projection for micro-batches of at most ``slots`` token slots
    (rows x ``seq_len``): what ``num_chunks`` chunks give a micro-batch whose every slot is a
    target; None when the loss is not chunked (``num_chunks <= 1``)."""
    return -(-slots // num_chunks) if num_chunks > 1 else None


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
    target_index: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    target_sources: torch.Tensor | None = None,
    per_source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``output(hidden)`` against ``labels``, projecting the target
    positions only.

    Args:
        hidden: final-normed hidden states ``[b, s, d]``.
        labels: target ids ``[b, s]`` (already shifted: position i predicts ``labels[:, i]``);
            ``ignore_index`` marks prompt and padding positions.
        output: the output projection ``d -> v``.
        num_chunks: chunks of the ``n`` gathered target rows; 0 or 1 projects them all at once.
        ignore_index: label value that contributes nothing.
        target_index: ``[n]`` int64, :func:`~fusiontrain.data.batch.target_positions` of ``labels`` (computed on the
            host, on the device of ``hidden``); None computes it here from ``labels``. Positions
            left out of it count nothing, so it must hold every target.
        chunk_rows: with ``num_chunks > 1``, rows per chunk instead of ``n / num_chunks``: the
            trainer passes the chunk of a micro-batch whose every slot is a target
            (:func:`loss_chunk_rows`), so a micro-batch with fewer targets takes fewer chunks of
            that size rather than ``num_chunks`` smaller ones: the same largest chunk of logits
            (the planner's worst case), larger matmuls.
        target_sources: ``[n]`` int64, the data source of each row of ``target_index``
            (``Batch.target_sources``); None: every row is of source 0.
        per_source: ``[k]`` fp32 accumulator (on the device of ``hidden``): each row's loss is
            added to its source's entry (detached); None: no per-source sums.

    Returns:
        A 0-dim fp32 tensor: the sum of per-token losses.
    """
    if target_index is None:
        if type(labels) is not torch.Tensor or labels.is_meta:
            raise ValueError(
                f"the loss cannot count the targets of {type(labels).__name__} labels (their number is data): pass "
                "target_index, computed from the host labels (Batch.with_target_index, data.batch.target_positions)"
            )
        target_index = target_positions(labels, ignore_index)
    flat = hidden.reshape(-1, hidden.shape[-1])  # [b * s, d]
    targets = labels.reshape(-1).index_select(0, target_index)  # [n]
    if num_chunks > 1 and not output.weight.requires_grad and getattr(output, "bias", None) is None:
        weight = _full_weight(output, hidden.dtype)
        return _FrozenProjectionCrossEntropy.apply(
            flat, targets, target_index, weight, num_chunks, chunk_rows, ignore_index, target_sources, per_source
        )
    rows = flat.index_select(0, target_index)  # [n, d]; its backward scatters the gradient to [b * s, d]
    if num_chunks <= 1:
        if per_source is None:
            return _chunk_loss_sum(rows, targets, output, ignore_index)
        losses = _chunk_losses(rows, targets, output, ignore_index)
        _add_per_source(per_source, losses, target_sources, slice(None))
        return losses.sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for chunk in _row_chunks(rows.shape[0], num_chunks, chunk_rows):
        if per_source is None:
            chunk_loss = checkpoint(_chunk_loss_sum, rows[chunk], targets[chunk], output, ignore_index, use_reentrant=False)
        else:  # per row out of the checkpointed function: its recompute in backward adds nothing twice
            losses = checkpoint(_chunk_losses, rows[chunk], targets[chunk], output, ignore_index, use_reentrant=False)
            _add_per_source(per_source, losses, target_sources, chunk)
            chunk_loss = losses.sum()
        total = total + chunk_loss
    return total


def full_cross_entropy_sum(
    hidden: torch.Tensor, labels: torch.Tensor, output: nn.Module, *, ignore_index: int = -100
) -> torch.Tensor:
    """The reference: the full fp32 logits ``[b * s, v]`` of every position, summed cross-entropy
    over the targets (plain autograd; no gather, no chunks). For tests and benchmarks."""
    return _chunk_loss_sum(hidden, labels, output, ignore_index)


def count_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Number of positions that contribute to the loss (a 0-dim int64 tensor)."""
    return (labels != ignore_index).sum()
