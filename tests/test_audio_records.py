"""Records that hold audio, for a composed model with an image and an audio encoder: caption
records (``{"audio": ..., "text": ...}``, with or without an image), chat records with
``{"type": "audio"}`` items and an ``audios`` list beside images, their placeholders' token ids,
spans, processed clips, and the bad records of audio (count mismatch, missing file, truncation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from fusiontrain import tiny
from fusiontrain.data.audio import load_audio
from fusiontrain.data.errors import BadSample
from fusiontrain.data.formats import OtherModality, SampleBuilder
from fusiontrain.data.sources import Record
from fusiontrain.families import model_family
from fusiontrain.models import compose_from_hf

IMAGE_ID, AUDIO_ID = tiny.TEXT_VOCAB_SIZE, tiny.TEXT_VOCAB_SIZE + 1  # the composed model's first two new rows


@pytest.fixture(scope="module")
def formats(tiny_llama_dir: Path, tiny_siglip_dir: Path, tiny_whisper_dir: Path) -> dict:
    model = compose_from_hf(tiny_llama_dir, {"image": tiny_siglip_dir, "audio": tiny_whisper_dir}, fusion_interval=2)
    return model_family("composed").input_formats(model)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("audio_records")
    t = np.arange(int(22_050 * 0.4), dtype=np.float32) / 22_050
    soundfile.write(folder / "tone.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 22_050)
    soundfile.write(folder / "chirp.flac", 0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t), 22_050)
    Image.new("RGB", (30, 20), (200, 40, 40)).save(folder / "red.png")
    return folder


def _builder(format: str, formats: dict, tiny_llama_dir: Path, tiny_siglip_dir: Path, tiny_whisper_dir: Path, **kwargs) -> SampleBuilder:
    kwargs.setdefault("max_len", 96)
    return SampleBuilder(
        tiny_llama_dir, formats["image"], image_dir=tiny_siglip_dir, format=format, image_token_id=IMAGE_ID,
        other_modalities=[OtherModality("audio", formats["audio"], tiny_whisper_dir, AUDIO_ID)], **kwargs,
    )


@pytest.fixture(scope="module")
def folders(tiny_llama_dir: Path, tiny_siglip_dir: Path, tiny_whisper_dir: Path) -> tuple[Path, Path, Path]:
    return tiny_llama_dir, tiny_siglip_dir, tiny_whisper_dir


def _clip(formats: dict, tiny_whisper_dir: Path, path: Path) -> dict:
    from transformers import WhisperFeatureExtractor

    fmt = formats["audio"]
    return fmt.process(WhisperFeatureExtractor.from_pretrained(tiny_whisper_dir), load_audio(path, fmt.sampling_rate), fmt.sampling_rate)


def test_caption_records_of_a_clip_and_of_an_image_and_a_clip(formats, folders, files) -> None:
    builder = _builder("caption", formats, *folders)
    sample = builder(Record({"audio": "tone.wav", "text": "a tone at 440 hertz"}, "caption:1", files))
    tokens = sample.tokens.tolist()
    assert tokens[0] == builder.tokenizer.bos_token_id and tokens[1] == AUDIO_ID and IMAGE_ID not in tokens
    assert sample.images == [] and sample.other_spans == {"audio": [(1, len(tokens))]}
    (clip,) = sample.other_items["audio"]
    want = _clip(formats, folders[2], files / "tone.wav")
    assert clip.keys() == want.keys() and all(torch.equal(clip[k], want[k]) for k in want)
    assert sample.labels[:1].tolist() == [-100]  # the position before the placeholder predicts nothing

    both = builder(Record({"image": "red.png", "audio": "chirp.flac", "text": "red, and a chirp"}, "caption:2", files))
    assert both.tokens[1:3].tolist() == [IMAGE_ID, AUDIO_ID]
    assert both.image_spans == [(1, len(both))] and both.other_spans == {"audio": [(2, len(both))]}
    assert not any(label in (IMAGE_ID, AUDIO_ID) for label in both.labels.tolist())

    with pytest.raises(BadSample, match=r"needs an 'image' or 'audio'") as error:
        builder(Record({"text": "no item"}, "caption:3", files))
    assert error.value.reason == "bad_record"


def test_chat_records_place_clips_and_images_where_their_items_stand(formats, folders, files) -> None:
    builder = _builder("chat", formats, *folders)
    record = {
        "images": ["red.png"],
        "audios": ["tone.wav", "chirp.flac"],
        "messages": [
            {"role": "user", "content": [
                {"type": "audio"}, {"type": "text", "text": "then a picture"}, {"type": "image"},
                {"type": "text", "text": "and another sound"}, {"type": "audio"},
            ]},
            {"role": "assistant", "content": "a tone, a red square and a chirp"},
        ],
    }
    sample = builder(Record(record, "chat:1", files))
    tokens = sample.tokens.tolist()
    audio_at = [k for k, t in enumerate(tokens) if t == AUDIO_ID]
    (image_at,) = [k for k, t in enumerate(tokens) if t == IMAGE_ID]
    assert len(audio_at) == 2 and audio_at[0] < image_at < audio_at[1]
    assert sample.other_spans["audio"] == [(audio_at[0], audio_at[1]), (audio_at[1], len(tokens))]
    assert sample.image_spans == [(image_at, len(tokens))]
    clips = sample.other_items["audio"]
    assert [int(c["num_frames"]) for c in clips] == [int(_clip(formats, folders[2], files / n)["num_frames"]) for n in ("tone.wav", "chirp.flac")]

    one_short = {**record, "audios": ["tone.wav"]}
    with pytest.raises(BadSample, match="2 audio placeholders in the text but 1 audio items") as error:
        builder(Record(one_short, "chat:2", files))
    assert error.value.reason == "item_count_mismatch"
    missing = {**record, "audios": ["tone.wav", "gone.wav"]}
    with pytest.raises(BadSample, match="gone.wav") as error:
        builder(Record(missing, "chat:3", files))
    assert error.value.reason == "missing_audio" and error.value.origin == "chat:3"


def test_truncation_keeps_the_clips_whose_placeholder_survives(formats, folders, files) -> None:
    record = {"audio": "tone.wav", "image": "red.png", "text": " ".join(["word"] * 60)}
    builder = _builder("caption", formats, *folders, max_len=20, too_long="truncate")
    sample = builder(Record(record, "caption:1", files))
    assert len(sample) == 20 and len(sample.other_items["audio"]) == 1
    with pytest.raises(BadSample) as error:
        _builder("caption", formats, *folders, max_len=20)(Record(record, "caption:2", files))
    assert error.value.reason == "too_long"


def test_sizes_count_each_modalitys_items_and_tokens(formats, folders, files) -> None:
    """RecordDataset.size gives the audio items and their encoder tokens after the image columns
    (clips decoded: Whisper's token count varies with a clip's length); the size table and its
    cache carry them in columns of their own."""
    from fusiontrain.data.record_dataset import RecordDataset
    from fusiontrain.data.sizes import SampleSizes, columns, load_cached, measure, save_cache

    records = [
        Record({"audio": "tone.wav", "text": "a tone"}, "r:0", files),
        Record({"image": "red.png", "audio": "chirp.flac", "text": "red and a chirp"}, "r:1", files),
        Record({"image": "red.png", "text": "only red"}, "r:2", files),
        Record({"audio": "gone.wav", "text": "missing"}, "r:3", files),
    ]
    dataset = RecordDataset(records, _builder("caption", formats, *folders))
    samples = [dataset[k] for k in range(3)]
    sizes = [dataset.size(k) for k in range(3)]
    for sample, size in zip(samples, sizes):
        clips = sample.other_items.get("audio", [])
        assert size == (len(sample), len(sample.images), len(sample.images) * formats["image"].max_tokens_per_image,
                        len(clips), sum(formats["audio"].num_tokens(c) for c in clips))
    assert sizes[0][4] == formats["audio"].num_tokens(samples[0].other_items["audio"][0]) < 50  # 0.4 s of the 1 s window
    table = measure(dataset.size, 4, range(4), others=("audio",))
    assert table.shape == (4, 6) and columns(("audio",))[4:] == ("audio_items", "audio_encoder_tokens")
    assert table[:3, 4:].tolist() == [list(s[3:]) for s in sizes] and table[3, 3] != 0  # missing_audio's code
    table_sizes = SampleSizes(table, ("audio",))
    assert table_sizes.reason(3) == "missing_audio" and table_sizes.other_sizes(table[1].tolist()) == [tuple(sizes[1][3:])]
    folder = files / "cache"
    save_cache(table_sizes, [folder], "k" * 64, {})
    cached, _ = load_cached([folder], "k" * 64, 4, ("audio",))
    assert torch.equal(cached.table, table) and cached.others == ("audio",)
    assert load_cached([folder], "k" * 64, 4) is None  # another width: the image-only table it is not


def test_the_row_plan_holds_each_modality_to_its_row_limits() -> None:
    """Audio items and tokens per row are limited like images (first-fit packing on sizes); a
    sample over them alone is skipped as too_many_items; the limits are recorded only when set."""
    from fusiontrain.data.row_plan import RowLimits, RowPlan
    from fusiontrain.data.sizes import SampleSizes

    generator = torch.Generator().manual_seed(0)
    rows = []
    for k in range(60):
        clips = int(torch.randint(0, 3, (), generator=generator))
        tokens = sum(int(torch.randint(5, 51, (), generator=generator)) for _ in range(clips))
        rows.append([int(torch.randint(6, 30, (), generator=generator)), k % 2, 4 * (k % 2), 0, clips, tokens])
    rows[7] = [10, 0, 0, 0, 3, 60]  # three clips: more than a row holds
    sizes = SampleSizes(torch.tensor(rows), ("audio",))
    limits = RowLimits(seq_len=64, max_images=2, max_encoder_tokens=None, packing=True, open_rows=4, other_limits=((2, 80),))
    plan = RowPlan(sizes, limits, seed=0)
    epoch = plan.epoch(0)
    over = [i for i, row in enumerate(rows) if row[4] > 2 or row[5] > 80]  # sample 7, and two long clips
    assert 7 in over and epoch.skipped == {"too_many_items": len(over)}
    assert sorted(i for row in epoch.rows for i in row) == [i for i in range(60) if i not in over]
    for row in epoch.rows:
        assert sum(rows[i][0] for i in row) <= 64 and sum(rows[i][1] for i in row) <= 2
        assert sum(rows[i][4] for i in row) <= 2 and sum(rows[i][5] for i in row) <= 80
    assert max(len(row) for row in epoch.rows) > 1  # packed
    assert limits.identity()["other_limits"] == [[2, 80]]
    assert "other_limits" not in RowLimits(64, 2, None, True, 4).identity()
    with pytest.raises(ValueError, match="row limits for 0 other modalities"):
        RowPlan(sizes, RowLimits(64, 2, None, True, 4), seed=0).epoch(0)


def test_the_packer_sizes_built_samples_by_their_formats(formats, folders, files) -> None:
    from fusiontrain.data.packing import FirstFitPacker

    builder = _builder("caption", formats, *folders)
    samples = [builder(Record({"audio": name, "text": "a sound"}, f"r:{k}", files)) for k, name in enumerate(["tone.wav", "chirp.flac"] * 2)]
    packer = FirstFitPacker(96, 1, 2, other_limits=((1, None),), other_formats=(("audio", formats["audio"]),))
    closed = [row for key, sample in enumerate(samples) for row in packer.add(key, sample)] + packer.flush()
    assert all(row.others == [(1, formats["audio"].num_tokens(row.samples[0].other_items["audio"][0]))] for row in closed)
    assert len(closed) == 4  # one clip a row
