"""Streaming records that hold audio, for a composed model with an image and an audio encoder: the
same caption records as a JSON Lines file (wav/flac paths), a parquet file with HF ``Image`` and
``Audio`` columns (bytes, or a path with no bytes; read undecoded, no torchcodec) and a webdataset
tar shard (png/wav/flac members) stream exactly the samples the map-style records give; bad clips
and clips over the row's audio limits are counted skips; a packed stream resumes exactly with clips
in its open rows; a 2-rank streamed CLI run resumes from its checkpoint to the same loss."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from fusiontrain import tiny
from fusiontrain.data.batch import Batch
from fusiontrain.data.errors import BadSample
from fusiontrain.data.formats import OtherModality, SampleBuilder
from fusiontrain.data.loader import StreamConfig, collate_micro_batch
from fusiontrain.data.packing import PackedRow
from fusiontrain.data.record_dataset import RecordDataset
from fusiontrain.data.sources import load_records
from fusiontrain.data.stream_sources import open_stream
from fusiontrain.data.stream_position import StreamResumeError
from fusiontrain.data.streaming import StreamingSampleStream, build_streaming_loader
from fusiontrain.families import model_family
from fusiontrain.models import compose_from_hf

IMAGE_ID, AUDIO_ID = tiny.TEXT_VOCAB_SIZE, tiny.TEXT_VOCAB_SIZE + 1  # the composed model's first two new rows
UNPACKED = StreamConfig(seq_len=48, micro_batch_size=1, packing=False, max_images=2)
PACKED = StreamConfig(seq_len=48, micro_batch_size=2, packing=True, max_images=2, max_open_rows=3)

# (text, image, audio): 8 caption records; "gone.wav" does not exist, "garbage.wav" is not audio.
RECORDS = [
    ("a red square", "red.png", None),
    ("a low tone", None, "tone.wav"),
    ("blue and a chirp", "blue.png", "chirp.flac"),
    ("nothing to hear", None, "gone.wav"),
    ("red and low", "red.png", "tone.wav"),
    ("only noise", None, "garbage.wav"),
    ("low again", None, "tone.wav"),
    ("a blue chirp", "blue.png", "chirp.flac"),
]
BAD = {"missing_audio": 1, "corrupt_audio": 1}
PATH_ONLY = 6  # in the parquet file, this record's clip is a path with no bytes


def _encoded(seconds: float, rate: int, hertz: float, format: str) -> bytes:
    t = np.arange(int(rate * seconds), dtype=np.float32) / rate
    out = io.BytesIO()
    soundfile.write(out, 0.3 * np.sin(2 * np.pi * hertz * (1 + t) * t), rate, format=format)
    return out.getvalue()


def _png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (30, 20), colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The records written three ways, each in its own folder beside the media files."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("audio_streaming")
    media = {
        "red.png": _png((220, 30, 30)),
        "blue.png": _png((30, 30, 220)),
        "tone.wav": _encoded(0.3, 16_000, 220.0, "WAV"),  # 15 encoder tokens
        "chirp.flac": _encoded(0.6, 22_050, 440.0, "FLAC"),  # resampled to 16 kHz: 30 tokens
        "garbage.wav": b"RIFF" + bytes(range(200)),
    }
    for name, content in media.items():
        (root / name).write_bytes(content)
    lines = [
        json.dumps({"text": text, **({"image": image} if image else {}), **({"audio": audio} if audio else {})})
        for text, image, audio in RECORDS
    ]
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")

    def ref(name: str | None, k: int) -> dict | None:
        if name is None:
            return None
        if name not in media or k == PATH_ONLY:
            return {"bytes": None, "path": name}
        return {"bytes": media[name], "path": None}

    features = datasets.Features(
        {"text": datasets.Value("string"), "image": datasets.Image(), "audio": datasets.Audio()}
    )
    columns = {
        "text": [t for t, _, _ in RECORDS],
        "image": [ref(i, k) for k, (_, i, _) in enumerate(RECORDS)],
        "audio": [ref(a, k) for k, (_, _, a) in enumerate(RECORDS)],
    }
    pq.write_table(pa.table(columns, schema=features.arrow_schema), root / "records.parquet")

    with tarfile.open(root / "records.tar", "w") as tar:
        for k, (text, image, audio) in enumerate(RECORDS):
            unpacked = {"audio": audio} if audio and audio not in media else {}  # a path: missing_audio
            members = {"json": json.dumps({"text": text, **unpacked}).encode()}
            for name in (image, audio):
                if name in media:
                    members[name.rsplit(".", 1)[1]] = media[name]
            for extension, content in members.items():
                info = tarfile.TarInfo(f"{k:03d}.{extension}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return {"jsonl": root / "records.jsonl", "parquet": root / "records.parquet", "tar": root / "records.tar"}


@pytest.fixture(scope="module")
def formats(tiny_llama_dir: Path, tiny_siglip_dir: Path, tiny_whisper_dir: Path) -> dict:
    model = compose_from_hf(tiny_llama_dir, {"image": tiny_siglip_dir, "audio": tiny_whisper_dir}, fusion_interval=2)
    return model_family("composed").input_formats(model)


@pytest.fixture(scope="module")
def builder(formats: dict, tiny_llama_dir: Path, tiny_siglip_dir: Path, tiny_whisper_dir: Path) -> SampleBuilder:
    return SampleBuilder(
        tiny_llama_dir, formats["image"], image_dir=tiny_siglip_dir, format="caption", image_token_id=IMAGE_ID,
        max_len=48, other_modalities=[OtherModality("audio", formats["audio"], tiny_whisper_dir, AUDIO_ID)],
    )


def _stream(
    path: Path, builder: SampleBuilder, formats: dict, config: StreamConfig, limits: tuple = ((2, 100),)
) -> StreamingSampleStream:
    return StreamingSampleStream(
        open_stream(str(path)), builder, formats, config, rank=0, world=1, num_workers=0, seed=3, other_limits=limits
    )


def _batches(stream: StreamingSampleStream, n: int, state: dict | None = None) -> tuple[list[Batch], dict]:
    """The first ``n`` batches of ``stream`` (from ``state``, a saved position, when given) and
    the position after them, as a checkpoint stores it (JSON)."""
    loader = build_streaming_loader(stream)
    if state is not None:
        loader.load_state_dict(state)
    iterator = iter(loader)
    out = [next(iterator) for _ in range(n)]
    return out, json.loads(json.dumps(loader.state_dict()))


def _tensors(batch: Batch) -> dict[str, torch.Tensor]:
    """Every tensor of ``batch`` by name, each modality's inputs and mask included."""
    out = {name: getattr(batch, name) for name in ("tokens", "labels", "input_pos", "is_real", "segment_ids")}
    out |= {f"mask/{modality}": mask for modality, mask in (batch.encoder_mask or {}).items()}
    for modality, inputs in (batch.encoder_input or {}).items():
        out |= {f"{modality}/{key}": value for key, value in inputs.items()}
    return {name: value for name, value in out.items() if value is not None}


