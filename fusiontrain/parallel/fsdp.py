"""Parallelize a model: activation checkpointing, optional torch.compile, FSDP2 sharding, and
activation offloading.

Applied to a model built on the meta device, before its weights are loaded, in torchtitan's
order: activation checkpointing, then compile, then ``fully_shard`` per block and at the root;
then the offloading hooks on the blocks (:mod:`fusiontrain.parallel.offload`). Model code never imports
this module.

Blocks are the model's block stacks (:func:`fusiontrain.modules.blocks.block_stacks`): an encoder
with no block stack is refused, rather than sharded whole into the root unit.
"""

from __future__ import annotations

from collections.abc import Collection
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from fusiontrain.modules import FusionLayer
from fusiontrain.modules.blocks import block_stacks, encoders_by_prefix
from fusiontrain.parallel.offload import MIN_OFFLOAD_BYTES, ActivationOffloader
from fusiontrain.parallel.precision import computes_in_bf16
from fusiontrain.torch_private import (
    CheckpointImpl,
    checkpoint_wrapped_module,
    checkpoint_wrapper,
    forget_pending_forward,
    raise_recompile_limit,
    without_wrapper_prefixes,
)


def canonical_name(name: str) -> str:
    """A parameter's name as the unwrapped model knows it (drops activation-checkpoint and
    compile wrappers' prefixes)."""
    return without_wrapper_prefixes(name)


