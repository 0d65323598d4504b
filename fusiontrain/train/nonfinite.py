"""Non-finite losses and gradients: skip the step or stop the run, and never checkpoint a NaN.

Every training step the trainer asks :class:`NonFiniteGuard` whether the step may update the
weights (:meth:`NonFiniteGuard.check_step`). The answer comes from values every rank shares (the
step's one all-reduce after backward, in :mod:`fusiontrain.train.step`, carries the loss sum, the
grad norm's square and one "my loss is non-finite" flag per rank), so every rank takes the same
decision and no rank is left waiting in a collective:

- ``loss.nonfinite: skip`` (the default): a step whose global loss or global grad norm is NaN or
  inf leaves the weights and the optimizer state untouched (its gradients are dropped), is
  counted (``nonfinite_skipped`` in ``metrics.jsonl``, ``skipped_step: true`` on its row), and
  otherwise counts as a step of the run: its data is consumed and the LR schedule advances, so the
  step index, the data position and the schedule stay aligned (and a resumed run sees the same).
  ``loss.max_consecutive_nonfinite`` such steps in a row stop the run with :class:`NonFiniteError`.
- ``loss.nonfinite: stop``: the first such step raises :class:`NonFiniteError`.

Messages say which ranks saw it first: the ranks whose own loss was non-finite, or, when every
rank's loss was finite, the ranks holding non-finite gradient shards.

Before a checkpoint is written, :meth:`NonFiniteGuard.check_before_save` checks (all ranks
together) that every trainable parameter and every optimizer-state tensor is finite, and raises
:class:`NonFiniteError` instead of writing; older checkpoints stay as they are.

Step numbers here are the 0-based ``step`` of ``metrics.jsonl``; the checkpoint written after step
``s`` is ``step_{s+1}``.

Testing aid: the environment variable ``FUSIONTRAIN_INJECT_NONFINITE`` (read only by
:func:`injection_from_env`) makes chosen ranks' loss NaN (or inf) at chosen steps, multiplying it
before backward, e.g. ``step=3,rank=1``, ``step=3-5`` (every rank, steps 3 to 5) or
``step=2,rank=0,value=inf``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fusiontrain.parallel import distributed

INJECT_ENV = "FUSIONTRAIN_INJECT_NONFINITE"
MODES = ("skip", "stop")
logger = logging.getLogger("fusiontrain.train.nonfinite")


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient the configuration does not allow to skip, too many of them in
    a row, or a checkpoint that would hold non-finite values."""


# -- fault injection (a test seam) -------------------------------------------------------------------


@dataclass(frozen=True)
class Injection:
    """Make the loss of ``ranks`` (None: every rank) non-finite at steps ``first..last``."""

    first: int
    last: int
    ranks: frozenset[int] | None
    value: float

    def applies(self, step: int, rank: int) -> bool:
        return self.first <= step <= self.last and (self.ranks is None or rank in self.ranks)


def parse_injection(text: str) -> Injection:
    """Parse ``step=N[-M][,rank=R[+R...]][,value=nan|inf]``; raises ValueError naming the problem."""
    usage = f"{INJECT_ENV} must look like 'step=3,rank=1' (optional: step=3-5, rank=0+1, value=nan|inf); got {text!r}"
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in ("step", "rank", "value") or key in fields or not value:
            raise ValueError(usage)
        fields[key] = value.strip()
    if "step" not in fields:
        raise ValueError(usage)
    try:
        first, _, last = fields["step"].partition("-")
        first_step, last_step = int(first), int(last or first)
        ranks = None if "rank" not in fields else frozenset(int(r) for r in fields["rank"].split("+"))
    except ValueError:
        raise ValueError(usage) from None
    value = fields.get("value", "nan")
    if first_step < 0 or last_step < first_step or value not in ("nan", "inf") or (ranks and min(ranks) < 0):
        raise ValueError(usage)
    return Injection(first_step, last_step, ranks, float(value))


def injection_from_env(environ: Mapping[str, str] = os.environ) -> Injection | None:
    """The fault injection ``FUSIONTRAIN_INJECT_NONFINITE`` asks for, or None when it is unset."""
    text = environ.get(INJECT_ENV, "").strip()
    return parse_injection(text) if text else None


# -- the decision ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepReport:
    """What every rank knows about a step after the all-reduce."""

    step: int
    loss: float  # global per-token loss
    grad_norm: float  # global grad norm
    loss_ranks: tuple[int, ...]  # ranks whose own loss was non-finite
    grad_ranks: tuple[int, ...] = ()  # ranks holding non-finite gradient shards (looked up only when no loss was)

    @property
    def finite(self) -> bool:
        return not self.loss_ranks and math.isfinite(self.loss) and math.isfinite(self.grad_norm)

    def describe(self) -> str:
        if self.loss_ranks:
            where = f"non-finite loss first seen on ranks {list(self.loss_ranks)}"
        elif not math.isfinite(self.loss):
            where = "non-finite global loss (every rank's own loss sum was finite)"
        elif self.grad_ranks:
            where = f"non-finite gradients (loss finite on every rank) first seen on ranks {list(self.grad_ranks)}"
        else:
            where = "non-finite grad norm (loss finite on every rank)"
        return f"step {self.step}: {where} (loss={self.loss:.6g}, grad_norm={self.grad_norm:.6g})"


@dataclass(frozen=True)
class Decision:
    skip: bool  # leave the weights and optimizer state as they are
    consecutive: int  # non-finite steps in a row, this one included
    error: str | None = None  # stop the run with this message


