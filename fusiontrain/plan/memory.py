"""Live tensor memory of a computation, by label, without allocating it.

:class:`TensorMemoryTracker` is a ``TorchDispatchMode``: every tensor an op returns is attributed
to the label active when it was created (``with tracker.label("encoder")``), and counted until
its storage dies (a weakref callback on the storage). It keeps the running total and, at the
highest total, a copy of the per-label totals: what was alive at the peak.

Run the computation on fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``) and
nothing is allocated, so a 90B-parameter step can be traced on a laptop; run it on real tensors
and it counts what the allocator would be asked for. Views share their base's storage and are
counted once, and an op's output that shares an input's storage (a view, an in-place result)
allocates nothing. Tensors created before entering the mode (parameters, say) are not counted;
the caller adds them from their shapes.

Two hooks cover memory the dispatcher does not see or labels by phase only:

- ``untracked``: ``{label: bytes()}`` polled after every op and added to the total (FSDP2 grows
  and frees its unsharded parameters by resizing storages in place, which no op reports);
- ``regroup``: called at each new peak, ``{label: tensors}``: those tensors' bytes are moved to
  ``label`` in the peak's breakdown (gradients made by reduce-scatter ops, say).

Tensors created under one of the ``host_labels`` live in host memory (offloaded activations, say):
they count towards ``host_current`` / ``host_peak``, not towards the device's total and peak.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from fusiontrain.dispatch_args import op_tensors
from fusiontrain.torch_private import TorchDispatchMode, current_fake_mode, storage_id, untyped_storage_id

# ``tensor.device`` on a tensor subclass (a fake tensor) is an op of its own: three in five of the
# ops a traced step dispatches (133k ops for an 11B model). It allocates nothing, so the tracker
# passes it through before any bookkeeping.
_DEVICE_QUERY = torch.ops.prim.device.default


class TensorMemoryTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created inside it, by label.

    Args:
        default_label: the label outside every :meth:`label` block.
        untracked: bytes held outside the dispatcher, by label, polled after each op.
        op_label: ``op_label(func, args)`` -> a label for that op's outputs, or None for the active one.
        regroup: at a new peak, tensors whose bytes belong to another label (see module doc).
        host_labels: labels of tensors in host memory, counted apart (see module doc).

    Attributes:
        current: bytes alive now (tracked and untracked).
        peak: the highest ``current`` seen.
        at_peak: bytes per label when ``peak`` was reached.
        peak_label: the label active when ``peak`` was reached.
        host_current: bytes alive now under ``host_labels``.
        host_peak: the highest ``host_current`` seen.
    """

    def __init__(
        self,
        default_label: str = "other",
        *,
        untracked: dict[str, Callable[[], int]] | None = None,
        op_label: Callable[[Any, tuple], str | None] | None = None,
        regroup: Callable[[], dict[str, list[torch.Tensor]]] | None = None,
        host_labels: Collection[str] = (),
    ) -> None:
        super().__init__()
        self._labels = [default_label]
        self._storages: dict[int, list[Any]] = {}  # live storage's id (storage_id) -> [label, bytes]
        self._untracked = untracked or {}
        self._op_label = op_label
        self._regroup = regroup
        self._host_labels = frozenset(host_labels)
        self.host_current = 0
        self.host_peak = 0
        self.by_label: dict[str, int] = defaultdict(int)
        self.tracked = 0
        self.current = 0
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.peak_label = default_label

    @contextmanager
    def label(self, name: str) -> Iterator[None]:
        """Attribute tensors created inside the block to ``name``."""
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    def push(self, name: str) -> None:
        """Start attributing new tensors to ``name`` (until :meth:`pop`); for module hooks."""
        self._labels.append(name)

    def pop(self) -> None:
        """Return to the label before the last :meth:`push`."""
        self._labels.pop()

    def __enter__(self) -> TensorMemoryTracker:
        self._fake_mode = current_fake_mode()  # None when tracking real tensors
        return super().__enter__()

    def _track(self, storage: torch.UntypedStorage, key: int, label: str) -> None:
        """Count ``storage`` (its id ``key``) under ``label`` until it dies, unless counted already."""
        if key in self._storages:
            return
        record = [label, storage.nbytes()]
        self._storages[key] = record
        if label in self._host_labels:
            self.host_current += record[1]
            self.host_peak = max(self.host_peak, self.host_current)
        else:
            self.by_label[label] += record[1]
            self.tracked += record[1]
        weakref.finalize(storage, self._release, key, record)

    def _release(self, key: int, record: list[Any]) -> None:
        if self._storages.get(key) is record:
            del self._storages[key]
        if record[0] in self._host_labels:
            self.host_current -= record[1]
        else:
            self.by_label[record[0]] -= record[1]
            self.tracked -= record[1]

    def _update_peak(self) -> None:
        untracked = {name: poll() for name, poll in self._untracked.items()}
        self.current = self.tracked + sum(untracked.values())
        if self.current <= self.peak:
            return
        self.peak = self.current
        breakdown = dict(self.by_label)
        for name, size in untracked.items():
            breakdown[name] = breakdown.get(name, 0) + size
        if self._regroup is not None:
            for name, tensors in self._regroup().items():
                seen: set[int] = set()
                for tensor in tensors:
                    record = self._storages.get(storage_id(tensor))
                    if record is None or id(record) in seen:
                        continue
                    seen.add(id(record))
                    breakdown[record[0]] -= record[1]
                    breakdown[name] = breakdown.get(name, 0) + record[1]
        self.at_peak = {name: n for name, n in breakdown.items() if n}
        self.peak_label = self._labels[-1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - the dispatch protocol
        if func is _DEVICE_QUERY:
            return func(*args, **(kwargs or {}))  # metadata: allocates nothing (most ops of a traced step)
        if any(issubclass(kind, DTensor) for kind in types):
            return NotImplemented  # let DTensor run its local ops, which come back here
        out = func(*args, **(kwargs or {}))
        if current_fake_mode() is not self._fake_mode:
            # DTensor's sharding propagation runs ops under a fake mode of its own to learn output
            # shapes (and caches them): metadata, not memory.
            return out
        label = (self._op_label(func, args) if self._op_label is not None else None) or self._labels[-1]
        # An output sharing an input's storage (a view, an in-place op) allocated nothing; the
        # input may even predate the tracker (a transposed weight).
        inputs = {storage_id(t) for t in op_tensors(args, kwargs)}
        for value in op_tensors(out):
            storage = value.untyped_storage()
            key = untyped_storage_id(storage)
            if key not in inputs:
                self._track(storage, key, label)
        self._update_peak()
        return out
