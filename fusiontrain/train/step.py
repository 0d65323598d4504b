"""One training step, the same code for the trainer and the planner.

:class:`TrainStep` turns one global-batch step's micro-batches, as they come from the loader (host
copies), into one optimizer update:

1. Counts from the host copies, with no device work: the target positions of each micro-batch
   (``Batch.with_target_index``: the loss projects only those, and their number is known on the
   host), target tokens, real tokens, bad samples skipped per reason and model FLOPs
   (:func:`~fusiontrain.flops.count.micro_batch_flops_or_none`), and with a mixture of data
   sources each source's targets, real tokens and samples, and per modality the items and the
   encoder tokens that text sees.
   They travel in ONE all-reduce, issued before the first forward; the loss scale (world size /
   global target tokens, since FSDP averages gradients over ranks) is taken from its result on
   the device, so nothing waits for it before the first backward.
2. Each micro-batch goes to the device on its own (pinned host memory and ``non_blocking`` copies
   on CUDA; on a CPU the host copy is the device copy), runs forward, the chunked loss and
   backward, and is dropped before the next one comes. FSDP reduce-scatters gradients on the last
   micro-batch only (``parallel.defer_gradient_sync``; every micro-batch otherwise).
3. ONE all-reduce after backward (:meth:`TrainStep.reduce_after_backward`) carries the loss sum,
   the square of the grad norm (each rank's gradient shards, summed), one "my loss is non-finite"
   flag per rank, one "I received a preemption signal" per rank and, with a mixture, each
   source's loss sum (added up inside the chunked loss); its result is the one
   device-to-host read of the step. From it: the non-finite check of
   :mod:`fusiontrain.train.nonfinite`, gradient clipping to the global norm, the optimizer and
   LR-scheduler steps; the trainer reads the preemption verdict from the step's result.

So a step issues two small all-reduces besides FSDP's own collectives (counted by
``tests/test_step_collectives.py``), where clipping, the non-finite check and the preemption flag
used to take one each.

The planner (:mod:`fusiontrain.plan.planner`) runs this class on fake tensors: it passes its own
``to_device`` (a fake, tracked copy) and ``phase`` (the labels of its memory tracker), so that
what it counts is what the trainer runs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fusiontrain.parallel import distributed
from fusiontrain.data import Batch
from fusiontrain.data.input_format import EncoderInputFormat
from fusiontrain.flops.count import micro_batch_flops_or_none
from fusiontrain.train.loss import chunked_cross_entropy_sum, count_targets
from fusiontrain.train.nonfinite import NonFiniteGuard
from fusiontrain.parallel.fsdp import set_gradient_sync

# Phases a ``phase`` hook is told about (the planner labels the memory of each, and runs the host
# phase outside its fake-tensor mode).
HOST_PHASE = "host"  # counting on the host copies: no device work
LOSS_PHASE = "loss"  # the chunked loss of one micro-batch (fp32 logits chunks)
BACKWARD_PHASE = "backward"  # one micro-batch's backward
OPTIMIZER_PHASE = "optimizer"  # clipping, the non-finite check, the optimizer step


@dataclass(frozen=True)
class StepSettings:
    """What the step needs from the config.

    Attributes:
        ignore_index: label value with no loss (``loss.ignore_index``).
        num_output_chunks: chunks of the output projection (``loss.num_output_chunks``).
        loss_chunk_rows: rows per chunk: those ``num_output_chunks`` chunks give a micro-batch
            whose every slot is a target (``fusiontrain.train.loss.loss_chunk_rows``), or None.
        max_grad_norm: clip the global grad norm to this; None = no clipping (``optim.max_grad_norm``).
        defer_gradient_sync: reduce-scatter on the last micro-batch only (``parallel.defer_gradient_sync``).
        flex_attention: packed rows attend through a flex_attention BlockMask (CUDA) rather than
            a dense ``[b, s, s]`` mask.
    """

    ignore_index: int
    num_output_chunks: int
    max_grad_norm: float | None
    defer_gradient_sync: bool
    flex_attention: bool
    loss_chunk_rows: int | None = None


@dataclass(frozen=True)
class StepResult:
    """What one step did, the same on every rank.

    Attributes:
        loss: global per-target-token loss (NaN / inf on a skipped non-finite step).
        grad_norm: global grad norm before clipping.
        lr: learning rate the step used.
        targets: target tokens of the global batch.
        real_tokens: non-padding tokens of the global batch.
        slots: token slots of the global batch (rows x seq_len over every rank).
        skipped: bad samples skipped while the global batch was produced, per skip reason.
        flops: model FLOPs of the global batch, or None when some rank could not count them.
        skipped_step: the optimizer update was skipped (non-finite loss or grad norm).
        preemption_signals: per rank, the preemption signal it had received by the step's update
            (0: none); see :meth:`~fusiontrain.train.preemption.PreemptionWatcher.verdict`.
        sources: with several data sources, per source name: its ``loss`` (per target token),
            ``targets``, ``real_tokens`` and ``samples`` in the global batch; empty otherwise.
        modalities: per modality the step was given formats of, the ``items`` of the global batch
            and their ``encoder_tokens`` that text sees (:func:`modality_counts`).
    """

    loss: float
    grad_norm: float
    lr: float
    targets: int
    real_tokens: int
    slots: int
    skipped: tuple[int, ...]
    flops: float | None
    skipped_step: bool
    preemption_signals: tuple[int, ...] = ()
    sources: dict[str, dict[str, float | None]] = field(default_factory=dict)
    modalities: dict[str, dict[str, int]] = field(default_factory=dict)

    def breakdown(self) -> dict[str, Any]:
        """The per-source and per-modality counts as flat metrics: ``source/<name>/loss``,
        ``/tokens`` (targets), ``/real_tokens``, ``/samples``; ``modality/<m>/items``,
        ``/encoder_tokens``."""
        metrics: dict[str, Any] = {}
        for name, stats in self.sources.items():
            for key, value in (("loss", "loss"), ("tokens", "targets"), ("real_tokens", "real_tokens"), ("samples", "samples")):
                metrics[f"source/{name}/{key}"] = stats[value]
        for modality, stats in self.modalities.items():
            metrics.update({f"modality/{modality}/{key}": value for key, value in stats.items()})
        return metrics


@dataclass(frozen=True)
class ReducedStep:
    """What the step's one all-reduce after backward gave, the same on every rank.

    Attributes:
        loss_sum: the global loss sum over target tokens.
        grad_norm: the global L2 norm of the trainable parameters' gradients (before clipping).
        loss_ranks: the ranks whose own loss sum was NaN or inf.
        preemption_signals: per rank, the signal number it had received (0: none).
        source_loss_sums: per data source, its global loss sum (empty with one source).
    """

    loss_sum: float
    grad_norm: float
    loss_ranks: tuple[int, ...]
    preemption_signals: tuple[int, ...]
    source_loss_sums: tuple[float, ...] = ()


def loss_sum(
    model: nn.Module,
    batch: Batch,
    *,
    num_output_chunks: int,
    ignore_index: int,
    flex_attention: bool,
    loss_phase: AbstractContextManager | None = None,
    loss_chunk_rows: int | None = None,
    per_source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed cross-entropy over the target tokens of ``batch`` (on the model's device): the model
    (with its output projection skipped) gives ``[b, s, d]``, the chunked loss gathers the target
    positions (``batch.target_index``, set on the host by ``Batch.with_target_index``; without it
    the loss finds them from the labels) and applies the projection to them chunk by chunk (inside
    ``loss_phase`` when given), adding each target's loss to its source's entry of ``per_source``
    when given (``batch.target_sources``)."""
    hidden = model(batch.tokens, **batch.model_inputs(flex=flex_attention))
    with loss_phase or nullcontext():
        return chunked_cross_entropy_sum(
            hidden,
            batch.labels,
            model.decoder.output,
            num_chunks=num_output_chunks,
            ignore_index=ignore_index,
            target_index=batch.target_index,
            chunk_rows=loss_chunk_rows,
            target_sources=batch.target_sources,
            per_source=per_source,
        )


