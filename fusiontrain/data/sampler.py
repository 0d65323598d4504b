"""Which samples each rank reads at each step, the same global batch at any world size.

Step ``k`` trains on positions ``[k * G, (k + 1) * G)`` of a seeded permutation of the dataset
(a new permutation per epoch), ``G`` the global batch. Data-parallel rank ``r`` takes the ``r``-th
contiguous share of those ``G`` and splits it into micro-batches. Because the step alone fixes the
samples, runs on 1, 2 or 64 ranks see the same global batch at every step, and a resumed run (on
any world size) recomputes its position from the step number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GlobalBatchPlan:
    """Sample indices per (step, rank, micro-batch).

    Args:
        num_samples: dataset size.
        global_batch_size: samples per optimizer step over all ranks (``G``).
        micro_batch_size: samples per forward on one rank.
        dp_rank, dp_size: this rank's data-parallel coordinate and the number of such ranks.
        seed: seed of the per-epoch permutations.
    """

    num_samples: int
    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    seed: int

    def __post_init__(self) -> None:
        per_rank, remainder = divmod(self.global_batch_size, self.dp_size * self.micro_batch_size)
        if remainder or per_rank == 0:
            raise ValueError(
                f"batch.global_batch_size={self.global_batch_size} must be a multiple of batch.micro_batch_size "
                f"({self.micro_batch_size}) x data-parallel ranks ({self.dp_size})"
            )
        if self.num_samples < self.global_batch_size:
            raise ValueError(f"the dataset has {self.num_samples} samples, fewer than one global batch")

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.dp_size * self.micro_batch_size)

    def _order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def global_indices(self, step: int) -> list[int]:
        """The ``G`` sample indices of step ``step``, in order (whole batches per epoch; the
        epoch's remainder is skipped)."""
        steps_per_epoch = self.num_samples // self.global_batch_size
        epoch, position = divmod(step, steps_per_epoch)
        start = position * self.global_batch_size
        return self._order(epoch)[start : start + self.global_batch_size].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of step ``step``: ``grad_accum_steps`` lists of indices."""
        per_rank = self.global_batch_size // self.dp_size
        mine = self.global_indices(step)[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        return [mine[i : i + self.micro_batch_size] for i in range(0, per_rank, self.micro_batch_size)]
