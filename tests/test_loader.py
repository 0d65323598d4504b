"""Each rank's loader of the global row plan: the same global batches at any world size and any
number of dataloader workers, exact resume onto another world size, bad samples skipped the same
way everywhere."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fusiontrain.data.batch import Batch, Sample
from fusiontrain.data.errors import BadSample
from fusiontrain.data.loader import Dealing, PlannedLoader, PlannedStream, StreamConfig
from fusiontrain.data.row_plan import DataPosition, RowLimits, RowPlan
from fusiontrain.data.sizes import SampleSizes, measure
from fusiontrain.families.fixed_size_image import FixedSizeImage

SPEC = FixedSizeImage(image_size=4, tokens_per_image=3)
NUM_SAMPLES = 60
GLOBAL_ROWS = 8  # rows per optimizer step
MICRO = 2


def sample_length(key: int) -> int:
    return 3 + (key * 7) % 18


def size_of(key: int) -> tuple[int, int, int]:
    """Sizes from the record alone: sample 22 and 45 are fine here, and fail only when built."""
    if key % 29 == 28:
        raise BadSample("malformed_json", f"data.jsonl:{key + 1}: invalid JSON")
    images = int(key % 3 == 0)
    return sample_length(key), images, 3 * images


def fetch(key: int) -> Sample:
    """Sample ``key``: tokens whose ids encode the key; every 3rd has an image; every 23rd has an
    image file that turns out missing when built."""
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


SIZES = SampleSizes(measure(size_of, NUM_SAMPLES, range(NUM_SAMPLES)))


def loader(
    rank: int, world: int, *, packing: bool = True, padding_free: bool = True, num_workers: int = 0, seed: int = 3
) -> PlannedLoader:
    limits = RowLimits(seq_len=32, max_images=3, max_encoder_tokens=9, packing=packing, open_rows=4)
    plan = RowPlan(SIZES, limits, seed)
    config = StreamConfig(
        seq_len=32, micro_batch_size=MICRO, packing=packing, padding_free=padding_free, max_images=3, max_encoder_tokens=9
    )
    dealing = Dealing(GLOBAL_ROWS, rank, world, MICRO)
    return PlannedLoader(
        lambda start: PlannedStream(plan, fetch, SPEC, config, dealing, start),
        num_workers=num_workers,
        identity={"seed": seed, "packing": packing, "rows_per_step": GLOBAL_ROWS},
        rank=rank,
    )


def keys_of(batch: Batch) -> list[list[int]]:
    """The sample keys in each row of a batch, in order, read back from the token ids."""
    rows = []
    for row, real in zip(batch.tokens, batch.is_real):
        keys = [int(t) - 1000 for t in row[real]]
        rows.append([key for i, key in enumerate(keys) if i == 0 or keys[i - 1] != key])
    return rows


def global_steps(loaders: list[PlannedLoader], steps: int) -> list[tuple[list[list[int]], Counter]]:
    """Per step: every rank's rows in rank order (the step's global rows) and the summed skips."""
    iterators = [iter(item) for item in loaders]
    accum = GLOBAL_ROWS // (len(loaders) * MICRO)
    out = []
    for _ in range(steps):
        rows, skipped = [], Counter()
        for iterator in iterators:
            for _ in range(accum):
                batch = next(iterator)
                rows += keys_of(batch)
                skipped.update(batch.skipped)
        out.append((rows, skipped))
    return out


def test_the_global_batches_are_the_same_on_1_2_and_4_ranks_with_or_without_workers() -> None:
    one = global_steps([loader(0, 1)], 12)  # 12 steps of 8 rows cross an epoch end
    assert global_steps([loader(r, 2) for r in range(2)], 12) == one
    assert global_steps([loader(r, 4, num_workers=2 if r == 1 else 0) for r in range(4)], 12) == one
    # the reference: the plan's rows with the bad-when-built samples left out
    plan = RowPlan(SIZES, RowLimits(32, 3, 9, True, 4), 3)
    rows, position = [], DataPosition()
    for _ in range(12):
        taken, position = plan.take(position, GLOBAL_ROWS)
        rows += [[key for key in row.ids if key % 23 != 22] for row in taken]
    assert [row for step, _ in one for row in step] == rows
    assert position.epoch >= 1  # the run went past an epoch end


def test_skips_are_counted_once_whatever_the_world_size() -> None:
    """Planning skips (malformed 28 and 57) once per epoch begun; build skips (22 and 45) each
    time their row is dealt; on 1 rank and summed over 2 ranks alike."""
    plan = RowPlan(SIZES, RowLimits(32, 3, 9, True, 4), 3)
    taken, position = plan.take(DataPosition(), 12 * GLOBAL_ROWS)
    epochs_begun = position.epoch + (position.row > 0)
    dealt = Counter(key for row in taken for key in row.ids)
    for loaders in ([loader(0, 1)], [loader(r, 2) for r in range(2)]):
        steps = global_steps(loaders, 12)
        total = sum((skipped for _, skipped in steps), Counter())
        assert total == {"malformed_json": 2 * epochs_begun, "missing_image": dealt[22] + dealt[45]}
        assert dealt[22] + dealt[45] >= 2 and epochs_begun >= 2
        built = Counter(key for rows, _ in steps for row in rows for key in row)
        assert not built[22] and not built[45] and not built[28] and not built[57]


@pytest.mark.parametrize("packing", [True, False])
def test_stop_on_4_ranks_resume_on_2_continues_with_the_next_global_rows(packing: bool) -> None:
    first = [loader(r, 4, packing=packing) for r in range(4)]
    done = global_steps(first, 5)
    states = [item.state_dict() for item in first]
    assert all(state == states[0] for state in states)  # global: the same on every rank
    resumed = [loader(r, 2, packing=packing) for r in range(2)]
    for item in resumed:
        item.load_state_dict(states[0])
    uninterrupted = global_steps([loader(r, 2, packing=packing) for r in range(2)], 11)
    assert done + global_steps(resumed, 6) == uninterrupted


def test_unpacked_rows_hold_one_sample_and_a_bad_one_leaves_a_padding_row() -> None:
    steps = global_steps([loader(0, 1, packing=False, padding_free=False)], 8)
    rows = [row for step, _ in steps for row in step]
    assert all(len(row) <= 1 for row in rows) and [] in rows  # 22 or 45 were dealt and left padding


def test_padding_free_micro_batches_hold_the_padded_rows_samples_in_one_row() -> None:
    padded = global_steps([loader(0, 1, packing=False, padding_free=False)], 8)
    free = global_steps([loader(0, 1, packing=False)], 8)
    accum = GLOBAL_ROWS // MICRO
    for (padded_rows, padded_skips), (free_rows, free_skips) in zip(padded, free, strict=True):
        assert len(padded_rows) == GLOBAL_ROWS and len(free_rows) == accum  # one row per micro-batch
        for micro in range(accum):
            samples = [key for row in padded_rows[micro * MICRO : (micro + 1) * MICRO] for key in row]
            assert free_rows[micro] == samples  # in order; a bad sample's empty row is left out
        assert free_skips == padded_skips
    assert any(len(row) < MICRO for rows, _ in free for row in rows)  # 22 or 45 were dealt


def test_a_state_from_another_plan_is_refused() -> None:
    saved = loader(0, 2).state_dict()
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        loader(0, 2, seed=4).load_state_dict(saved)


def test_a_world_size_that_does_not_divide_the_global_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="do not split .* over 3 ranks"):
        Dealing(GLOBAL_ROWS, 0, 3, MICRO)
