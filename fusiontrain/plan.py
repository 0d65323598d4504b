"""Size a run before queueing it: per-GPU memory and an estimated step time, from the config.

``python -m fusiontrain plan --config X --gpus N [--gpu h100]`` (and ``train --dry-run``) needs
neither a GPU nor the weights. It builds the configured model on the meta device from its
``config.json`` files, shards it with the real FSDP2 code (``parallelize``) over a fake process
group of N ranks, and runs a training step on fake tensors (``FakeTensorMode``: shapes only,
nothing allocated): the worst-case micro-batch (every row full, every image slot filled with all
its tiles), the configured activation checkpointing, precision, chunked loss, gradient
accumulation (two micro-batches are enough to show it) and AdamW, after one untracked step that
lets FSDP and AdamW allocate their lazy state.

A :class:`~fusiontrain.memory_tracker.TensorMemoryTracker` counts every tensor alive on rank 0
(the rank with the largest shards) and keeps the breakdown at the peak: parameter shards (from the
sharded parameters), inputs, encoder, decoder activations, loss chunk, backward working set,
optimizer state and step temporaries, gradients, FSDP's unsharded parameters (polled: FSDP2
resizes their storages in place, which no op reports), its unsharded gradients and its
gradient-reduction buffers. On CPU the prediction is checked against measured training runs
(tests/test_plan.py, benchmarks/plan_accuracy.py).

The step time is a model, not a measurement: the model FLOPs of :mod:`fusiontrain.flops` plus the
forward recomputed by activation checkpointing, at an assumed fraction of the device's peak
(``--efficiency``), against the FSDP all-gathers and reduce-scatters at an assumed bus bandwidth
(NVLink within a node, InfiniBand across), the two overlapped.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from fusiontrain.builders import build_meta_model, build_optimizer, image_format as configured_image_format
from fusiontrain.config import TrainConfig
from fusiontrain.data import Batch, ImageFormat, collate_padded
from fusiontrain.data.batch import Sample
from fusiontrain.data.packing import PackedRow, collate_rows
from fusiontrain.distributed import DistributedContext, build_mesh
from fusiontrain.flop_probe import ValueKeepingFakeMode
from fusiontrain.flops import PEAK_FLOPS, measure_matmul_flops, micro_batch_flops
from fusiontrain.loss import chunked_cross_entropy_sum
from fusiontrain.memory_tracker import TensorMemoryTracker
from fusiontrain.parallel import checkpoint_every, mixed_precision_policy, parallelize, set_gradient_sync

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    """One accelerator and its links, as the planner assumes them.

    Attributes:
        name: for the report.
        device_type: "cuda" or "cpu" (sets the 'auto' precision and the attention path).
        memory_bytes: memory per device.
        peak_flops: dense peak FLOP/s per device (BF16 tensor cores; a measured fp32 matmul on CPU).
        intra_node_bandwidth: collective bus bandwidth per device within a node, bytes/s.
        inter_node_bandwidth: the same across nodes.
        devices_per_node: devices that share the fast link.
    """

    name: str
    device_type: str
    memory_bytes: int
    peak_flops: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    devices_per_node: int = 8


# Bandwidths are the bus bandwidths NCCL's all-gather / reduce-scatter reach in practice, below the
# links' nominal per-direction rates: NVLink 4 (H100/H200) 450 GB/s, NVLink 3 (A100) 300 GB/s,
# NVLink 5 (B200) 900 GB/s; one 400 Gb/s (A100: 200 Gb/s) InfiniBand NIC per GPU across nodes.
GPUS: dict[str, Hardware] = {
    "h100": Hardware("H100 SXM 80GB", "cuda", 80 * GiB, PEAK_FLOPS["H100 SXM"], 360e9, 40e9),
    "h200": Hardware("H200 141GB", "cuda", 141 * 10**9, PEAK_FLOPS["H200"], 360e9, 40e9),
    "a100": Hardware("A100 SXM 80GB", "cuda", 80 * GiB, PEAK_FLOPS["A100"], 230e9, 20e9),
    "b200": Hardware("B200 180GB", "cuda", 180 * 10**9, PEAK_FLOPS["B200"], 720e9, 40e9),
}


def cpu_hardware() -> Hardware:
    """This machine's CPU: its memory, a measured fp32 matmul peak, gloo over shared memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("CPU (this machine)", "cpu", memory, measure_matmul_flops("cpu"), 2e9, 2e9, devices_per_node=1 << 30)