def device_transfer(device: torch.device) -> Callable[[Batch], Batch]:
    """Host micro-batch -> the same on ``device``: ``non_blocking`` copies (from pinned memory,
    see :meth:`TrainStep.stage`) on CUDA; on a CPU the tensors themselves."""
    return lambda batch: batch.to(device)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class TrainStep:
    """One optimizer step over this rank's micro-batches of a global batch (see the module doc).

    Args:
        model: the parallelized model, output projection skipped (the loss applies it).
        optimizer: over the trainable parameters.
        scheduler: stepped once per step, skipped or not (the schedule follows the step index).
        guard: the non-finite policy (``loss.nonfinite``).
        settings: the config values the step reads.
        device: this rank's device.
        world_size: data-parallel ranks.
        skip_reasons: the order of the per-reason skip counts.
        to_device: host micro-batch -> device micro-batch (default :func:`device_transfer`).
        phase: ``phase(name)`` -> a context manager entered around each phase (``*_PHASE``).
        rank: this rank's index (its slots in the all-reduce after backward).
        preemption_signal: this rank's received preemption signal, 0 when none
            (:meth:`~fusiontrain.train.preemption.PreemptionWatcher.local_signal`).
        source_names: the data sources of a mixture, in order (their metrics are counted and
            reduced with the step's own); fewer than two: nothing per source.
        input_formats: the formats of the modalities whose items and encoder tokens are counted
            per step (``{"image": ...}`` for a model with one encoder); empty: none.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        guard: NonFiniteGuard,
        settings: StepSettings,
        *,
        device: torch.device,
        world_size: int,
        skip_reasons: Sequence[str],
        to_device: Callable[[Batch], Batch] | None = None,
        phase: Callable[[str], AbstractContextManager] | None = None,
        rank: int = 0,
        preemption_signal: Callable[[], int] = lambda: 0,
        source_names: Sequence[str] = (),
        input_formats: Mapping[str, EncoderInputFormat] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.guard = guard
        self.settings = settings
        self.device = device
        self.world_size = world_size
        self.skip_reasons = tuple(skip_reasons)
        self.to_device = to_device or device_transfer(device)
        self.phase = phase or (lambda _name: nullcontext())
        self.rank = rank
        self.preemption_signal = preemption_signal
        self.source_names = tuple(source_names) if len(source_names) > 1 else ()
        self.input_formats = dict(input_formats or {})

    def stage(self, batch: Batch) -> Batch:
        """A host micro-batch ready for an asynchronous copy: in pinned memory on CUDA."""
        return batch.map(self.stage_tensor) if self.device.type == "cuda" else batch

    def stage_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor in pinned memory on CUDA (so that ``non_blocking`` copies are asynchronous)."""
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def host_counts(self, batches: Sequence[Batch]) -> torch.Tensor:
        """``[targets, real tokens, FLOPs, uncounted micro-batches, *skips per reason, *per source
        (targets, real tokens, samples), *per modality (items, encoder tokens seen)]`` of this
        rank's host micro-batches (float64 on the host: exact up to 2**53)."""
        k, base, m = len(self.source_names), 4 + len(self.skip_reasons), len(self.input_formats)
        counts = torch.zeros(base + 3 * k + 2 * m, dtype=torch.float64)
        for batch in batches:
            if k:
                counts[base : base + 3 * k] += source_counts(batch, k).reshape(-1)
            if m:
                counts[base + 3 * k :] += modality_counts(batch, self.input_formats).reshape(-1)
            counts[0] += int(count_targets(batch.labels, self.settings.ignore_index))
            counts[1] += int(batch.is_real.sum())
            flops = micro_batch_flops_or_none(self.model, batch)  # host copies: no device syncs
            if flops is None:
                counts[3] += 1
            else:
                counts[2] += flops.total
            for reason, n in batch.skipped.items():
                counts[4 + self.skip_reasons.index(reason)] += n
        return counts

    def __call__(self, step: int, host_batches: Sequence[Batch]) -> StepResult:
        """Run step ``step`` (0-based) over this rank's ``host_batches``; a collective."""
        with self.phase(HOST_PHASE):
            ignore_index = self.settings.ignore_index
            host_batches = [self.stage(batch.with_target_index(ignore_index)) for batch in host_batches]
            counts = self.stage_tensor(self.host_counts(host_batches))
        totals = distributed.all_reduce_sum(
            counts.to(self.device, non_blocking=True), f"token, skip and FLOP counts of step {step}"
        )
        scale = (self.world_size / totals[0].clamp(min=1)).float()  # FSDP averages gradients over ranks

        settings = self.settings
        local_loss = torch.zeros((), device=self.device)
        k = len(self.source_names)
        per_source = torch.zeros(k, dtype=torch.float32, device=self.device) if k else None
        last = len(host_batches) - 1
        for index, host_batch in enumerate(host_batches):
            set_gradient_sync(self.model, index == last or not settings.defer_gradient_sync)
            batch = self.to_device(host_batch)
            batch_loss = loss_sum(
                self.model,
                batch,
                num_output_chunks=settings.num_output_chunks,
                ignore_index=settings.ignore_index,
                flex_attention=settings.flex_attention,
                loss_phase=self.phase(LOSS_PHASE),
                loss_chunk_rows=settings.loss_chunk_rows,
                per_source=per_source,
            )
            del batch
            batch_loss = self.guard.inject(batch_loss, step)  # a test seam; see nonfinite.py
            with self.phase(BACKWARD_PHASE):
                (batch_loss * scale).backward()
            local_loss += batch_loss.detach()
            del batch_loss

        counts = totals.tolist()  # long arrived: issued before the first forward
        reduced, lr, skip = self.update(step, local_loss, int(counts[0]), per_source)
        slots = sum(batch.is_real.numel() for batch in host_batches) * self.world_size
        base = 4 + len(self.skip_reasons)
        sources = {}
        for index, name in enumerate(self.source_names):
            targets, real_tokens, samples = counts[base + 3 * index : base + 3 * index + 3]
            loss = reduced.source_loss_sums[index] / targets if targets else None  # no target of it this step
            sources[name] = {"loss": loss, "targets": int(targets), "real_tokens": int(real_tokens), "samples": int(samples)}
        per_modality = counts[base + 3 * len(self.source_names) :]
        modalities = {
            modality: {"items": int(per_modality[2 * index]), "encoder_tokens": int(per_modality[2 * index + 1])}
            for index, modality in enumerate(self.input_formats)
        }
        return StepResult(
            loss=reduced.loss_sum / max(int(counts[0]), 1),
            grad_norm=reduced.grad_norm,
            lr=lr,
            targets=int(counts[0]),
            real_tokens=int(counts[1]),
            slots=slots,
            skipped=tuple(int(n) for n in counts[4:base]),
            flops=counts[2] if counts[3] == 0 else None,
            skipped_step=skip,
            preemption_signals=reduced.preemption_signals,
            sources=sources,
            modalities=modalities,
        )

    def update(
        self, step: int, local_loss: torch.Tensor, targets: int, per_source: torch.Tensor | None = None
    ) -> tuple[ReducedStep, float, bool]:
        """The step's update, once the gradients are in: the all-reduce after backward
        (:meth:`reduce_after_backward`), the non-finite check (every rank takes the same decision,
        see :mod:`fusiontrain.train.nonfinite`; raises to stop the run), then, unless skipped,
        clipping to the global norm and the optimizer step; the LR-scheduler step either way (a
        skipped step still counts: the schedule follows the step index). Returns ``(what the
        all-reduce gave, lr, skipped)``."""
        with self.phase(OPTIMIZER_PHASE):
            params = [p for p in self.model.parameters() if p.grad is not None]
            reduced = self.reduce_after_backward(step, local_loss, params, per_source)
            skip = self.guard.check_step(
                step, reduced.loss_sum, targets, reduced.grad_norm, reduced.loss_ranks, self._local_grads, self.device
            )
            lr = self.scheduler.get_last_lr()[0]
            if not skip:
                self._clip_gradients(params, reduced.grad_norm)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        return reduced, lr, skip

    def reduce_after_backward(
        self, step: int, local_loss: torch.Tensor, params: list[torch.Tensor], per_source: torch.Tensor | None = None
    ) -> ReducedStep:
        """One all-reduce (a sum) of ``[loss sum, squared grad norm, non-finite flag per rank,
        preemption signal per rank, loss sum per data source]`` in float64, and one device-to-host
        read of its result; a collective. Each rank puts in its own loss sum, the sum of squares of
        its gradient shards (:func:`gradient_square_sum`), its own two slots and its per-source
        loss sums (none with one source)."""
        world = self.world_size
        k = 0 if per_source is None else per_source.numel()
        packed = torch.zeros(2 + 2 * world + k, dtype=torch.float64, device=self.device)
        loss = local_loss.detach()
        packed[0] = loss.double()
        packed[1] = gradient_square_sum(params, world, self.device)
        packed[2 + self.rank] = (~torch.isfinite(loss)).double()
        packed[2 + world + self.rank] = self.preemption_signal()
        if k:
            packed[2 + 2 * world :] = per_source.double()
        distributed.all_reduce_sum(
            packed, f"loss, grad norm, non-finite and preemption flags of step {step}"
        )
        values = packed.tolist()
        return ReducedStep(
            loss_sum=values[0],
            grad_norm=math.sqrt(values[1]) if values[1] >= 0 else math.nan,
            loss_ranks=tuple(r for r in range(world) if values[2 + r] > 0),
            preemption_signals=tuple(int(v) for v in values[2 + world : 2 + 2 * world]),
            source_loss_sums=tuple(values[2 + 2 * world :]),
        )

    def _clip_gradients(self, params: list[torch.Tensor], grad_norm: float) -> None:
        """Scale the gradients by ``max_grad_norm / grad_norm`` when the global norm exceeds
        ``optim.max_grad_norm`` (as ``torch.nn.utils.clip_grad_norm_``, whose coefficient this
        is, with the norm that the all-reduce after backward already gave)."""
        max_norm = self.settings.max_grad_norm
        if max_norm is None or not params:
            return
        coefficient = max_norm / (grad_norm + 1e-6)
        if coefficient < 1.0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(grad_norm, device=self.device))

    def _local_grads(self) -> list[torch.Tensor]:
        """This rank's gradient shards of the trainable parameters."""
        return [local_tensor(p.grad) for p in self.model.parameters() if p.grad is not None]


