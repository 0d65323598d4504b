"""Every private torch API fusiontrain uses, wrapped once, with the torch versions it was checked on.

PyTorch changes its private names (a leading underscore: ``torch._subclasses``, ``_cdata``,
``_get_fsdp_state``, or the internals of its private classes, such as FSDP2's parameter groups)
without notice between releases. So that a torch upgrade breaks in one known place, this module is
the only one that touches them: each is re-exported under a plain name or read by a small
function, with a note on what it wraps and on what differs between torch versions.

The rule: no other module of fusiontrain touches a private torch name; ``tests/test_torch_private.py``
enforces it (an AST scan of the package) and calls every wrapper under the running torch, so that
running that file under another torch shows at once what moved.

This module imports only torch and the standard library, and sits below every other layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import (
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_PREFIX,
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

#: The torch versions these wrappers were checked on, and by what.
CHECKED_ON: tuple[str, ...] = (
    "2.11.0+cu130 (GPU check, scripts/gpu_check.py)",
    "2.13.0+cpu (the suite)",
    "2.14.1+cu130 (scripts/compat.sh, on the CPU)",
)

__all__ = [
    "ALLGATHER_INTO_TENSOR",
    "CHECKED_ON",
    "CHECKPOINT_WRAPPER_PREFIX",
    "COLLECTIVE_OP_NAMESPACES",
    "COMPILE_WRAPPER_PREFIX",
    "LOCAL_SCALAR_DENSE",
    "MODULE_HOOK_DICTS",
    "CheckpointImpl",
    "FakeStore",
    "FakeTensor",
    "FakeTensorMode",
    "ModuleRegistries",
    "TorchDispatchMode",
    "active_fake_mode",
    "current_fake_mode",
    "checkpoint_wrapped_module",
    "checkpoint_wrapper",
    "compiled_original_module",
    "dtensor_sharding_rule_misses",
    "forget_pending_forward",
    "fsdp_all_gather_outputs",
    "fsdp_group_params",
    "fsdp_groups_unsharding",
    "fsdp_held_reduce_outputs",
    "fsdp_param_group",
    "fsdp_retained_reduce_scatter_inputs",
    "fsdp_sharded_data",
    "fsdp_unsharded_accumulated_grad",
    "fsdp_unsharded_groups",
    "fsdp_unsharded_param",
    "local_tensor",
    "non_persistent_buffer_names",
    "process_group_options",
    "pytree",
    "raise_recompile_limit",
    "read_module_registries",
    "shutdown_dataloader_workers",
    "storage_id",
    "untyped_storage_id",
    "tensor_base",
    "tensor_version",
    "unset_fake_temporarily",
    "without_wrapper_prefixes",
    "write_module_registries",
]


# -- process groups ------------------------------------------------------------------------------


def process_group_options(backend: str, timeout: timedelta) -> Any:
    """Options for a new process group of ``backend`` ("nccl", else gloo) that carry ``timeout``.

    Wraps the private ``_timeout`` field of both backends' options, and gloo's options class, which
    is private (``ProcessGroupGloo._Options``; NCCL's ``ProcessGroupNCCL.Options`` is public, and
    exists only in a torch built with NCCL)."""
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
    else:
        options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return options


# -- activation checkpoint and torch.compile wrappers --------------------------------------------

# ``checkpoint_wrapper`` and ``CheckpointImpl``, re-exported above, live in the private module
# ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper`` (torch has no public home for them).

#: What a checkpoint wrapper puts in front of its module's parameter names (the private
#: ``_CHECKPOINT_PREFIX``: "_checkpoint_wrapped_module.").
CHECKPOINT_WRAPPER_PREFIX: str = _CHECKPOINT_PREFIX

#: What a ``torch.compile`` wrapper (``OptimizedModule``) puts in front of its module's names: the
#: private attribute ``_orig_mod`` that holds the module.
COMPILE_WRAPPER_PREFIX: str = "_orig_mod."


def without_wrapper_prefixes(name: str) -> str:
    """A parameter or module name with the checkpoint and compile wrappers' prefixes removed: the
    name the unwrapped model knows it by."""
    return name.replace(CHECKPOINT_WRAPPER_PREFIX, "").replace(COMPILE_WRAPPER_PREFIX, "")


def checkpoint_wrapped_module(module: nn.Module) -> nn.Module | None:
    """The module inside ``module`` when it is an activation-checkpoint wrapper, else None (the
    wrapper's private attribute ``_checkpoint_wrapped_module``)."""
    return getattr(module, "_checkpoint_wrapped_module", None)


def compiled_original_module(module: nn.Module) -> nn.Module | None:
    """The module inside ``module`` when it is a ``torch.compile`` wrapper, else None (the
    ``OptimizedModule``'s private attribute ``_orig_mod``)."""
    return getattr(module, "_orig_mod", None)


def raise_recompile_limit(limit: int) -> None:
    """Let dynamo keep at least ``limit`` compiled variants per code object
    (``torch._dynamo.config.recompile_limit``; never lowers it).

    ``torch._dynamo`` is imported here, on the first call, not with this module: it takes about a
    second, which only a run that compiles should pay."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


# -- FSDP2 internals ------------------------------------------------------------------------------
# A "group" below is FSDP2's private ``FSDPParamGroup`` (one per ``fully_shard`` call) and an
# "FSDP parameter" its private ``FSDPParam``: every attribute of theirs is internal, underscore or
# not.


def forget_pending_forward(fsdp_module: Any) -> None:
    """Let an FSDP unit of several modules start its next forward afresh.

    torch <= 2.12 completes such a unit's forward only once every member has run, so after an eval
    in which the output projection never ran as a module (the chunked loss reads its weight) the
    unit still waits for it, and would skip its next unshard (seen on torch 2.11 + CUDA: the next
    training step fails with "mixed torch.Tensor and DTensor"). torch >= 2.13 completes such units
    at the end of the root's forward and has no ``_modules_to_run_forward``, so this finds nothing
    to clear. FSDP2 has no public call for it before 2.13 (``reset_iter_state``), so this clears the
    private set of the unit's private state (``_get_fsdp_state()``), and only if the set exists."""
    state = fsdp_module._get_fsdp_state()
    pending = getattr(state, "_modules_to_run_forward", None)  # torch <= 2.12 only
    if pending:
        pending.clear()


def fsdp_param_group(fsdp_module: Any) -> Any | None:
    """The parameter group of an ``FSDPModule`` (``_get_fsdp_state()._fsdp_param_group``), or
    None for a unit that holds no parameter of its own."""
    return fsdp_module._get_fsdp_state()._fsdp_param_group


def fsdp_group_params(group: Any) -> list[Any]:
    """The FSDP parameters of ``group`` (``FSDPParamGroup.fsdp_params``)."""
    return group.fsdp_params


def fsdp_unsharded_groups(groups: Sequence[Any]) -> list[Any]:
    """Those of ``groups`` whose parameters are unsharded now (``FSDPParamGroup.is_unsharded``).

    It reads the state the property compares (``_sharded_state``) without the property call: the
    planner asks this of every group after every op it traces (a 90B model: about 150 groups,
    280,000 ops), where the two calls per group cost more than the rest of the poll."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState  # loaded with FSDP by now

    unsharded = ShardedState.UNSHARDED
    return [group for group in groups if group._sharded_state is unsharded]


def fsdp_groups_unsharding(groups: Sequence[Any]) -> list[Any]:
    """Those of ``groups`` inside an unshard now: between ``unshard()`` (which sets
    ``FSDPParamGroup._all_gather_result``) and the end of ``wait_for_unshard()`` (which clears it),
    and not yet marked unsharded. Their parameters' all-gather outputs are allocated one by one
    (one rank: each copied from its shard, cast to the compute dtype) or all at once (several:
    the copy-out of the all-gather), before the group's state says so."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState  # loaded with FSDP by now

    unsharded = ShardedState.UNSHARDED
    return [
        group
        for group in groups
        if getattr(group, "_all_gather_result", None) is not None and group._sharded_state is not unsharded
    ]


def fsdp_all_gather_outputs(fsdp_param: Any) -> list[torch.Tensor]:
    """The flat tensors an FSDP parameter's unsharded data lives in (``FSDPParam.all_gather_outputs``:
    empty before the first unshard; their storages are resized to 0 between unshards)."""
    return fsdp_param.all_gather_outputs


def fsdp_sharded_data(fsdp_param: Any) -> torch.Tensor:
    """The flat tensor holding an FSDP parameter's shard on this rank
    (``FSDPParam._sharded_param_data``)."""
    return fsdp_param._sharded_param_data


def fsdp_unsharded_param(fsdp_param: Any) -> torch.Tensor | None:
    """An FSDP parameter's unsharded (all-gathered) tensor (``FSDPParam._unsharded_param``), or
    None before its first unshard, which sets the attribute."""
    return getattr(fsdp_param, "_unsharded_param", None)


def fsdp_unsharded_accumulated_grad(fsdp_param: Any) -> torch.Tensor | None:
    """The unsharded gradient an FSDP parameter accumulates while gradient sync is off
    (``FSDPParam.unsharded_accumulated_grad``), or None."""
    return fsdp_param.unsharded_accumulated_grad


def fsdp_held_reduce_outputs(group: Any) -> list[torch.Tensor]:
    """The gradient-reduction buffers ``group`` keeps until its backward ends, in this order: the
    HSDP all-reduce input (``_all_reduce_state.all_reduce_input``) and the partial reduce output
    (``_partial_reduce_output``), each where it is set."""
    held = []
    all_reduce_state = getattr(group, "_all_reduce_state", None)
    if all_reduce_state is not None:
        held.append(all_reduce_state.all_reduce_input)
    partial_reduce_output = getattr(group, "_partial_reduce_output", None)
    if partial_reduce_output is not None:
        held.append(partial_reduce_output)
    return held


def fsdp_retained_reduce_scatter_inputs(group: Any) -> list[torch.Tensor]:
    """The reduce-scatter inputs that FSDP2 retains for the groups sharing ``group``'s
    communication context (``comm_ctx``): its states are a list from torch 2.12 on
    (``reduce_scatter_states``), one state or None before (``reduce_scatter_state``)."""
    comm_ctx = group.comm_ctx
    states = getattr(comm_ctx, "reduce_scatter_states", None)
    if states is None:
        state = getattr(comm_ctx, "reduce_scatter_state", None)
        states = [] if state is None else [state]
    return [state.reduce_scatter_input for state in states]


# -- DTensor --------------------------------------------------------------------------------------


def local_tensor(dtensor: Any) -> torch.Tensor:
    """This rank's shard of a ``DTensor``, the very tensor it holds (``DTensor._local_tensor``;
    the public ``to_local()`` goes through autograd and may return a new view)."""
    return dtensor._local_tensor


def dtensor_sharding_rule_misses() -> int | None:
    """How often DTensor has derived a sharding rule so far (the misses of its rule cache, each of
    which ran the op on global-shape tensors), or None where the cache is not where torch 2.6-2.13
    keep it (``DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding``)."""
    from torch.distributed.tensor import DTensor  # about a second to import: only for the planner

    dispatcher = getattr(DTensor, "_op_dispatcher", None)
    cache = getattr(getattr(dispatcher, "sharding_propagator", None), "propagate_op_sharding", None)
    cache_info = getattr(cache, "cache_info", None)
    return cache_info().misses if callable(cache_info) else None


#: The op namespaces of collectives (FSDP2's, c10d's, and the private functional collectives'
#: ``torch.ops._c10d_functional``).
COLLECTIVE_OP_NAMESPACES: tuple[str, ...] = ("fsdp", "c10d", "_c10d_functional")

#: The op ``all_gather_into_tensor`` dispatches (``(output, input, group, ...)``): FSDP2 gathers each
#: unit's parameters with one of it.
ALLGATHER_INTO_TENSOR = torch.ops.c10d._allgather_base_.default


# -- tensors and their storages -------------------------------------------------------------------


def storage_id(tensor: torch.Tensor) -> int:
    """An id of ``tensor``'s storage, the same for every view of it and unique among live storages
    (the address of the storage's C++ object, ``untyped_storage()._cdata``)."""
    return tensor.untyped_storage()._cdata


def untyped_storage_id(storage: torch.UntypedStorage) -> int:
    """:func:`storage_id` of a storage in hand (``UntypedStorage._cdata``)."""
    return storage._cdata


def tensor_base(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``tensor`` is a view of, or None when it is not a view (``Tensor._base``)."""
    return tensor._base


def tensor_version(tensor: torch.Tensor) -> int:
    """``tensor``'s version counter, which every in-place change bumps (``Tensor._version``)."""
    return tensor._version


# -- fake tensors and dispatch ---------------------------------------------------------------------

# Re-exported above: ``FakeTensor``, ``FakeTensorMode`` and ``unset_fake_temporarily``
# (``torch._subclasses.fake_tensor``); ``active_fake_mode``
# (``torch._guards``); ``TorchDispatchMode`` (``torch.utils._python_dispatch``); ``FakeStore``, the
# store of the "fake" process-group backend (``torch.testing._internal.distributed.fake_pg``);
# ``pytree``, torch's pytree module (``torch.utils._pytree``: tree_flatten, tree_map, tree_leaves,
# arg_tree_leaves).

def current_fake_mode() -> FakeTensorMode | None:
    """The fake-tensor mode active now, or None: what ``active_fake_mode`` finds by walking the
    mode stack, read in one call from the dispatcher's FAKE slot, which every ``FakeTensorMode``
    takes while entered (``torch._C._get_dispatch_mode``). The planner's memory tracker asks this of
    every op it traces."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)


#: The op behind reading a tensor's value on the host (``.item()``, ``.tolist()``, ``float()``):
#: ``aten._local_scalar_dense``.
LOCAL_SCALAR_DENSE = torch.ops.aten._local_scalar_dense.default


# -- nn.Module internals ---------------------------------------------------------------------------

#: The names, in a module's ``__dict__``, of ``nn.Module``'s private dicts of forward and backward
#: hooks (hook id -> hook).
MODULE_HOOK_DICTS: tuple[str, ...] = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


@dataclass
class ModuleRegistries:
    """What a module registered on itself, by name, None entries included (which ``named_*``
    skip): nn.Module's private ``_parameters``, ``_buffers`` and ``_modules``."""

    parameters: dict[str, nn.Parameter | None]
    buffers: dict[str, torch.Tensor | None]
    submodules: dict[str, nn.Module | None]


def read_module_registries(module: nn.Module) -> ModuleRegistries:
    """``module``'s own registries (the dicts themselves, not copies)."""
    return ModuleRegistries(parameters=module._parameters, buffers=module._buffers, submodules=module._modules)


def write_module_registries(module_state: dict[str, Any], registries: ModuleRegistries) -> None:
    """Put ``registries`` into ``module_state``, a module's ``__dict__`` or a copy of it to become
    one, under nn.Module's private names for them."""
    module_state["_parameters"] = registries.parameters
    module_state["_buffers"] = registries.buffers
    module_state["_modules"] = registries.submodules


def non_persistent_buffer_names(module: nn.Module) -> set[str]:
    """The names of ``module``'s own buffers that are left out of its state dict
    (``nn.Module._non_persistent_buffers_set``)."""
    return module._non_persistent_buffers_set


# -- dataloaders ------------------------------------------------------------------------------------


def shutdown_dataloader_workers(iterator: Any) -> None:
    """End the worker processes of a dataloader iterator the dataloader's own way (the done event
    and a ``None`` task, which an idle worker obeys): its private ``_shutdown_workers``. No-op for
    an iterator without workers (single-process iterators have no such method)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