def default_hardware_name() -> str:
    """This machine's GPU kind when it is in :data:`GPUS`, else "cpu"."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        for kind in GPUS:
            if kind in name:
                return kind
    return "cpu"


def hardware_for(name: str) -> Hardware:
    """``--gpu`` value -> Hardware ('cpu' measures this machine)."""
    if name == "cpu":
        return cpu_hardware()
    if name not in GPUS:
        raise ValueError(f"unknown --gpu {name!r}; choose one of {', '.join([*GPUS, 'cpu'])}")
    return GPUS[name]


@dataclass
class Plan:
    """A predicted per-device peak and step time. Byte counts are for the largest rank."""

    config_summary: list[str]
    memory: dict[str, int]  # component -> bytes at the predicted peak
    phase: str  # which phase peaks: "forward/backward" or "optimizer step"
    hardware: Hardware
    flops_per_step_per_device: float
    compute_time_s: float
    communication_time_s: float
    tokens_per_step: int
    efficiency: float
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def step_time_s(self) -> float:
        """Compute and collectives overlap (FSDP prefetches); the longer one sets the pace."""
        return max(self.compute_time_s, self.communication_time_s)

    @property
    def mfu(self) -> float:
        return self.flops_per_step_per_device / (self.step_time_s * self.hardware.peak_flops)


# -- the simulated step ---------------------------------------------------------------------------


def worst_case_batch(
    image_format: ImageFormat, *, rows: int, seq_len: int, images_per_row: int, packing: bool
) -> Batch:
    """The largest micro-batch the loader can produce: every row full, every image slot holding the
    encoder's most expensive image (:meth:`ImageFormat.worst_case`: all tiles, all patches; packed:
    one image per sample, ``images_per_row`` samples a row)."""

    def image() -> dict[str, torch.Tensor]:
        return image_format.worst_case()

    def sample(length: int, num_images: int) -> Sample:
        tokens = torch.zeros(length, dtype=torch.long)
        spans = [(0, length)] * num_images
        return Sample(tokens=tokens, labels=tokens.clone(), images=[image() for _ in range(num_images)], image_spans=spans)

    if not packing:
        return collate_padded([sample(seq_len, images_per_row) for _ in range(rows)], seq_len, image_format)
    packed = []
    for _ in range(rows):
        row = PackedRow()
        per_row = max(1, images_per_row)
        lengths = [seq_len // per_row] * per_row
        lengths[-1] += seq_len - sum(lengths)
        for index, length in enumerate(lengths):
            row.add(index, sample(length, 1 if images_per_row else 0))
        packed.append(row)
    return collate_rows(packed, seq_len, image_format)


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
    """Bytes of the FSDP units whose parameters are unsharded now. FSDP2 allocates and frees them
    by resizing storages in place, which no op reports, so the tracker polls this."""

    def __init__(self, model: nn.Module) -> None:
        self._groups = []
        for module in model.modules():
            if isinstance(module, FSDPModule):
                group = module._get_fsdp_state()._fsdp_param_group
                if group is not None:
                    self._groups.append(group)
        self._sizes: dict[int, int] = {}

    def _size(self, group: Any) -> int:
        size = self._sizes.get(id(group))
        if size is None:
            sharded = {p._sharded_param_data.untyped_storage()._cdata for p in group.fsdp_params}
            storages = {}
            for fsdp_param in group.fsdp_params:
                storage = fsdp_param._unsharded_param.untyped_storage()
                if storage._cdata not in sharded:  # one rank, same dtype: no copy is made
                    storages[storage._cdata] = storage.nbytes()
            size = self._sizes[id(group)] = sum(storages.values())
        return size

    def __call__(self) -> int:
        return sum(self._size(group) for group in self._groups if group.is_unsharded)

    def reduce_buffers(self) -> list[torch.Tensor]:
        """Gradient-reduction buffers FSDP2 holds on to: the reduce-scatter inputs it retains
        (unsharded, in the reduce dtype) and, with HSDP, each unit's all-reduce buffer, kept until
        its backward ends so that the allocator cannot reuse the block while the collective runs."""
        held = []
        if self._groups:
            held += [state.reduce_scatter_input for state in _retained_reduce_scatter_states(self._groups[0].comm_ctx)]
        for group in self._groups:
            state = getattr(group, "_all_reduce_state", None)
            if state is not None:
                held.append(state.all_reduce_input)
            if getattr(group, "_partial_reduce_output", None) is not None:
                held.append(group._partial_reduce_output)
        return held

    def gradients(self) -> list[torch.Tensor]:
        """Unsharded gradients not yet reduce-scattered (they accumulate, in the reduce dtype,
        while gradient sync is off)."""
        grads = []
        for group in self._groups:
            for fsdp_param in group.fsdp_params:
                unsharded = getattr(fsdp_param, "_unsharded_param", None)  # absent until first unsharded
                for grad in (getattr(unsharded, "grad", None), fsdp_param.unsharded_accumulated_grad):
                    if grad is not None:
                        grads.append(grad)
        return grads


def _collective_label(func: Any) -> str | None:
    namespace = getattr(func, "namespace", "")
    return "FSDP all-gather / reduce-scatter buffers" if namespace in ("fsdp", "c10d", "_c10d_functional") else None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


@dataclass
class StepTrace:
    """What :func:`simulate_step` found, for rank 0 (the rank with the largest shards)."""

    parameters: int  # bytes of this rank's parameter shards
    tracker: TensorMemoryTracker
    batch: Batch  # the worst-case micro-batch (real, CPU)
    model: nn.Module  # the sharded model, on fake tensors


def simulate_step(config: TrainConfig, *, gpus: int, hardware: Hardware, micro_batches: int) -> StepTrace:
    """Run a training step of ``config`` as rank 0 of ``gpus``: the real model sharded with FSDP2
    and checkpointed as configured, on fake tensors and a fake process group, under a
    :class:`TensorMemoryTracker`, after one untracked step (lazy initialisation, optimizer
    state). ``micro_batches`` (at most 2 are needed) are accumulated, with gradient sync as the
    trainer does it (``parallel.defer_gradient_sync``)."""
    device = torch.device(hardware.device_type)  # sets 'auto' precision and the optimizer
    stored_dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    parallel = config.parallel
    with fake_process_group(gpus), warnings.catch_warnings():
        # The projection head returns a view (FSDP2 warns once per run; nothing modifies it in place).
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
        context = DistributedContext(rank=0, world_size=gpus, local_rank=0, device=torch.device("cpu"), backend="fake")
        mesh = build_mesh(context, parallel.dp_replicate, parallel.dp_shard)
        model = build_meta_model(config.model).to(stored_dtype)
        parallelize(
            model,
            mesh,
            device,
            activation_checkpointing=parallel.activation_checkpointing,
            mixed_precision=parallel.mixed_precision,
            fusion_layer_sharding=parallel.fusion_layer_sharding,
        )
        image_format = configured_image_format(config.model, model)
        batch = worst_case_batch(
            image_format,
            rows=config.batch.micro_batch_size,
            seq_len=config.batch.seq_len,
            images_per_row=config.data.max_images_per_row,
            packing=config.data.packing,
        )
        with ValueKeepingFakeMode(allow_non_fake_inputs=True) as mode:
            model.to_empty(device="cpu")
            model.set_skip_output_projection(True)
            storages = {_local(p).untyped_storage()._cdata: _local(p).untyped_storage().nbytes() for p in model.parameters()}
            optimizer = build_optimizer(model, config.optim, device)
            trainable = [p for p in model.parameters() if p.requires_grad]
            # The optimizer steps over each rank's local shards (what DTensor's foreach ops run);
            # stepping the local tensors directly keeps DTensor's shape-propagation tensors out
            # of the count.
            local_optimizer, local_of = _local_optimizer(optimizer)

            def step(fake: Batch, tracker: TensorMemoryTracker | None, micro_batches: int) -> None:
                label = tracker.label if tracker is not None else lambda _name: nullcontext()
                for index in range(micro_batches):
                    set_gradient_sync(model, index == micro_batches - 1 or not parallel.defer_gradient_sync)
                    hidden = model(fake.tokens, **fake.model_inputs())
                    with label("loss chunk"):
                        loss = chunked_cross_entropy_sum(
                            hidden, fake.labels, model.decoder.output, num_chunks=config.loss.num_output_chunks
                        )
                    del hidden
                    with label("backward working set"):
                        loss.backward()
                    del loss

            def optimizer_step() -> None:
                for param, local in local_of.items():
                    local.grad = None if param.grad is None else _local(param.grad)
                local_optimizer.step()
                local_optimizer.zero_grad(set_to_none=True)
                optimizer.zero_grad(set_to_none=True)

            # A first step outside the tracker: FSDP's lazy init allocates its unsharded-parameter
            # storages (then polled, not tracked) and AdamW its state (then a constant).
            step(_fake_batch(batch, mode, None), None, micro_batches=1)
            optimizer_step()
            state = [value for values in local_optimizer.state.values() for value in values.values() if isinstance(value, torch.Tensor)]
            state_bytes = sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in state}.values())

            unsharded = _UnshardedParameters(model)
            tracker = TensorMemoryTracker(
                "decoder activations",
                untracked={"FSDP unsharded parameters": unsharded, "optimizer state (AdamW)": lambda: state_bytes},
                op_label=_collective_label,
                regroup=lambda: {
                    "FSDP unsharded gradients": unsharded.gradients(),
                    "FSDP gradient-reduction buffers": unsharded.reduce_buffers(),
                    "gradients (trainable shards)": [_local(p.grad) for p in trainable if p.grad is not None],
                },
            )
            model.encoder.register_forward_pre_hook(lambda *_: tracker.push("encoder"))
            model.encoder.register_forward_hook(lambda *_: tracker.pop())
            with tracker:
                step(_fake_batch(batch, mode, tracker), tracker, micro_batches)
                with tracker.label("optimizer step temporaries"):
                    optimizer_step()
    return StepTrace(parameters=sum(storages.values()), tracker=tracker, batch=batch, model=model)


def _local_optimizer(optimizer: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, dict[nn.Parameter, nn.Parameter]]:
    """A copy of ``optimizer`` (same class, groups and settings) over the local shards of its
    parameters; returns it and the map from each parameter to its local stand-in."""
    local_of: dict[nn.Parameter, nn.Parameter] = {}
    groups = []
    for group in optimizer.param_groups:
        params = [local_of.setdefault(p, nn.Parameter(_local(p.detach()))) for p in group["params"]]
        groups.append({**group, "params": params})
    return type(optimizer)(groups), local_of  # each group carries all its settings


def _fake_batch(batch: Batch, mode: FakeTensorMode, tracker: TensorMemoryTracker | None) -> Batch:
    """``batch`` as fake tensors, each a fresh (tracked) allocation: inputs live on the device.

    The encoder's integer inputs stay real (CPU copies): an encoder may read their values (SigLIP2
    NaFlex sizes its position embeddings from ``spatial_shapes``), which fake tensors cannot give.
    They are a few bytes per image, and are left out of the count."""
    batch.packed_layouts()  # from the host values, as Batch.to does: the traced step attends through them
    with tracker.label("inputs") if tracker is not None else nullcontext():
        fake = batch.map(lambda t: mode.from_tensor(t).clone())
    if batch.encoder_input is not None:
        fake.encoder_input = {
            key: value.clone() if not value.is_floating_point() else fake.encoder_input[key]
            for key, value in batch.encoder_input.items()
        }
    return fake


# -- the plan -------------------------------------------------------------------------------------


def plan_run(config: TrainConfig, *, gpus: int, hardware: Hardware, efficiency: float = 0.5) -> Plan:
    """Predict one rank's peak memory and the step time of ``config`` on ``gpus`` devices.

    Args:
        config: the training config (its model folders need ``config.json`` only).
        gpus: devices in the job (the data-parallel world size).
        hardware: the device and its links.
        efficiency: fraction of ``hardware.peak_flops`` the kernels reach on this model's matmuls.
    """
    parallel, batch_config = config.parallel, config.batch
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    shards = parallel.dp_shard if parallel.dp_shard != -1 else gpus // parallel.dp_replicate
    if shards * parallel.dp_replicate != gpus:
        raise ValueError(
            f"parallel.dp_replicate ({parallel.dp_replicate}) x parallel.dp_shard ({parallel.dp_shard}) "
            f"must equal --gpus ({gpus})"
        )
    global_rows = batch_config.global_batch_size or batch_config.micro_batch_size * batch_config.grad_accum_steps * gpus
    accum, remainder = divmod(global_rows, batch_config.micro_batch_size * gpus)
    if remainder or not accum:
        raise ValueError(
            f"batch.global_batch_size={global_rows} must be a multiple of batch.micro_batch_size "
            f"({batch_config.micro_batch_size}) x --gpus ({gpus})"
        )

    trace = simulate_step(config, gpus=gpus, hardware=hardware, micro_batches=min(accum, 2))
    tracker, model, batch = trace.tracker, trace.model, trace.batch
    memory = {f"parameters (shards, {config.model.dtype})": trace.parameters, **tracker.at_peak}
    notes = []
    if hardware.device_type == "cuda" and batch.segment_ids is not None:
        # The traced step runs Batch.model_inputs() as the trainer does on a CPU: packed layouts
        # (a few index tensors, in "inputs"), no dense [b, s, s] mask. On CUDA the trainer's
        # flex_attention BlockMasks are as small; its attention saves about what SDPA saves.
        notes.append("packed rows attend through flex_attention BlockMasks on CUDA (traced through the CPU's packed layouts)")
    if hardware.device_type == "cpu" and gpus > 1:
        notes.append("CPU: the time estimate gives each rank the measured matmul peak, though ranks share this machine's cores")
    phase = "optimizer step" if tracker.peak_label == "optimizer step temporaries" else "forward/backward"

    # Time: model FLOPs plus the recomputed forward of checkpointed blocks, and the collectives.
    flops = micro_batch_flops(model, batch)
    every = checkpoint_every(parallel.activation_checkpointing)
    recompute = flops.forward / every if every else 0
    compute_time = (flops.total + recompute) * accum / (hardware.peak_flops * efficiency)
    policy = mixed_precision_policy(parallel.mixed_precision, torch.device(hardware.device_type))
    compute_bytes = (policy.param_dtype or torch.float32).itemsize
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    bandwidth = hardware.intra_node_bandwidth if shards <= hardware.devices_per_node else hardware.inter_node_bandwidth
    ring = (shards - 1) / shards
    gathered = sum(p.numel() for p in params) * compute_bytes * ring  # forward and again in backward
    reduced = sum(p.numel() for p in trainable) * 4 * ring  # fp32 gradient reduce-scatter
    communication = (2 * gathered * accum + reduced) / bandwidth
    if parallel.dp_replicate > 1:  # HSDP: all-reduce the reduced shards across replicas
        shard_grads = reduced / max(shards - 1, 1)
        communication += 2 * shard_grads * (parallel.dp_replicate - 1) / parallel.dp_replicate / hardware.inter_node_bandwidth

    images = batch.encoder_input["pixel_values"].shape[1] if batch.encoder_input is not None else 0
    image_format = configured_image_format(config.model, model)
    summary = [
        f"devices: {gpus} x {hardware.name}; FSDP over {shards}"
        + (f", {parallel.dp_replicate} replicas (HSDP)" if parallel.dp_replicate > 1 else ""),
        f"model: {sum(p.numel() for p in params) / 1e9:.2f} B parameters, "
        f"{sum(p.numel() for p in trainable) / 1e9:.3f} B trainable; stored {config.model.dtype}, compute "
        f"{'bfloat16' if compute_bytes == 2 else 'float32'}; activation checkpointing {parallel.activation_checkpointing}; "
        f"{config.loss.num_output_chunks} loss chunks",
        f"micro-batch per device (worst case): {batch_config.micro_batch_size} row{'s' if batch_config.micro_batch_size > 1 else ''} "
        f"x {batch_config.seq_len} tokens "
        f"{'packed' if config.data.packing else 'padded'}, {images} images per row of {image_format.describe()} "
        f"({batch.encoder_mask.shape[-1] if batch.encoder_mask is not None else 0} encoder tokens); "
        f"{accum} micro-batches per step",
    ]
    return Plan(
        config_summary=summary,
        memory=memory,
        phase=phase,
        hardware=hardware,
        flops_per_step_per_device=flops.total * accum,
        compute_time_s=compute_time,
        communication_time_s=communication,
        tokens_per_step=global_rows * batch_config.seq_len,
        efficiency=efficiency,
        notes=notes,
    )


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain JSON-ready values (bytes, seconds)."""
    return {
        "hardware": plan.hardware.name,
        "summary": plan.config_summary,
        "memory_bytes": plan.memory,
        "peak_bytes": plan.peak_bytes,
        "peak_phase": plan.phase,
        "device_memory_bytes": plan.hardware.memory_bytes,
        "flops_per_step_per_device": plan.flops_per_step_per_device,
        "compute_time_s": plan.compute_time_s,
        "communication_time_s": plan.communication_time_s,
        "step_time_s": plan.step_time_s,
        "tokens_per_s": plan.tokens_per_step / plan.step_time_s,
        "mfu": plan.mfu,
        "efficiency": plan.efficiency,
        "notes": plan.notes,
    }


