"""No silent hangs: a rank whose data yields nothing raises, and a collective waits only so long.

- A stream (or a dataloader worker's part of it) that reads a whole epoch of its share without one
  usable sample raises ``NoUsableSampleError`` naming the data and the skips per reason, with 0
  and 2 workers, packed and padded; before, it looped for ever without yielding or raising.
- Collectives time out after ``distributed.timeout_s``; the trainer's own collectives then raise
  ``CollectiveError`` naming the rank, the operation and what it was for.
- End to end through ``python -m fusiontrain train`` on 2 gloo ranks: every record bad -> every
  rank exits non-zero, naming the data and the skip counts; only rank 1's share bad -> rank 1
  names its data, rank 0 fails in its all-reduce naming its rank and the operation; rank 1 stuck
  (its images are a FIFO nobody writes) -> rank 0 times out with that message.

Every test has a hard deadline (pytest-timeout, the launch helpers' timeouts), so a regression
fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from fusiontrain.config import ConfigError, load_config
from fusiontrain.data.batch import Sample
from fusiontrain.data.errors import BadSample
from fusiontrain.data.loader import NoUsableSampleError, SampleStream, StreamConfig, build_loader
from fusiontrain.families.encoder import FixedSizeImage
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
    """Odd keys: a missing image; even keys: 40 tokens (too long for rows of 32)."""
    if key % 2:
        raise BadSample("missing_image", f"image nowhere_{key}.png does not exist", origin=f"train.jsonl:{key + 1}")
    return _sample(key, 40)


def _stream(fetch, num_samples: int = 24, rank: int = 0, world: int = 2, **overrides) -> SampleStream:
    config = StreamConfig(**{"seq_len": 32, "micro_batch_size": 2, "packing": True, **overrides})
    return SampleStream(num_samples, fetch, SPEC, config, rank=rank, world=world, seed=5, name=NAME)


def _expected_counts(stream: SampleStream, worker: int = 0, num_workers: int = 1) -> str:
    keys = stream.shard(0, worker, num_workers)
    missing, too_long = sum(k % 2 for k in keys), sum(1 - k % 2 for k in keys)
    return f"all {len(keys)} samples of epoch 0 were skipped (missing_image: {missing}, too_long: {too_long})"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stream_with_no_usable_sample_raises_naming_the_data_and_skips(num_workers: int, packing: bool) -> None:
    stream = _stream(all_bad, rank=1, packing=packing)
    loader = build_loader(stream, num_workers=num_workers)
    started = time.monotonic()
    with pytest.raises(NoUsableSampleError) as caught:
        next(iter(loader))
    loader.close()
    message = str(caught.value)  # with workers: re-raised in this process by the dataloader
    assert time.monotonic() - started < 30
    where = "rank 1 of 2" + (", dataloader worker 0 of 2" if num_workers else "")
    assert where in message
    assert NAME in message
    # the worker that raised first is worker 0 (the dataloader asks the workers in turn)
    assert _expected_counts(stream, 0, max(num_workers, 1)) in message
    assert "batch.seq_len" in message  # the fix for too_long


@pytest.mark.timeout(60)
def test_only_too_long_samples_name_that_reason() -> None:
    stream = _stream(lambda key: _sample(key, 33), rank=0, packing=False)
    with pytest.raises(NoUsableSampleError, match=r"all 12 samples of epoch 0 were skipped \(too_long: 12\)"):
        next(iter(build_loader(stream, num_workers=0)))


@pytest.mark.timeout(60)
def test_one_workers_part_all_bad_raises_although_the_other_yields() -> None:
    """Worker 1 of 2 reads only bad samples: it would never yield, and the dataloader, asking the
    workers in turn, would wait for it for ever after worker 0's first batch."""
    stream = _stream(lambda key: key, rank=0, world=1)
    bad = set(stream.shard(0, worker=1, num_workers=2))

    def fetch(key: int) -> Sample:
        if key in bad:
            raise BadSample("corrupt_image", f"image {key}.png is not an image", origin=f"train.jsonl:{key + 1}")
        return _sample(key, 5)

    loader = build_loader(_stream(fetch, rank=0, world=1), num_workers=2)
    with pytest.raises(NoUsableSampleError, match=rf"rank 0 of 1, dataloader worker 1 of 2 .* all {len(bad)} samples of epoch 0 were skipped \(corrupt_image: {len(bad)}\)"):
        iterator = iter(loader)
        for _ in range(20):
            next(iterator)
    loader.close()


@pytest.mark.timeout(60)
def test_a_worker_with_an_empty_share_raises() -> None:
    """3 samples over 2 ranks x 2 workers leave worker 1 of rank 1 nothing to read."""
    loader = build_loader(_stream(lambda key: _sample(key, 5), num_samples=3, rank=1, packing=False), num_workers=2)
    with pytest.raises(NoUsableSampleError, match="rank 1 of 2, dataloader worker 1 of 2 has no sample .* lower data.num_workers"):
        iterator = iter(loader)
        for _ in range(5):
            next(iterator)
    loader.close()


@pytest.mark.timeout(60)
def test_a_share_with_one_good_sample_keeps_yielding() -> None:
    """The check is per epoch: one usable sample per epoch is progress, never an error."""
    stream = _stream(lambda key: key, rank=0, world=1)
    good = stream.shard(0)[-1]  # the last of epoch 0

    def fetch(key: int) -> Sample:
        if key != good:
            raise BadSample("empty_text", "blank caption", origin=f"train.jsonl:{key + 1}")
        return _sample(key, 5)

    iterator = iter(build_loader(_stream(fetch, rank=0, world=1, packing=False), num_workers=0))
    batch = next(iterator)  # two epochs' good sample
    assert batch.skipped["empty_text"] >= 23


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


