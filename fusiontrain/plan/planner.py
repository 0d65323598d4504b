"""Size a run before queueing it: per-GPU memory and an estimated step time, from the config.

``python -m fusiontrain plan --config X --gpus N [--gpu h100]`` (and ``train --dry-run``) needs
neither a GPU nor the weights. It builds the configured model on the meta device from its
``config.json`` files, shards it with the real FSDP2 code (``parallelize``) over a fake process
group of N ranks, and runs the trainer's own training step (:mod:`fusiontrain.train.step`) on fake
tensors (``FakeTensorMode``: shapes only, nothing allocated; :mod:`fusiontrain.plan.trace`): the
worst-case micro-batch (every row full, every image slot filled with all its tiles; with an
encoder per modality, every modality's item slots filled at its row limits), the configured
activation checkpointing and offloading, precision, chunked loss, gradient accumulation (two
micro-batches are enough to show it) and AdamW, after an untracked warm-up in which FSDP and AdamW
allocate their lazy state (no forward or backward: one unshard per unit and one update on zero
gradients). The step's micro-batches wait in pinned host memory, and offloaded activations live
there: the plan lists them as host memory per device.

A :class:`~fusiontrain.plan.memory.TensorMemoryTracker` counts every tensor alive on rank 0
(the rank with the largest shards) and keeps the breakdown at the peak: parameter shards (from the
sharded parameters), inputs, the encoder (each encoder, with one per modality), decoder
activations, loss chunk, backward working set, optimizer state and step temporaries, gradients,
FSDP's unsharded parameters (polled: FSDP2 resizes their storages in place, which no op reports),
its unsharded gradients and its gradient-reduction buffers. On CPU the prediction is checked
against measured training runs (tests/test_plan.py, tests/test_plan_multi_encoder.py,
benchmarks/plan_accuracy.py).

The step time is a model, not a measurement: the model FLOPs of :mod:`fusiontrain.flops.count` plus the
forward recomputed by activation checkpointing, at an assumed fraction of the device's peak
(``--efficiency``), against the FSDP all-gathers and reduce-scatters at an assumed bus bandwidth
(NVLink within a node, InfiniBand across), the two overlapped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from fusiontrain.config import DataConfig, TrainConfig
from fusiontrain.data import Batch
from fusiontrain.data.batch import IMAGE
from fusiontrain.flops.count import micro_batch_flops
from fusiontrain.flops.peak import PEAK_FLOPS, measure_matmul_flops
from fusiontrain.parallel.fsdp import checkpoint_every, mixed_precision_policy
from fusiontrain.parallel.precision import dtype_name
from fusiontrain.plan.trace import OFFLOADED, StepTrace, simulate_step
from fusiontrain.torch_private import storage_id
from fusiontrain.train.setup import build_batch_layout

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
        library_workspace_bytes: what the math libraries take from the caching allocator at their
            first call and keep (cuBLAS's workspace per stream, cuBLASLt's), counted in
            ``torch.cuda.max_memory_allocated`` like any tensor.
    """

    name: str
    device_type: str
    memory_bytes: int
    peak_flops: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    devices_per_node: int = 8
    library_workspace_bytes: int = 0


MiB = 2**20
# cuBLAS's workspace on the compute stream plus cuBLASLt's: 32 MiB + 1 MiB measured on an H200
# (torch 2.11; benchmarks/RESULTS.md, "On a GPU"), the size PyTorch picks for sm_90 and later; on
# an A100, PyTorch's pre-Hopper default (2 x 4 MiB + 8 x 16 KiB), not measured here.
HOPPER_WORKSPACES = 33 * MiB
AMPERE_WORKSPACES = 8 * MiB + 128 * 2**10 + MiB


# Bandwidths are the bus bandwidths NCCL's all-gather / reduce-scatter reach in practice, below the
# links' nominal per-direction rates: NVLink 4 (H100/H200) 450 GB/s, NVLink 3 (A100) 300 GB/s,
# NVLink 5 (B200) 900 GB/s; one 400 Gb/s (A100: 200 Gb/s) InfiniBand NIC per GPU across nodes.
GPUS: dict[str, Hardware] = {
    "h100": Hardware("H100 SXM 80GB", "cuda", 80 * GiB, PEAK_FLOPS["H100 SXM"], 360e9, 40e9, library_workspace_bytes=HOPPER_WORKSPACES),
    "h200": Hardware("H200 141GB", "cuda", 141 * 10**9, PEAK_FLOPS["H200"], 360e9, 40e9, library_workspace_bytes=HOPPER_WORKSPACES),
    "a100": Hardware("A100 SXM 80GB", "cuda", 80 * GiB, PEAK_FLOPS["A100"], 230e9, 20e9, library_workspace_bytes=AMPERE_WORKSPACES),
    "b200": Hardware("B200 180GB", "cuda", 180 * 10**9, PEAK_FLOPS["B200"], 720e9, 40e9, library_workspace_bytes=HOPPER_WORKSPACES),
}