def decide(report: StepReport, *, mode: str, max_consecutive: int, consecutive: int) -> Decision:
    """What to do with a step: apply it, skip it, or stop (``error``). ``consecutive`` is the
    number of non-finite steps in a row before this one."""
    if mode not in MODES:
        raise ValueError(f"loss.nonfinite must be one of {MODES}; got {mode!r}")
    if report.finite:
        return Decision(skip=False, consecutive=0)
    consecutive += 1
    if mode == "stop":
        return Decision(True, consecutive, f"{report.describe()}; stopping (loss.nonfinite=stop)")
    if consecutive >= max_consecutive:
        first = report.step - consecutive + 1
        return Decision(
            True,
            consecutive,
            f"{report.describe()}; {consecutive} non-finite steps in a row (steps {first}..{report.step}), "
            f"stopping (loss.max_consecutive_nonfinite={max_consecutive})",
        )
    return Decision(True, consecutive)


def _ranks_flagged(flag: bool, device: torch.device) -> tuple[int, ...]:
    """The ranks whose ``flag`` is true (an all-gather done as one all-reduce; a collective)."""
    rank, world = _rank_world()
    flags = torch.zeros(world, dtype=torch.float32, device=device)
    flags[rank] = float(flag)
    distributed.all_reduce_sum(flags)
    return tuple(r for r in range(world) if flags[r].item() > 0)


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(_local(t)).all()) for t in tensors)


def _fail(message: str) -> None:
    """Log ``message`` with this rank's number, wait until every rank has (all ranks reach this
    point together, right after the collective that decided it), then raise it. So every rank's log
    says why, even though the launcher kills the other ranks as soon as the first one exits."""
    import torch.distributed as dist

    logger.error("rank %d: %s", _rank_world()[0], message)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    raise NonFiniteError(message)


class NonFiniteGuard:
    """Applies ``loss.nonfinite`` / ``loss.max_consecutive_nonfinite`` on every rank (its methods
    are collectives: every rank calls them at the same point) and counts skipped steps."""

    def __init__(self, mode: str, max_consecutive: int, injection: Injection | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"loss.nonfinite must be one of {MODES}; got {mode!r}")
        if max_consecutive < 1:
            raise ValueError(f"loss.max_consecutive_nonfinite must be >= 1; got {max_consecutive}")
        self.mode = mode
        self.max_consecutive = max_consecutive
        self.injection = injection
        self.skipped = 0  # skipped steps in the whole run (resumes included)
        self.consecutive = 0  # non-finite steps in a row up to the last step

    def inject(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """``loss``, made non-finite if the fault injection asks for this step on this rank."""
        if self.injection is not None and self.injection.applies(step, _rank_world()[0]):
            return loss * self.injection.value
        return loss

    def check_step(
        self,
        step: int,
        loss_sum: float,
        targets: int,
        grad_norm: float,
        loss_ranks: tuple[int, ...],
        local_grads: Callable[[], Iterable[torch.Tensor]],
        device: torch.device,
    ) -> bool:
        """Decide on the step from values every rank shares (every rank calls it at the same
        point): the global ``loss_sum`` and ``grad_norm``, and ``loss_ranks``, the ranks whose own
        loss was non-finite. Returns whether to skip the update; raises :class:`NonFiniteError`
        when the run must stop. ``local_grads`` (this rank's gradient shards) is only called when
        the grad norm is non-finite and every loss finite, to say where the bad gradients are (one
        more all-reduce, on that path only).
        """
        grad_ranks: tuple[int, ...] = ()
        if not loss_ranks and not math.isfinite(grad_norm):  # grad_norm is global: every rank is here
            grad_ranks = _ranks_flagged(not _all_finite(local_grads()), device)
        report = StepReport(step, loss_sum / max(targets, 1), grad_norm, loss_ranks, grad_ranks)
        decision = decide(report, mode=self.mode, max_consecutive=self.max_consecutive, consecutive=self.consecutive)
        self.consecutive = decision.consecutive
        if decision.error is not None:
            _fail(decision.error)
        if decision.skip:
            self.skipped += 1
            if _rank_world()[0] == 0:
                logger.warning(
                    "%s; skipping the optimizer step (%d in a row, %d in the run; loss.nonfinite=skip)",
                    report.describe(),
                    self.consecutive,
                    self.skipped,
                )
        return decision.skip

    def check_before_save(
        self,
        checkpoint_step: int,
        trainable: Mapping[str, torch.Tensor],
        optimizer_state: Iterable[torch.Tensor],
        device: torch.device,
    ) -> None:
        """Raise :class:`NonFiniteError` (on every rank) rather than let checkpoint
        ``step_<checkpoint_step>`` hold a non-finite trainable parameter or optimizer-state value."""
        bad = [name for name, tensor in trainable.items() if not _all_finite([tensor])]
        state_bad = not _all_finite(optimizer_state)
        ranks = _ranks_flagged(bool(bad) or state_bad, device)
        if not ranks:
            return
        what = []
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            what.append(f"non-finite trainable parameters here: {shown}")
        if state_bad:
            what.append("non-finite optimizer state here")
        local = "; ".join(what) if what else "this rank's shards are finite"
        _fail(
            f"refusing to write checkpoint step_{checkpoint_step}: non-finite values on ranks {list(ranks)} "
            f"({local}); the earlier checkpoints are kept"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state["skipped"])
        self.consecutive = int(state["consecutive"])
