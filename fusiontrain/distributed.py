"""Process group, device and device mesh: the same code on N GPUs (nccl) and on a CPU (gloo).

Every run, a plain single process included, joins a process group, so that one code path (FSDP2
over a device mesh) serves 1 and 400 ranks alike. A plain ``python -m fusiontrain train`` gets a
world of one on a free local port.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


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


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistributedContext:
    """Join the process group torchrun (or accelerate, or srun + torchrun) describes in the
    environment, or form a world of one. Picks nccl and ``cuda:LOCAL_RANK`` when CUDA is
    available, gloo and the CPU otherwise."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        device_id = device if backend == "nccl" else None
        store = _restart_safe_store()
        if store is None:
            dist.init_process_group(backend, device_id=device_id)
        else:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, device_id=device_id)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


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
    if dp_shard == -1:
        if context.world_size % dp_replicate:
            raise ValueError(
                f"parallel.dp_replicate={dp_replicate} does not divide the world of {context.world_size} ranks"
            )
        dp_shard = context.world_size // dp_replicate
    if dp_replicate * dp_shard != context.world_size:
        raise ValueError(
            f"parallel.dp_replicate ({dp_replicate}) x parallel.dp_shard ({dp_shard}) must equal the "
            f"world size ({context.world_size}); set dp_shard=-1 to fill it"
        )
    device_type = context.device.type
    if dp_replicate == 1:
        return init_device_mesh(device_type, (dp_shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device_type, (dp_replicate, dp_shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum ``value`` over all ranks (in place) and return it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def shutdown() -> None:
    """Leave the process group deterministically: a barrier first, so no rank tears down while
    another still communicates (gloo otherwise aborts now and then at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
