"""The Whisper audio encoder family and audio decoding.

The tiny Whisper folder (``tiny_whisper_dir``: a 1 s window of 100 frames, 50 tower outputs) is
composed with the tiny Llama as the ``audio`` encoder and checked against transformers'
``WhisperEncoder`` loaded from the same folder; clips are written with soundfile in the test.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch

from fusiontrain.data.audio import load_audio, resample
from fusiontrain.data.errors import BadSample
from fusiontrain.families import encoder_family_for
from fusiontrain.families.hf_tower import project_tokens
from fusiontrain.families.whisper import WhisperAudioEncoder, WhisperTowerEncoder
from fusiontrain.families.whisper_audio import WhisperClips
from fusiontrain.models import compose_from_hf
from fusiontrain.modules import get_fusion_params
from fusiontrain.modules.blocks import block_stacks

RATE = 16_000
WINDOW = 16_000  # samples: the tiny feature extractor's 1 s chunk
TOKENS = 50  # tower outputs per window


@pytest.fixture(scope="module")
def model(tiny_llama_dir: Path, tiny_whisper_dir: Path) -> torch.nn.Module:
    return compose_from_hf(tiny_llama_dir, {"audio": tiny_whisper_dir}, fusion_interval=2).eval()


@pytest.fixture(scope="module")
def feature_extractor(tiny_whisper_dir: Path) -> object:
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor.from_pretrained(tiny_whisper_dir)


@pytest.fixture(scope="module")
def fmt(model: torch.nn.Module) -> WhisperClips:
    return WhisperAudioEncoder().input_format(model.encoder["audio"])


def noise(samples: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(samples) * 0.1).astype(np.float32)


def real_frames(feature_extractor: object, waveform: np.ndarray) -> int:
    """The clip's real feature frames, as the feature extractor's own frame mask counts them."""
    out = feature_extractor(waveform, sampling_rate=RATE, return_attention_mask=True, return_tensors="pt")
    return int(out["attention_mask"].sum())


# -- the encoder against transformers ------------------------------------------------------------


def test_packed_clips_equal_hf_whisper_encoder_clip_by_clip(
    model: torch.nn.Module, fmt: WhisperClips, feature_extractor: object, tiny_whisper_dir: Path
) -> None:
    from transformers import WhisperModel

    hf = WhisperModel.from_pretrained(tiny_whisper_dir).encoder.eval()
    waveforms = [noise(5_000, 1), noise(WINDOW, 2), noise(3_000, 3)]
    clips = [fmt.process(feature_extractor, w, RATE) for w in waveforms]
    counts = [fmt.num_tokens(clip) for clip in clips]
    assert counts == [16, TOKENS, 10]  # ceil(ceil(n / 160) / 2)
    with torch.no_grad():
        references = []
        for waveform, n in zip(waveforms, counts):
            features = feature_extractor(waveform, sampling_rate=RATE, return_tensors="pt")["input_features"]
            references.append(hf(input_features=features).last_hidden_state[0, :n])

    per_row = [[clips[0], clips[1]], [clips[2]]]  # row 1 has a padding slot
    batch = fmt.collate(per_row)
    assert set(batch) == {"input_features", "token_index", "clip_slots"}
    assert batch["clip_slots"].tolist() == [0, 1, 2]
    encoder = model.encoder["audio"]
    features = encoder.features(**batch)  # grad mode: the frozen tower runs without a graph
    assert not features.requires_grad
    assert features.shape == (2, counts[0] + counts[1], 32)
    row_0 = torch.cat([references[0], references[1]])
    assert torch.allclose(features[0], row_0, rtol=0, atol=1e-6)
    assert torch.allclose(features[1, : counts[2]], references[2], rtol=0, atol=1e-6)

    projected = encoder(**batch)
    assert projected.requires_grad  # the projection head trains
    assert torch.equal(projected.detach(), project_tokens(encoder.projection, features).detach())


def test_token_counts_follow_the_real_frames_and_too_long(fmt: WhisperClips, feature_extractor: object) -> None:
    for samples in (1, 170, 3_000, 4_960, 15_680):  # 1, 2, 19, 31, 98 frames
        waveform = noise(samples, samples)
        frames = real_frames(feature_extractor, waveform)
        assert frames < 100
        assert fmt.num_tokens(fmt.process(feature_extractor, waveform, RATE)) == math.ceil(frames / 2)
    assert fmt.num_tokens(fmt.process(feature_extractor, noise(WINDOW, 0), RATE)) == TOKENS

    long = noise(WINDOW * 3 // 2, 7)
    assert fmt.too_long == "skip"
    with pytest.raises(BadSample, match=r"1\.5 s .* longer than the encoder's 1 s window") as error:
        fmt.process(feature_extractor, long, RATE)
    assert error.value.reason == "too_long"
    truncated = fmt.with_too_long("truncate").process(feature_extractor, long, RATE)
    assert fmt.too_long == "skip"  # a copy
    first_window = fmt.process(feature_extractor, long[:WINDOW], RATE)
    assert fmt.num_tokens(truncated) == TOKENS
    assert torch.equal(truncated["input_features"], first_window["input_features"])


def test_format_items_and_batches(fmt: WhisperClips) -> None:
    assert fmt.max_tokens_per_item == fmt.max_tokens_per_clip == TOKENS and fmt.tokens_vary
    assert fmt.num_tokens(fmt.blank()) == 1 and fmt.num_tokens(fmt.worst_case()) == TOKENS
    generator = torch.Generator().manual_seed(0)
    one, two = fmt.synthetic(generator, 0.5), fmt.synthetic(generator, -0.5)
    n1, n2 = fmt.num_tokens(one), fmt.num_tokens(two)
    assert n1 != n2
    offsets, width = fmt.layout([[one, two], [], [two]])
    assert offsets == [[0, n1], [], [0]] and width == n1 + n2
    batch = fmt.collate([[one, two], [], [two]])
    assert batch["input_features"].shape == (3, 2, 16, 100)
    assert batch["clip_slots"].tolist() == [0, 1, 4]
    assert batch["token_index"][0].tolist() == list(range(n1)) + list(range(TOKENS, TOKENS + n2))
    assert batch["token_index"][2, :n2].tolist() == list(range(n2)) and not batch["token_index"][2, n2:].any()
    assert fmt.collate([[], []]) is None


# -- loading -----------------------------------------------------------------------------------


def test_the_family_loads_every_encoder_tensor(
    model: torch.nn.Module, tiny_llama_dir: Path, tiny_whisper_dir: Path, tmp_path: Path
) -> None:
    from transformers import WhisperForConditionalGeneration, WhisperModel

    config = json.loads((tiny_whisper_dir / "config.json").read_text())
    assert encoder_family_for(config).name == "whisper" and encoder_family_for(config).modality == "audio"
    reference = WhisperModel.from_pretrained(tiny_whisper_dir).encoder.state_dict()
    encoder = model.encoder["audio"]
    assert isinstance(encoder, WhisperTowerEncoder)
    ours = encoder.tower.state_dict()
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
    fusion = {name for name in get_fusion_params(model) if name.startswith("encoder.")}
    assert fusion == {f"encoder.audio.projection.{name}" for name, _ in encoder.projection.named_parameters()}
    stacks = dict(block_stacks(model))
    assert stacks.get("encoder.audio.tower.layers") is encoder.tower.layers

    # a WhisperForConditionalGeneration folder stores the encoder under model.encoder.*
    full = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir)
    full.save_pretrained(tmp_path / "full")
    from safetensors import safe_open

    with safe_open(tmp_path / "full" / "model.safetensors", "pt") as stored:
        assert any(key.startswith("model.encoder.") for key in stored.keys())
    loaded = compose_from_hf(tiny_llama_dir, {"audio": tmp_path / "full"}, fusion_interval=2)
    for name, tensor in reference.items():
        assert torch.equal(loaded.encoder["audio"].tower.state_dict()[name], tensor), name


def test_a_trainable_encoder_keeps_the_fixed_position_table_frozen(tiny_llama_dir: Path, tiny_whisper_dir: Path) -> None:
    """transformers freezes WhisperEncoder.embed_positions (sinusoids); encoder_trainable trains
    every other tower parameter and leaves it so (the encoder declares it in frozen_params())."""
    model = compose_from_hf(tiny_llama_dir, {"audio": tiny_whisper_dir}, fusion_interval=2, encoder_trainable=True)
    tower = {name: p.requires_grad for name, p in model.named_parameters() if name.startswith("encoder.audio.tower.")}
    assert not tower.pop("encoder.audio.tower.embed_positions.weight")
    assert tower and all(tower.values())


def test_the_one_encoder_shorthand_refuses_whisper(
    tiny_llama_dir: Path, tiny_whisper_dir: Path, model: torch.nn.Module
) -> None:
    with pytest.raises(ValueError, match=r"'model\.compose\.encoder'.*audio.*model\.compose\.encoders: \{audio: "):
        compose_from_hf(tiny_llama_dir, tiny_whisper_dir)
    with pytest.raises(TypeError, match="Whisper encodes audio"):
        WhisperAudioEncoder().image_format(model.encoder["audio"])


# -- decoding ------------------------------------------------------------------------------------


def pcm16_exact(samples: int, channels: int, seed: int) -> np.ndarray:
    """float32 ``[samples, channels]`` that 16-bit PCM stores exactly."""
    ints = np.random.default_rng(seed).integers(-8000, 8000, size=(samples, channels))
    return (ints / 32768).astype(np.float32)


def encoded(data: np.ndarray, rate: int, container: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, data, rate, format=container, subtype="PCM_16")
    return buffer.getvalue()


@pytest.mark.parametrize("container", ["WAV", "FLAC"])
def test_bytes_and_paths_decode_to_the_samples(container: str, tmp_path: Path) -> None:
    data = pcm16_exact(4_000, 1, seed=0)
    clip = encoded(data, RATE, container)
    file = tmp_path / f"clip.{container.lower()}"
    file.write_bytes(clip)
    for ref, base_dir in [(clip, None), (file, None), (str(file), None), (file.name, tmp_path)]:
        waveform = load_audio(ref, RATE, base_dir=base_dir)
        assert waveform.dtype == np.float32 and np.array_equal(waveform, data[:, 0])


def test_a_stereo_clip_is_mixed_down_and_resampled_by_soxr() -> None:
    data = pcm16_exact(44_100 // 2, 2, seed=1)
    waveform = load_audio(encoded(data, 44_100, "WAV"), RATE)
    expected = soxr.resample(data.mean(axis=1), 44_100, RATE)
    assert waveform.dtype == np.float32 and waveform.shape == (RATE // 2,)
    assert np.array_equal(waveform, expected)


def test_an_hf_audio_column_without_decoding(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert importlib.util.find_spec("torchcodec") is None  # what datasets would decode Audio with
    mono, stereo = pcm16_exact(3_000, 1, seed=2), pcm16_exact(8_000, 2, seed=3)
    on_disk = tmp_path / "stereo.flac"
    on_disk.write_bytes(encoded(stereo, 44_100, "FLAC"))
    column = pa.array(
        [{"bytes": encoded(mono, RATE, "WAV"), "path": "mono.wav"}, {"bytes": None, "path": str(on_disk)}],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"audio": column}), tmp_path / "clips.parquet")
    dataset = datasets.Dataset.from_parquet(str(tmp_path / "clips.parquet"), cache_dir=str(tmp_path / "cache"))
    dataset = dataset.cast_column("audio", datasets.Audio(decode=False))
    first, second = dataset[0]["audio"], dataset[1]["audio"]
    assert first["path"] == "mono.wav" and second["bytes"] is None
    assert np.array_equal(load_audio(first, RATE), mono[:, 0])
    assert np.array_equal(load_audio(second, RATE), soxr.resample(stereo.mean(axis=1), 44_100, RATE))


def test_bad_audio_raises_its_reason_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.wav"
    corrupt = tmp_path / "garbage.wav"
    corrupt.write_bytes(b"RIFF" + bytes(range(256)) * 4)
    empty = tmp_path / "silence.wav"
    empty.write_bytes(encoded(np.zeros((0, 1), np.float32), RATE, "WAV"))
    for file, reason in [(missing, "missing_audio"), (corrupt, "corrupt_audio"), (empty, "empty_audio")]:
        with pytest.raises(BadSample) as error:
            load_audio(file, RATE)
        assert error.value.reason == reason and str(file) in error.value.detail
        with pytest.raises(BadSample) as error:
            load_audio({"bytes": None, "path": str(file)}, RATE)
        assert error.value.reason == reason and str(file) in error.value.detail
    # soxr would hang on nan, inf and 1e15; 1 Hz would resample to 16,000 times the samples
    for rate in (0, -8_000, 1, 999, float("nan"), float("inf"), 1e15, "16k"):
        with pytest.raises(BadSample) as error:
            resample(noise(100, 0), rate, RATE, f"audio file {tmp_path / 'clip.wav'}")
        assert error.value.reason == "bad_sample_rate" and "clip.wav" in error.value.detail
    low = tmp_path / "one_hertz.wav"
    low.write_bytes(encoded(noise(100, 0)[:, None], 1, "WAV"))  # a file may state 1 Hz
    with pytest.raises(BadSample, match=r"sample rate 1 Hz, below the 1000 Hz") as error:
        load_audio(low, RATE)
    assert error.value.reason == "bad_sample_rate" and str(low) in error.value.detail
