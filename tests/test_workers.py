"""How dataloader workers start (fusiontrain/data/workers.py): under the configured context, from
a helper that runs no thread of the training process, and with the preemption signals blocked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from fusiontrain.config import DataConfig
from fusiontrain.data.workers import WORKER_BLOCKED_SIGNALS, WORKER_START_METHODS, modules_to_preload, worker_context
from fusiontrain.train.preemption import PREEMPTION_SIGNALS
from tests.helpers.launch import process_alive

ROOT = Path(__file__).resolve().parents[1]


def test_workers_block_exactly_the_preemption_signals() -> None:
    assert set(WORKER_BLOCKED_SIGNALS) == set(PREEMPTION_SIGNALS)


def test_the_config_offers_exactly_the_start_methods_the_loader_knows() -> None:
    hints = typing.get_type_hints(DataConfig)
    assert typing.get_args(hints["worker_start"]) == WORKER_START_METHODS
    assert DataConfig().worker_start == WORKER_START_METHODS[0] == "forkserver"


def test_an_unknown_start_method_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="data.worker_start must be one of"):
        worker_context("threads")


def test_a_loader_is_built_without_warnings() -> None:
    """torchdata's loader calls torch's deprecated (no-op) ``set_vital`` in its constructor; the
    trainer's loader keeps that warning out of every run's output, and only that one."""
    import warnings

    from torchdata.stateful_dataloader import StatefulDataLoader

    from fusiontrain.data.workers import ClosableLoader

    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        StatefulDataLoader(range(4), batch_size=None)
    assert any("set_vital" in str(w.message) for w in plain)  # what the filter is for, still raised
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        ClosableLoader(range(4)).close()
        warnings.warn("after the loader", UserWarning)  # the filter ends with the constructor
    assert [str(w.message) for w in ours] == ["after the loader"]


def test_the_helper_preloads_the_modules_that_the_stream_pickle_names() -> None:
    """What a worker would import to unpickle its stream, and no more: a synthetic stream names no
    tokenizer, image-processor or datasets module; one that holds a tokenizer and tensors names
    the tokenizer's class's module and torch's rebuild function."""
    import numpy as np
    import torch

    from fusiontrain import tiny
    from fusiontrain.data.synthetic import SyntheticImageText
    from tests.helpers.worker_probe import WhereBuilt

    synthetic = modules_to_preload(WhereBuilt())
    assert "tests.helpers.worker_probe" in synthetic
    assert not [m for m in synthetic if m.split(".")[0] in ("transformers", "datasets", "tokenizers")], synthetic

    tokenizer = tiny.build_tiny_tokenizer()
    real = modules_to_preload({"tokenizer": tokenizer, "table": torch.zeros(3), "sizes": np.zeros(2), "source": SyntheticImageText})
    assert type(tokenizer).__module__ in real
    assert {"torch._utils", "fusiontrain.data.synthetic"} <= set(real)
    assert any(m.startswith("numpy") for m in real)
    assert "__main__" not in real and "builtins" not in real


@pytest.fixture(scope="module")
def probe() -> dict:
    """One fresh interpreter that starts a loader under each method (tests/helpers/worker_start_probe.py)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.worker_start_probe", *WORKER_START_METHODS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", WORKER_START_METHODS)
def test_workers_start_by_the_configured_method_with_the_preemption_signals_blocked(probe: dict, method: str) -> None:
    """A worker of ``fork`` is the training process's child; one of ``forkserver`` is the child of
    the helper (itself the training process's child), so it copies none of the training
    process's threads or locks; one of ``spawn`` is a fresh interpreter, the training process's
    child. In every case the worker blocks SIGTERM and SIGUSR1, although the training process
    had unblocked them before the loader started: a worker never dies of a preemption signal
    meant for the trainer (train/preemption.py). Under ``forkserver`` this fails if the resource
    tracker's start unblocks SIGTERM before the helper starts (the CPython trap in workers.py)."""
    items = probe["items"][method]
    assert len(items) == 2 and len({item["pid"] for item in items}) == 1
    worker = items[0]
    assert worker["pid"] != probe["rank_pid"]
    if method == "forkserver":
        assert worker["parent"] != probe["rank_pid"]
        # The helper imported what this stream's pickle names (data/workers.py: modules_to_preload),
        # not the tokenizer, image-processor and datasets modules that real-data streams need.
        assert worker["unneeded_imports"] == []
    else:
        assert worker["parent"] == probe["rank_pid"]
    assert worker["sigterm_blocked"] and worker["sigusr1_blocked"]
    assert probe["training_process_blocks"] == []  # the training process's own mask is left as it was


@pytest.mark.parametrize("method", WORKER_START_METHODS)
def test_workers_end_when_the_training_process_is_killed(method: str) -> None:
    """SIGKILL the training process (as the OOM killer or a torchrun restart does): its worker ends
    within seconds, and under ``forkserver`` the helper too. Before the worker watched the
    training process, a ``forkserver`` worker and its helper lived on for good (PyTorch's check
    looks at the worker's parent, the helper, which every worker keeps alive)."""
    probe = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.killed_trainer_probe", method],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = probe.stdout.readline()
        assert line, "the probe printed nothing"
        pids = json.loads(line)
    finally:
        probe.kill()
        probe.wait()
    watched = [pids["worker"]] + ([pids["parent"]] if method == "forkserver" else [])
    deadline = time.monotonic() + 30
    while any(process_alive(pid) for pid in watched) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in watched if process_alive(pid)]
    for pid in left:  # leave nothing behind, then fail
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{method}: still running 30 s after the training process was killed: {left}"


def test_a_spawned_worker_ends_cleanly_while_its_last_item_is_still_being_sent() -> None:
    """A spawned worker (the one start method whose workers run the interpreter's teardown) may
    return while its queue's feeder thread is still pickling its last batch inside torch's C++
    code: without the loader's worker init, that feeder aborts the whole worker during the
    teardown (SIGABRT, "terminate called without an active exception"), which failed 1 in 5
    ``data.worker_start=spawn`` loaders as they closed (benchmarks/dataloader_start.py); with it,
    the worker waits for its feeders first and exits with 0."""
    probe = subprocess.run(
        [sys.executable, "-m", "tests.helpers.feeder_teardown_probe"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    codes = json.loads(probe.stdout.strip().splitlines()[-1])
    assert codes["with_init"] == 0, probe.stderr[-2000:]
    if sys.version_info < (3, 14):  # 3.14's teardown parks such threads instead of unwinding them
        assert codes["without"] == -signal.SIGABRT, "the probe no longer reproduces the abort"


def test_a_run_with_workers_outside_a_launcher_leaves_no_semaphore_behind(tmp_path: Path, tiny_mllama_dir: Path) -> None:
    """``train`` in a world of one with dataloader workers ends without the interpreter's teardown
    (``distributed.exit_promptly``): closing the loader frees its queues and events first, so
    multiprocessing's resource tracker finds no leaked semaphore to warn of (a fresh interpreter,
    with a resource tracker of its own)."""
    from tests.helpers.launch import run_commands

    (result,) = run_commands([[
        sys.executable, "-m", "fusiontrain", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
        f"model.hf_mllama={tiny_mllama_dir}", f"output_dir={tmp_path}", "max_steps=2", "data.num_workers=2",
        "eval.every_n_steps=0", "checkpoint.every_n_steps=0",
    ]])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # it trained
    assert "leaked semaphore" not in result.stdout, result.stdout[-2000:]
