"""Process group, device and device mesh: the same code on N GPUs (nccl) and on a CPU (gloo).

Every run, a plain single process included, joins a process group, so that one code path (FSDP2
over a device mesh) serves 1 and 400 ranks alike. A plain ``python -m fusiontrain train`` gets a
world of one on a free local port.

Every collective has a timeout (``distributed.timeout_s``, passed to ``init_process_group`` and to
the device mesh's sub-groups), so a rank that is stuck or dead cannot hang the others for ever.
The collectives the trainer calls itself (:func:`all_reduce_sum`, the barrier in
:func:`shutdown`) turn a timeout or a lost peer into a :class:`CollectiveError` that names this
rank, the operation and what it was for. (On nccl, a collective that times out is usually ended
by the NCCL watchdog instead, which logs the rank, the operation and its sequence number.)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fusiontrain.batch_layout import mesh_shape
from fusiontrain.torch_private import process_group_options


# Default for ``distributed.timeout_s``: torch's own default for gloo (NCCL's is 10 minutes). A
# healthy job's ranks can wait on each other for long stretches: rank-local work between two
# collectives (loading shards from a slow shared file system, a checkpoint write, a first
# torch.compile of a large model) takes minutes on big models. 30 minutes leaves room for that,
# and still ends a stuck job within half an hour instead of never.
DEFAULT_TIMEOUT_S = 1800.0
_timeout_s: float | None = None  # the timeout of the process group init_distributed made
_checkpoint_group: dist.ProcessGroup | None = None  # see checkpoint_group()


class CollectiveError(RuntimeError):
    """A collective that timed out or lost a peer, described for people: this rank, the
    operation, what it was for, and where to look (the other ranks' logs)."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        device: this rank's device.
        backend: "nccl" on CUDA, "gloo" on CPU.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> DistributedContext:
    """Join the process group torchrun (or accelerate, or srun + torchrun) describes in the
    environment, or form a world of one. Picks nccl and ``cuda:LOCAL_RANK`` when CUDA is
    available, gloo and the CPU otherwise. Every collective of the group times out after
    ``timeout_s`` seconds (``distributed.timeout_s``)."""
    global _timeout_s, _checkpoint_group
    if not timeout_s > 0:
        raise ValueError(f"the collective timeout must be > 0 seconds; got {timeout_s}")
    # Outside a launcher: a world of one, whose store is in this process (no port to bind, which
    # another process could take between its choice and its bind).
    world_of_one = "RANK" not in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    backend, checkpoint_backend = process_group_backends(device_type)
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        device_id = device if backend == "nccl" else None
        timeout = timedelta(seconds=timeout_s)
        store = dist.HashStore() if world_of_one else _restart_safe_store()
        if store is None:
            dist.init_process_group(backend, device_id=device_id, timeout=timeout)
        else:
            rank, world = (0, 1) if world_of_one else (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world, device_id=device_id, timeout=timeout
            )
        _timeout_s = timeout_s
        _checkpoint_group = dist.new_group(backend=checkpoint_backend, timeout=timeout)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def process_group_backends(device_type: str) -> tuple[str, str]:
    """The backends of a run on ``device_type``: the default process group's (nccl on CUDA, gloo on
    a CPU; the training loop's and FSDP's collectives run there), and the checkpoint group's
    (always gloo: :func:`checkpoint_group`)."""
    return ("nccl" if device_type == "cuda" else "gloo"), "gloo"


def checkpoint_group() -> dist.ProcessGroup | None:
    """The process group that checkpoint writing runs its collectives on (None without a process
    group). A group of its own, so that a save finishing in the background never shares a group
    with the training loop's collectives (the ranks would meet the two kinds in different orders
    and hang), and a CPU backend (gloo), which ``dcp.async_save`` requires and nccl is not. Made
    by :func:`init_distributed` on every rank, with the same timeout."""
    if _checkpoint_group is None or not dist.is_initialized():
        return None
    return _checkpoint_group


def _restart_safe_store() -> dist.Store | None:
    """Under torchrun, a store whose keys are private to this restart attempt, or None elsewhere.

    torchrun's workers share one store hosted by the agent, and it outlives a failed attempt. The
    process group keeps its peers' addresses in it under fixed keys, so after a restart
    (``--max-restarts``) a worker may read a dead peer's address from the failed attempt and fail
    to connect (seen with gloo in torch 2.13). Prefixing the keys with the attempt number keeps
    every attempt's rendezvous apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timedelta(minutes=10),
    )
    return dist.PrefixStore(f"fusiontrain/attempt_{attempt}", client)


def build_mesh(context: DistributedContext, dp_replicate: int, dp_shard: int) -> DeviceMesh:
    """A 1-D ``("dp_shard",)`` mesh (FSDP), or 2-D ``("dp_replicate", "dp_shard")`` (HSDP).

    ``dp_shard=-1`` takes all the ranks that ``dp_replicate`` leaves.
    """
    dp_replicate, dp_shard = mesh_shape(dp_replicate, dp_shard, context.world_size)
    device_type = context.device.type
    if dp_replicate == 1:  # the default process group serves it, with its timeout
        return init_device_mesh(device_type, (dp_shard,), mesh_dim_names=("dp_shard",))
    shape, names = (dp_replicate, dp_shard), ("dp_replicate", "dp_shard")
    if context.backend not in ("nccl", "gloo"):  # the planner's fake backend: no timeout to carry
        return init_device_mesh(device_type, shape, mesh_dim_names=names)
    # The sub-groups of a 2-D mesh are new process groups: without options they would get
    # torch's default timeout, not distributed.timeout_s.
    options = _group_options(context.backend)
    override = {"dp_replicate": (context.backend, options), "dp_shard": (context.backend, options)}
    return init_device_mesh(device_type, shape, mesh_dim_names=names, backend_override=override)


def _group_options(backend: str) -> Any:
    """Options of a new process group of ``backend`` carrying this process group's timeout."""
    timeout_s = _timeout_s if _timeout_s is not None else DEFAULT_TIMEOUT_S
    return process_group_options(backend, timedelta(seconds=timeout_s))


def collective(operation: str, what: str, call: Callable[[], Any]) -> Any:
    """Run ``call()``, a collective; a timeout or a lost peer becomes a :class:`CollectiveError`
    that says ``rank R: timed out after T s in <operation> (<what>)``."""
    started = time.monotonic()
    try:
        return call()
    except RuntimeError as error:
        # torch 2.13: gloo raises a plain RuntimeError from its transport ("[.../gloo/transport/tcp/
        # unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete", or
        # "...pair.cc:553] Connection closed by peer"); nccl raises DistBackendError (a DistError).
        # Anything else (a wrong dtype, ...) is a bug here and passes unchanged.
        if not (isinstance(error, dist.DistError) or "gloo" in str(error)):
            raise
        raise CollectiveError(_describe_failure(operation, what, error, time.monotonic() - started)) from error


def _describe_failure(operation: str, what: str, error: BaseException, elapsed: float) -> str:
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    text = str(error)
    first = text.splitlines()[0] if text else type(error).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        limit = _timeout_s if _timeout_s is not None else elapsed
        return (
            f"rank {rank}: timed out after {limit:g} s in {operation} ({what}) — another rank is stuck or died; "
            f"see its log (distributed.timeout_s sets the limit; the backend said: {first})"
        )
    return (
        f"rank {rank}: {operation} ({what}) failed after {elapsed:.1f} s — another rank is stuck or died; "
        f"see its log (the backend said: {first})"
    )


def all_reduce_sum(value: torch.Tensor, what: str = "a sum over ranks") -> torch.Tensor:
    """Sum ``value`` over all ranks (in place) and return it. ``what`` names the value in the
    :class:`CollectiveError` a timeout or a lost peer raises."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        collective("all_reduce", what, lambda: dist.all_reduce(value, op=dist.ReduceOp.SUM))
    return value


def all_reduce_max(value: torch.Tensor, what: str = "a maximum over ranks") -> torch.Tensor:
    """Maximum of ``value`` over all ranks (in place), returned. ``what`` names the value in the
    :class:`CollectiveError` a timeout or a lost peer raises."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        collective("all_reduce", what, lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX))
    return value


def shutdown() -> None:
    """Leave the process group deterministically: a barrier first, so no rank tears down while
    another still communicates (gloo otherwise aborts now and then at exit)."""
    global _checkpoint_group
    if dist.is_initialized():
        collective("barrier", "the end of the run", dist.barrier)
        dist.destroy_process_group()
    _checkpoint_group = None


def exit_promptly(code: int) -> NoReturn:
    """End a launched worker right after :func:`shutdown`, skipping the interpreter's teardown.

    With the group destroyed and everything written, what is left to run at exit is finalizers
    and C++ static destructors; one of them, now and then, destroys a thread still joinable and
    the worker aborts ("terminate called without an active exception", exit -6) after a run that
    succeeded (/work/shared/NOTES.md; seen again with 2 gloo ranks in this suite). Logs and the
    standard streams are flushed first; nothing else is pending by then (metrics, wandb and
    checkpoints are closed by the trainer)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can reach it
            pass
    os._exit(code)


def leave_after_failure() -> None:
    """Leave the process group after an error, without a barrier: the other ranks may be stuck
    elsewhere (or in another collective), so waiting for them would only add a timeout; they see
    this rank's connections close and fail at once. Destroying the group also keeps gloo from
    aborting the process at exit ("terminate called without an active exception")."""
    global _checkpoint_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _checkpoint_group = None
