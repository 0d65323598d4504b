"""The global-batch and mesh arithmetic every part of fusiontrain asks (fusiontrain/batch_layout.py)."""

from __future__ import annotations

import pytest

from fusiontrain.batch_layout import batch_layout, mesh_shape


def _layout(world: int, *, replicate: int = 1, shard: int = -1, micro: int = 2, accum: int = 1, global_rows: int | None = None):
    return batch_layout(
        world_size=world,
        dp_replicate=replicate,
        dp_shard=shard,
        micro_batch_size=micro,
        grad_accum_steps=accum,
        global_batch_size=global_rows,
    )


def test_global_batch_sets_the_accumulation_steps_at_any_world_size() -> None:
    for world, accum in ((1, 8), (2, 4), (4, 2), (8, 1)):
        layout = _layout(world, global_rows=16)
        assert (layout.grad_accum_steps, layout.global_batch_size, layout.world_size) == (accum, 16, world)
    hsdp = _layout(8, replicate=2, global_rows=32)
    assert (hsdp.dp_replicate, hsdp.dp_shard, hsdp.grad_accum_steps, hsdp.rows_per_rank) == (2, 4, 2, 4)
    assert _layout(4, accum=3).global_batch_size == 24  # no global batch: accumulation as given


@pytest.mark.parametrize(
    "world, kwargs, message",
    [
        (4, {"global_rows": 12}, r"global_batch_size=12 .* batch.micro_batch_size \(2\) x data-parallel ranks \(4\)"),
        (4, {"global_rows": 4}, r"global_batch_size=4 must be a positive multiple"),
        (4, {"shard": 3}, r"dp_replicate \(1\) x parallel.dp_shard \(3\) must equal the world size \(4\)"),
        (4, {"replicate": 3}, r"dp_replicate=3 does not divide the world of 4 ranks"),
        (2, {"accum": 0}, r"batch.grad_accum_steps must be >= 1"),
    ],
)
def test_a_batch_that_does_not_split_is_refused_by_name(world: int, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _layout(world, **kwargs)


def test_mesh_shape_fills_dp_shard() -> None:
    assert mesh_shape(1, -1, 8) == (1, 8)
    assert mesh_shape(2, -1, 8) == (2, 4)
    assert mesh_shape(2, 4, 8) == (2, 4)
