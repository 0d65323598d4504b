"""Dataloader worker processes: how they start, and how they end.

**Start** (``data.worker_start``). A worker is a process that builds samples (tokenizing,
decoding and processing images) off the training loop. How it comes to life matters on a cluster:

- ``forkserver`` (the default): one helper process per training process, a fresh interpreter
  that imports once the modules the workers need (:func:`modules_to_preload`: those of the
  objects in the stream they receive pickled); every worker is forked from that helper, which runs
  no other thread. The helper starts with the first loader that has workers
  (:func:`start_worker_server`), when the stream, and so what it needs, is known; its imports
  overlap with what the trainer does before the first batch (the eval data, the resume).
- ``spawn``: a fresh interpreter per worker, every import again (the slowest start).
- ``fork``: the worker is a copy of the training process. Fastest to start, but by then the
  training process runs gloo's / NCCL's and the async checkpoint writer's threads, and a fork
  copies whatever locks those threads hold at that instant (malloc arenas among them): the child
  can deadlock or corrupt its heap. Keep it for measurements and for datasets that cannot be
  pickled.

``benchmarks/dataloader_start.py`` measures the three side by side (``benchmarks/RESULTS.md``).

**Signals.** Workers are born with SIGTERM and SIGUSR1 blocked (:data:`WORKER_BLOCKED_SIGNALS`),
whichever way they start and whenever: a preemption signal reaches every process of a job step, and
only the training process may act on it, at a step boundary (:mod:`fusiontrain.train.preemption`);
a worker that died of it would fail the run before its checkpoint. A forked or spawned process
inherits the mask of the thread that starts it, so :class:`ClosableLoader` blocks them while its
workers start, and :func:`start_worker_server` while the helper starts (the helper's workers
inherit its mask). One CPython trap is handled there: starting multiprocessing's resource tracker
(which the helper and named semaphores need) *unblocks* SIGINT and SIGTERM in the calling process
(CPython 3.11 and 3.12, ``resource_tracker.ensure_running``), so the tracker is started first and
the mask put back.

**End.** :class:`ClosableLoader` can end its workers at once (after an error), which
multiprocessing's exit hook cannot do for workers that block SIGTERM. And a worker ends by itself
once the training process is gone (:func:`end_with_the_training_process`), however it died:
PyTorch's own check (is my parent still the one that started me?) never fires for a ``forkserver``
worker, whose parent is the helper; the helper in turn outlives the training process, because
every worker holds the pipe whose closing would end it. Without this a SIGKILLed rank (the OOM
killer, a torchrun restart) would leave its workers and their shared memory on the node for good.
A ``spawn`` worker, the one kind that runs the interpreter's teardown, first waits for its
queues' feeder threads (:func:`_join_queue_feeders`: one still sending a batch aborts it).
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import pickle
import select
import signal
import threading
import time
import types
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing import forkserver, resource_tracker
from multiprocessing.context import BaseContext
from typing import Any

from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from fusiontrain.torch_private import shutdown_dataloader_workers

#: How dataloader workers may start (``data.worker_start``); the first is the default.
WORKER_START_METHODS = ("forkserver", "spawn", "fork")

#: Signals that dataloader workers block for all their life: the preemption signals, which the
#: training process alone acts on (:data:`fusiontrain.train.preemption.PREEMPTION_SIGNALS`).
WORKER_BLOCKED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _ByteCounter:
    """A file that keeps nothing: the sink of :func:`modules_to_preload`'s pickling pass."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


class _ModuleRecorder(pickle.Pickler):
    """A pickler that notes the module of every class and function it meets, and of every object's
    class: what an unpickler of the same object graph imports."""

    def __init__(self) -> None:
        super().__init__(_ByteCounter(), protocol=pickle.HIGHEST_PROTOCOL)
        self.modules: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            module = getattr(obj, "__module__", None)  # pickled by reference: module and name
        else:
            module = type(obj).__module__
        if isinstance(module, str):
            self.modules.add(module)
        return NotImplemented  # pickle as usual


