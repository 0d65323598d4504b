"""Per-step metrics, on rank 0 only: ``metrics.jsonl``, the console, and Weights & Biases.

Every step's metrics go to ``output_dir/metrics.jsonl`` whatever else is configured. On the
console, rank 0 shows a tqdm progress bar (step, loss, tokens/s, ETA) when its stream is a
terminal, and otherwise a plain line every ``console_every`` steps. With wandb enabled, rank 0
also records each step's metrics, the resolved config and a little system information in a wandb
run that a resumed training run continues (same ``run_id``). Other ranks write and print nothing.

wandb is imported only on rank 0 and only when its mode is not ``disabled``, so light commands stay
fast. The mode comes from the config, but ``WANDB_MODE`` in the environment wins; likewise
``WANDB_PROJECT``, ``WANDB_NAME`` and ``WANDB_DIR`` win over the project, name and directory given
here, and every other ``WANDB_*`` variable (entity, group, API key, ...) is left to wandb. Nothing
here prints or records environment variables or credentials.
"""

from __future__ import annotations

import json
import math
import os
import platform
import secrets
import string
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

import fusiontrain

if TYPE_CHECKING:  # imported lazily at run time
    import tqdm
    import wandb.sdk.wandb_run

WANDB_MODES = ("online", "offline", "disabled")


def host_rss_bytes() -> int:
    """This process's resident set size now (Linux ``VmRSS``)."""
    return _proc_status_bytes("VmRSS")


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status (memory metrics need Linux)")


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring the peak afresh (after building and loading the model): the CUDA
    allocator's peak, or on CPU the RSS high-water mark (Linux ``/proc/self/clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device, host_baseline: int = 0) -> int:
    """Peak memory since :func:`reset_peak_memory`: the CUDA allocator's peak on a GPU (tensor
    bytes, what ``python -m fusiontrain plan`` predicts); on a CPU the RSS high-water mark minus
    ``host_baseline`` (pass the RSS from before the model holds memory, leaving out the Python
    and torch runtime and the model's code)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM") - host_baseline


def new_run_id() -> str:
    """A fresh wandb-style run id: 8 random base-36 characters (what wandb itself generates)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def resolve_wandb_mode(configured: str) -> str:
    """The wandb mode to use: ``WANDB_MODE`` from the environment if set, else ``configured``."""
    return os.environ.get("WANDB_MODE") or configured


def system_info(device: torch.device | None = None, world_size: int | None = None) -> dict[str, Any]:
    """What ran this: torch and fusiontrain versions, accelerator, world size, host."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if world_size is None:
        world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {
        "fusiontrain_version": fusiontrain.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world_size,
        "hostname": platform.node(),
    }


def wandb_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` as wandb records them: the ``skipped`` dict (counts per reason) becomes
    ``skipped/<reason>`` plus ``skipped/total``; every other value is kept as it is."""
    flat = {key: value for key, value in metrics.items() if key != "skipped"}
    if "skipped" in metrics:
        skipped = metrics["skipped"] or {}
        flat.update({f"skipped/{reason}": count for reason, count in skipped.items()})
        flat["skipped/total"] = sum(skipped.values())
    return flat