def cpu_hardware() -> Hardware:
    """This machine's CPU: its memory, a measured fp32 matmul peak, gloo over shared memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("CPU (this machine)", "cpu", memory, measure_matmul_flops("cpu"), 2e9, 2e9, devices_per_node=1 << 30)


def machine_gpu_kind() -> str | None:
    """This machine's GPU kind when it is one of :data:`GPUS`, else None."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        for kind in GPUS:
            if kind in name:
                return kind
    return None


def hardware_for(name: str, *, source: str = "--gpu") -> Hardware:
    """A device kind (``--gpu`` or ``plan.gpu``, named by ``source``) -> Hardware ('cpu' measures
    this machine)."""
    if name == "cpu":
        return cpu_hardware()
    if name not in GPUS:
        raise ValueError(f"unknown {source} {name!r}; choose one of {', '.join([*GPUS, 'cpu'])}")
    return GPUS[name]


def planned_hardware(config: TrainConfig, gpu: str | None) -> Hardware:
    """The device to plan for: ``gpu`` (``--gpu``) when given, else this machine's GPU when it is
    one of :data:`GPUS`, else the config's own ``plan.gpu``.

    Raises:
        ValueError: none of them names one; the message says to pass ``--gpu``.
    """
    if gpu is not None:
        return hardware_for(gpu)
    kind = machine_gpu_kind()
    if kind is not None:
        return hardware_for(kind)
    if config.plan.gpu is not None:
        return hardware_for(config.plan.gpu, source="config key 'plan.gpu'")
    raise ValueError(
        "this machine has no GPU to plan for and the config names none (plan.gpu): pass --gpu KIND "
        f"({', '.join(GPUS)}), or --gpu cpu to plan for this machine's CPU"
    )


def planned_world_size(config: TrainConfig, gpus: int | None, *, default: int | None = None) -> int:
    """The world size to plan for: ``gpus`` (``--gpus``) when given, else the config's own mesh
    (``parallel.dp_replicate x dp_shard`` when ``dp_shard`` is set), else its ``plan.gpus``, else
    ``default``.

    Raises:
        ValueError: none of them gives one; the message says to pass ``--gpus``.
    """
    parallel = config.parallel
    if gpus is not None:
        return gpus
    if parallel.dp_shard != -1:
        return parallel.dp_replicate * parallel.dp_shard
    if config.plan.gpus is not None:
        return config.plan.gpus
    if default is not None:
        return default
    raise ValueError(
        "the config does not fix the world size (parallel.dp_shard is -1 and plan.gpus is unset): "
        "pass --gpus N, the number of devices in the job"
    )


