"""The global row plan: which samples go into which row, for the whole run, from sizes alone.

Rows are planned from the per-sample size table (:mod:`fusiontrain.data.sizes`), never from built
samples, so every rank computes the same plan without decoding an image, and the plan is a
function of ``(seed, sizes, limits)`` only, not of the number of ranks:

1. Epoch ``e`` visits every sample id once, in the order of ``randperm(n)`` seeded with
   ``seed * 1_000_003 + e`` (a mixture of sources gives its own order instead, in which each
   source's ids appear as often as its weight says: :mod:`fusiontrain.data.mixture`).
2. Samples that cannot be used are dropped there and counted once per epoch: those the size pass
   found bad (a malformed line, a template problem, ...), and those that can never fit a row
   (``too_long``: more than ``seq_len`` tokens; ``too_many_images``: more images than
   ``max_images`` or more encoder tokens than ``max_encoder_tokens``).
3. With packing, the remaining ids go through the bounded first-fit packer
   (:class:`~fusiontrain.data.packing.FirstFitPacker`, on sizes), and the rows still open at the
   epoch's end are closed: epoch ``e``'s rows are a fixed list. Without packing each sample is a
   row of its own.
4. The run's row stream is epoch 0's rows, then epoch 1's, and so on. A position in it is
   ``(epoch, row)``; each optimizer step takes the next ``global_batch_size`` rows
   (:meth:`RowPlan.take`).

How a step's rows are dealt to ranks and built is the loader's business
(:mod:`fusiontrain.data.loader`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from fusiontrain.data.errors import BadSample
from fusiontrain.data.packing import FirstFitPacker, misfit_reason
from fusiontrain.data.sizes import SKIP_REASONS, SampleSizes

# What to change when every sample is skipped for one reason.
_FIXES = {
    "too_long": "raise batch.seq_len or set data.too_long=truncate",
    "too_many_images": "raise data.max_images_per_row or data.max_encoder_tokens_per_row",
    "too_many_items": "raise the row limits of the other modalities (audio)",
}


class NoUsableSampleError(RuntimeError):
    """An epoch of the data holds no usable sample (the message names the data and the skips per
    reason): the run could never get a batch."""


@dataclass(frozen=True)
class RowLimits:
    """What one row holds.

    Attributes:
        seq_len: tokens per row.
        max_images: image slots per row.
        max_encoder_tokens: encoder tokens per row (None: only ``max_images`` limits).
        packing: several samples per row (first-fit) or one.
        open_rows: rows the first-fit packer keeps open.
        other_limits: for a model with an encoder per modality, each other modality's (the size
            table's ``others``, in order) ``(items, encoder tokens or None)`` per row.
    """

    seq_len: int
    max_images: int
    max_encoder_tokens: int | None
    packing: bool
    open_rows: int
    other_limits: tuple[tuple[int, int | None], ...] = ()

    def identity(self) -> dict:
        """What a run records of these limits (a resume must find the same, after a JSON round trip):
        every field, but ``other_limits`` only when set (a one-encoder run records what it did
        before there were other modalities)."""
        fields = asdict(self)
        if self.other_limits:
            fields["other_limits"] = [list(pair) for pair in self.other_limits]  # as JSON gives it back
        else:
            fields.pop("other_limits")
        return fields


@dataclass(frozen=True)
class DataPosition:
    """A place in the run's row stream: the next row is row ``row`` of epoch ``epoch``; ``step``
    optimizer steps' worth of rows come before it."""

    epoch: int = 0
    row: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, int]) -> DataPosition:
        return cls(int(state["epoch"]), int(state["row"]), int(state["step"]))


@dataclass(frozen=True)
class PlannedRow:
    """One row of the plan: where it is in the stream and the sample ids it holds, in order."""

    epoch: int
    index: int
    ids: tuple[int, ...]


@dataclass(frozen=True)
class EpochRows:
    """An epoch's rows (sample ids each) and the samples the planning dropped, by reason."""

    rows: list[tuple[int, ...]]
    skipped: dict[str, int]


