"""No silent hangs: a rank whose data yields nothing raises, and a collective waits only so long.

- A dataloader worker that builds two epochs' worth of rows without one usable sample (data that
  fails only when built, e.g. every image missing) raises ``NoUsableSampleError`` naming the data
  and the skips per reason, with 0 and 2 workers, packed and padded, instead of feeding padding
  for ever. (Data whose sizes already show no usable sample fails at planning:
  tests/test_row_plan.py.)
- Collectives time out after ``distributed.timeout_s``; the trainer's own collectives then raise
  ``CollectiveError`` naming the rank, the operation and what it was for.
- End to end through ``python -m fusiontrain train`` on 2 gloo ranks: every record bad -> every
  rank exits non-zero, naming the data and the skip counts; with ``data.strict``, a bad record
  dealt to rank 1 -> rank 1 names it, rank 0 fails in its all-reduce naming its rank and the operation; rank 1 stuck
  (its images are a FIFO nobody writes) -> rank 0 times out with that message.

Every test has a hard deadline (pytest-timeout, the launch helpers' timeouts), so a regression
fails instead of hanging.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from fusiontrain.config import ConfigError, load_config
from fusiontrain.data.batch import Sample
from fusiontrain.data.errors import BadSample
from fusiontrain.data.loader import Dealing, NoUsableSampleError, PlannedLoader, PlannedStream, StreamConfig
from fusiontrain.data.row_plan import DataPosition, RowLimits, RowPlan
from fusiontrain.data.sizes import SampleSizes
from fusiontrain.families.fixed_size_image import FixedSizeImage
from fusiontrain.parallel.processes import descendant_pids
from tests.helpers.launch import REPO_ROOT, run_ranks, run_torchrun

SPEC = FixedSizeImage(image_size=4, tokens_per_image=3)
TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
PROBE = str(REPO_ROOT / "tests" / "helpers" / "collective_timeout_probe.py")
NAME = "data.train.path=/data/train.jsonl (data.format=chat)"


# -- the stream ---------------------------------------------------------------------------------


def _sample(key: int, length: int) -> Sample:
    tokens = torch.full((length,), 1000 + key)
    return Sample(tokens, torch.cat([tokens[1:], torch.tensor([-100])]), origin=f"train.jsonl:{key + 1}")


def all_bad(key: int) -> Sample:
    """Every sample's image turns out missing when built (its size looked fine)."""
    raise BadSample("missing_image", f"image nowhere_{key}.png does not exist", origin=f"train.jsonl:{key + 1}")


def _loader(fetch, *, rank: int = 0, world: int = 2, packing: bool = True, num_workers: int = 0) -> PlannedLoader:
    sizes = SampleSizes(torch.tensor([[5, 0, 0, 0]] * 24))
    limits = RowLimits(seq_len=32, max_images=4, max_encoder_tokens=None, packing=packing, open_rows=2)
    plan = RowPlan(sizes, limits, seed=5, name=NAME)
    config = StreamConfig(seq_len=32, micro_batch_size=2, packing=packing)
    dealing = Dealing(4, rank, world, 2)
    return PlannedLoader(lambda start: PlannedStream(plan, fetch, SPEC, config, dealing, start), num_workers=num_workers, identity={})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_rows_that_never_hold_a_usable_sample_raise_naming_the_data_and_skips(num_workers: int, packing: bool) -> None:
    loader = _loader(all_bad, rank=1, packing=packing, num_workers=num_workers)
    started = time.monotonic()
    with pytest.raises(NoUsableSampleError) as caught:
        for _ in itertools.islice(loader, 200):
            pass
    loader.close()
    message = str(caught.value)  # with workers: re-raised in this process by the dataloader
    assert time.monotonic() - started < 30
    assert f"rank 1 of 2, dataloader worker 0 of {max(num_workers, 1)}" in message  # worker 0 is asked first
    assert NAME in message and "(two epochs' worth) held no usable sample (missing_image: " in message