def source_counts(batch: Batch, num_sources: int) -> torch.Tensor:
    """``[num_sources, 3]`` float64: per data source, the target tokens, real tokens and samples
    of a host micro-batch (all of source 0 when the batch carries no source map)."""
    counts = torch.zeros(num_sources, 3, dtype=torch.float64)
    if batch.source_ids is None:
        counts[0, 0] = float(batch.target_index.numel()) if batch.target_index is not None else 0.0
        counts[0, 1] = float(batch.is_real.sum())
    else:
        if batch.target_sources is not None:
            counts[:, 0] = torch.bincount(batch.target_sources, minlength=num_sources)[:num_sources].double()
        real = batch.source_ids[batch.is_real]
        counts[:, 1] = torch.bincount(real, minlength=num_sources)[:num_sources].double()
    for source in batch.sample_sources:
        counts[source, 2] += 1
    return counts


def modality_counts(batch: Batch, input_formats: Mapping[str, EncoderInputFormat]) -> torch.Tensor:
    """``[m, 2]`` float64: per modality of ``input_formats`` (in order), the items of a host
    micro-batch and the encoder-token columns some text token sees (``encoder_mask.any(dim=1)``
    summed over rows). A modality that only fills the blank slots no token sees (every rank runs
    every encoder, :func:`~fusiontrain.data.batch.with_placeholder_items`) counts nothing."""
    inputs, masks = batch.encoder_input, batch.encoder_mask
    if not isinstance(masks, dict):  # one encoder: its inputs are the images'
        inputs, masks = {"image": inputs}, {"image": masks}
    counts = torch.zeros(len(input_formats), 2, dtype=torch.float64)
    for index, (modality, input_format) in enumerate(input_formats.items()):
        mask = masks.get(modality)
        if mask is None or not bool(mask.any()):
            continue
        counts[index, 0] = input_format.item_count(inputs[modality])
        counts[index, 1] = int(mask.any(dim=1).sum())
    return counts


