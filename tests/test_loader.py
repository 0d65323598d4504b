"""The per-rank sample stream: sharding, skipping bad samples, and exact resume mid-pack."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fusiontrain.data.batch import Sample
from fusiontrain.families.encoder import FixedSizeImage
from fusiontrain.data.errors import BadSample
from fusiontrain.data.loader import SampleStream, StreamConfig, build_loader

SPEC = FixedSizeImage(image_size=4, tokens_per_image=3)
NUM_SAMPLES = 60


def fetch(key: int) -> Sample:
    """Sample ``key``: 3-20 tokens whose ids encode the key; every 3rd has an image."""
    if key % 23 == 22:
        raise BadSample("missing_image", f"data.jsonl:{key + 1}: image nowhere.png does not exist")
    length = sample_length(key)
    tokens = torch.full((length,), 1000 + key)
    labels = torch.cat([tokens[1:], torch.tensor([-100])])
    images, spans = [], []
    if key % 3 == 0:
        images = [{"pixel_values": torch.full((3, 4, 4), float(key))}]
        spans = [(0, length)]
    return Sample(tokens, labels, images, spans, origin=f"data.jsonl:{key + 1}")


def stream(rank: int = 0, world: int = 1, **overrides) -> SampleStream:
    config = StreamConfig(**{"seq_len": 32, "micro_batch_size": 2, "packing": True, "max_images": 3, **overrides})
    return SampleStream(NUM_SAMPLES, fetch, SPEC, config, rank=rank, world=world, seed=3)


def sample_length(key: int) -> int:
    return 3 + (key * 7) % 18


def keys_of(batch) -> list[list[int]]:
    """The sample keys in each row of a batch, in order (from the token ids), each as many times
    as the row holds that sample (its token count over the sample's length)."""
    rows = []
    for row, real in zip(batch.tokens, batch.is_real):
        counts = Counter(int(t) - 1000 for t in row[real])
        assert all(count % sample_length(key) == 0 for key, count in counts.items()), counts
        rows.append([key for key in counts for _ in range(counts[key] // sample_length(key))])
    return rows


def batches(loader, n: int) -> list:
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def stream_states_of(loader_state: dict, num_workers: int) -> list[dict]:
    """The SampleStream states inside a StatefulDataLoader state: one, or one per worker."""
    if num_workers == 0:
        return [loader_state.get("dataset_state")]
    workers = loader_state["_snapshot"]["_worker_snapshots"]
    return [workers.get(f"worker_{w}", {}).get("dataset_state") for w in range(num_workers)]


def same_batch(a, b) -> bool:
    fields = ("tokens", "labels", "input_pos", "is_real", "segment_ids", "encoder_mask")
    same = all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields if getattr(a, f) is not None)
    if a.encoder_input is not None:
        same &= all(torch.equal(a.encoder_input[k], b.encoder_input[k]) for k in a.encoder_input)
    return same and a.skipped == b.skipped


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("rank", [0, 1])
def test_resumed_stream_yields_exactly_the_rest(rank: int, num_workers: int) -> None:
    """Stop after 5 batches (mid-epoch, with rows still open in the packer), save, restore into a
    fresh loader: the next batches equal those of the uninterrupted run, across an epoch end."""
    uninterrupted = batches(build_loader(stream(rank, 2), num_workers=num_workers), 14)
    first = build_loader(stream(rank, 2), num_workers=num_workers)
    head = batches(first, 5)
    state = first.state_dict()
    resumed = build_loader(stream(rank, 2), num_workers=num_workers)
    resumed.load_state_dict(state)
    tail = batches(resumed, 9)
    assert len(head + tail) == len(uninterrupted)
    assert all(same_batch(a, b) for a, b in zip(head + tail, uninterrupted))
    # The saved state holds each stream's own position and open rows (one per worker), not only
    # a count of yielded batches that a restore would fast-forward through.
    stream_states = stream_states_of(state, num_workers)
    assert len(stream_states) == max(1, num_workers)
    for stream_state in stream_states:
        assert isinstance(stream_state, dict), f"no stream state saved: {state}"
        assert (stream_state["rank"], stream_state["world"], stream_state["seed"]) == (rank, 2, 3)
        assert stream_state["position"] > 0
        assert stream_state["open_rows"], "the packer must have rows open at the save"


def test_state_holds_open_rows_and_position() -> None:
    loader = build_loader(stream(0, 2), num_workers=0)
    batches(loader, 3)
    state = loader.state_dict()["dataset_state"]
    assert state["position"] > 0
    assert state["open_rows"], "the packer must have rows open mid-stream"
    assert state["world"] == 2 and state["seed"] == 3


def test_ranks_read_disjoint_shards_covering_the_epoch() -> None:
    shards = [stream(rank, 2).shard(epoch=0) for rank in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(NUM_SAMPLES))
    assert stream(0, 2).shard(epoch=1) != shards[0]


def test_rows_respect_caps_and_bad_samples_are_counted() -> None:
    seen, skipped = [], {}
    loader = build_loader(stream(), num_workers=0)
    for batch in batches(loader, 12):
        assert batch.tokens.shape == (2, 32)
        assert batch.encoder_mask is None or batch.encoder_mask.shape[-1] <= 3 * SPEC.max_tokens_per_image
        for reason, count in batch.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
        seen += [key for row in keys_of(batch) for key in row]
    bad = [key for key in seen if key % 23 == 22]
    assert not bad
    # Every sample read so far (whole epochs, then the current one up to its position) was either
    # skipped as bad, yielded exactly once, or is still waiting in an open or ready row: the
    # multiset of yielded keys is exact, so a sample yielded twice within an epoch (or lost) fails.
    state = loader.state_dict()["dataset_state"]
    reference = stream()
    read = [key for epoch in range(state["epoch"]) for key in reference.shard(epoch)]
    read += reference.shard(state["epoch"])[: state["position"]]
    assert state["epoch"] >= 1, "12 batches should cross an epoch end (60 samples); raise the count"
    pending = Counter(key for row in state["open_rows"] + state["ready_rows"] for key in row)
    good = Counter(key for key in read if key % 23 != 22)
    assert not pending - good, "rows hold samples that were never read"
    assert Counter(seen) == good - pending
    assert skipped == {"missing_image": sum(1 for key in read if key % 23 == 22)}


def test_strict_mode_raises_on_the_first_bad_sample() -> None:
    with pytest.raises(BadSample, match="does not exist"):
        batches(build_loader(stream(strict=True), num_workers=0), 40)


def test_too_long_samples_are_skipped() -> None:
    skipped = {}
    for batch in batches(build_loader(stream(seq_len=12, packing=False), num_workers=0), 10):
        assert batch.is_real.sum(-1).max() <= 12
        for reason, count in batch.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    assert skipped.get("too_long", 0) > 0


def test_padded_stream_gives_the_same_global_batches_at_any_world_size() -> None:
    """Unpacked, with no bad samples: the k-th batch of every rank together holds the same samples
    whatever the number of ranks."""

    def good_fetch(key: int) -> Sample:
        return fetch(key if key % 23 != 22 else 0)

    def global_batches(world: int, micro: int, steps: int) -> list[set[int]]:
        streams = [
            SampleStream(NUM_SAMPLES, good_fetch, SPEC, StreamConfig(32, micro, packing=False), rank=r, world=world, seed=3)
            for r in range(world)
        ]
        per_rank = [batches(build_loader(s), steps * 4 // (world * micro)) for s in streams]
        out = []
        for step in range(steps):
            keys = set()
            for rank_batches in per_rank:
                count = 4 // (world * micro)
                for batch in rank_batches[step * count : (step + 1) * count]:
                    keys |= {(int(t) - 1000) for row in batch.tokens for t in row if t >= 1000}
            out.append(keys)
        return out

    assert global_batches(1, 2, 5) == global_batches(2, 2, 5) == global_batches(4, 1, 5)


def test_restoring_into_another_world_size_is_refused() -> None:
    loader = build_loader(stream(0, 2), num_workers=0)
    batches(loader, 2)
    state = loader.state_dict()
    other = build_loader(stream(0, 4), num_workers=0)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="world size 2"):
        batches(other, 1)