def format_plan(plan: Plan) -> str:
    """The plan as a table for the console (and for a config's comment)."""
    width = max(len(name) for name in plan.memory) + 2
    unit, scale = ("GiB", GiB) if plan.peak_bytes >= 4 * GiB else ("MiB", 2**20)
    lines = [*plan.config_summary, "", f"memory per device ({unit})"]
    for name, size in plan.memory.items():
        lines.append(f"  {name:<{width}}{size / scale:9.2f}")
    capacity = plan.hardware.memory_bytes
    verdict = "fits" if plan.peak_bytes <= 0.9 * capacity else "does NOT fit (keep 10% for the CUDA context and fragmentation)"
    lines += [
        f"  {'peak (' + plan.phase + ')':<{width}}{plan.peak_bytes / scale:9.2f}  of {capacity / scale:,.0f}: {verdict}",
        "",
        f"time per step (estimate: kernels at {plan.efficiency:.0%} of peak, collectives overlapped)",
        f"  model FLOPs per device      {plan.flops_per_step_per_device / 1e12:10.1f} TFLOP",
        f"  compute                     {plan.compute_time_s:10.3f} s",
        f"  FSDP collectives            {plan.communication_time_s:10.3f} s",
        f"  step                        {plan.step_time_s:10.3f} s  ({plan.tokens_per_step / plan.step_time_s:,.0f} tokens/s)",
        f"  MFU                         {plan.mfu:10.1%}",
    ]
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _retained_reduce_scatter_states(comm_ctx: Any) -> list[Any]:
    """The reduce-scatter states FSDP2 retains: a list from torch 2.12 on
    (``reduce_scatter_states``), one state or None before (``reduce_scatter_state``)."""
    states = getattr(comm_ctx, "reduce_scatter_states", None)
    if states is not None:
        return list(states)
    state = getattr(comm_ctx, "reduce_scatter_state", None)
    return [] if state is None else [state]