def gradient_square_sum(params: Sequence[torch.Tensor], world_size: int, device: torch.device) -> torch.Tensor:
    """This rank's share of the squared global L2 norm of the ``params``' gradients: the sum of
    squares of its gradient shards, each divided by the number of ranks that hold the same shard
    (the replicas of HSDP; every rank for a gradient that is not a DTensor), so that the sum over
    ranks is the squared global norm. A 0-dim float64 tensor on ``device``.

    Raises:
        ValueError: a gradient is a DTensor with a ``Partial`` placement (a sum still to be reduced:
            FSDP's gradients are sharded or replicated, never partial).
    """
    by_copies: dict[int, list[torch.Tensor]] = defaultdict(list)
    for param in params:
        grad = param.grad
        if isinstance(grad, DTensor):
            if any(placement.is_partial() for placement in grad.placements):
                raise ValueError(f"a gradient with placements {grad.placements} is not reduced yet; cannot take its norm")
            mesh = grad.device_mesh
            copies = math.prod(mesh.size(dim) for dim, placement in enumerate(grad.placements) if placement.is_replicate())
            by_copies[copies].append(grad.to_local())
        else:
            by_copies[world_size].append(grad)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for copies, grads in by_copies.items():
        norm = torch.nn.utils.get_total_norm(grads, 2.0).to(device=device, dtype=torch.float64)
        total += norm.square() / copies
    return total
