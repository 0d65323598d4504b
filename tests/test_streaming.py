"""Streaming data from webdataset tar shards: exact resume (batches, and a 2-rank CLI run), bad
members skipped and counted, shards split over ranks and workers, refusal of another split."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from fusiontrain.data.batch import Sample
from fusiontrain.data.errors import BadSample
from fusiontrain.data.loader import StreamConfig
from fusiontrain.data.sources import Record, open_image
from fusiontrain.data.stream_sources import open_stream
from fusiontrain.data.stream_position import StreamResumeError
from fusiontrain.data.streaming import StreamingSampleStream, build_streaming_loader
from fusiontrain.families.fixed_size_image import FixedSizeImage

SPEC = FixedSizeImage(image_size=4, tokens_per_image=3)
PER_SHARD = 5


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (6, 5), (value % 256, 40, 90)).save(out, "PNG")
    return out.getvalue()


def write_shards(folder: Path, num_shards: int, bad: dict[int, str] | None = None) -> str:
    """``num_shards`` tar shards of PER_SHARD samples (``000.png`` + ``000.json``); sample ``n``'s
    JSON is ``{"id": n, "text": ...}``. ``bad`` maps sample ids to a defect: ``corrupt_image``,
    ``malformed_json`` or ``no_text``. Returns the shards' glob."""
    bad = bad or {}
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        with tarfile.open(folder / f"shard-{shard:03d}.tar", "w") as tar:
            for n in range(shard * PER_SHARD, (shard + 1) * PER_SHARD):
                defect = bad.get(n)
                record = {"id": n} if defect == "no_text" else {"id": n, "text": "w" * (1 + n % 7)}
                _member(tar, f"{n:04d}.png", b"\x89PNG not really" if defect == "corrupt_image" else _png(n))
                _member(tar, f"{n:04d}.json", b'{"id": ' if defect == "malformed_json" else json.dumps(record).encode())
    return str(folder / "*.tar")


def sample_length(n: int) -> int:
    return 3 + (n * 7) % 11


def build(record: Record) -> Sample:
    """A sample whose token ids encode the record's id; the image is decoded for real."""
    if record.error is not None:
        raise record.error
    data = record.data
    if "text" not in data:
        raise BadSample("bad_record", "a caption record needs a string 'text'", origin=record.origin)
    try:
        image = open_image(data["image"], record.base_dir)
    except BadSample as error:
        raise error.at(record.origin) from error
    n = data["id"]
    tokens = torch.full((sample_length(n),), 1000 + n)
    labels = torch.cat([tokens[1:], torch.tensor([-100])])
    pixels = torch.full((3, 4, 4), float(image.getpixel((0, 0))[0]))
    return Sample(tokens, labels, [{"pixel_values": pixels}], [(0, len(tokens))], origin=record.origin)


def stream(pattern: str, rank: int = 0, world: int = 1, num_workers: int = 0, **overrides) -> StreamingSampleStream:
    split = overrides.pop("stream_split", "shards")
    config = StreamConfig(**{"seq_len": 24, "micro_batch_size": 2, "packing": True, "max_images": 3, **overrides})
    return StreamingSampleStream(
        open_stream(pattern), build, SPEC, config, rank=rank, world=world, num_workers=num_workers, seed=5,
        stream_split=split,
    )


def batches(loader, n: int) -> list:
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def ids_of(batch) -> list[int]:
    """The sample ids in a batch (each once per row it is in), from the token ids."""
    out = []
    for row, real in zip(batch.tokens, batch.is_real):
        counts = Counter(int(t) - 1000 for t in row[real])
        for n, count in counts.items():
            assert count % sample_length(n) == 0, counts
            out += [n] * (count // sample_length(n))
    return out


def same_batch(a, b) -> bool:
    fields = ("tokens", "labels", "input_pos", "is_real", "segment_ids", "encoder_mask")
    same = all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields if getattr(a, f) is not None)
    same &= all(torch.equal(a.encoder_input[k], b.encoder_input[k]) for k in a.encoder_input)
    return same and a.skipped == b.skipped


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """8 shards of 5 samples, 40 in all, with 3 bad ones in the middle of their shards."""
    return write_shards(tmp_path_factory.mktemp("shards"), 8, {7: "corrupt_image", 21: "malformed_json", 32: "no_text"})