class RowPlan:
    """The row plan of one dataset (see the module docstring).

    Args:
        sizes: the dataset's size table.
        limits: what a row holds.
        seed: the run's seed.
        name: what the data is, for messages.
        strict: raise on the first unusable sample instead of skipping it.
        order: ``order(epoch)`` -> the sample ids the epoch visits, in order (a mixture's); None:
            every id once, shuffled by the seed.
    """

    def __init__(
        self,
        sizes: SampleSizes,
        limits: RowLimits,
        seed: int,
        *,
        name: str = "",
        strict: bool = False,
        order: Callable[[int], list[int]] | None = None,
    ) -> None:
        self.sizes = sizes
        self._order = order
        self.limits = limits
        self.seed = seed
        self.name = name or f"a dataset of {len(sizes)} samples"
        self.strict = strict
        self._epochs: dict[int, EpochRows] = {}

    def order(self, epoch: int) -> list[int]:
        """The sample ids epoch ``epoch`` visits, in order: every id once, unless a mixture's
        ``order`` says otherwise."""
        if self._order is not None:
            return self._order(epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.sizes), generator=generator).tolist()

    def epoch(self, epoch: int) -> EpochRows:
        """The rows of ``epoch`` (the last few epochs planned are kept)."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = self._plan(epoch)
        return self._epochs[epoch]

    def take(self, position: DataPosition, count: int) -> tuple[list[PlannedRow], DataPosition]:
        """The ``count`` rows from ``position`` on (crossing epoch ends), and the position after
        them (one step further)."""
        rows, epoch, index = [], position.epoch, position.row
        while len(rows) < count:
            planned = self.epoch(epoch).rows
            if index >= len(planned):
                epoch, index = epoch + 1, 0
                continue
            rows.append(PlannedRow(epoch, index, planned[index]))
            index += 1
        return rows, DataPosition(epoch, index, position.step + 1)

    def _plan(self, epoch: int) -> EpochRows:
        limits, table = self.limits, self.sizes.table.tolist()
        if len(limits.other_limits) != len(self.sizes.others):
            raise ValueError(
                f"row limits for {len(limits.other_limits)} other modalities, sizes of {list(self.sizes.others)}"
            )
        packer = FirstFitPacker(
            limits.seq_len, limits.max_images, limits.open_rows, max_encoder_tokens=limits.max_encoder_tokens,
            other_limits=limits.other_limits,
        )
        skipped: Counter[str] = Counter()
        rows: list[tuple[int, ...]] = []
        for index in self.order(epoch):
            tokens, images, encoder_tokens, code = table[index][:4]
            others = self.sizes.other_sizes(table[index])
            reason = (SKIP_REASONS[code - 1] if code else None) or misfit_reason(
                tokens, images, encoder_tokens, seq_len=limits.seq_len, max_images=limits.max_images,
                max_encoder_tokens=limits.max_encoder_tokens, others=others, other_limits=limits.other_limits,
            )
            if reason is not None:
                if self.strict:
                    raise BadSample(reason, f"sample {index} of {self.name} cannot be used (data.strict=true)")
                skipped[reason] += 1
                continue
            if limits.packing:
                rows += [tuple(row.keys) for row in packer.add_sized(index, tokens, images, encoder_tokens, others)]
            else:
                rows.append((index,))
        rows += [tuple(row.keys) for row in packer.flush()]
        if not rows:
            raise NoUsableSampleError(self._no_usable_sample(epoch, skipped))
        return EpochRows(rows, dict(skipped))

    def _no_usable_sample(self, epoch: int, skipped: Counter) -> str:
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
        fixes = [_FIXES[reason] for reason in sorted(skipped) if reason in _FIXES]
        fix = f"; {' / '.join(fixes)}" if fixes else ""
        return (
            f"no usable sample in {self.name}: all {len(self.sizes)} samples of epoch {epoch} are skipped ({counts}). "
            f"Fix or filter the data (each skipped sample was logged when its size was measured){fix}"
        )