def modules_to_preload(stream: object) -> list[str]:
    """The modules a worker imports as it unpickles ``stream``: those of every class and function
    in its pickle (the stream, its dataset and source, the tokenizer, image processor and image
    format it holds, numpy's and torch's rebuild functions), found by pickling it once into a
    byte counter. The forkserver helper imports them once, so that no worker imports them itself;
    a run on synthetic data then preloads no tokenizer, image-processor or ``datasets`` modules
    (about 2.5 s of imports per helper that such a run never uses).

    Raises:
        Whatever pickling ``stream`` raises: its workers would fail the same way.
    """
    recorder = _ModuleRecorder()
    recorder.dump(stream)
    return sorted(module for module in recorder.modules if module not in ("__main__", "builtins"))


def worker_context(method: str, preload: Sequence[str] = ()) -> BaseContext:
    """The multiprocessing context that starts dataloader workers by ``method``; for
    ``forkserver``, with ``preload`` (module names) for the helper to import when it starts.

    Raises:
        ValueError: ``method`` is not one of :data:`WORKER_START_METHODS`.
    """
    if method not in WORKER_START_METHODS:
        raise ValueError(f"data.worker_start must be one of {list(WORKER_START_METHODS)}, got {method!r}")
    context = multiprocessing.get_context(method)
    if method == "forkserver" and preload:
        context.set_forkserver_preload(list(preload))  # read when the helper starts; no effect once it runs
    return context


def end_with_the_training_process(training_pid: int, worker_id: int) -> None:
    """A dataloader worker's init function (bound to the training process's pid): a daemon thread
    that ends this worker at once (exit code 1) when that process has exited. It waits on a pidfd
    (Linux 5.3+), where there is none it polls the pid every second."""
    del worker_id  # every worker watches the same process
    threading.Thread(target=_exit_after, args=(training_pid,), name="training-process-watch", daemon=True).start()
    atexit.register(_join_queue_feeders)


#: How long a worker's exit waits for its queues' feeder threads (:func:`_join_queue_feeders`):
#: the 5 s the dataloader gives each worker to end (``MP_STATUS_CHECK_INTERVAL``).
FEEDER_JOIN_S = 5.0


def _join_queue_feeders(timeout_s: float = FEEDER_JOIN_S) -> None:
    """At a spawned worker's exit (the only start method whose workers run the interpreter's
    teardown; fork and forkserver end them with ``os._exit``): wait, up to ``timeout_s`` in all,
    for the feeder threads of its multiprocessing queues.

    The dataloader's worker loop closes its result queue without waiting for it
    (``cancel_join_thread``), so its feeder, a daemon thread, may still be pickling the last
    batch, inside torch's C++ code (sharing a storage's file descriptor), when the teardown starts.
    A daemon thread that reacquires the GIL during the teardown exits by unwinding its stack, and
    unwinding through those C++ frames calls ``std::terminate``: the worker dies of SIGABRT
    ("terminate called without an active exception") and the training process's loader fails
    as it closes, at the end of a run. A closed queue's feeder ends once its last item is written."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread":  # multiprocessing.queues.Queue's feeder
            thread.join(max(0.0, deadline - time.monotonic()))


def _exit_after(pid: int) -> None:
    try:
        if hasattr(os, "pidfd_open"):
            handle = os.pidfd_open(pid)
            select.select([handle], [], [])  # readable once the process has exited
        else:
            while True:
                os.kill(pid, 0)
                time.sleep(1.0)
    except ProcessLookupError:  # gone already
        pass
    os._exit(1)  # no one is left to take a batch; skip the interpreter's teardown


@contextmanager
def _worker_signals_blocked() -> Iterator[None]:
    """Block :data:`WORKER_BLOCKED_SIGNALS` in this thread for the block, then put back its mask
    exactly as it was (a signal that arrived meanwhile is delivered then)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_BLOCKED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


#: The start methods whose worker server this process has started (:func:`start_worker_server`).
_servers_started: set[str] = set()


def start_worker_server(method: str, preload: Sequence[str] = ()) -> None:
    """Make ready what workers started by ``method`` need: multiprocessing's resource tracker (not
    for ``fork``) and, for ``forkserver``, the helper, started with :data:`WORKER_BLOCKED_SIGNALS`
    blocked, which imports ``preload`` (:func:`modules_to_preload`). It returns at once, the helper
    importing meanwhile. No-op for what already runs (a helper that runs keeps its first preload).
    This thread's signal mask is the same afterwards."""
    worker_context(method, preload)
    if method == "fork":
        return
    with _worker_signals_blocked():
        resource_tracker.ensure_running()  # unblocks SIGINT / SIGTERM here when it starts the tracker
        signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_BLOCKED_SIGNALS)
        if method == "forkserver":
            forkserver.ensure_running()
    _servers_started.add(method)