@pytest.mark.parametrize("num_workers, split", [(0, "shards"), (2, "shards"), (2, "examples")])
def test_resumed_stream_yields_exactly_the_rest(shards: str, num_workers: int, split: str) -> None:
    """Stop mid-pass with rows open in the packer, restore into a fresh loader: the next batches
    are bitwise those of the uninterrupted stream, across the end of the pass."""
    total = 16
    uninterrupted = batches(build_streaming_loader(stream(shards, 1, 2, num_workers, stream_split=split)), total)
    first = build_streaming_loader(stream(shards, 1, 2, num_workers, stream_split=split))
    head = batches(first, 3)
    state = first.state_dict()
    resumed = build_streaming_loader(stream(shards, 1, 2, num_workers, stream_split=split))
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the checkpoint stores it as JSON
    tail = batches(resumed, total - 3)
    assert all(same_batch(a, b) for a, b in zip(head + tail, uninterrupted, strict=True))
    passes = {n for batch in uninterrupted for n in ids_of(batch)}
    assert len(passes) < sum(len(ids_of(batch)) for batch in uninterrupted), "the run must cross a pass end"
    saved = json.dumps(state)
    assert '"open_rows": [[' in saved, "the packer must have rows open at the save"


def test_bad_members_are_skipped_counted_and_logged(shards: str, caplog) -> None:
    """One pass: the corrupt image, the malformed JSON member and the record without text are
    skipped, each counted once under its reason and logged with its shard and key."""
    good = 40 - 3
    loader = build_streaming_loader(stream(shards, packing=False, micro_batch_size=1))
    with caplog.at_level(logging.WARNING, logger="fusiontrain.data"):
        one_pass = batches(loader, good)
    assert sorted(n for batch in one_pass for n in ids_of(batch)) == sorted(set(range(40)) - {7, 21, 32})
    skipped = sum((Counter(batch.skipped) for batch in one_pass), Counter())
    assert skipped == {"corrupt_image": 1, "malformed_json": 1, "bad_record": 1}
    logged = caplog.text
    assert "shard-001.tar:0007" in logged and "shard-004.tar:0021" in logged and "shard-006.tar:0032" in logged


def test_shards_split_over_ranks_and_workers_cover_the_data_once(tmp_path: Path) -> None:
    """2 ranks x 2 workers over 8 shards: the first pass of every worker reads each sample once,
    by one rank and worker. Unpacked single-sample batches alternate between the two workers."""
    pattern = write_shards(tmp_path, 8)
    seen: list[int] = []
    for rank in range(2):
        loader = build_streaming_loader(stream(pattern, rank, 2, 2, packing=False, micro_batch_size=1))
        seen += [n for batch in batches(loader, 2 * 2 * PER_SHARD) for n in ids_of(batch)]  # 2 shards per worker
    assert sorted(seen) == list(range(40))


def test_examples_split_gives_each_rank_every_other_record(tmp_path: Path) -> None:
    """stream_split=examples, 5 shards on 2 ranks: each rank reads every shard and keeps every
    second record (13 and 12 of the 25); together the ranks' first passes are the data, once."""
    pattern = write_shards(tmp_path, 5)
    seen: list[int] = []
    for rank, share in ((0, 13), (1, 12)):
        loader = build_streaming_loader(stream(pattern, rank, 2, stream_split="examples", packing=False, micro_batch_size=1))
        seen += [n for batch in batches(loader, share) for n in ids_of(batch)]
    assert sorted(seen) == list(range(25))


def test_resume_with_another_split_is_refused(shards: str) -> None:
    loader = build_streaming_loader(stream(shards, 0, 2))
    batches(loader, 2)
    state = loader.state_dict()
    with pytest.raises(StreamResumeError, match=r"the number of ranks: saved 2, now 1.*Resume with the saved values"):
        build_streaming_loader(stream(shards, 0, 1)).load_state_dict(state)
    with pytest.raises(StreamResumeError, match=r"data.num_workers: saved 0, now 2"):
        build_streaming_loader(stream(shards, 0, 2, 2)).load_state_dict(state)


def test_resume_under_other_row_limits_is_refused_and_an_older_position_resumes(shards: str) -> None:
    """The open rows of a position were filled under its row limits: another seq_len, image
    limit or packing setting is refused, naming the keys. A position saved before the limits were
    recorded resumes as it did (to the same batches)."""
    loader = build_streaming_loader(stream(shards, 0, 2))
    batches(loader, 2)
    state = loader.state_dict()
    with pytest.raises(StreamResumeError, match=r"the rows' limits \(batch.seq_len.*'seq_len': 24.*'seq_len': 32"):
        build_streaming_loader(stream(shards, 0, 2, seq_len=32)).load_state_dict(state)
    with pytest.raises(StreamResumeError, match=r"'max_images': 3.*'max_images': 2"):
        build_streaming_loader(stream(shards, 0, 2, max_images=2)).load_state_dict(state)
    with pytest.raises(StreamResumeError, match=r"'packing': True.*'packing': False"):
        build_streaming_loader(stream(shards, 0, 2, packing=False)).load_state_dict(state)

    def without_rows(value):
        if isinstance(value, dict):
            return {key: without_rows(inner) for key, inner in value.items() if key != "rows"}
        return value

    older = without_rows(state)
    assert "'rows'" in repr(state) and "'rows'" not in repr(older)
    expected, resumed = build_streaming_loader(stream(shards, 0, 2)), build_streaming_loader(stream(shards, 0, 2))
    expected.load_state_dict(state)
    resumed.load_state_dict(older)
    assert all(same_batch(a, b) for a, b in zip(batches(expected, 3), batches(resumed, 3), strict=True))