def _same(a: Batch, b: Batch) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[name], tb[name]) for name in ta)


@pytest.mark.parametrize("reader", ["jsonl", "parquet", "tar"])
def test_a_stream_yields_the_samples_of_the_map_style_records(reader, data, builder, formats, caplog) -> None:
    """One sample a batch: each streamed batch is the map-style sample of the same record collated
    alone (tokens, labels, pixels, mel features, masks by modality); the missing and the corrupt
    clip are skipped, counted under their reasons and logged with their clip."""
    records = RecordDataset(load_records(data["jsonl"]), builder)
    expected, reasons = [], Counter()
    for k in range(len(records)):
        try:
            sample = records[k]
        except BadSample as error:
            reasons[error.reason] += 1
            continue
        expected.append(collate_micro_batch([PackedRow([k], [sample])], UNPACKED, formats))
    assert reasons == BAD and sum("audio" in (batch.encoder_input or {}) for batch in expected) == 5

    with caplog.at_level(logging.WARNING, logger="fusiontrain.data"):
        got, _ = _batches(_stream(data[reader], builder, formats, UNPACKED), len(expected))
    assert all(_same(a, b) for a, b in zip(got, expected, strict=True))
    assert sum((Counter(batch.skipped) for batch in got), Counter()) == BAD
    assert "gone.wav" in caplog.text and "missing_audio" in caplog.text and "corrupt_audio" in caplog.text


def test_clips_over_the_rows_audio_limits_are_counted_skips(data, builder, formats) -> None:
    """With at most 20 audio tokens a row, a record with the 30-token chirp is a too_many_items
    skip, beside the bad clips; the records with the 15-token tone stream on."""
    got, _ = _batches(_stream(data["jsonl"], builder, formats, UNPACKED, limits=((1, 20),)), 4)
    assert [int((batch.tokens == AUDIO_ID).sum()) for batch in got] == [0, 1, 1, 1]
    assert sum((Counter(batch.skipped) for batch in got), Counter()) == {**BAD, "too_many_items": 1}