@dataclass
class Plan:
    """A predicted per-device peak and step time. Byte counts are for the largest rank."""

    config_summary: list[str]
    memory: dict[str, int]  # component -> bytes at the predicted peak
    host_memory: dict[str, int]  # component -> host (CPU) bytes per device, beyond the device's own
    phase: str  # which phase peaks: "forward/backward" or "optimizer step"
    hardware: Hardware
    flops_per_step_per_device: float
    compute_time_s: float
    communication_time_s: float
    gathered_bytes_per_micro_batch: int  # FSDP's all-gathers of one micro-batch (their outputs)
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
    layout = build_batch_layout(batch_config, parallel, gpus)
    shards, accum, global_rows = layout.dp_shard, layout.grad_accum_steps, layout.global_batch_size

    trace = simulate_step(config, gpus=gpus, device_type=hardware.device_type, micro_batches=min(accum, 2))
    tracker, model, batch = trace.tracker, trace.model, trace.batch
    memory = {**_parameter_lines(trace), **tracker.at_peak}
    notes = []
    if hardware.device_type == "cuda" and batch.segment_ids is not None:
        # The traced step runs Batch.model_inputs() as the trainer does on a CPU: packed layouts
        # (a few index tensors, in "inputs"), no dense [b, s, s] mask. On CUDA the trainer's
        # flex_attention BlockMasks are as small; its attention saves about what SDPA saves.
        notes.append("packed rows attend through flex_attention BlockMasks on CUDA (traced through the CPU's packed layouts)")
    # The step's micro-batches stay on the host for the whole step (pinned on CUDA); each goes to
    # the device only for its own forward and backward (fusiontrain/train/step.py).
    host_batches = accum * _batch_bytes(batch)
    host_memory: dict[str, int] = {}
    if hardware.device_type == "cpu":  # the host copies are the device copies
        memory["inputs"] = memory.get("inputs", 0) + host_batches
    else:
        host_memory["micro-batches of one step (pinned)"] = host_batches
        if tracker.host_peak:  # on a CPU they are in the device memory above
            host_memory[f"{OFFLOADED} (at their peak)"] = tracker.host_peak
    if hardware.library_workspace_bytes:
        memory["cuBLAS / cuBLASLt workspaces"] = hardware.library_workspace_bytes
    if hardware.device_type == "cpu" and gpus > 1:
        notes.append("CPU: the time estimate gives each rank the measured matmul peak, though ranks share this machine's cores")
    phase = "optimizer step" if tracker.peak_label == "optimizer step temporaries" else "forward/backward"

    # Time: model FLOPs plus the recomputed forward of checkpointed blocks, and the collectives.
    flops = micro_batch_flops(model, batch)
    every = checkpoint_every(parallel.activation_checkpointing)
    recompute = flops.forward / every if every else 0
    compute_time = (flops.total + recompute) * accum / (hardware.peak_flops * efficiency)
    params = list(model.parameters())
    policy = mixed_precision_policy(parallel.mixed_precision, torch.device(hardware.device_type), {p.dtype for p in params})
    compute_dtype = policy.param_dtype or trace.dtypes.trainable
    trainable = [p for p in params if p.requires_grad]
    bandwidth = hardware.intra_node_bandwidth if shards <= hardware.devices_per_node else hardware.inter_node_bandwidth
    ring = (shards - 1) / shards
    # What the traced micro-batch's all-gathers produced (in forward, and again in backward for the
    # units whose backward needs their parameters), each rank receiving all but its own shard.
    gathered = trace.gathered_bytes * ring
    reduced = sum(p.numel() for p in trainable) * 4 * ring  # fp32 gradient reduce-scatter
    communication = (gathered * accum + reduced) / bandwidth
    if parallel.dp_replicate > 1:  # HSDP: all-reduce the reduced shards across replicas
        shard_grads = reduced / max(shards - 1, 1)
        communication += 2 * shard_grads * (parallel.dp_replicate - 1) / parallel.dp_replicate / hardware.inter_node_bandwidth

    summary = [
        f"devices: {gpus} x {hardware.name}; FSDP over {shards}"
        + (f", {parallel.dp_replicate} replicas (HSDP)" if parallel.dp_replicate > 1 else ""),
        f"model: {sum(p.numel() for p in params) / 1e9:.2f} B parameters, "
        f"{sum(p.numel() for p in trainable) / 1e9:.3f} B trainable; stored {trace.dtypes.describe()}, compute "
        f"{dtype_name(compute_dtype)}; activation checkpointing {parallel.activation_checkpointing}; "
        f"{config.loss.num_output_chunks} loss chunks",
        f"micro-batch per device (worst case): {_row_layout(config.data, batch_config.micro_batch_size, batch_config.seq_len)}, "
        f"{_items_per_row(trace, config.data, batch_config.micro_batch_size)}; {accum} micro-batches per step",
    ]
    return Plan(
        config_summary=summary,
        memory=memory,
        host_memory=host_memory,
        phase=phase,
        hardware=hardware,
        flops_per_step_per_device=flops.total * accum,
        compute_time_s=compute_time,
        communication_time_s=communication,
        gathered_bytes_per_micro_batch=trace.gathered_bytes,
        tokens_per_step=global_rows * batch_config.seq_len,
        efficiency=efficiency,
        notes=notes,
    )


def _parameter_lines(trace: StepTrace) -> dict[str, int]:
    """The parameter shards' line, or a line each for trained and frozen ones when
    ``model.frozen_dtype`` stores them in different dtypes."""
    dtypes = trace.dtypes
    if dtypes.frozen == dtypes.trainable:
        return {f"parameters (shards, {dtype_name(dtypes.trainable)})": trace.parameters}
    return {
        f"trained parameters (shards, {dtype_name(dtypes.trainable)})": trace.parameters - trace.frozen_parameters,
        f"frozen parameters (shards, {dtype_name(dtypes.frozen)})": trace.frozen_parameters,
    }