def canonical_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``named_parameters`` under their canonical names."""
    return {canonical_name(name): param for name, param in model.named_parameters()}


def checkpoint_every(mode: str) -> int:
    """The activation-checkpointing stride: 0 for 'none', 1 for 'full', k for 'k'."""
    if mode == "none":
        return 0
    if mode == "full":
        return 1
    return int(mode)


def apply_activation_checkpointing(model: nn.Module, every: int) -> int:
    """Wrap every ``every``-th block of each stack (blocks 0, k, 2k, ...) in non-reentrant
    activation checkpointing; returns how many blocks were wrapped.

    Non-reentrant only: the reentrant variant silently drops the gradients of fusion parameters
    when a block's inputs do not require grad (a frozen embedding in front). Cross-attention
    (fusion) layers are wrapped like every other block.
    """
    if every <= 0:
        return 0
    wrapped = 0
    for _, stack in block_stacks(model):
        for index in range(0, len(stack), every):
            stack[index] = checkpoint_wrapper(stack[index], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            wrapped += 1
    return wrapped


RECOMPILE_LIMIT = 64  # compiled variants kept per block class (see apply_compile)


def apply_compile(model: nn.Module) -> None:
    """``torch.compile`` each block in place (names unchanged), with PyTorch's default shapes:
    static first, then one recompile to dynamic sizes when a shape changes (the padded length,
    the number of images, the count of tokens that see an image).

    On the CPU, the packed attention (``fusiontrain.modules.packed_attention.attend_packed``) is opaque to
    dynamo, a graph break, so a new packed layout of the same ``[b, s]`` recompiles nothing.
    ``benchmarks/compile_cpu.py`` measures what it buys there (see ``parallel.compile``'s help).

    Blocks of one class share one compiled-code cache (dynamo's is per code object), and a model
    needs several entries per class: the vision layers (width 256, no grad) and the decoder layers
    (width 512, grad) run the same ``forward``, each static then dynamic, with and without a
    packed layout. Dynamo's default limit of 8 entries was hit in the Trainer and made the rest
    run eagerly (with only a warning), so the limit is raised to ``RECOMPILE_LIMIT`` here.
    """
    raise_recompile_limit(RECOMPILE_LIMIT)  # imports torch._dynamo: only when compiling
    for _, stack in block_stacks(model):
        for block in stack:
            block.compile()


def mixed_precision_policy(
    mode: str, device: torch.device, stored_dtypes: Collection[torch.dtype] = ()
) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction ('bf16', or 'auto' on CUDA). Otherwise every
    parameter computes in the dtype it is stored in, except that a model storing its parameters in
    several floating dtypes (``stored_dtypes``: ``model.frozen_dtype`` below ``model.dtype``)
    computes in the widest of them: FSDP casts the narrower shards up before the all-gather."""
    if computes_in_bf16(mode, device.type):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    floating = {dtype for dtype in stored_dtypes if dtype.is_floating_point}
    if len(floating) > 1:
        return MixedPrecisionPolicy(param_dtype=max(floating, key=lambda dtype: dtype.itemsize))
    return MixedPrecisionPolicy()


def _unwrapped(block: nn.Module) -> nn.Module:
    """The module inside ``block``'s activation-checkpoint wrapper, or ``block`` when it has none."""
    inner = checkpoint_wrapped_module(block)
    return block if inner is None else inner


def fsdp_units(model: nn.Module, *, split_fusion_layers: bool = False) -> list[tuple[str, nn.Module | list[nn.Module]]]:
    """The FSDP units of ``model`` in the order they are sharded: each block, then the decoder's
    embeddings, its norm + output, each encoder's projection head, and the root (which holds every
    parameter no other unit does). ``(name, module or modules)`` per unit.

    With ``split_fusion_layers``, a ``FusionLayer``'s pretrained and fusion halves are two units
    instead of one.
    """
    units: list[tuple[str, nn.Module | list[nn.Module]]] = []
    for stack_name, stack in block_stacks(model):
        for index, block in enumerate(stack):
            inner = _unwrapped(block)
            if split_fusion_layers and isinstance(inner, FusionLayer):
                units.append((f"{stack_name}.{index}.layer", inner.layer))
                # one unit per modality's layer (a unit must be a module that is called)
                for modality, part in inner.fusion_parts():
                    suffix = "" if modality is None else f".{modality}"
                    units.append((f"{stack_name}.{index}.fusion_layer{suffix}", part))
            else:
                units.append((f"{stack_name}.{index}", block))
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        units.append((EMBEDDING_UNIT, decoder.tok_embeddings))
        # One unit: the norm runs in the root's forward and unshards it, so the chunked loss finds
        # the projection unsharded (a unit never called would break FSDP2's backward).
        units.append((OUTPUT_UNIT, [decoder.norm, decoder.output]))
    for prefix, encoder in encoders_by_prefix(model):
        projection = getattr(encoder, "projection", None)
        if projection is not None:
            units.append((f"{prefix}.projection", projection))
    units.append((ROOT_UNIT, model))
    return units


#: The unit of every parameter no other unit holds (the model itself).
ROOT_UNIT = "<root>"


#: The FSDP unit of the decoder's final norm and output projection. With a frozen projection (the
#: fusion-only default) it stays unsharded from the norm's forward (the end of the decoder's) until
#: its backward (the first of the model's), which is when the chunked loss applies the projection:
#: the projection's weight is then gathered once per micro-batch, by this unit, where resharding
#: after forward would gather it three times (the unit's forward, the loss's own ``full_tensor()``,
#: the unit's backward). The loss needs the whole weight over exactly that span anyway. A trainable
#: projection runs through the ``output`` module under activation checkpointing, whose recompute in
#: backward needs the unit to reshard as usual (kept unsharded, the unit is left with its unsharded
#: parameters registered after backward, which the optimizer does not know).
OUTPUT_UNIT = "decoder.norm+output"

#: The FSDP unit of the decoder's token embeddings. When it holds nothing but lookup tables (an
#: ``nn.Embedding``, or a ``FusionEmbedding``'s pretrained and new rows), its backward reads none
#: of them (an embedding's weight gradient is its output gradient added at the looked-up rows), so
#: it is not gathered again in backward: once per micro-batch instead of twice, one gather of
#: the whole vocabulary less (128,256 x 4,096 in bf16, about 1 GiB, for Llama 3.2 11B).
EMBEDDING_UNIT = "decoder.tok_embeddings"


def lookup_tables_only(module: nn.Module) -> bool:
    """Whether every parameter of ``module`` belongs to a lookup table, whose backward never reads
    its weights: an ``nn.Embedding``, or a module that says so (``is_lookup_table = True``, as the
    decoders' ``FusionEmbedding`` does)."""
    holders = [child for child in module.modules() if next(child.parameters(recurse=False), None) is not None]
    return bool(holders) and all(
        isinstance(child, nn.Embedding) or getattr(child, "is_lookup_table", False) is True for child in holders
    )


def forward_only_units(model: nn.Module) -> set[str]:
    """The units of :func:`fsdp_units` that :func:`shard_model` has gathered in forward only: the
    norm + output unit when the projection is frozen (kept unsharded until its backward), the
    embeddings' unit when it holds only lookup tables (not gathered for its backward). FSDP2 on its
    own gathers the root once (kept unsharded until its backward), and skips the backward gather of
    a unit that no gradient reaches (the blocks of a frozen encoder)."""
    units: set[str] = set()
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        if not any(param.requires_grad for param in decoder.output.parameters()):
            units.add(OUTPUT_UNIT)
        if lookup_tables_only(decoder.tok_embeddings):
            units.add(EMBEDDING_UNIT)
    return units


def copy_only_parameters(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy) -> set[nn.Parameter]:
    """The parameters that FSDP2 would do nothing for but copy, which :func:`shard_model` leaves
    out of it (``ignored_params``): when the shard dimension of ``mesh`` has one rank (one device,
    or HSDP over replicas of one), a frozen parameter already stored in the compute dtype is whole
    on its rank and needs no all-gather, no cast and no gradient reduction; FSDP2 would still copy
    it into a new buffer at every unshard (each micro-batch's forward, and the backward of units
    that read their weights there), and hold both copies while the unit is unsharded. Empty when
    the shard dimension has more than one rank."""
    if mesh.size(mesh.ndim - 1) != 1:
        return set()
    return {
        param
        for param in model.parameters()
        if not param.requires_grad and param.dtype == (mp_policy.param_dtype or param.dtype)
    }


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy,
    split_fusion_layers: bool = False,
) -> list[str]:
    """``fully_shard`` every unit of :func:`fsdp_units`, innermost first, except the parameters
    of :func:`copy_only_parameters`; returns the units' names."""
    units = fsdp_units(model, split_fusion_layers=split_fusion_layers)
    once = forward_only_units(model)
    ignored = copy_only_parameters(model, mesh, mp_policy)
    for name, module in units:
        # The others keep FSDP2's default (None, not True: with it the root stays unsharded after
        # forward, as backward needs it at once).
        keep = {"reshard_after_forward": False} if name == OUTPUT_UNIT and name in once else {}
        fully_shard(module, mesh=mesh, mp_policy=mp_policy, ignored_params=ignored or None, **keep)
        if name == EMBEDDING_UNIT and name in once:
            module.set_unshard_in_backward(False)
    return [name for name, _ in units]


def reshard(model: nn.Module) -> None:
    """Reshard every FSDP unit. A unit called outside the root's forward with no backward after it
    (the output projection, applied by the loss, during an eval) is otherwise left unsharded: full
    size in memory, and its parameters swapped for unsharded tensors the optimizer does not know."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
            # A unit of several modules would otherwise wait, on torch <= 2.12, for the member
            # that never ran (the output projection, in an eval); see forget_pending_forward.
            forget_pending_forward(module)


def apply_activation_offloading(model: nn.Module, mode: str, offloader: ActivationOffloader) -> int:
    """Make blocks save their activations through ``offloader`` (to host memory): with ``mode``
    "checkpointed" the activation-checkpointed blocks (which save only their inputs), with "all"
    every block (all it saves; a checkpointed one still saves only its inputs); "none" does
    nothing. Returns how many blocks offload.

    The hooks sit on the block as the stack holds it (the checkpoint wrapper, when there is one):
    a checkpoint's recompute in backward calls the wrapped module and does not offload again.
    """
    if mode not in ("none", "checkpointed", "all"):
        raise ValueError(f"parallel.activation_offloading must be 'none', 'checkpointed' or 'all'; got {mode!r}")
    if mode == "none":
        return 0
    blocks = [block for _, stack in block_stacks(model) for block in stack]
    if mode == "checkpointed":
        blocks = [block for block in blocks if block is not _unwrapped(block)]
        if not blocks:
            raise ValueError(
                "parallel.activation_offloading=checkpointed offloads the inputs of checkpointed blocks, and no block "
                "is checkpointed: set parallel.activation_checkpointing, or activation_offloading=all"
            )
    entered: list[AbstractContextManager] = []

    def enter(*_: object) -> None:
        context = offloader.saved_tensors_hooks()
        context.__enter__()
        entered.append(context)

    def leave(*_: object) -> None:
        entered.pop().__exit__(None, None, None)

    for block in blocks:
        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave, always_call=True)
    return len(blocks)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Turn FSDP's gradient reduce-scatter on or off (off on non-final accumulation micro-steps)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    device: torch.device,
    *,
    activation_checkpointing: str = "none",
    mixed_precision: str = "auto",
    fusion_layer_sharding: str = "unit",
    compile: bool = False,
    activation_offloading: str = "none",
    offloader: ActivationOffloader | None = None,
) -> list[str]:
    """Apply activation checkpointing, compile, FSDP2 and activation offloading (in that order);
    returns the FSDP units. ``offloader`` (default: a new one for ``device``, offloading saved
    tensors of at least 1 MiB) is what ``activation_offloading`` other than "none" uses."""
    apply_activation_checkpointing(model, checkpoint_every(activation_checkpointing))
    if compile:
        apply_compile(model)
    units = shard_model(
        model,
        mesh,
        mp_policy=mixed_precision_policy(mixed_precision, device, {param.dtype for param in model.parameters()}),
        split_fusion_layers=fusion_layer_sharding == "split",
    )
    if activation_offloading != "none":
        offloader = offloader or ActivationOffloader(device, min_bytes=MIN_OFFLOAD_BYTES)
        apply_activation_offloading(model, activation_offloading, offloader)
    return units
