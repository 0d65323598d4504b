"""The global row plan: deterministic, within every row limit, each usable sample once per epoch,
unusable ones counted; the size-only first-fit equals the packer run on built samples."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fusiontrain.data.batch import Sample
from fusiontrain.data.errors import BadSample
from fusiontrain.data.packing import FirstFitPacker
from fusiontrain.data.row_plan import DataPosition, NoUsableSampleError, RowLimits, RowPlan
from fusiontrain.data.sizes import SampleSizes, measure

NUM_SAMPLES = 200
LIMITS = RowLimits(seq_len=40, max_images=3, max_encoder_tokens=20, packing=True, open_rows=4)


def size_of(key: int) -> tuple[int, int, int]:
    """A long-tailed mix: 2-49 tokens, 0-4 images of 3-9 encoder tokens; every 31st is malformed."""
    if key % 31 == 30:
        raise BadSample("malformed_json", f"line {key + 1}")
    tokens = 2 + (key * 37) % 48
    images = (key * 7) % 5 if key % 2 else 0
    return tokens, images, sum(3 + (key + k) % 7 for k in range(images))


def sizes() -> SampleSizes:
    return SampleSizes(measure(size_of, NUM_SAMPLES, range(NUM_SAMPLES)))


def expected_reason(key: int, limits: RowLimits) -> str | None:
    """Why the planner must drop ``key``, worked out from size_of directly."""
    try:
        tokens, images, encoder_tokens = size_of(key)
    except BadSample as error:
        return error.reason
    if tokens > limits.seq_len:
        return "too_long"
    if images > limits.max_images or encoder_tokens > limits.max_encoder_tokens:
        return "too_many_images"
    return None


@pytest.mark.parametrize("packing", [True, False])
def test_rows_hold_every_usable_sample_once_within_the_limits(packing: bool) -> None:
    limits = RowLimits(**{**vars(LIMITS), "packing": packing})
    plan = RowPlan(sizes(), limits, seed=5)
    for epoch in range(2):
        planned = plan.epoch(epoch)
        ids = [key for row in planned.rows for key in row]
        usable = [key for key in range(NUM_SAMPLES) if expected_reason(key, limits) is None]
        assert sorted(ids) == usable  # each usable sample exactly once
        want = Counter(r for r in map(lambda k: expected_reason(k, limits), range(NUM_SAMPLES)) if r)
        assert planned.skipped == dict(want) and set(want) == {"malformed_json", "too_long", "too_many_images"}
        for row in planned.rows:
            sized = [size_of(key) for key in row]
            assert sum(s[0] for s in sized) <= limits.seq_len
            assert sum(s[1] for s in sized) <= limits.max_images
            assert sum(s[2] for s in sized) <= limits.max_encoder_tokens
            assert packing or len(row) == 1
        # samples keep the epoch's visiting order across rows without packing
        if not packing:
            assert ids == [key for key in plan.order(epoch) if key in set(usable)]
    if packing:
        assert len(plan.epoch(0).rows) < 0.7 * len(usable)  # rows really hold several samples


def test_plan_is_a_function_of_seed_and_sizes_only() -> None:
    first, again, other = RowPlan(sizes(), LIMITS, seed=5), RowPlan(sizes(), LIMITS, seed=5), RowPlan(sizes(), LIMITS, seed=6)
    assert first.epoch(0).rows == again.epoch(0).rows and first.epoch(1).rows == again.epoch(1).rows
    assert first.epoch(0).rows != first.epoch(1).rows  # another order each epoch
    assert first.epoch(0).rows != other.epoch(0).rows


def test_size_only_first_fit_equals_the_packer_on_built_samples() -> None:
    """The planner packs from sizes; the packer fed built samples in the same order (the
    reference: it counts tokens, images and encoder tokens from the samples) gives the same rows."""
    plan = RowPlan(sizes(), LIMITS, seed=9)
    packer = FirstFitPacker(
        LIMITS.seq_len, LIMITS.max_images, LIMITS.open_rows, image_format=_Counted(), max_encoder_tokens=LIMITS.max_encoder_tokens
    )
    rows = []
    for key in plan.order(0):
        if expected_reason(key, LIMITS) is None:
            tokens, images, _ = size_of(key)
            per_image = [{"n": torch.tensor(3 + (key + k) % 7)} for k in range(images)]
            sample = Sample(torch.zeros(tokens, dtype=torch.long), torch.zeros(tokens, dtype=torch.long), per_image)
            rows += [tuple(row.keys) for row in packer.add(key, sample)]
    rows += [tuple(row.keys) for row in packer.flush()]
    assert plan.epoch(0).rows == rows


class _Counted:
    """An image format stub whose images carry their own encoder-token count."""

    def num_tokens(self, image: dict) -> int:
        return int(image["n"])


def test_take_crosses_epoch_ends_and_counts_steps() -> None:
    plan = RowPlan(sizes(), LIMITS, seed=5)
    length = len(plan.epoch(0).rows)
    rows, after = plan.take(DataPosition(0, length - 3, step=7), 5)
    assert [(r.epoch, r.index) for r in rows] == [(0, length - 3), (0, length - 2), (0, length - 1), (1, 0), (1, 1)]
    assert [r.ids for r in rows] == plan.epoch(0).rows[-3:] + plan.epoch(1).rows[:2]
    assert after == DataPosition(1, 2, step=8)
    assert DataPosition.from_dict(after.to_dict()) == after


def test_no_usable_sample_and_strict_mode() -> None:
    tight = RowLimits(seq_len=1, max_images=0, max_encoder_tokens=0, packing=True, open_rows=1)
    with pytest.raises(NoUsableSampleError, match=r"too_long: \d+.*raise batch.seq_len"):
        RowPlan(sizes(), tight, seed=0, name="data.train.path=x.jsonl").epoch(0)
    with pytest.raises(BadSample, match="cannot be used") as error:
        RowPlan(sizes(), LIMITS, seed=0, strict=True).epoch(0)
    assert error.value.reason in {"malformed_json", "too_long", "too_many_images"}
