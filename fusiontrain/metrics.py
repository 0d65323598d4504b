"""Per-step metrics: ``metrics.jsonl`` (every step) and a console line every N steps, rank 0 only."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any, TextIO

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: CUDA allocator peak on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsLogger:
    """Appends one JSON object per step to ``output_dir/metrics.jsonl`` and prints a console
    line every ``console_every`` steps. Silent on ranks other than 0.

    Args:
        output_dir: run folder.
        is_main: whether this is rank 0.
        console_every: print every N steps (0 = never).
        stream: where console lines go.
    """

    def __init__(self, output_dir: str | Path, *, is_main: bool, console_every: int = 1, stream: TextIO = sys.stdout) -> None:
        self.is_main = is_main
        self.console_every = console_every
        self.stream = stream
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = self.path.open("a") if is_main else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` of ``step``."""
        if not self.is_main:
            return
        row = {"step": step, **metrics}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.console_every and step % self.console_every == 0:
            shown = " ".join(f"{key}={_fmt(value)}" for key, value in row.items())
            print(shown, file=self.stream, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