def test_too_few_shards_for_the_readers_is_refused(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, 3)
    with pytest.raises(ValueError, match=r"3 shards.*2 ranks and 2 reader\(s\).*data.stream_split=examples"):
        stream(pattern, 0, 2, 2)


# -- end to end: the CLI on 2 ranks ------------------------------------------------------------------


def _caption_shards(folder: Path) -> str:
    """4 shards of 6 caption samples (``png`` + ``json``); one corrupt image, one malformed JSON member."""
    folder.mkdir(parents=True)
    colors = ["red", "green", "blue"]
    for shard in range(4):
        with tarfile.open(folder / f"train-{shard}.tar", "w") as tar:
            for k in range(6):
                n = shard * 6 + k
                color = colors[n % 3]
                out = io.BytesIO()
                Image.new("RGB", (20 + n, 20 + n % 5), color).save(out, "PNG")
                _member(tar, f"{n:03d}.png", b"\x89PNG broken" if n == 8 else out.getvalue())
                text = f"{color} {n}" + " x" * (n % 3)  # every sample its own
                _member(tar, f"{n:03d}.json", b"{" if n == 15 else json.dumps({"text": text}).encode())
    return str(folder / "*.tar")


def test_cli_streaming_run_resumes_bitwise_and_counts_skips(tmp_path: Path, tiny_mllama_dir: Path) -> None:
    """Train 4 steps on 2 ranks (a dataloader worker each) from tar shards, checkpointing at 2;
    resume a second run from step 2: its steps 3-4 have exactly the losses of the uninterrupted
    run (each loss depends on the weights and the data before it). The bad members appear in the
    run's skip metrics."""
    from tests.helpers.launch import REPO_ROOT, run_world

    shards = _caption_shards(tmp_path / "shards")

    def train(out: Path, *extra: str) -> list[dict]:
        args = [
            "-m", "fusiontrain", "train", "--config", str(REPO_ROOT / "configs" / "tiny.yaml"),
            f"model.hf_mllama={tiny_mllama_dir}", f"output_dir={out}", "data.format=caption", "data.streaming=true",
            f"data.train.path={shards}", "data.num_workers=1", "batch.seq_len=48", "batch.global_batch_size=4",
            "max_steps=4", "checkpoint.every_n_steps=2", "eval.every_n_steps=0", "logging.every_n_steps=0", *extra,
        ]
        run_world(args, nproc=2, timeout=300)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    uninterrupted = train(tmp_path / "a")
    resumed = train(tmp_path / "b", f"checkpoint.resume={tmp_path / 'a' / 'checkpoints' / 'step_2'}")
    assert [row["step"] for row in resumed] == [row["step"] for row in uninterrupted[2:]]
    assert [row["loss"] for row in resumed] == [row["loss"] for row in uninterrupted[2:]]
    assert resumed[-1]["skipped"] == uninterrupted[-1]["skipped"]
    assert set(uninterrupted[-1]["skipped"]) == {"corrupt_image", "malformed_json"}, uninterrupted[-1]


def test_streamed_json_lines_resume_exactly(tmp_path: Path) -> None:
    """The datasets-streaming path (load_dataset(..., streaming=True); the hub path too) on 3
    local .jsonl shards, image paths relative to their folder, a malformed line among them:
    stopped and resumed, the batches are those of the uninterrupted stream."""
    for shard in range(3):
        lines = []
        for n in range(shard * 6, shard * 6 + 6):
            (tmp_path / f"{n}.png").write_bytes(_png(n))
            lines.append('{"id": 4, "text": ' if n == 10 else json.dumps({"id": n, "text": "w", "image": f"{n}.png"}))
        (tmp_path / f"part-{shard}.jsonl").write_text("\n".join(lines) + "\n")
    pattern = str(tmp_path / "part-*.jsonl")
    uninterrupted = batches(build_streaming_loader(stream(pattern)), 12)
    first = build_streaming_loader(stream(pattern))
    head = batches(first, 5)
    resumed = build_streaming_loader(stream(pattern))
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = batches(resumed, 7)
    assert all(same_batch(a, b) for a, b in zip(head + tail, uninterrupted, strict=True))
    seen = [n for batch in uninterrupted for n in ids_of(batch)]
    assert set(seen) == set(range(18)) - {10} and len(seen) > 17  # every good line, into a second pass
    assert sum(batch.skipped.get("malformed_json", 0) for batch in uninterrupted) >= 1


