"""What the trainer and the planner set up the same way: the batch layout of a world size, the
parallel model (storage dtypes, then activation checkpointing, compile, FSDP2 and offloading), and
the step's settings. The planner (:mod:`fusiontrain.plan.trace`) runs the trainer's step on fake
tensors, so everything the step's memory depends on is built here, once, for both."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from fusiontrain.batch_layout import BatchLayout, batch_layout
from fusiontrain.config import BatchConfig, ParallelConfig, TrainConfig
from fusiontrain.parallel.fsdp import parallelize
from fusiontrain.parallel.offload import ActivationOffloader
from fusiontrain.parallel.precision import StorageDtypes, storage_dtypes, store_parameters
from fusiontrain.train.loss import loss_chunk_rows
from fusiontrain.train.step import StepSettings


def build_batch_layout(batch: BatchConfig, parallel: ParallelConfig, world_size: int) -> BatchLayout:
    """How ``world_size`` ranks split each optimizer step (see :mod:`fusiontrain.batch_layout`).

    Raises:
        ValueError: the mesh does not fit the world, or the global batch does not split evenly.
    """
    return batch_layout(
        world_size=world_size,
        dp_replicate=parallel.dp_replicate,
        dp_shard=parallel.dp_shard,
        micro_batch_size=batch.micro_batch_size,
        grad_accum_steps=batch.grad_accum_steps,
        global_batch_size=batch.global_batch_size,
    )


def run_storage_dtypes(config: TrainConfig, device_type: str) -> StorageDtypes:
    """What the trained and the frozen parameters are stored in (``model.dtype``,
    ``model.frozen_dtype``, and the compute dtype ``parallel.mixed_precision`` gives ``device_type``)."""
    return storage_dtypes(
        config.model.dtype,
        config.model.frozen_dtype,
        mixed_precision=config.parallel.mixed_precision,
        device_type=device_type,
    )


def build_parallel_model(
    config: TrainConfig,
    model: nn.Module,
    mesh: DeviceMesh,
    device: torch.device,
    *,
    offloader: ActivationOffloader | None = None,
    compile: bool | None = None,
) -> nn.Module:
    """``model`` (on the meta device) stored in the run's dtypes, then parallelized as
    ``parallel.*`` says: activation checkpointing, compile (``compile``, default
    ``parallel.compile``; the planner traces the eager step), FSDP2 over ``mesh`` and activation
    offloading (through ``offloader``; default: a new one for ``device``). Returns the model,
    still on the meta device."""
    parallel = config.parallel
    model = store_parameters(model, run_storage_dtypes(config, device.type))
    parallelize(
        model,
        mesh,
        device,
        activation_checkpointing=parallel.activation_checkpointing,
        mixed_precision=parallel.mixed_precision,
        fusion_layer_sharding=parallel.fusion_layer_sharding,
        compile=parallel.compile if compile is None else compile,
        activation_offloading=parallel.activation_offloading,
        offloader=offloader,
    )
    return model


def step_settings(config: TrainConfig, *, flex_attention: bool) -> StepSettings:
    """The step's settings from the config; ``flex_attention``: packed rows attend through a
    flex_attention BlockMask (CUDA training) instead of the CPU's packed layouts. A micro-batch has
    at most ``micro_batch_size x seq_len`` token slots (padded, packed or padding-free): the loss's
    chunks have the rows ``loss.num_output_chunks`` chunks give that many targets."""
    slots = config.batch.micro_batch_size * config.batch.seq_len
    return StepSettings(
        ignore_index=config.loss.ignore_index,
        num_output_chunks=config.loss.num_output_chunks,
        max_grad_norm=config.optim.max_grad_norm,
        defer_gradient_sync=config.parallel.defer_gradient_sync,
        flex_attention=flex_attention,
        loss_chunk_rows=loss_chunk_rows(slots, config.loss.num_output_chunks),
    )
