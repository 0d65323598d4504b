"""A streamed worker's saved position: what it must match to be resumed, and where a
StatefulDataLoader state holds it (see :mod:`fusiontrain.data.streaming` for what a position is).

A position belongs to one split of the shards over ranks and dataloader workers and to the row
limits its open rows were filled under: :func:`check_resumable` compares the saved identity fields
with the resuming run's and names every difference with the config key that restores it.
"""

from __future__ import annotations

from typing import Any

# The fields of a worker's state that must match the resuming run, with the config key to restore.
IDENTITY = {
    "world": "the number of ranks",
    "rank": "the rank",
    "num_workers": "data.num_workers",
    "stream_split": "data.stream_split",
    "seed": "seed",
    "source": "data.train (its path, or a mixture's sources and weights)",
    "num_shards": "the number of shards",
    # only in the state of a model with an encoder per modality (one-encoder positions resume as before)
    "other_limits": "data.max_items_per_row / data.max_item_tokens_per_row (the other modalities' row limits)",
    # what a row is: the open rows a position holds were filled under these
    "rows": "the rows' limits (batch.seq_len, data.max_images_per_row, data.max_encoder_tokens_per_row, "
    "data.packing, the packer's open rows)",
}
#: Identity fields that positions saved before they existed lack: such a position is not checked
#: for them (it resumes as it did then).
ADDED_LATER = frozenset({"rows"})


class StreamResumeError(ValueError):
    """A saved streaming position that this run cannot continue (another split of the shards)."""


def check_resumable(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise :class:`StreamResumeError` naming every identity field (world size, workers, split,
    seed, source, shard count, the rows' limits, other modalities' row limits) in which the
    ``saved`` worker state differs from ``current``."""
    differences = [
        f"{what}: saved {saved.get(field)!r}, now {current.get(field)!r}"
        for field, what in IDENTITY.items()
        if saved.get(field) != current.get(field) and not (field in ADDED_LATER and field not in saved)
    ]
    if differences:
        raise StreamResumeError(
            "cannot resume the streamed data position: " + "; ".join(differences) + ". A streamed position belongs "
            "to one split of the shards over ranks and dataloader workers and cannot be re-split. Resume with the "
            "saved values (same number of ranks, data.num_workers, data.stream_split, seed, data and row limits), or start "
            "the data from the beginning with a fresh output_dir (or model.fusion_init to keep the weights)"
        )


def start_state() -> dict[str, Any]:
    """The position of a worker that has read nothing: no anchor ``datasets`` state, no waiting
    rows, no skips."""
    return {
        "anchor": {"epoch": 0, "index": 0, "datasets_state": None},
        "position": [0, 0],
        "usable": 0,
        "open_rows": [],
        "ready_rows": [],
        "skipped": {},
    }


def worker_states(loader_state: dict[str, Any]) -> list[dict[str, Any]]:
    """The stream states inside a StatefulDataLoader state (one per worker that had reported one,
    or the one of a loader without workers). A map-style stream's state there is refused."""
    found: list[dict[str, Any]] = []
    map_style = False

    def walk(value: Any) -> None:
        nonlocal map_style
        if isinstance(value, dict):
            if "anchor" in value and "position" in value:
                found.append(value)
                return
            if "rows_per_step" in value and "position" in value:  # the row plan's (map-style) state
                map_style = True
                return
            for inner in value.values():
                walk(inner)

    walk(loader_state)
    if map_style:
        raise StreamResumeError(
            "the checkpoint's data position is a map-style one (saved with data.streaming=false) and this run streams "
            "its data (data.streaming=true): resume with data.streaming=false, or start the data afresh in a new "
            "output_dir (model.fusion_init keeps the weights)"
        )
    return found