def test_a_map_style_position_is_refused(shards: str) -> None:
    from tests.test_loader import loader as planned_loader

    with pytest.raises(StreamResumeError, match="map-style one.*data.streaming=false"):
        build_streaming_loader(stream(shards)).load_state_dict(planned_loader(0, 1).state_dict())


def test_streamed_parquet_images_are_decoded_by_the_stream(tmp_path: Path) -> None:
    """A parquet file with an HF Image column: rows arrive undecoded, so a corrupt image is one
    counted bad record (not an error inside datasets) and the good images decode."""
    import datasets

    images = [{"bytes": _png(n), "path": None} for n in range(4)]
    images[2] = {"bytes": b"\x89PNG broken", "path": None}
    table = datasets.Dataset.from_dict({"id": list(range(4)), "text": ["w"] * 4, "image": images})
    table.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "part-0.parquet"))
    loader = build_streaming_loader(stream(str(tmp_path / "*.parquet"), packing=False, micro_batch_size=1))
    got = batches(loader, 3)
    assert [ids_of(batch) for batch in got] == [[0], [1], [3]]
    assert got[2].skipped == {"corrupt_image": 1}


# -- a mixture of streamed sources ---------------------------------------------------------------------


def build_second(record: Record) -> Sample:
    """:func:`build`, with token ids 5000 + n (a second source's samples, told apart in a batch)."""
    sample = build(record)
    sample.tokens = sample.tokens + 4000
    sample.labels = torch.where(sample.labels == -100, -100, sample.labels + 4000)
    return sample


def mixed_stream(patterns: list[str], rank: int, world: int, num_workers: int, weights=(3.0, 1.0)) -> StreamingSampleStream:
    """Two tar sources interleaved at ``weights``; source 1's samples get token ids 5000 + n so
    that a batch tells the sources apart (and SourceBuilders is seen to pick each one's builder)."""
    from fusiontrain.data.mixture import SourceBuilders
    from fusiontrain.data.stream_sources import MixedStreamSource

    source = MixedStreamSource([open_stream(p) for p in patterns], ("first", "second"), weights)
    config = StreamConfig(seq_len=24, micro_batch_size=2, packing=True, max_images=3)
    return StreamingSampleStream(
        source, SourceBuilders([build, build_second]), SPEC, config, rank=rank, world=world, num_workers=num_workers, seed=5
    )


@pytest.fixture(scope="module")
def second_shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("second"), 4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_streamed_mixture_interleaves_by_weight_tags_sources_and_resumes_exactly(
    shards: str, second_shards: str, num_workers: int
) -> None:
    """Two tar sources at 3:1 on rank 1 of 2: every sample is built by its own source's builder
    and tagged with its source, the sources come in about their shares, and a loader restored
    mid-pass continues bitwise."""
    total = 12
    uninterrupted = batches(build_streaming_loader(mixed_stream([shards, second_shards], 1, 2, num_workers)), total)
    def source_ids(batch) -> torch.Tensor:  # None: every sample of the batch is of source 0
        return torch.zeros_like(batch.tokens) if batch.source_ids is None else batch.source_ids

    sources = [int(s) for batch in uninterrupted for s, real in zip(source_ids(batch).reshape(-1), batch.is_real.reshape(-1)) if real]
    from_tokens = [int(t >= 5000) for batch in uninterrupted for t, real in zip(batch.tokens.reshape(-1), batch.is_real.reshape(-1)) if real]
    assert sources == from_tokens  # the tag agrees with the builder that made each token
    samples = [s for batch in uninterrupted for s in batch.sample_sources]
    share = samples.count(0) / len(samples)
    assert 0 < samples.count(1) and abs(share - 0.75) < 4 * (0.75 * 0.25 / len(samples)) ** 0.5, (share, len(samples))
    first = build_streaming_loader(mixed_stream([shards, second_shards], 1, 2, num_workers))
    head = batches(first, 4)
    state = first.state_dict()
    resumed = build_streaming_loader(mixed_stream([shards, second_shards], 1, 2, num_workers))
    resumed.load_state_dict(json.loads(json.dumps(state)))
    tail = batches(resumed, total - 4)
    assert all(same_batch(a, b) for a, b in zip(head + tail, uninterrupted, strict=True))
    other = build_streaming_loader(mixed_stream([shards, second_shards], 1, 2, num_workers, weights=(1.0, 1.0)))
    with pytest.raises(StreamResumeError, match=r"at weights \[3.0, 1.0\]', now .* at weights \[1.0, 1.0\]"):
        other.load_state_dict(json.loads(json.dumps(state)))
