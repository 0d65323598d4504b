"""Several data sources mixed by weight, in one id space and one global row plan.

A list of training sources (``data.train: [{path, format, weight, name}, ...]``) becomes one
dataset whose sample ids run over the sources end to end: source ``k`` holds ids
``offsets[k] .. offsets[k] + sizes[k] - 1``. The mixture decides only which ids each epoch visits
and in which order; the row plan (:mod:`fusiontrain.data.row_plan`) packs them exactly as it packs
one source's, so packing, padding-free rows, the planner and elastic resume need nothing new.

The semantics (docs/data.md: Mixtures):

- An epoch draws as many samples as the sources hold together, ``N = sum(sizes)``.
- Without weights each source gives all of its samples once per epoch: the sources concatenated
  and shuffled together.
- With weights, source ``k`` gives ``q_k`` samples per epoch, ``N * w_k / sum(w)`` rounded by
  largest remainders (so the counts sum to ``N``). The weights are sampling shares: a source with
  more weight than its size is repeated (its samples come round again within and across epochs),
  one with less is sub-sampled, and each source's own epochs follow from them (LLaMA-Factory's
  ``interleave_over`` in spirit, but exact per epoch rather than random: the shares of every
  epoch are the weights to the rounding, and no sample of a source comes round again before all
  of that source's samples have).
- Source ``k`` takes its draws from its own endless stream: its permutation number 0, then
  number 1, ... (``randperm(sizes[k])`` seeded with the run's seed and the source's name), the
  ``q_k`` draws of epoch ``e`` being the stream's positions ``e * q_k`` to ``(e + 1) * q_k - 1``.
- The epoch's draws are then shuffled together (``randperm(N)`` seeded with the seed and the
  epoch).

Everything is a function of the seed, the names, the sizes and the weights: the same on every rank
and at every world size. Bad samples drawn are skipped by the row plan and counted as for one
source, so a source with many bad records gives a little less than its share.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from fusiontrain.data.batch import Sample


@dataclass(frozen=True)
class SourceMixture:
    """The sources of a mixture: names, sizes (samples each) and weights (None: each source once
    per epoch). See the module docstring."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.names or len(self.names) != len(self.sizes):
            raise ValueError(f"a mixture needs one size per source: {len(self.names)} names, {len(self.sizes)} sizes")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"mixture sources need distinct names, got {list(self.names)}")
        empty = [name for name, size in zip(self.names, self.sizes) if size <= 0]
        if empty:
            raise ValueError(f"mixture source {empty[0]!r} holds no record")
        if self.weights is not None:
            if len(self.weights) != len(self.names) or not all(w > 0 for w in self.weights):
                raise ValueError(f"a mixture needs one positive weight per source, got {self.weights}")

    @cached_property  # asked once per sample read (source_of): computed once
    def offsets(self) -> np.ndarray:
        """``[k + 1]``: source ``k``'s ids start at ``offsets[k]``; ``offsets[-1]`` is the total."""
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(sum(self.sizes))

    def source_of(self, sample_id: int) -> tuple[int, int]:
        """``(source index, index within the source)`` of a sample id."""
        if not 0 <= sample_id < len(self):
            raise IndexError(f"sample id {sample_id} out of range for a mixture of {len(self)} samples")
        source = int(np.searchsorted(self.offsets, sample_id, side="right")) - 1
        return source, sample_id - int(self.offsets[source])

    def quotas(self) -> tuple[int, ...]:
        """Samples each source gives per epoch (summing to the epoch's size)."""
        return self._quotas

    @cached_property
    def _quotas(self) -> tuple[int, ...]:
        total = len(self)
        if self.weights is None:
            return self.sizes
        shares = np.asarray(self.weights, dtype=np.float64) / sum(self.weights) * total
        quotas = np.floor(shares).astype(np.int64)
        remainders = shares - quotas
        # largest remainders first; ties to the earlier source
        for k in sorted(range(len(quotas)), key=lambda k: (-remainders[k], k))[: total - int(quotas.sum())]:
            quotas[k] += 1
        return tuple(int(q) for q in quotas)

    def order(self, epoch: int, seed: int) -> list[int]:
        """The sample ids epoch ``epoch`` visits, in order."""
        draws = [self._draws(k, epoch, seed) + int(self.offsets[k]) for k in range(len(self.names))]
        ids = np.concatenate(draws)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return ids[torch.randperm(len(ids), generator=generator).numpy()].tolist()

    def _draws(self, source: int, epoch: int, seed: int) -> np.ndarray:
        """Positions ``epoch * q .. (epoch + 1) * q - 1`` of source ``source``'s endless stream of
        its own permutations (local ids)."""
        size, quota = self.sizes[source], self.quotas()[source]
        start, stop = epoch * quota, (epoch + 1) * quota
        pieces = []
        for lap in range(start // size, -(-stop // size)):
            permutation = self._permutation(source, lap, seed)
            lo, hi = max(start - lap * size, 0), min(stop - lap * size, size)
            pieces.append(permutation[lo:hi])
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    def _permutation(self, source: int, lap: int, seed: int) -> np.ndarray:
        name_seed = zlib.crc32(self.names[source].encode())
        generator = torch.Generator().manual_seed((seed * 1_000_003 + lap) * 2_654_435_761 + name_seed)
        return torch.randperm(self.sizes[source], generator=generator).numpy()

    def counts_per_epoch(self) -> dict[str, int]:
        """Samples per epoch by source name (what ``prepare`` reports)."""
        return dict(zip(self.names, self.quotas()))


class MixedDataset:
    """The datasets of a mixture's sources as one, by sample id: ``dataset[i]`` is the sample of
    id ``i`` with its ``source`` set to its source's index.

    Args:
        datasets: one per source, in the mixture's order; each has ``__len__``, ``__getitem__``
            and ``size`` (as :class:`~fusiontrain.data.record_dataset.RecordDataset`).
        mixture: the sources' names, sizes and weights.
    """

    def __init__(self, datasets: Sequence, mixture: SourceMixture) -> None:
        sizes = tuple(len(dataset) for dataset in datasets)
        if sizes != mixture.sizes:
            raise ValueError(f"the datasets hold {sizes} samples, the mixture says {mixture.sizes}")
        self.datasets = list(datasets)
        self.mixture = mixture

    def __len__(self) -> int:
        return len(self.mixture)

    def __getitem__(self, sample_id: int) -> Sample:
        source, index = self.mixture.source_of(sample_id)
        sample = self.datasets[source][index]
        sample.source = source
        return sample

    def size(self, sample_id: int) -> tuple[int, int, int]:
        source, index = self.mixture.source_of(sample_id)
        return self.datasets[source].size(index)


class SourceBuilders:
    """Builds each record with its own source's builder (a streamed mixture's records carry their
    ``source``; the sources' formats differ), and marks the sample with its source."""

    def __init__(self, builders: Sequence) -> None:
        self.builders = list(builders)

    def __call__(self, record) -> Sample:
        sample = self.builders[record.source](record)
        sample.source = record.source
        return sample

