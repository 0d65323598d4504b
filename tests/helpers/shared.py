"""Expensive test fixtures made once per test session and shared by every pytest-xdist worker.

A session-scoped fixture runs once per worker; a training run that two test files compare
against would run twice under ``make test``'s 2 workers. :func:`shared_folder` makes it once:
the first worker to ask fills the folder (under a file lock in the session's shared temporary
root), and the others wait for it and read it.

:func:`uninterrupted_packed_run` is the reference the resume, preemption and async-checkpoint tests
compare against: 8 steps of the tiny Mllama on 2 gloo ranks, packed, with a checkpoint every 4
steps (checkpoints change nothing in what trains).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file

from tests.helpers.launch import REPO_ROOT, run_world

HARNESS = str(REPO_ROOT / "tests" / "helpers" / "train_harness.py")
TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
MAX_STEPS = 8
# The packed run the resume, preemption and async-checkpoint tests share. Without dataloader
# workers: each rank's worker costs about 3.6 s of CPU to start under forkserver (its imports), and
# the 2-core CI machine runs hundreds of ranks. The tests about signals and restarts add
# WITH_WORKERS where the signal or the kill comes, and still end bitwise at this run's weights.
PACKED_RUN = [
    f"max_steps={MAX_STEPS}", "data.packing=true", "data.synthetic_lengths=long_tail", "data.synthetic_max_text=30",
    "data.num_workers=0", "batch.micro_batch_size=2", "batch.global_batch_size=4", "logging.every_n_steps=0",
    "eval.every_n_steps=0", "checkpoint.resume=auto",
]

WITH_WORKERS = "data.num_workers=1"


def shared_folder(tmp_path_factory: pytest.TempPathFactory, name: str, produce: Callable[[Path], None]) -> Path:
    """``<session root>/shared/<name>``, filled by ``produce(folder)`` once per test session
    whichever worker asks first; a failed ``produce`` leaves nothing, and the next caller retries."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' temporary folders share this parent
    shared = root / "shared"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            produce(folder)
            done.touch()
    return folder


def uninterrupted_packed_run(tmp_path_factory: pytest.TempPathFactory, mllama: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(the harness report, the final trainable weights, the run folder) of :data:`PACKED_RUN` on 2
    ranks, checkpointed every 4 steps."""

    def produce(folder: Path) -> None:
        args = [HARNESS, str(folder / "h"), "--config", TINY_CONFIG, f"model.hf_mllama={mllama}",
                f"output_dir={folder / 'run'}", *PACKED_RUN, "checkpoint.every_n_steps=4"]
        run_world(args, nproc=2, timeout=300)

    folder = shared_folder(tmp_path_factory, "uninterrupted_packed_run", produce)
    report = json.loads((folder / "h" / "report.json").read_text())
    return report, load_file(folder / "h" / "trainable.safetensors"), folder / "run"
