"""Private torch APIs are used in one place only (fusiontrain/torch_private.py), and every wrapper
there works under the running torch.

The first part scans the package's source (an AST scan, so comments and docstrings do not count);
the scanner is shown to catch each kind of use on a small source string, so that a scan that finds
nothing means something. The second part calls every wrapper on tiny inputs: run this file under
another torch (``scripts/compat.sh``) and it names each private API that moved.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

from fusiontrain import torch_private
from fusiontrain.torch_private import (
    ALLGATHER_INTO_TENSOR,
    CHECKED_ON,
    CHECKPOINT_WRAPPER_PREFIX,
    COLLECTIVE_OP_NAMESPACES,
    COMPILE_WRAPPER_PREFIX,
    LOCAL_SCALAR_DENSE,
    MODULE_HOOK_DICTS,
    CheckpointImpl,
    FakeStore,
    FakeTensor,
    FakeTensorMode,
    ModuleRegistries,
    TorchDispatchMode,
    active_fake_mode,
    checkpoint_wrapped_module,
    checkpoint_wrapper,
    compiled_original_module,
    current_fake_mode,
    dtensor_sharding_rule_misses,
    forget_pending_forward,
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
    non_persistent_buffer_names,
    process_group_options,
    pytree,
    raise_recompile_limit,
    read_module_registries,
    shutdown_dataloader_workers,
    storage_id,
    untyped_storage_id,
    tensor_base,
    tensor_version,
    unset_fake_temporarily,
    without_wrapper_prefixes,
    write_module_registries,
)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fusiontrain"
TORCH_PRIVATE = PACKAGE / "torch_private.py"

# Private torch attribute names that are read off objects of any name (a tensor, a storage, an FSDP
# module, a process group's options, ...), so the scan cannot tell them by a ``torch.`` in front.
# Also refused as string constants (``getattr(x, "_unsharded_param")``, ``state["_parameters"]``)
# and as the prefix of one (``"_orig_mod."``).
PRIVATE_TORCH_ATTRIBUTES = frozenset(
    {
        "_cdata",
        "_get_fsdp_state",
        "_fsdp_param_group",
        "_sharded_param_data",
        "_unsharded_param",
        "_partial_reduce_output",
        "_all_reduce_state",
        "_local_tensor",
        "_op_dispatcher",
        "_timeout",
        "_Options",
        "_base",
        "_version",
        "_shutdown_workers",
        "_get_iterator",
        "_parameters",
        "_buffers",
        "_modules",
        "_non_persistent_buffers_set",
        "_forward_pre_hooks",
        "_forward_hooks",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_modules_to_run_forward",
        "_local_scalar_dense",
        "_checkpoint_wrapped_module",
        "_orig_mod",
        "_CHECKPOINT_PREFIX",
        "_c10d_functional",
    }
)


# -- the scan -------------------------------------------------------------------------------------


def test_no_module_but_torch_private_touches_a_private_torch_name() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == TORCH_PRIVATE:
            continue
        relative = path.relative_to(REPO)
        found += [f"{relative}:{line}: {what}" for line, what in private_torch_uses(path.read_text())]
    assert not found, "private torch names outside fusiontrain/torch_private.py (wrap them there):\n" + "\n".join(found)


def test_the_scan_reports_every_kind_of_private_use() -> None:
    """The scan of the package can fail: each line below is one kind of private use, and each is
    reported, by its line."""
    source = "\n".join(
        [
            "import torch.utils._pytree as pytree",  # 1: an import of a private module
            "from torch._subclasses.fake_tensor import FakeTensor",  # 2: a name from a private module
            "from torch.utils import _pytree",  # 3: a private module by name
            "from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper",  # 4
            "limit = torch._dynamo.config.recompile_limit",  # 5: a private attribute of torch
            "op = torch.ops.aten._local_scalar_dense.default",  # 6: deeper down torch
            "key = tensor.untyped_storage()._cdata",  # 7: a private attribute of any object
            "options = dist.ProcessGroupGloo._Options()",  # 8: ... through an alias of a torch module
            "inner = getattr(block, '_checkpoint_wrapped_module', block)",  # 9: by name
            "name = name.replace('_orig_mod.', '')",  # 10: as a name's prefix
            "iterator = super()._get_iterator()",  # 11
            "from torch import nn\nx = nn.Module._call_impl",  # 12, 13: via a name imported from torch
        ]
    )
    assert [line for line, _ in private_torch_uses(source)] == list(range(1, 12)) + [13]


def test_the_scan_lets_public_and_own_names_pass() -> None:
    source = '''
"""Mentions of torch._subclasses and ``_cdata`` in a docstring are not uses."""
import os
import torch
from torch.utils.data import DataLoader
from torch.distributed.fsdp import FSDPModule

class Cache:
    """Its own private names are its own business."""

    def __init__(self):
        self._entries = {}
        self._version_seen = 0

def leave(code):
    print(torch.__version__, "_cdata is a word here")
    os._exit(code)
'''
    assert private_torch_uses(source) == []


def test_torch_private_imports_only_torch_and_the_standard_library() -> None:
    roots = set()
    for node in ast.walk(ast.parse(TORCH_PRIVATE.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, f"line {node.lineno}: a relative import"
            roots.add(node.module.split(".")[0])
    assert roots - {"torch"} <= set(sys.stdlib_module_names), sorted(roots)


def private_torch_uses(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for every private torch name that ``source`` uses: imports of or from a
    private torch module, private attributes reached from a name bound to torch (``torch``, or an
    alias or a name imported from it), and :data:`PRIVATE_TORCH_ATTRIBUTES` read off anything or
    written as a string (docstrings aside)."""
    tree = ast.parse(source)
    torch_names = _names_bound_to_torch(tree)
    docstrings = _docstring_nodes(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found += [(node.lineno, f"imports {name}") for name in _private_torch_imports(node)]
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            if node.attr in PRIVATE_TORCH_ATTRIBUTES or _root_name(node) in torch_names:
                found.append((node.lineno, f"reads .{node.attr} ({ast.unparse(node)})"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node not in docstrings:
            if node.value.removesuffix(".") in PRIVATE_TORCH_ATTRIBUTES:
                found.append((node.lineno, f"names {node.value!r}"))
    return sorted(found)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_torch_module(module: str) -> bool:
    return module == "torch" or module.startswith("torch.")


def _private_torch_imports(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The private torch modules or names that an import statement imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if _is_torch_module(a.name) and any(map(_is_private, a.name.split(".")))]
    if node.level or not node.module or not _is_torch_module(node.module):
        return []
    if any(map(_is_private, node.module.split("."))):
        return [node.module]
    return [f"{node.module}.{a.name}" for a in node.names if _is_private(a.name)]


def _names_bound_to_torch(tree: ast.AST) -> set[str]:
    """``torch``, and the names that an import binds to torch or to something of torch's."""
    names = {"torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_torch_module(alias.name):
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module and _is_torch_module(node.module):
            names |= {alias.asname or alias.name for alias in node.names}
    return names


def _root_name(node: ast.Attribute) -> str | None:
    """The name an attribute chain starts from (``torch`` in ``torch.ops.aten.add``), if any."""
    value = node.value
    while isinstance(value, ast.Attribute):
        value = value.value
    return value.id if isinstance(value, ast.Name) else None


def _docstring_nodes(tree: ast.AST) -> set[ast.AST]:
    """The string constants that are docstrings (of the module, its classes and functions)."""
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, owners) and node.body:
            first = node.body[0]
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.add(value)
    return found


# -- every wrapper under the running torch -------------------------------------------------------


def test_every_name_torch_private_offers_is_used_by_a_test_here() -> None:
    """A wrapper added to torch_private without a check here would not tell that it moved."""
    used = {node.id for node in ast.walk(ast.parse(Path(__file__).read_text())) if isinstance(node, ast.Name)}
    assert not set(torch_private.__all__) - used, sorted(set(torch_private.__all__) - used)
    assert CHECKED_ON and all(isinstance(version, str) and version[0].isdigit() for version in CHECKED_ON)


def test_process_group_options_carry_the_timeout() -> None:
    timeout = timedelta(seconds=123)
    assert process_group_options("gloo", timeout)._timeout == timeout
    if dist.is_nccl_available():
        assert process_group_options("nccl", timeout)._timeout == timeout


def test_checkpoint_and_compile_wrappers_are_seen_through() -> None:
    inner = nn.Linear(2, 2)
    wrapped = checkpoint_wrapper(inner, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    assert checkpoint_wrapped_module(wrapped) is inner and checkpoint_wrapped_module(inner) is None
    compiled = torch.compile(nn.Linear(2, 2))  # nothing compiles until it is called
    assert compiled_original_module(compiled) is not None and compiled_original_module(inner) is None
    blocks = nn.Sequential(wrapped, compiled)  # the wrappers' prefixes show in their parent's names
    names = [name for name, _ in blocks.named_parameters()]
    assert names == [
        f"0.{CHECKPOINT_WRAPPER_PREFIX}weight",
        f"0.{CHECKPOINT_WRAPPER_PREFIX}bias",
        f"1.{COMPILE_WRAPPER_PREFIX}weight",
        f"1.{COMPILE_WRAPPER_PREFIX}bias",
    ]
    assert [without_wrapper_prefixes(name) for name in names] == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_the_recompile_limit_is_raised_never_lowered() -> None:
    import torch._dynamo

    before = torch._dynamo.config.recompile_limit
    try:
        raise_recompile_limit(before + 1)
        assert torch._dynamo.config.recompile_limit == before + 1
        raise_recompile_limit(1)
        assert torch._dynamo.config.recompile_limit == before + 1
    finally:
        torch._dynamo.config.recompile_limit = before


def test_fsdp_internals_are_where_the_wrappers_read_them(mesh: DeviceMesh) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    full_weight = model[0].weight.detach().clone()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    group = fsdp_param_group(model[0])
    assert group is not None
    params = fsdp_group_params(group)
    assert len(params) == 2  # weight and bias
    assert isinstance(fsdp_sharded_data(params[0]), torch.Tensor)
    assert fsdp_unsharded_accumulated_grad(params[0]) is None

    handle = model[0].unshard(async_op=True)  # issued, not yet waited for: inside the unshard
    assert fsdp_groups_unsharding([group, fsdp_param_group(model)]) == [group]
    assert fsdp_unsharded_groups([group]) == []
    handle.wait()
    assert fsdp_groups_unsharding([group]) == []
    assert fsdp_unsharded_groups([group, fsdp_param_group(model)]) == [group]  # not the root
    unsharded = fsdp_unsharded_param(params[0])
    assert unsharded is not None and torch.equal(unsharded, full_weight)
    (buffer,) = fsdp_all_gather_outputs(params[0])  # the unsharded weight lives in it
    assert buffer.untyped_storage().nbytes() == full_weight.numel() * 4
    model[0].reshard()
    assert fsdp_unsharded_groups([group]) == []
    assert buffer.untyped_storage().nbytes() == 0  # freed by a resize, no op

    model(torch.ones(3, 4)).sum().backward()
    assert fsdp_held_reduce_outputs(group) == []  # released when the backward ended
    assert isinstance(fsdp_retained_reduce_scatter_inputs(group), list)
    # The lookups above fall back to nothing when a name is absent: their names must exist.
    assert hasattr(group, "_all_reduce_state") and hasattr(group, "_partial_reduce_output")
    assert hasattr(group.comm_ctx, "reduce_scatter_states") or hasattr(group.comm_ctx, "reduce_scatter_state")

    forget_pending_forward(model)  # clears the pending set on torch <= 2.12; nothing to clear after
    shard = local_tensor(model[0].weight)
    assert type(shard) is torch.Tensor and torch.equal(shard, model[0].weight.to_local())


def test_dtensor_sharding_rule_cache_is_watched() -> None:
    misses = dtensor_sharding_rule_misses()
    assert isinstance(misses, int), "DTensor's sharding-rule cache moved: the planner warms it the slow way"


def test_the_collective_namespaces_are_the_collectives_ones() -> None:
    import torch.distributed.fsdp  # noqa: F401 - registers torch.ops.fsdp

    namespaces = {
        torch.ops.fsdp.all_gather_copy_in.default.namespace,
        torch.ops.c10d.allreduce_.default.namespace,
        torch.ops._c10d_functional.all_reduce.default.namespace,
    }
    assert namespaces == set(COLLECTIVE_OP_NAMESPACES)


def test_the_all_gather_op_is_what_all_gather_into_tensor_dispatches(mesh) -> None:
    class Seen(torch_private.TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.funcs: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - the dispatch protocol
            self.funcs.append(func)
            return func(*args, **(kwargs or {}))

    output, shard = torch.zeros(4), torch.arange(4.0)
    with Seen() as seen:
        dist.all_gather_into_tensor(output, shard)
    assert ALLGATHER_INTO_TENSOR in seen.funcs and torch.equal(output, shard)


def test_storage_ids_base_and_version() -> None:
    tensor, other = torch.zeros(4), torch.zeros(4)
    view = tensor[1:]
    assert storage_id(tensor) == storage_id(view) == storage_id(tensor.view(2, 2))
    assert storage_id(tensor) != storage_id(other)
    assert untyped_storage_id(view.untyped_storage()) == storage_id(tensor)
    assert tensor_base(view) is tensor and tensor_base(tensor) is None
    version = tensor_version(tensor)
    tensor.add_(1)
    assert tensor_version(tensor) == tensor_version(view) == version + 1


def test_fake_tensors_and_their_mode() -> None:
    assert active_fake_mode() is None and current_fake_mode() is None
    with FakeTensorMode() as mode:
        fake = torch.empty(2, 3)
        assert isinstance(fake, FakeTensor) and active_fake_mode() is mode and current_fake_mode() is mode
        with unset_fake_temporarily():
            assert not isinstance(torch.zeros(1), FakeTensor)
            assert current_fake_mode() is active_fake_mode() is None


def test_inside_a_dispatch_mode_the_current_fake_mode_is_the_innermost_one() -> None:
    """What the memory tracker asks of each op: the fake mode the op runs under, also when
    another one (DTensor's sharding propagation) is entered inside the first."""
    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            seen.append((current_fake_mode(), active_fake_mode()))
            return func(*args, **(kwargs or {}))

    with FakeTensorMode() as outer, Watch():
        torch.empty(3).add_(1)
        with FakeTensorMode() as inner:
            torch.empty(2).mul_(2)
    assert [current for current, _ in seen] == [outer, outer, inner, inner]
    assert all(current is walked for current, walked in seen)


def test_a_dispatch_mode_sees_a_value_read_back_as_local_scalar_dense() -> None:
    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    tensor = torch.tensor(3.0)
    with Ops() as ops:
        assert tensor.item() == 3.0
    assert LOCAL_SCALAR_DENSE in ops.seen


def test_the_fake_store_makes_a_fake_process_group() -> None:
    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        assert dist.get_world_size() == 4 and dist.get_rank() == 0
    finally:
        dist.destroy_process_group()


def test_pytree_functions_in_use() -> None:
    tensor = torch.ones(1)
    leaves, spec = pytree.tree_flatten({"a": [tensor, 2]})
    assert leaves == [tensor, 2] and pytree.tree_unflatten(leaves, spec) == {"a": [tensor, 2]}
    assert pytree.tree_leaves((tensor, {"b": 3})) == [tensor, 3]
    assert pytree.arg_tree_leaves(tensor, key=[4]) == [tensor, 4]
    assert pytree.tree_map(lambda x: x * 2, {"a": (1, 2)}) == {"a": (2, 4)}


def test_module_hook_dicts_and_registries() -> None:
    module = nn.Linear(2, 2)
    module.register_parameter("absent", None)
    module.register_buffer("steps", torch.zeros(1), persistent=False)
    module.register_buffer("scale", torch.ones(1))

    def hook(*_: object) -> None:
        return None

    module.register_forward_pre_hook(hook)
    module.register_forward_hook(hook)
    module.register_full_backward_pre_hook(hook)
    module.register_full_backward_hook(hook)
    for name in MODULE_HOOK_DICTS:
        assert list(module.__dict__[name].values()) == [hook], name

    registries = read_module_registries(module)
    assert list(registries.parameters) == ["weight", "bias", "absent"] and registries.parameters["absent"] is None
    assert list(registries.buffers) == ["steps", "scale"] and registries.submodules == {}
    assert non_persistent_buffer_names(module) == {"steps"}

    state = dict(module.__dict__)
    replacement = nn.Parameter(torch.zeros(3))
    write_module_registries(
        state, ModuleRegistries(parameters={"weight": replacement}, buffers={}, submodules={"inner": nn.ReLU()})
    )
    copy = object.__new__(nn.Linear)
    copy.__dict__.update(state)
    assert [p for p in copy.parameters()] == [replacement]
    assert [name for name, _ in copy.named_children()] == ["inner"] and list(copy.buffers()) == []


@pytest.fixture
def worker_iterator() -> Iterator[Iterator]:
    iterator = iter(DataLoader(list(range(8)), num_workers=1, multiprocessing_context="fork"))
    yield iterator
    shutdown_dataloader_workers(iterator)  # again: a no-op once done


def test_dataloader_workers_are_shut_down(worker_iterator: Iterator) -> None:
    assert next(worker_iterator) is not None
    workers = list(worker_iterator._workers)
    assert workers and all(worker.is_alive() for worker in workers)
    shutdown_dataloader_workers(worker_iterator)
    assert not any(worker.is_alive() for worker in workers)
    shutdown_dataloader_workers(iter(DataLoader([1, 2])))  # no workers: nothing to do