def strict_json_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as strict JSON takes it (RFC 8259 has no NaN or Infinity): a non-finite number
    becomes ``null``, and ``nonfinite`` maps its key to what it was (``"nan"``, ``"inf"``,
    ``"-inf"``). Nested mappings (``skipped``) keep their finite integers."""
    out: dict[str, Any] = {}
    nonfinite: dict[str, str] = {}
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
            nonfinite[key] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        else:
            out[key] = value
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


class MetricsLogger:
    """Records every step's metrics on rank 0: ``metrics.jsonl``, the console, and wandb.

    Args:
        output_dir: run folder; ``metrics.jsonl`` goes there, and wandb's files into
            ``output_dir/wandb`` (unless ``WANDB_DIR`` is set).
        is_main: whether this is rank 0. Other ranks record nothing.
        console_every: without a progress bar, print a line every N steps (0 = never).
        stream: where the console lines or the progress bar go (default: ``sys.stdout``).
        config: the resolved training config as a plain dict, recorded as the wandb run's config.
        wandb_mode: ``online``, ``offline`` or ``disabled`` (the config's ``logging.wandb.mode``);
            ``WANDB_MODE`` in the environment wins.
        wandb_project: the wandb project; ``WANDB_PROJECT`` in the environment wins.
        run_name: the wandb run's display name (default: the name of ``output_dir``);
            ``WANDB_NAME`` in the environment wins.
        run_id: id of the wandb run to continue (from a checkpoint), or None for a new run.
        max_steps: steps of the whole run: the progress bar's total (None: no ETA).
        start_step: steps already done (a resumed run): where the progress bar starts.
        world_size: ranks in the job, for the system info (default: from torch.distributed).
        device: this rank's device, for the system info (default: the current CUDA device, or CPU).
        progress: show a progress bar: None decides by whether ``stream`` is a terminal, True
            always, False never.

    Attributes:
        run_id: on rank 0, the id of the wandb run (what wandb returned), or a fresh id when wandb
            is disabled, so that it can always be stored in checkpoints; elsewhere ``run_id`` as
            given.
        system: the system info recorded in the wandb config under ``system`` (rank 0).
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        is_main: bool,
        console_every: int = 1,
        stream: TextIO | None = None,
        config: dict[str, Any] | None = None,
        wandb_mode: str = "disabled",
        wandb_project: str = "fusiontrain",
        run_name: str | None = None,
        run_id: str | None = None,
        max_steps: int | None = None,
        start_step: int = 0,
        world_size: int | None = None,
        device: torch.device | None = None,
        progress: bool | None = None,
    ) -> None:
        self.is_main = is_main
        self.console_every = console_every
        self.stream = stream if stream is not None else sys.stdout
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "metrics.jsonl"
        self.run_id = run_id
        self.system: dict[str, Any] = {}
        self.wandb_run: wandb.sdk.wandb_run.Run | None = None
        self._file: TextIO | None = None
        self._bar: tqdm.tqdm | None = None
        if not is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.system = system_info(device, world_size)
        if self.run_id is None:
            self.run_id = new_run_id()
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            self.wandb_run = self._start_wandb(mode, wandb_project, run_name, config or {})
            self.run_id = self.wandb_run.id
        self._file = self.path.open("a")
        if progress is None:
            progress = _is_terminal(self.stream)
        if progress:
            self._bar = self._start_bar(max_steps, start_step)

    def _start_wandb(
        self, mode: str, project: str, name: str | None, config: dict[str, Any]
    ) -> wandb.sdk.wandb_run.Run:
        """Start (or continue, by ``self.run_id``) the wandb run. ``WANDB_PROJECT``,
        ``WANDB_NAME`` and ``WANDB_DIR`` from the environment win over the arguments."""
        try:
            import wandb
        except ImportError:
            raise ImportError(
                f"wandb mode {mode!r} needs the wandb package: pip install wandb, or set "
                "logging.wandb.mode=disabled (metrics.jsonl is written either way)"
            ) from None

        env = os.environ
        return wandb.init(
            project=env.get("WANDB_PROJECT") or project,
            name=env.get("WANDB_NAME") or name or self.output_dir.resolve().name,
            id=self.run_id,
            resume="allow",
            mode=mode,
            dir=env.get("WANDB_DIR") or str(self.output_dir),
            config={**config, "system": self.system},
        )

    def _start_bar(self, max_steps: int | None, start_step: int) -> tqdm.tqdm:
        from tqdm import tqdm

        return tqdm(
            total=max_steps,
            initial=start_step,
            desc="train",
            unit="step",
            file=self.stream,
            dynamic_ncols=True,
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` of ``step`` (the 0-based index of the optimizer step just done)."""
        if not self.is_main:
            return
        row = {"step": step, **metrics}
        self._file.write(json.dumps(strict_json_row(row), allow_nan=False) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(wandb_metrics(metrics), step=step)
        if self._bar is not None:
            self._update_bar(step, metrics)
        elif self.console_every and step % self.console_every == 0:
            shown = " ".join(f"{key}={_fmt(value)}" for key, value in row.items())
            print(shown, file=self.stream, flush=True)

    def _update_bar(self, step: int, metrics: dict[str, Any]) -> None:
        """Move the bar to ``step + 1`` steps done; show loss and tokens/s (tqdm adds the ETA)."""
        postfix = {}
        if "loss" in metrics:
            postfix["loss"] = f"{metrics['loss']:.4f}"
        if "tokens_per_s" in metrics:
            postfix["tok/s"] = f"{metrics['tokens_per_s']:,.0f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step + 1 - self._bar.n)
        if "eval_loss" in metrics:  # rare, and worth keeping in the scrollback
            self._bar.write(f"step {step} eval_loss={_fmt(metrics['eval_loss'])}", file=self.stream)

    def close(self, exit_code: int = 0) -> None:
        """Close the bar, finish the wandb run (``exit_code`` != 0 marks it failed) and close
        ``metrics.jsonl``. Safe to call more than once.

        Finishing also shuts wandb's service process down (``wandb.teardown``): only then is
        everything on disk (``run.finish()`` alone can return before an offline run's datastore is
        written) and uploaded, even if the process then ends without running ``atexit`` hooks.
        """
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None
            wandb.teardown(exit_code)
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        self.close(exit_code=0 if kind is None else 1)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
