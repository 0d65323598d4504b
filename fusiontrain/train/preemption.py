"""Preemption: stop at a step boundary, checkpoint, and exit with :data:`PREEMPTED_EXIT_CODE`.

SLURM and Kubernetes announce a preemption or the end of a time slot with SIGTERM (or the signal
that ``sbatch --signal=SIG@N`` names, usually SIGUSR1) and kill the job a little later. Every
rank installs :class:`PreemptionWatcher`: the handler only records the signal. Each step's
update all-reduces every rank's "signal that arrived here" (:meth:`PreemptionWatcher.local_signal`)
together with the loss and the grad norm (:mod:`fusiontrain.train.step`: one all-reduce after
backward), and the trainer reads the verdict from them (:meth:`PreemptionWatcher.verdict`), so a
signal that reached only some ranks stops all of them at the same step; they then write a checkpoint of that step together and leave with
:data:`PREEMPTED_EXIT_CODE`.

Dataloader workers must not die of the signal: torchrun delivers SIGTERM to each worker's whole
process group (``os.killpg``) and SLURM signals every process of a step, so they get it too, and
torch's dataloader installs a handler in them that dies on SIGTERM; the main process then fails
with "DataLoader worker ... is killed by signal: Terminated" (seen with torch 2.13). So every
worker is born with the signals blocked, however and whenever it starts
(:data:`fusiontrain.data.workers.WORKER_BLOCKED_SIGNALS`, the same signals, checked by
``tests/test_workers.py``). :meth:`PreemptionWatcher.install` blocks them in the training process
too, until :meth:`start`: a signal that arrives while the model is built is handled once the run
starts.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from types import FrameType


#: Exit code of a run that stopped because of a preemption signal, after writing its checkpoint:
#: ``EX_TEMPFAIL`` of ``sysexits.h`` ("temporary failure; the user is invited to retry"). It is
#: not 143 / 138 (128 + SIGTERM / SIGUSR1, what a shell reports for a process the signal
#: killed), so a job script can tell "checkpointed, requeue me" from "killed, nothing saved".
PREEMPTED_EXIT_CODE = 75

#: Signals that request a checkpoint-and-exit.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

#: Environment variable naming a file that rank 0 writes once a preemption checkpoint is complete
#: (JSON: step, signal, checkpoint). A job script sets it: torchrun reports a worker's exit code 75
#: as 1, so the file, not the exit code, tells the script that the run stopped to be requeued
#: (``launch/slurm.sbatch``).
MARKER_ENV = "FUSIONTRAIN_PREEMPTED_MARKER"


def write_preemption_marker(step: int, signal_name: str, checkpoint: Path) -> Path | None:
    """Write the file :data:`MARKER_ENV` names, when it is set (on rank 0, after the preemption
    checkpoint of ``step`` is complete); returns its path."""
    where = os.environ.get(MARKER_ENV)
    if not where:
        return None
    path = Path(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"step": step, "signal": signal_name, "checkpoint": str(checkpoint)}))
    partial.replace(path)
    return path


class Preempted(Exception):
    """Raised by :meth:`fusiontrain.train.trainer.Trainer.run` after the preemption checkpoint is
    written (on every rank, at the same step)."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"preempted by {signal_name}: checkpoint of step {step} written")
        self.step = step
        self.signal_name = signal_name


class PreemptionWatcher:
    """Records SIGTERM / SIGUSR1 on this rank; :meth:`verdict` tells, from every rank's
    :meth:`local_signal` (all-reduced by the training step), whether any rank got one.

    Only the main thread may install signal handlers; elsewhere (a trainer in a thread) the watcher
    stays inert and says so in :attr:`installed`.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self.installed = False
        self._blocked_before: set[signal.Signals] = set()
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> "PreemptionWatcher":
        """Handle the signals in this process, and block them until :meth:`start`."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._blocked_before = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        self.installed = True
        return self

    def start(self) -> None:
        """Unblock the signals in this process (when the run starts); one that arrived since
        :meth:`install` is handled now."""
        if self.installed:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    def uninstall(self) -> None:
        """Put back the handlers that were there before :meth:`install`, and the signals
        unblocked (a pending one reaches this watcher first, not the old handler)."""
        if not self.installed:
            return
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [s for s in self.signals if s not in self._blocked_before])
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
        self.installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def local_signal(self) -> int:
        """The number of the signal this rank received, 0 when none: what this rank contributes to
        the step's all-reduce."""
        return int(self.received) if self.received is not None else 0

    def verdict(self, signals: Sequence[int]) -> str | None:
        """From every rank's :meth:`local_signal` (the same on every rank once all-reduced): the
        name of the signal when any rank received one, else None. A rank that got none reports
        ``"<SIGNAL> on another rank"``."""
        received = [value for value in signals if value]
        if not received:
            return None
        if self.received is not None:
            return self.received.name
        return f"{signal.Signals(max(received)).name} on another rank"