def prepare_worker_server(stream: object, method: str) -> None:
    """Start the worker server of ``method`` for workers that will receive ``stream``, unless this
    process has started it already: for ``forkserver`` the helper preloads
    :func:`modules_to_preload` of ``stream``, so the stream is pickled for that once per process,
    not again at every loader or epoch (a running helper keeps its preload anyway)."""
    if method in _servers_started:
        return
    start_worker_server(method, modules_to_preload(stream) if method == "forkserver" else ())


class ClosableLoader(StatefulDataLoader):
    """A StatefulDataLoader over an iterable stream of ready batches, built by ``num_workers``
    processes (in the calling process when 0) that start by ``worker_start`` with
    :data:`WORKER_BLOCKED_SIGNALS` blocked; :meth:`close` ends them at once. The worker server
    (the forkserver helper, with the modules the stream needs) starts with the loader, so that its
    imports overlap with whatever the caller does before the first batch.

    After an error the iterator (and its workers) usually stays alive, held by the traceback, until
    the interpreter exits; then multiprocessing's exit hook SIGTERMs the daemon workers and joins
    them. Workers block SIGTERM (see the module docstring), so they would never end, and the
    process would hang at exit. :meth:`close` shuts them down the dataloader's own way instead (the
    done event and a ``None`` task, which an idle worker obeys), and the process can leave.
    """

    def __init__(self, stream: IterableDataset, *, num_workers: int = 0, worker_start: str = WORKER_START_METHODS[0]) -> None:
        with warnings.catch_warnings():
            # torchdata's constructor calls torch.set_vital, which torch has deprecated (and which
            # records nothing now): a warning per loader that says nothing to the user.
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            super().__init__(
                stream,
                batch_size=None,
                num_workers=num_workers,
                prefetch_factor=2 if num_workers else None,
                persistent_workers=False,
                multiprocessing_context=worker_context(worker_start) if num_workers else None,
                worker_init_fn=functools.partial(end_with_the_training_process, os.getpid()) if num_workers else None,
            )
        self.worker_start = worker_start
        self._live_iterators: weakref.WeakSet = weakref.WeakSet()
        if num_workers:
            prepare_worker_server(stream, worker_start)

    def __iter__(self) -> Iterator[Any]:
        """A new iterator, whose workers start now with :data:`WORKER_BLOCKED_SIGNALS` blocked (the
        loader's workers are not persistent: each iteration makes its own), remembered for
        :meth:`close`."""
        with self._workers_starting():
            iterator = super().__iter__()
        self._live_iterators.add(iterator)
        return iterator

    def state_dict(self) -> dict[str, Any]:
        """The loader's own state (StatefulDataLoader's). Called before the first iteration, it makes
        the iterator that the next :meth:`__iter__` hands out (and :meth:`close` then knows): its
        workers start here, so with the same mask."""
        with self._workers_starting():
            return super().state_dict()

    def close(self) -> None:
        """End the worker processes of every iterator made so far (no-op with 0 workers)."""
        for iterator in list(self._live_iterators):
            shutdown_dataloader_workers(iterator)

    @contextmanager
    def _workers_starting(self) -> Iterator[None]:
        """A block in which workers may start: the forkserver helper runs (it starts it first), and
        this thread blocks :data:`WORKER_BLOCKED_SIGNALS`, so that the workers inherit the mask."""
        if self.num_workers:
            start_worker_server(self.worker_start)  # restarts a helper that died, with its first preload
        with _worker_signals_blocked():
            yield


def build_loader(stream: IterableDataset, *, num_workers: int = 0, worker_start: str = WORKER_START_METHODS[0]) -> ClosableLoader:
    """A :class:`ClosableLoader` over ``stream``: items are built in ``num_workers`` processes (in
    this process when 0) started by ``worker_start``, collected round-robin from the workers.
    ``close()`` ends the workers (call it after an error)."""
    return ClosableLoader(stream, num_workers=num_workers, worker_start=worker_start)