def _batch_bytes(batch: Batch) -> int:
    """Bytes of a micro-batch's tensors (storages counted once)."""
    storages: dict[int, int] = {}

    def record(tensor: torch.Tensor) -> torch.Tensor:
        storages[storage_id(tensor)] = tensor.untyped_storage().nbytes()
        return tensor

    batch.map(record)
    return sum(storages.values())


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain JSON-ready values (bytes, seconds)."""
    return {
        "hardware": plan.hardware.name,
        "summary": plan.config_summary,
        "memory_bytes": plan.memory,
        "peak_bytes": plan.peak_bytes,
        "host_memory_bytes": plan.host_memory,
        "peak_phase": plan.phase,
        "device_memory_bytes": plan.hardware.memory_bytes,
        "flops_per_step_per_device": plan.flops_per_step_per_device,
        "compute_time_s": plan.compute_time_s,
        "communication_time_s": plan.communication_time_s,
        "gathered_bytes_per_micro_batch": plan.gathered_bytes_per_micro_batch,
        "step_time_s": plan.step_time_s,
        "tokens_per_s": plan.tokens_per_step / plan.step_time_s,
        "mfu": plan.mfu,
        "efficiency": plan.efficiency,
        "notes": plan.notes,
    }


def format_plan(plan: Plan) -> str:
    """The plan as a table for the console (and for a config's comment)."""
    width = max(len(name) for name in [*plan.memory, *plan.host_memory]) + 2
    unit, scale = ("GiB", GiB) if plan.peak_bytes >= 4 * GiB else ("MiB", 2**20)
    lines = [*plan.config_summary, "", f"memory per device ({unit})"]
    for name, size in plan.memory.items():
        lines.append(f"  {name:<{width}}{size / scale:9.2f}")
    capacity = plan.hardware.memory_bytes
    verdict = "fits" if plan.peak_bytes <= 0.9 * capacity else "does NOT fit (keep 10% for the CUDA context and fragmentation)"
    lines += [
        f"  {'peak (' + plan.phase + ')':<{width}}{plan.peak_bytes / scale:9.2f}  of {capacity / scale:,.0f}: {verdict}",
        "",
    ]
    if plan.host_memory:
        lines.append(f"host memory per device ({unit})")
        lines += [f"  {name:<{width}}{size / scale:9.2f}" for name, size in plan.host_memory.items()]
        lines.append("")
    lines += [
        f"time per step (estimate: kernels at {plan.efficiency:.0%} of peak, collectives overlapped)",
        f"  model FLOPs per device      {plan.flops_per_step_per_device / 1e12:10.1f} TFLOP",
        f"  compute                     {plan.compute_time_s:10.3f} s",
        f"  FSDP collectives            {plan.communication_time_s:10.3f} s",
        f"  step                        {plan.step_time_s:10.3f} s  ({plan.tokens_per_step / plan.step_time_s:,.0f} tokens/s)",
        f"  MFU                         {plan.mfu:10.1%}",
    ]
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _items_per_row(trace: StepTrace, data: DataConfig, micro_batch_size: int) -> str:
    """The worst-case micro-batch's items in words, per modality, e.g. ``'4 images per row of
    <format> (3136 encoder tokens), 2 audio items per row of <format> (3000 encoder tokens)'``:
    each modality's item slots (padding-free: all of the micro-batch's, in its one row), what its
    format says of itself, and a row's encoder-token columns."""
    batch = trace.batch
    masks = batch.encoder_mask if isinstance(batch.encoder_mask, dict) else {IMAGE: batch.encoder_mask}
    padding_free = _padding_free(data)
    parts = []
    for modality, input_format in trace.input_formats.items():
        items = trace.items_per_row[modality] * (micro_batch_size if padding_free else 1)
        mask = masks.get(modality)
        noun = "images" if modality == IMAGE else f"{modality} items"
        parts.append(
            f"{items} {noun} {'in the row' if padding_free else 'per row'} of {input_format.describe()} "
            f"({mask.shape[-1] if mask is not None else 0} encoder tokens)"
        )
    return ", ".join(parts)


def _padding_free(data: DataConfig) -> bool:
    return not data.packing and data.padding_free


def _row_layout(data: DataConfig, micro_batch_size: int, seq_len: int) -> str:
    """The plan's worst-case micro-batch in words, e.g. ``'4 rows x 1024 tokens packed'``."""
    plural = "s" if micro_batch_size > 1 else ""
    if data.packing:
        return f"{micro_batch_size} row{plural} x {seq_len} tokens packed"
    if _padding_free(data):
        return f"{micro_batch_size} sample{plural} x {seq_len} tokens in one padding-free row"
    return f"{micro_batch_size} row{plural} x {seq_len} tokens padded"
