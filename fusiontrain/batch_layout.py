"""Global-batch and device-mesh arithmetic, in one place: the trainer, the planner and config
validation all ask here.

A step's global batch (``batch.global_batch_size`` rows) is split over the data-parallel ranks
(``parallel.dp_replicate x parallel.dp_shard``, the whole world: there is no tensor or pipeline
parallelism), and each rank runs its share as ``grad_accum_steps`` micro-batches of
``batch.micro_batch_size`` rows::

    global_batch_size = micro_batch_size x grad_accum_steps x dp_replicate x dp_shard

Without ``global_batch_size``, ``batch.grad_accum_steps`` is taken as given and the global batch
follows from the world size.

Pure integer arithmetic (no torch), so ``config.py`` can use it before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchLayout:
    """How a world of ranks splits one optimizer step.

    Attributes:
        dp_replicate: replica groups (HSDP; 1 for plain FSDP).
        dp_shard: ranks each parameter is sharded over.
        micro_batch_size: rows per rank per forward/backward.
        grad_accum_steps: micro-batches per rank per optimizer step.
    """

    dp_replicate: int
    dp_shard: int
    micro_batch_size: int
    grad_accum_steps: int

    @property
    def world_size(self) -> int:
        """Data-parallel ranks (every rank of the job)."""
        return self.dp_replicate * self.dp_shard

    @property
    def rows_per_rank(self) -> int:
        """Rows each rank processes per optimizer step."""
        return self.micro_batch_size * self.grad_accum_steps

    @property
    def global_batch_size(self) -> int:
        """Rows per optimizer step over all ranks."""
        return self.rows_per_rank * self.world_size


def mesh_shape(dp_replicate: int, dp_shard: int, world_size: int) -> tuple[int, int]:
    """``(dp_replicate, dp_shard)`` for ``world_size`` ranks, ``dp_shard=-1`` meaning "every rank
    that ``dp_replicate`` leaves".

    Raises:
        ValueError: the two do not multiply to ``world_size`` (the message names the keys).
    """
    if world_size < 1:
        raise ValueError(f"the world size must be >= 1, got {world_size}")
    if dp_replicate < 1 or dp_shard == 0 or dp_shard < -1:
        raise ValueError(
            f"parallel.dp_replicate must be >= 1 and parallel.dp_shard -1 or >= 1; got {dp_replicate} and {dp_shard}"
        )
    if dp_shard == -1:
        if world_size % dp_replicate:
            raise ValueError(f"parallel.dp_replicate={dp_replicate} does not divide the world of {world_size} ranks")
        dp_shard = world_size // dp_replicate
    if dp_replicate * dp_shard != world_size:
        raise ValueError(
            f"parallel.dp_replicate ({dp_replicate}) x parallel.dp_shard ({dp_shard}) must equal the "
            f"world size ({world_size}); set dp_shard=-1 to fill it"
        )
    return dp_replicate, dp_shard


def accumulation_steps(global_batch_size: int, micro_batch_size: int, dp_ranks: int) -> int:
    """Micro-batches per rank that make ``global_batch_size`` rows on ``dp_ranks`` ranks.

    Raises:
        ValueError: the global batch does not split into whole micro-batches on every rank.
    """
    steps, remainder = divmod(global_batch_size, micro_batch_size * dp_ranks)
    if remainder or steps < 1:
        raise ValueError(
            f"batch.global_batch_size={global_batch_size} must be a positive multiple of batch.micro_batch_size "
            f"({micro_batch_size}) x data-parallel ranks ({dp_ranks}); change one of them"
        )
    return steps


def batch_layout(
    *,
    world_size: int,
    dp_replicate: int,
    dp_shard: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    global_batch_size: int | None,
) -> BatchLayout:
    """The split of one step over ``world_size`` ranks, from the ``batch`` and ``parallel`` keys.

    ``global_batch_size`` (when not None) sets the accumulation steps; else ``grad_accum_steps``
    is used as given.

    Raises:
        ValueError: the mesh does not fit the world, or the global batch does not split evenly.
    """
    replicate, shard = mesh_shape(dp_replicate, dp_shard, world_size)
    if micro_batch_size < 1:
        raise ValueError(f"batch.micro_batch_size must be >= 1, got {micro_batch_size}")
    if global_batch_size is not None:
        grad_accum_steps = accumulation_steps(global_batch_size, micro_batch_size, world_size)
    elif grad_accum_steps < 1:
        raise ValueError(f"batch.grad_accum_steps must be >= 1, got {grad_accum_steps}")
    return BatchLayout(replicate, shard, micro_batch_size, grad_accum_steps)


def check_global_batch_without_world(
    *, dp_replicate: int, dp_shard: int, micro_batch_size: int, global_batch_size: int | None
) -> None:
    """What can be checked before the world size is known (config validation): with an explicit
    ``dp_shard`` the world is ``dp_replicate x dp_shard`` and the whole layout is checked; with
    ``dp_shard=-1`` the global batch must at least split over the ``dp_replicate`` replicas.

    Raises:
        ValueError: as :func:`batch_layout`.
    """
    if global_batch_size is None:
        return
    if dp_shard != -1:
        batch_layout(
            world_size=dp_replicate * dp_shard,
            dp_replicate=dp_replicate,
            dp_shard=dp_shard,
            micro_batch_size=micro_batch_size,
            grad_accum_steps=1,
            global_batch_size=global_batch_size,
        )
    else:
        accumulation_steps(global_batch_size, micro_batch_size, dp_replicate)