def test_a_packed_stream_with_clips_resumes_exactly(data, builder, formats) -> None:
    """Packed rows of at most 2 clips and 40 audio tokens (a tone and a chirp never share one):
    stopped with rows open and restored from its JSON state, the stream continues bitwise as the
    uninterrupted one, across the end of the pass; another audio row limit is refused."""
    parquet, limits, total = data["parquet"], ((2, 40),), 8
    uninterrupted, _ = _batches(_stream(parquet, builder, formats, PACKED, limits), total)
    head, state = _batches(_stream(parquet, builder, formats, PACKED, limits), 3)
    tail, _ = _batches(_stream(parquet, builder, formats, PACKED, limits), total - 3, state)
    assert all(_same(a, b) for a, b in zip(head + tail, uninterrupted, strict=True))
    saved = json.dumps(state)
    assert '"open_rows": [[' in saved and '"other_limits": [[2, 40]]' in saved
    assert all("audio" in batch.encoder_input for batch in tail[:2])
    for batch in uninterrupted:
        assert int((batch.tokens == AUDIO_ID).sum(dim=1).max()) <= 2
        if "audio" in batch.encoder_mask:  # [b, s, s_e]: the row's clips' tokens are the columns seen
            assert int(batch.encoder_mask["audio"].any(dim=1).sum(dim=1).max()) <= 40
    assert max(int(batch.segment_ids.max()) for batch in uninterrupted) >= 2, "rows must be packed"
    with pytest.raises(StreamResumeError, match=r"data.max_items_per_row.*saved \[\[2, 40\]\], now \[\[1, 40\]\]"):
        build_streaming_loader(_stream(parquet, builder, formats, PACKED, ((1, 40),))).load_state_dict(state)



def test_the_trainers_streaming_loader_carries_clips_under_the_configured_row_limits(
    data, builder, formats, tiny_llama_dir: Path, tiny_siglip_dir: Path, tiny_whisper_dir: Path
) -> None:
    """The trainer's path from a config (data.streaming=true, model.compose.encoders with audio):
    no refusal, and its loader streams the batches of a stream built here with the model's
    formats and the configured audio row limits (data.max_items_per_row, data.max_item_tokens_per_row),
    which its saved position names."""
    from fusiontrain.config import load_config
    from fusiontrain.source.model_source import ModelSource
    from fusiontrain.train.data import build_stream_config, build_streaming_train_loader
    from fusiontrain.train.model import build_meta_model
    from fusiontrain.train.model_inputs import model_inputs
    from tests.helpers.launch import REPO_ROOT

    config = load_config(REPO_ROOT / "configs" / "tiny.yaml", [
        "model.hf_mllama=null", f"model.compose.decoder={tiny_llama_dir}",
        f"model.compose.encoders={{image: {tiny_siglip_dir}, audio: {tiny_whisper_dir}}}",
        "model.compose.fusion_intervals={image: 2, audio: 4}", "data.format=caption", "data.streaming=true",
        f"data.train.path={data['parquet']}", "data.packing=true", "data.num_workers=0", "batch.seq_len=48",
        "data.max_items_per_row={audio: 2}", "data.max_item_tokens_per_row={audio: 40}",
    ])
    source = ModelSource.from_config(config.model)
    image_format, inputs, _ = model_inputs(config, source, build_meta_model(config.model, source))
    loader = build_streaming_train_loader(config, image_format, inputs, rank=0, world=1, ignore_index=-100)
    iterator = iter(loader)
    got = [next(iterator) for _ in range(6)]
    stream_config = build_stream_config(config.data, config.batch, image_format, ignore_index=-100)
    want, _ = _batches(_stream(data["parquet"], builder, formats, stream_config, ((2, 40),)), 6)
    assert all(_same(a, b) for a, b in zip(got, want, strict=True))
    assert any("audio" in batch.encoder_input for batch in got)
    assert '"other_limits": [[2, 40]]' in json.dumps(loader.state_dict())


def test_map_style_parquet_records_with_an_audio_column_read_it_undecoded(data, builder, formats) -> None:
    """load_records reads a parquet file's HF ``Audio`` column undecoded too (``datasets`` would
    decode it with torchcodec): its samples are those of the JSON Lines records, bad clips alike."""
    by_reader = []
    for reader in ("jsonl", "parquet"):
        records, got = RecordDataset(load_records(data[reader]), builder), []
        for k in range(len(records)):
            try:
                got.append(collate_micro_batch([PackedRow([k], [records[k]])], UNPACKED, formats))
            except BadSample as error:
                got.append(error.reason)
        by_reader.append(got)
    jsonl, parquet = by_reader
    assert len(jsonl) == len(parquet) and sum(isinstance(x, str) for x in jsonl) == sum(BAD.values())
    for a, b in zip(jsonl, parquet):
        assert a == b if isinstance(a, str) else _same(a, b)