@pytest.mark.timeout(60)
def test_one_good_sample_per_epoch_keeps_yielding() -> None:
    """One usable sample per epoch is progress, never an error (three epochs on one rank)."""
    good = 17

    def fetch(key: int) -> Sample:
        if key != good:
            raise BadSample("empty_text", "blank caption", origin=f"train.jsonl:{key + 1}")
        return _sample(key, 5)

    batches = list(itertools.islice(_loader(fetch, world=1, packing=False), 3 * 24 // 2))
    assert sum(int(batch.is_real.any()) for batch in batches) == 3
    assert sum(batch.skipped["empty_text"] for batch in batches if batch.skipped) == 3 * 23


# -- config -------------------------------------------------------------------------------------


def test_timeout_key_is_read_and_checked(tiny_mllama_dir) -> None:
    model = f"model.hf_mllama={tiny_mllama_dir}"
    assert load_config(TINY_CONFIG, [model]).distributed.timeout_s == 1800.0
    assert load_config(TINY_CONFIG, [model, "distributed.timeout_s=20"]).distributed.timeout_s == 20.0
    with pytest.raises(ConfigError, match="distributed.timeout_s"):
        load_config(TINY_CONFIG, [model, "distributed.timeout_s=0"])


# -- collectives ----------------------------------------------------------------------------------


def test_a_collective_with_a_stuck_peer_times_out_naming_rank_and_operation() -> None:
    started = time.monotonic()
    result = run_torchrun([PROBE, "3"], nproc=2, timeout=120, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stdout[-3000:]
    assert "CollectiveError: rank 0: timed out after 3 s in all_reduce (the probe's value)" in result.stdout, result.stdout[-3000:]
    assert "another rank is stuck or died; see its log" in result.stdout
    assert re.search(r"rank 0: all_reduce returned or failed after [34]\.\d s", result.stdout), result.stdout[-3000:]
    assert elapsed < 90


# -- end to end ---------------------------------------------------------------------------------

NUM_RECORDS = 16


def _records(tmp_path: Path, bad_keys: set[int], *, stuck_image: Path | None = None, missing_only: bool = False) -> Path:
    """Caption records; bad ones alternate a missing image and a text too long for rows of 64
    tokens (all a missing image with ``missing_only``), or point at ``stuck_image`` when given."""
    images = tmp_path / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (40, 30), (220, 30, 30)).save(images / "red.png")
    lines = []
    for key in range(NUM_RECORDS):
        if key not in bad_keys:
            record = {"image": "images/red.png", "text": "a red square"}
        elif stuck_image is not None:
            record = {"image": str(stuck_image), "text": "a red square"}
        elif key % 2 or missing_only:
            record = {"image": f"images/nowhere_{key}.png", "text": "a red square"}
        else:
            record = {"image": "images/red.png", "text": "x" * 300}
        lines.append(json.dumps(record))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _dealt(rank: int, steps: int) -> list[int]:
    """The records dealt to ``rank`` of 2 in the first ``steps`` steps of an unpacked run of
    ``_train_args`` (tiny.yaml's seed 0; every record fits a row, so the plan is the shuffle)."""
    sizes = SampleSizes(torch.tensor([[8, 1, 1, 0]] * NUM_RECORDS))
    plan = RowPlan(sizes, RowLimits(64, 4, None, packing=False, open_rows=8), seed=0)
    dealing, position, keys = Dealing(4, rank, 2, 2), DataPosition(), []
    for _ in range(steps):
        rows, position = plan.take(position, 4)
        keys += [key for row in dealing.micro_batch(rows, 0) for key in row.ids]
    return keys


def _train_args(tmp_path: Path, data: Path, mllama_dir: Path, *overrides: str) -> list[str]:
    return [
        "-m", "fusiontrain", "train", "--config", TINY_CONFIG, f"model.hf_mllama={mllama_dir}",
        f"output_dir={tmp_path / 'run'}", "data.format=caption", f"data.train.path={data}", "batch.seq_len=64",
        "batch.global_batch_size=4", "max_steps=3", "eval.every_n_steps=0", "logging.every_n_steps=0", *overrides,
    ]


def test_all_records_bad_every_rank_ends_with_a_clear_error_in_bounded_time(tmp_path, tiny_mllama_dir) -> None:
    """Half the records are too long (dropped by the planner), half have a missing image (found
    when built): every rank's rows hold nothing, and every rank raises at the same step."""
    data = _records(tmp_path, set(range(NUM_RECORDS)))
    started = time.monotonic()
    results = run_ranks(
        _train_args(tmp_path, data, tiny_mllama_dir, "distributed.timeout_s=20"), nproc=2, timeout=180, check=False
    )
    elapsed = time.monotonic() - started
    for rank, result in enumerate(results):
        out = result.stdout[-6000:]
        assert result.returncode != 0, out
        assert "NoUsableSampleError" in out, out
        assert f"rank {rank} of 2, dataloader worker 0 of 1: the last" in out, out
        assert f"from data.train.path={data} (data.format=caption) (two epochs' worth) held no usable sample (missing_image: " in out, out
    assert elapsed < 150


def test_only_rank_1_fails_and_rank_0_fails_in_its_all_reduce(tmp_path, tiny_mllama_dir) -> None:
    """With data.strict, the records dealt to rank 1 at step 0 have missing images (found only
    when built): rank 1 raises naming the file and line and leaves the process group; rank 0,
    waiting for it in its first all-reduce, fails at once (gloo sees the closed connection) with
    the rank and the operation, instead of waiting out the timeout or, without one, for ever."""
    bad = set(_dealt(1, 1))
    assert not bad & set(_dealt(0, 1))
    data = _records(tmp_path / "odd", bad, missing_only=True)
    started = time.monotonic()
    results = run_ranks(
        _train_args(tmp_path, data, tiny_mllama_dir, "distributed.timeout_s=60", "data.packing=false", "data.strict=true"),
        nproc=2, timeout=180, check=False,
    )
    elapsed = time.monotonic() - started
    out0, out1 = results[0].stdout[-6000:], results[1].stdout[-6000:]
    assert results[1].returncode != 0 and results[0].returncode != 0, out0 + out1
    assert re.search(rf"BadSample: {re.escape(str(data))}:\d+: image file .*nowhere_\d+.png does not exist", out1), out1
    assert "BadSample" not in out0, out0
    assert "CollectiveError: rank 0: all_reduce (token, skip and FLOP counts of step 0) failed after" in out0, out0
    assert "another rank is stuck or died; see its log" in out0
    assert elapsed < 150  # well under rank 0's 60 s timeout on top of the run itself


def _unblock_the_fifo_once_a_rank_has_exited(fifo: Path, done: threading.Event) -> None:
    """Wait until one of this test's two training ranks has exited (rank 0, timed out: rank 1 cannot
    leave its blocked read), then keep giving the FIFO a writer until ``done``, so that rank 1's
    reads return (each an empty image, a counted skip) and it fails fast on its dead peer. Without this, torchrun waits its
    fixed 30 s before it SIGKILLs rank 1, which ignores SIGTERM while it is stuck (preemption
    signals only set a flag: train/preemption.py). That wait is torchrun's, not what this test
    proves."""
    seen_both = False
    while not done.wait(0.2):
        ranks = [pid for pid in descendant_pids(os.getpid()) if _is_training_rank(pid)]
        seen_both = seen_both or len(ranks) == 2
        if seen_both and len(ranks) < 2:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader now
                pass


def _is_training_rank(pid: int) -> bool:
    try:
        args = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"fusiontrain" in args and b"torch.distributed.run" not in args


def test_a_stuck_rank_makes_the_other_time_out_naming_rank_and_operation(tmp_path, tiny_mllama_dir) -> None:
    """Rank 1's images are a FIFO nobody writes: reading one blocks for ever (like a hung network
    file system). Rank 0 ends after distributed.timeout_s with the clear message. (Then the test
    unblocks rank 1, which ends on its dead peer, rather than wait for torchrun's SIGKILL.)"""
    fifo = tmp_path / "stuck.png"
    os.mkfifo(fifo)
    data = _records(tmp_path, set(_dealt(1, 1)), stuck_image=fifo)
    done = threading.Event()
    unblocker = threading.Thread(target=_unblock_the_fifo_once_a_rank_has_exited, args=(fifo, done), daemon=True)
    unblocker.start()
    started = time.monotonic()
    try:
        result = run_torchrun(
            _train_args(tmp_path, data, tiny_mllama_dir, "distributed.timeout_s=8", "data.packing=false", "data.num_workers=0"),
            nproc=2, timeout=200, check=False,
        )
    finally:
        done.set()
        unblocker.join()
        try:  # unblock a reader left behind, if any
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    elapsed = time.monotonic() - started
    out = result.stdout[-8000:]
    assert result.returncode != 0, out
    assert "CollectiveError: rank 0: timed out after 8 s in all_reduce (token, skip and FLOP counts of step 0)" in out, out
    assert "another rank is stuck or died; see its log" in out
    assert elapsed < 170, elapsed
    print(f"stuck-rank run took {elapsed:.0f} s", file=sys.stderr)


@pytest.mark.timeout(60)
def test_close_ends_the_workers_of_a_loader_that_raised() -> None:
    """After an error the iterator stays alive (the traceback holds it); close() must end its
    workers the dataloader's own way, even with SIGTERM blocked in them (as preemption does), or
    the process hangs at exit."""
    import signal

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        loader = _loader(all_bad, rank=1, num_workers=2)
        iterator = iter(loader)
        next(iterator)  # the workers fork now, inheriting the blocked SIGTERM
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    with pytest.raises(NoUsableSampleError):
        for _ in itertools.islice(iterator, 200):
            pass
    (inner,) = list(loader._loaders)
    workers = [w for it in list(inner._live_iterators) for w in it._workers]
    assert workers and any(w.is_alive() for w in workers)
    started = time.monotonic()
    loader.close()
    assert not any(w.is_alive() for w in workers)
    assert time.monotonic() - started < 10