def _records(tmp_path: Path, bad_keys: set[int], *, stuck_image: Path | None = None) -> Path:
    """Caption records; bad ones alternate a missing image and a text too long for rows of 64
    tokens, or point at ``stuck_image`` when given."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (220, 30, 30)).save(images / "red.png")
    lines = []
    for key in range(NUM_RECORDS):
        if key not in bad_keys:
            record = {"image": "images/red.png", "text": "a red square"}
        elif stuck_image is not None:
            record = {"image": str(stuck_image), "text": "a red square"}
        elif key % 2:
            record = {"image": f"images/nowhere_{key}.png", "text": "a red square"}
        else:
            record = {"image": "images/red.png", "text": "x" * 300}
        lines.append(json.dumps(record))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _share(rank: int) -> list[int]:
    """Rank ``rank``'s records in epoch 0 on 2 ranks (tiny.yaml's seed 0, one dataloader worker)."""
    config = StreamConfig(seq_len=64, micro_batch_size=2)
    return SampleStream(NUM_RECORDS, lambda key: key, SPEC, config, rank=rank, world=2, seed=0).shard(0)


def _train_args(tmp_path: Path, data: Path, mllama_dir: Path, *overrides: str) -> list[str]:
    return [
        "-m", "fusiontrain", "train", "--config", TINY_CONFIG, f"model.hf_mllama={mllama_dir}",
        f"output_dir={tmp_path / 'run'}", "data.format=caption", f"data.train.path={data}", "batch.seq_len=64",
        "batch.global_batch_size=4", "max_steps=3", "eval.every_n_steps=0", "logging.every_n_steps=0", *overrides,
    ]


def _counts(keys: list[int]) -> str:
    missing, too_long = sum(k % 2 for k in keys), sum(1 - k % 2 for k in keys)
    return f"all {len(keys)} samples of epoch 0 were skipped (missing_image: {missing}, too_long: {too_long})"


def test_all_records_bad_every_rank_ends_with_a_clear_error_in_bounded_time(tmp_path, tiny_mllama_dir) -> None:
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
        assert f"rank {rank} of 2 found no usable sample in its share of data.train.path={data} (data.format=caption)" in out, out
        assert _counts(_share(rank)) in out, out
    assert elapsed < 150


def test_only_rank_1_bad_rank_1_names_its_data_and_rank_0_fails_in_its_all_reduce(tmp_path, tiny_mllama_dir) -> None:
    """Rank 1 raises and leaves the process group; rank 0, waiting for it in its first all-reduce,
    fails at once (gloo sees the closed connection) with the rank and the operation, instead of
    waiting out the timeout or, without one, for ever."""
    rank1 = _share(1)
    data = _records(tmp_path, set(rank1))
    started = time.monotonic()
    results = run_ranks(
        _train_args(tmp_path, data, tiny_mllama_dir, "distributed.timeout_s=60", "data.packing=false"),
        nproc=2, timeout=180, check=False,
    )
    elapsed = time.monotonic() - started
    out0, out1 = results[0].stdout[-6000:], results[1].stdout[-6000:]
    assert results[1].returncode != 0 and results[0].returncode != 0, out0 + out1
    assert f"rank 1 of 2 found no usable sample in its share of data.train.path={data}" in out1, out1
    assert _counts(rank1) in out1, out1
    assert "NoUsableSampleError" not in out0, out0
    assert "CollectiveError: rank 0: all_reduce (target token count of step 0) failed after" in out0, out0
    assert "another rank is stuck or died; see its log" in out0
    assert elapsed < 150  # well under rank 0's 60 s timeout on top of the run itself


def test_a_stuck_rank_makes_the_other_time_out_naming_rank_and_operation(tmp_path, tiny_mllama_dir) -> None:
    """Rank 1's images are a FIFO nobody writes: reading one blocks for ever (like a hung network
    file system). Rank 0 ends after distributed.timeout_s with the clear message; torchrun then
    ends rank 1."""
    fifo = tmp_path / "stuck.png"
    os.mkfifo(fifo)
    data = _records(tmp_path, set(_share(1)), stuck_image=fifo)
    started = time.monotonic()
    try:
        result = run_torchrun(
            _train_args(tmp_path, data, tiny_mllama_dir, "distributed.timeout_s=8", "data.packing=false", "data.num_workers=0"),
            nproc=2, timeout=200, check=False,
        )
    finally:
        try:  # unblock a reader left behind, if any
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    elapsed = time.monotonic() - started
    out = result.stdout[-8000:]
    assert result.returncode != 0, out
    assert "CollectiveError: rank 0: timed out after 8 s in all_reduce (target token count of step 0)" in out, out
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
        loader = build_loader(_stream(all_bad, rank=1), num_workers=2)
        iterator = iter(loader)  # workers fork now, inheriting the blocked SIGTERM
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    with pytest.raises(NoUsableSampleError):
        next(iterator)
    workers = list(iterator._workers)
    assert workers and any(w.is_alive() for w in workers)
    started = time.monotonic()
    loader.close()
    assert not any(w.is_alive() for w in workers)
    assert time.monotonic() - started < 10
