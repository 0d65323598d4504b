"""The planner's traced step: the trainer's own training step (:class:`~fusiontrain.train.step.TrainStep`)
run as rank 0 of N on fake tensors (``FakeTensorMode``: shapes only, nothing allocated) over a
fake process group, with the real FSDP2 sharding, activation checkpointing and offloading, under
a :class:`~fusiontrain.plan.memory.TensorMemoryTracker`.

What the tracker cannot see is added by polling: FSDP2's unsharded parameters (storages resized
in place) and AdamW's state (a constant after the first step). Gradients, FSDP's unsharded
gradients and its gradient-reduction buffers are regrouped at the peak; offloaded activations
are labelled as host memory on a GPU. :mod:`fusiontrain.plan.planner` turns the trace into a plan.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fusiontrain.config import TrainConfig
from fusiontrain.data import Batch, collate_padded
from fusiontrain.data.batch import IMAGE, InputFormats, Sample
from fusiontrain.data.input_format import EncoderInputFormat, ItemInput
from fusiontrain.data.loader import SKIP_REASONS
from fusiontrain.data.packing import PackedRow, collate_padding_free, collate_rows
from fusiontrain.flops.probe import ValueKeepingFakeMode
from fusiontrain.modules.blocks import encoders_by_modality
from fusiontrain.parallel.distributed import DistributedContext, build_mesh
from fusiontrain.parallel.offload import ActivationOffloader
from fusiontrain.parallel.precision import StorageDtypes
from fusiontrain.plan.memory import TensorMemoryTracker
from fusiontrain.source.model_source import ModelSource
from fusiontrain.torch_private import (
    ALLGATHER_INTO_TENSOR,
    COLLECTIVE_OP_NAMESPACES,
    LOCAL_SCALAR_DENSE,
    FakeStore,
    FakeTensor,
    FakeTensorMode,
    dtensor_sharding_rule_misses,
    fsdp_all_gather_outputs,
    fsdp_group_params,
    fsdp_groups_unsharding,
    fsdp_held_reduce_outputs,
    fsdp_param_group,
    fsdp_retained_reduce_scatter_inputs,
    fsdp_sharded_data,
    fsdp_unsharded_accumulated_grad,
    fsdp_unsharded_groups,
    fsdp_unsharded_param,
    local_tensor,
    storage_id,
    unset_fake_temporarily,
    untyped_storage_id,
)
from fusiontrain.train.model import build_meta_model
from fusiontrain.train.model_inputs import model_inputs, other_limits, other_names
from fusiontrain.train.nonfinite import NonFiniteGuard
from fusiontrain.train.optim import build_lr_scheduler, build_optimizer
from fusiontrain.train.setup import build_parallel_model, run_storage_dtypes, step_settings
from fusiontrain.train.step import BACKWARD_PHASE, HOST_PHASE, LOSS_PHASE, OPTIMIZER_PHASE, TrainStep


def worst_case_items(input_format: EncoderInputFormat, items: int, max_tokens: int | None) -> list[ItemInput]:
    """One row's worst case of a modality held to ``items`` item slots and ``max_tokens`` encoder
    tokens (None: no limit beyond the slots): the format's most expensive item
    (:meth:`EncoderInputFormat.worst_case`) in as many slots as the tokens allow, then its
    :meth:`~EncoderInputFormat.blank` item (Whisper's and SigLIP2's: one token; a fixed-size
    encoder's costs as many as any item) in as many of the rest as they still allow: the most
    slots the encoder runs, and nearly the most columns text attends over (a real row may spread
    the tokens left after the full items over its other slots)."""
    chosen: list[ItemInput] = []
    used = 0
    for make in (input_format.worst_case, input_format.blank):
        tokens = input_format.num_tokens(make())
        while len(chosen) < items and (max_tokens is None or used + tokens <= max_tokens):
            chosen.append(make())
            used += tokens
    return chosen


def worst_case_batch(
    input_formats: InputFormats,
    *,
    rows: int,
    seq_len: int,
    images_per_row: int,
    packing: bool,
    padding_free: bool = False,
    other_limits: Mapping[str, tuple[int, int | None]] | None = None,
) -> Batch:
    """The largest micro-batch the loader can produce: every row full, every image slot holding the
    encoder's most expensive image (:meth:`ImageFormat.worst_case`: all tiles, all patches; packed:
    one image per sample, ``images_per_row`` samples a row; padding-free: the ``rows`` padded rows'
    samples in one row).

    Args:
        input_formats: what the collators take: the image format, or (a model with an encoder per
            modality) the input formats by modality.
        rows: ``b``, the micro-batch's rows.
        seq_len: ``s``, tokens per row.
        images_per_row: image slots per row (``data.max_images_per_row``).
        packing: packed rows (``data.packing``), else padded ones.
        padding_free: unpacked samples back to back in one row (``data.padding_free``).
        other_limits: with formats by modality, each modality beside images' row limits,
            ``(items, encoder tokens or None)`` (``data.max_items_per_row`` and
            ``data.max_item_tokens_per_row``): every row holds its :func:`worst_case_items`
            (packed: dealt to the row's samples in turn; unpacked: in every sample).

    Raises:
        ValueError: ``other_limits`` that do not name exactly the modalities beside images.
    """
    by_modality = not isinstance(input_formats, EncoderInputFormat)
    limits = dict(other_limits or {})
    beside_images = [m for m in input_formats if m != IMAGE] if by_modality else []
    if sorted(limits) != sorted(beside_images):
        raise ValueError(f"other_limits names {sorted(limits)}; the modalities beside images are {sorted(beside_images)}")
    image_format = input_formats[IMAGE] if by_modality else input_formats

    def row_items() -> dict[str, list[ItemInput]]:
        return {m: worst_case_items(input_formats[m], items, tokens) for m, (items, tokens) in limits.items()}

    def sample(length: int, num_images: int, others: dict[str, list[ItemInput]]) -> Sample:
        tokens = torch.zeros(length, dtype=torch.long)
        spans = [(0, length)] * num_images
        return Sample(
            tokens=tokens,
            labels=tokens.clone(),
            images=[image_format.worst_case() for _ in range(num_images)],
            image_spans=spans,
            other_items=others,
            other_spans={m: [(0, length)] * len(items) for m, items in others.items()},
        )

    if not packing:
        collate = collate_padding_free if padding_free else collate_padded
        return collate([sample(seq_len, images_per_row, row_items()) for _ in range(rows)], seq_len, input_formats)
    packed = []
    for _ in range(rows):
        row = PackedRow()
        per_row = max(1, images_per_row)
        lengths = [seq_len // per_row] * per_row
        lengths[-1] += seq_len - sum(lengths)
        others = row_items()
        for index, length in enumerate(lengths):
            dealt = {m: items[index::per_row] for m, items in others.items()}
            row.add(index, sample(length, 1 if images_per_row else 0, dealt))
        packed.append(row)
    return collate_rows(packed, seq_len, input_formats)


@contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """A process group of ``world_size`` ranks, of which this process is rank 0, whose collectives
    do nothing (``torch.testing._internal.distributed.fake_pg``, as torchtitan's estimator uses)."""
    if dist.is_initialized():
        raise RuntimeError("the planner needs a process without a process group: run it without torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _UnshardedParameters:
    """Bytes of the FSDP units whose parameters are unsharded now, and of those a unit inside its
    unshard has allocated so far. FSDP2 allocates and frees them by resizing storages in place,
    which no op reports, so the tracker polls this. A unit of several modules (the final norm and
    the output projection) is one parameter group, counted once."""

    def __init__(self, model: nn.Module) -> None:
        self._groups = []
        for module in model.modules():
            if isinstance(module, FSDPModule):
                group = fsdp_param_group(module)
                if group is not None and all(group is not seen for seen in self._groups):
                    self._groups.append(group)
        self._sizes: dict[int, int] = {}

    def _size(self, group: Any) -> int:
        size = self._sizes.get(id(group))
        if size is None:
            sharded = {storage_id(fsdp_sharded_data(p)) for p in fsdp_group_params(group)}
            storages = {}
            for fsdp_param in fsdp_group_params(group):
                unsharded = fsdp_unsharded_param(fsdp_param)  # set: the group is unsharded now
                if storage_id(unsharded) not in sharded:  # one rank, same dtype: no copy is made
                    storages[storage_id(unsharded)] = unsharded.untyped_storage().nbytes()
            size = self._sizes[id(group)] = sum(storages.values())
        return size

    def __call__(self) -> int:
        unsharded = sum(self._size(group) for group in fsdp_unsharded_groups(self._groups))
        return unsharded + sum(self._allocated(group) for group in fsdp_groups_unsharding(self._groups))

    @staticmethod
    def _allocated(group: Any) -> int:
        """Bytes a group inside its unshard has allocated so far: over one rank each parameter's
        copy is allocated in turn, beside the temporary cast of its shard to the compute dtype
        (tracked as a tensor), which is the moment a frozen bf16 output projection peaks."""
        storages = {}
        for fsdp_param in fsdp_group_params(group):
            for output in fsdp_all_gather_outputs(fsdp_param):
                storage = output.untyped_storage()
                storages[untyped_storage_id(storage)] = storage.nbytes()
        return sum(storages.values())

    def reduce_buffers(self) -> list[torch.Tensor]:
        """Gradient-reduction buffers FSDP2 holds on to: the reduce-scatter inputs it retains
        (unsharded, in the reduce dtype) and, with HSDP, each unit's all-reduce buffer, kept until
        its backward ends so that the allocator cannot reuse the block while the collective runs."""
        held = []
        if self._groups:  # the groups share one communication context
            held += fsdp_retained_reduce_scatter_inputs(self._groups[0])
        for group in self._groups:
            held += fsdp_held_reduce_outputs(group)
        return held

    def gradients(self) -> list[torch.Tensor]:
        """Unsharded gradients not yet reduce-scattered (they accumulate, in the reduce dtype,
        while gradient sync is off)."""
        grads = []
        for group in self._groups:
            for fsdp_param in fsdp_group_params(group):
                unsharded = fsdp_unsharded_param(fsdp_param)  # None until first unsharded
                for grad in (getattr(unsharded, "grad", None), fsdp_unsharded_accumulated_grad(fsdp_param)):
                    if grad is not None:
                        grads.append(grad)
        return grads


class _CollectiveLabels:
    """The tracker's label for the outputs of collectives; counts the bytes FSDP's all-gathers
    produce (each unit's gathered parameters, every rank's shard)."""

    def __init__(self) -> None:
        self.gathered_bytes = 0

    def __call__(self, func: Any, args: tuple) -> str | None:
        if getattr(func, "namespace", "") not in COLLECTIVE_OP_NAMESPACES:
            return None
        if func is ALLGATHER_INTO_TENSOR:  # (output, input, group, ...)
            self.gathered_bytes += args[0].numel() * args[0].element_size()
        return "FSDP all-gather / reduce-scatter buffers"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return local_tensor(tensor) if isinstance(tensor, DTensor) else tensor


@dataclass
class StepTrace:
    """What :func:`simulate_step` found, for rank 0 (the rank with the largest shards)."""

    parameters: int  # bytes of this rank's parameter shards
    frozen_parameters: int  # the part of them that is frozen (requires_grad False)
    dtypes: StorageDtypes  # what the trained and the frozen parameters are stored in
    tracker: TensorMemoryTracker
    batch: Batch  # the worst-case micro-batch (real, CPU)
    model: nn.Module  # the sharded model, on fake tensors
    input_formats: dict[str, EncoderInputFormat]  # how each encoder takes its items, by modality ("image" for one)
    items_per_row: dict[str, int]  # each modality's item slots per worst-case row (per sample when padding-free)
    gathered_bytes: int  # what FSDP's all-gathers produce per micro-batch (0 at one shard: nothing is gathered)


class PlanningFakeMode(ValueKeepingFakeMode):
    """The planner's fake-tensor mode: a value read back to the host from a fake tensor
    (``.item()``, ``.tolist()``, ``float()``) is zero, where a plain ``FakeTensorMode`` raises.

    A shape-only trace has no values; the training step reads a few back (its token counts, the
    global loss and grad norm for the non-finite check). With zeros they describe a finite step,
    so the traced step takes the path that updates the weights, the one that needs memory."""

    def dispatch(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is LOCAL_SCALAR_DENSE and isinstance(args[0], FakeTensor):
            return False if args[0].dtype == torch.bool else 0
        return super().dispatch(func, types, args, kwargs)


OFFLOADED = "offloaded activations"  # parallel.activation_offloading's host copies
_TRACKER_LABELS = {LOSS_PHASE: "loss chunk", BACKWARD_PHASE: "backward working set", OPTIMIZER_PHASE: "optimizer step temporaries"}


def simulate_step(config: TrainConfig, *, gpus: int, device_type: str, micro_batches: int) -> StepTrace:
    """Run the trainer's step (:class:`~fusiontrain.train.step.TrainStep`) of ``config`` as rank 0 of
    ``gpus``: the real model sharded with FSDP2 and checkpointed as configured, on fake tensors and
    a fake process group, under a :class:`TensorMemoryTracker`, after an untracked warm-up that
    makes the lazy state (:func:`_warm_up`: FSDP's unsharded parameters, AdamW's state, DTensor's
    sharding rules) without a forward or backward. ``micro_batches`` (at most 2 are needed: gradients
    accumulate in place, and each micro-batch leaves the device before the next arrives) are
    accumulated, with gradient sync as the trainer does it (``parallel.defer_gradient_sync``)."""
    device = torch.device(device_type)  # sets 'auto' precision and the optimizer
    parallel = config.parallel
    dtypes = run_storage_dtypes(config, device_type)
    source = ModelSource.from_config(config.model)
    with fake_process_group(gpus):
        context = DistributedContext(rank=0, world_size=gpus, local_rank=0, device=torch.device("cpu"), backend="fake")
        mesh = build_mesh(context, parallel.dp_replicate, parallel.dp_shard)
        tracking: list[TensorMemoryTracker] = []  # the tracker, once the tracked step starts
        # Offloaded activations are labelled as such; on a GPU they live in host memory.
        offloader = ActivationOffloader(
            torch.device("cpu"),  # where the fake tensors live
            host_allocation=lambda: tracking[0].label(OFFLOADED) if tracking else nullcontext(),
        )
        model = build_parallel_model(
            config, build_meta_model(config.model, source), mesh, device, offloader=offloader, compile=False
        )
        # The trainer's own formats and row limits (the input formats by modality, from the family).
        _, inputs, collated = model_inputs(config, source, model)
        limits = dict(zip(other_names(inputs), other_limits(config.data, inputs)))
        formats = source.family.input_formats(model)
        batch = worst_case_batch(
            collated,
            rows=config.batch.micro_batch_size,
            seq_len=config.batch.seq_len,
            images_per_row=config.data.max_images_per_row,
            packing=config.data.packing,
            padding_free=config.data.padding_free,
            other_limits=limits,
        )
        items_per_row = {
            IMAGE: config.data.max_images_per_row,
            **{m: len(worst_case_items(formats[m], items, tokens)) for m, (items, tokens) in limits.items()},
        }
        with PlanningFakeMode(allow_non_fake_inputs=True) as mode:
            model.to_empty(device="cpu")
            model.set_skip_output_projection(True)
            storages = {storage_id(_local(p)): _local(p).untyped_storage().nbytes() for p in model.parameters()}
            frozen = {storage_id(_local(p)) for p in model.parameters() if not p.requires_grad}
            optimizer = build_optimizer(model, config.optim, device)
            scheduler = build_lr_scheduler(optimizer, config.optim, config.max_steps)
            trainable = [p for p in model.parameters() if p.requires_grad]

            def label(phase: str) -> AbstractContextManager:
                if phase == HOST_PHASE:  # the step's counts on the host copies are real work
                    return unset_fake_temporarily()
                return tracking[0].label(_TRACKER_LABELS[phase]) if tracking else nullcontext()

            train_step = TrainStep(
                model,
                optimizer,
                scheduler,
                NonFiniteGuard("stop", 1),  # the trace reads zeros: a finite step, never skipped
                step_settings(config, flex_attention=False),  # plan_run takes the dense mask out on CUDA
                device=torch.device("cpu"),  # where the fake tensors live
                world_size=gpus,
                skip_reasons=SKIP_REASONS,
                to_device=lambda host: _fake_batch(host, mode, tracking[0] if tracking else None),
                phase=label,
            )
            _warm_up(model, train_step, trainable)
            if dtensor_sharding_rule_misses() is None:  # the cache cannot be watched: warm it the sure way
                train_step(0, [batch])
            state = [_local(v) for values in optimizer.state.values() for v in values.values() if isinstance(v, torch.Tensor)]
            state_bytes = sum({storage_id(t): t.untyped_storage().nbytes() for t in state}.values())
            unsharded = _UnshardedParameters(model)
            for _ in range(2):  # a second time only if DTensor derived a sharding rule in the first
                misses = dtensor_sharding_rule_misses()
                collectives = _CollectiveLabels()
                tracker = TensorMemoryTracker(
                    "decoder activations",
                    untracked={"FSDP unsharded parameters": unsharded, "optimizer state (AdamW)": lambda: state_bytes},
                    op_label=collectives,
                    regroup=lambda: {
                        "FSDP unsharded gradients": unsharded.gradients(),
                        "FSDP gradient-reduction buffers": unsharded.reduce_buffers(),
                        "gradients (trainable shards)": [_local(p.grad) for p in trainable if p.grad is not None],
                    },
                    host_labels={OFFLOADED} if device_type == "cuda" else (),
                )
                tracking[:] = [tracker]
                hooks = [
                    hook
                    for label, encoder in _encoders(model).items()
                    for hook in (
                        encoder.register_forward_pre_hook(lambda *_, label=label: tracker.push(label)),
                        encoder.register_forward_hook(lambda *_: tracker.pop()),
                    )
                ]
                with tracker:
                    train_step(1, [batch] * micro_batches)
                for hook in hooks:
                    hook.remove()
                if dtensor_sharding_rule_misses() == misses:
                    break
    return StepTrace(
        parameters=sum(storages.values()),
        frozen_parameters=sum(storages[storage] for storage in frozen),
        dtypes=dtypes,
        tracker=tracker,
        batch=batch,
        model=model,
        input_formats=formats,
        items_per_row=items_per_row,
        gathered_bytes=collectives.gathered_bytes // micro_batches,
    )


def _encoders(model: nn.Module) -> dict[str, nn.Module]:
    """The model's encoders by the label their activations get in the breakdown: ``encoder`` for
    one, ``<modality> encoder`` each for an encoder per modality."""
    return {"encoder" if m is None else f"{m} encoder": encoder for m, encoder in encoders_by_modality(model).items()}


def _warm_up(model: nn.Module, train_step: TrainStep, trainable: list[torch.Tensor]) -> None:
    """Make the step's lazy state outside the tracker, with no forward or backward: every FSDP unit
    unshards once (allocating its unsharded parameters, then polled, not tracked), and the step's
    update runs once on zero gradients (AdamW's state, then a constant; and DTensor's sharding rules
    for the clipping and optimizer ops, which DTensor would otherwise derive inside the tracked step
    on global-shape tensors of this very fake mode, counted as memory that no GPU ever holds)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            module.reshard()
    for param in trainable:
        param.grad = torch.zeros_like(param)
    train_step.update(0, torch.zeros(()), 0)


def _fake_batch(batch: Batch, mode: FakeTensorMode, tracker: TensorMemoryTracker | None) -> Batch:
    """``batch`` as fake tensors, each a fresh (tracked) allocation: inputs live on the device.

    The encoders' integer inputs stay real (CPU copies): an encoder may read their values (SigLIP2
    NaFlex sizes its position embeddings from ``spatial_shapes``), which fake tensors cannot give.
    They are a few bytes per item (Whisper's ``token_index``: per encoder token), and are left out
    of the count."""
    batch.packed_layouts()  # from the host values, as Batch.to does: the traced step attends through them
    with tracker.label("inputs") if tracker is not None else nullcontext():
        fake = batch.map(lambda t: mode.from_tensor(t).clone())

    def keep_integers(real: dict[str, torch.Tensor], faked: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.clone() if not value.is_floating_point() else faked[key] for key, value in real.items()}

    if isinstance(batch.encoder_mask, dict):  # inputs by modality
        fake.encoder_input = {m: keep_integers(batch.encoder_input[m], fake.encoder_input[m]) for m in batch.encoder_input}
    elif batch.encoder_input is not None:
        fake.encoder_input = keep_integers(batch.encoder_input, fake.encoder_input)
    return fake
