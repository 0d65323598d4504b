"""The planner and synthetic data for a composed model with an encoder per modality (Llama + SigLIP
for images + Whisper for audio): the worst-case micro-batch holds every modality's worst-case items
at the trainer's row limits; synthetic samples carry clips beside images, deterministically, and a
model reads them; the plan's peak is within 10% of a real training run's measured peak.

Shapes: b rows, s tokens per row, s_e encoder tokens per row."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from fusiontrain import tiny
from fusiontrain.config import load_config
from fusiontrain.data.packing import FirstFitPacker, collate_rows
from fusiontrain.data.synthetic import SyntheticImageText
from fusiontrain.families.composed.compose import init_fusion_params
from fusiontrain.families.fixed_size_image import FixedSizeImage
from fusiontrain.families.whisper_audio import WhisperClips
from fusiontrain.models import compose_from_hf
from fusiontrain.modules import TanhGate
from fusiontrain.plan.trace import worst_case_batch, worst_case_items
from fusiontrain.source.model_source import ModelSource
from fusiontrain.train.data import build_dataset
from fusiontrain.train.model import build_meta_model
from fusiontrain.train.model_inputs import model_inputs
from tests.helpers.launch import REPO_ROOT, run_world

TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


# -- the worst-case micro-batch ---------------------------------------------------------------------

IMAGE_TOKENS, MEL_BINS, FRAMES = 4, 16, 100  # a 28 px image of 4 tokens; a Whisper window of 50 tokens
FORMATS = {"image": FixedSizeImage(28, IMAGE_TOKENS), "audio": WhisperClips(MEL_BINS, FRAMES)}


def test_worst_case_items_fill_the_slots_the_tokens_allow() -> None:
    clips = FORMATS["audio"]
    assert [clips.num_tokens(c) for c in worst_case_items(clips, 3, None)] == [50, 50, 50]
    # 120 tokens: two full windows, then the blank clip's one token in the third slot
    assert [clips.num_tokens(c) for c in worst_case_items(clips, 3, 120)] == [50, 50, 1]
    # a fixed-size format's blank costs as much as any item: the tokens bound the slots
    assert len(worst_case_items(FORMATS["image"], 4, 3 * IMAGE_TOKENS)) == 3


@pytest.mark.parametrize("layout", ["packed", "padded", "padding-free"])
def test_the_worst_case_batch_holds_every_modality_at_its_row_limits(layout: str) -> None:
    """2 rows of 48 tokens, 2 images a row, audio held to 3 clips and 120 tokens a row (two full
    windows and a blank clip): every row's items of each modality, each seen by its own sample's
    tokens only."""
    batch = worst_case_batch(
        FORMATS, rows=2, seq_len=48, images_per_row=2, packing=layout == "packed",
        padding_free=layout == "padding-free", other_limits={"audio": (3, 120)},
    )
    rows = 1 if layout == "padding-free" else 2
    per_row = 2 if layout == "padding-free" else 1  # samples of a padding-free row: the 2 padded rows'
    assert set(batch.encoder_input) == set(batch.encoder_mask) == {"image", "audio"}
    audio, image = batch.encoder_input["audio"], batch.encoder_input["image"]
    assert audio["input_features"].shape == (rows, 3 * per_row, MEL_BINS, FRAMES)
    assert image["pixel_values"].shape == (rows, 2 * per_row, 3, 28, 28)
    assert batch.encoder_mask["audio"].shape == (rows, 48 * (2 // rows), 101 * per_row)
    assert batch.encoder_mask["image"].shape[-1] == 2 * IMAGE_TOKENS * per_row
    # every column is seen by some token, and each token sees only its own sample's items
    for modality in ("image", "audio"):
        mask = batch.encoder_mask[modality]
        assert mask.any(dim=1).all()
        if batch.segment_ids is not None:
            for row in range(rows):
                for column in range(mask.shape[-1]):
                    assert batch.segment_ids[row][mask[row, :, column]].unique().numel() == 1
    if layout == "packed":  # two samples a row: the three clips dealt to them in turn (2 + 1)
        seen = batch.encoder_mask["audio"][0].any(dim=1)
        assert seen[:24].all() and seen[24:].all()
        assert batch.encoder_mask["audio"][0, 30].sum() == 50


def test_the_worst_case_batch_takes_limits_for_exactly_the_modalities_beside_images() -> None:
    with pytest.raises(ValueError, match="modalities beside images are"):
        worst_case_batch(FORMATS, rows=1, seq_len=16, images_per_row=1, packing=True)
    with pytest.raises(ValueError, match="modalities beside images are"):
        worst_case_batch(FORMATS["image"], rows=1, seq_len=16, images_per_row=1, packing=True, other_limits={"audio": (1, None)})


# -- synthetic samples with audio -------------------------------------------------------------------


def _composed_overrides(llama: Path, siglip: Path, whisper: Path, intervals: str, offsets: str) -> list[str]:
    """The config overrides of a composed Llama + SigLIP (images) + Whisper (audio) model, its
    cross-attention layers placed by ``model.compose.fusion_intervals`` and ``fusion_offsets``."""
    return [
        "model.hf_mllama=null", f"model.compose.decoder={llama}",
        f"model.compose.encoders={{image: {siglip}, audio: {whisper}}}",
        f"model.compose.fusion_intervals={intervals}", f"model.compose.fusion_offsets={offsets}",
    ]


def test_synthetic_samples_with_audio_are_deterministic_and_read_by_the_model(
    tiny_llama_dir: Path, tiny_siglip_dir: Path, tiny_whisper_dir: Path
) -> None:
    """The trainer's synthetic set for a model with an image and an audio encoder: every fixed-length
    sample holds one image and one clip, each followed by the word its mean gives; sample i is the
    same for the same (seed, i) and another for another seed; packed rows of them run through the
    model, and a clip moves the logits of its own sample's tokens after its placeholder only."""
    overrides = [*_composed_overrides(tiny_llama_dir, tiny_siglip_dir, tiny_whisper_dir, "{image: 2, audio: 4}", "{audio: 0}"),
                 "data.synthetic_lengths=fixed", "data.synthetic_max_text=14", "data.synthetic_samples=8"]
    config = load_config(TINY_CONFIG, overrides)
    source = ModelSource.from_config(config.model)
    meta = build_meta_model(config.model, source)
    image_format, inputs, formats = model_inputs(config, source, meta)
    dataset = build_dataset(config, image_format, inputs, meta, split="train")
    (audio,) = inputs.others
    assert list(dataset.others) == ["audio"] and dataset.others["audio"][1] == audio.token_id
    assert source.family.image_format(meta).describe() == image_format.describe()  # the image encoder's, by modality

    sample = dataset[3]
    again = build_dataset(config, image_format, inputs, meta, split="train")[3]
    other_seed = SyntheticImageText(8, **{**_synthetic_kwargs(dataset), "seed": 1})[3]
    assert torch.equal(sample.tokens, again.tokens) and torch.equal(sample.labels, again.labels)
    assert torch.equal(sample.other_items["audio"][0]["input_features"], again.other_items["audio"][0]["input_features"])
    assert not torch.equal(sample.other_items["audio"][0]["input_features"], other_seed.other_items["audio"][0]["input_features"])
    # one image, then one clip halfway through the 14 text tokens; each item's word after its placeholder
    assert len(sample) == 16 and sample.tokens[0] == inputs.image_token_id and sample.tokens[8] == audio.token_id
    assert sample.image_spans == [(0, 16)] and sample.other_spans == {"audio": [(8, 16)]}
    clip = sample.other_items["audio"][0]
    mean = clip["input_features"].mean().clamp(-1, 1)
    assert sample.tokens[9] == dataset.first_text_id + int((mean + 1) * 4) % (dataset.vocab_size - dataset.first_text_id)
    assert sample.labels[7] == sample.labels[-1] == -100 and sample.labels[8] == sample.tokens[9]  # placeholders are inputs
    assert dataset.size(3) == (16, 1, image_format.num_tokens(sample.images[0]), 1, audio.input_format.num_tokens(clip))

    model = compose_from_hf(
        tiny_llama_dir, {"image": tiny_siglip_dir, "audio": tiny_whisper_dir}, fusion_placements={"image": (2, 1), "audio": (4, 0)}
    ).eval()
    init_fusion_params(model, seed=1, std=0.3)
    with torch.no_grad():
        for k, gate in enumerate(m for m in model.modules() if isinstance(m, TanhGate)):
            gate.scale.fill_(0.4 + 0.1 * k)
    packer = FirstFitPacker(32, 2, 1, other_limits=((2, None),), other_formats=(("audio", audio.input_format),))
    rows = [row for index in range(4) for row in packer.add(index, dataset[index])] + packer.flush()
    assert [len(row.samples) for row in rows] == [2, 2]
    batch = collate_rows(rows, 32, formats)
    louder = copy.deepcopy(rows)
    louder[0].samples[1].other_items["audio"][0]["input_features"] += 0.5
    changed = collate_rows(louder, 32, formats)
    with torch.no_grad():
        logits = model(batch.tokens, **batch.model_inputs())
        moved = (model(changed.tokens, **changed.model_inputs()) - logits).abs().amax(dim=-1)
    assert torch.isfinite(logits).all()
    assert moved[1].max() == 0 and moved[0, :24].max() == 0  # the other row; the clip's sample before its placeholder
    assert moved[0, 24:].min() > 1e-4


def _synthetic_kwargs(dataset: SyntheticImageText) -> dict:
    return {
        "vocab_size": dataset.vocab_size, "image_token_id": dataset.image_token_id, "image_format": dataset.image_format,
        "max_text": dataset.max_text, "lengths": dataset.lengths, "seed": dataset.seed, "others": dataset.others,
    }


def test_long_tail_synthetic_samples_hold_0_to_2_items_of_each_modality() -> None:
    """Each long-tail sample holds 0, 1 or 2 clips beside its 0, 1 or 2 images, after them, every
    item followed by text, within max_text tokens in all; its size row counts the clips."""
    kwargs = {"vocab_size": 100, "image_token_id": 100, "image_format": FORMATS["image"], "max_text": 40, "lengths": "long_tail"}
    dataset = SyntheticImageText(64, **kwargs, others={"audio": (FORMATS["audio"], 101)})
    counts = set()
    for index in range(64):
        sample = dataset[index]
        clips, placeholders = sample.other_items["audio"], torch.isin(sample.tokens, torch.tensor([100, 101]))
        counts.add((len(sample.images), len(clips)))
        assert sample.tokens[placeholders].tolist() == [100] * len(sample.images) + [101] * len(clips)
        assert not placeholders[1:][placeholders[:-1]].any() and len(sample) <= 40  # text after every item
        assert dataset.size(index)[3:] == (len(clips), sum(FORMATS["audio"].num_tokens(c) for c in clips))
    assert {clips for _, clips in counts} == {0, 1, 2} and len(counts) >= 6
    with pytest.raises(ValueError, match="raise max_text"):
        SyntheticImageText(4, **{**kwargs, "max_text": 6}, others={"audio": (FORMATS["audio"], 101)})


# -- prediction against measurement -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_composed_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A Llama of d=512 (4 layers, an 8k vocabulary, 21M parameters), a SigLIP tower (width 256, 4
    layers, 112 px images of 64 tokens) and a Whisper encoder (width 256, 4 layers, 80 mel bins, a
    2 s window of 100 tokens): large enough that tensors, not the runtime, dominate a run's memory."""
    from transformers import SiglipImageProcessorPil, SiglipVisionModel, WhisperFeatureExtractor, WhisperModel

    root = tmp_path_factory.mktemp("bench_composed")
    llama_config = tiny.tiny_llama_config(
        vocab_size=8_000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=1536, max_position_embeddings=4096,
    )
    llama, _ = tiny.save_tiny_llama(root / "llama", config=llama_config, save_tokenizer=False)
    torch.manual_seed(0)
    siglip_config = tiny.tiny_siglip_vision_config(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, image_size=112
    )
    SiglipVisionModel(siglip_config).save_pretrained(root / "siglip")
    SiglipImageProcessorPil(size={"height": 112, "width": 112}).save_pretrained(root / "siglip")
    whisper_config = tiny.tiny_whisper_config(
        d_model=256, encoder_layers=4, decoder_layers=1, encoder_ffn_dim=1024, num_mel_bins=80, max_source_positions=100
    )
    WhisperModel(whisper_config).save_pretrained(root / "whisper")
    WhisperFeatureExtractor(feature_size=80, chunk_length=2).save_pretrained(root / "whisper")
    return llama, root / "siglip", root / "whisper"


@pytest.mark.slow  # a training run beside a plan (the file's other tests take seconds: it is not in SLOW_FILES)
@pytest.mark.timeout(300)
def test_plan_predicts_the_measured_peak_within_10_percent_with_both_encoders(
    bench_composed_dirs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The plan's peak against the RSS peak of a real 2-step run of the same config on 1 rank (run
    side by side, as tests/test_plan.py's): synthetic fixed-length samples of one image, one clip
    and 254 text tokens, two to a packed row of 512, so every row holds the worst case's two images
    and two clips. (Rows of 128 left the decoder's activations at 47 MiB of a 262 MiB peak, and the
    run's memory outside tensors, 20-40 MiB here, varied with the machine's load by more than the
    tolerance.)"""
    overrides = [
        *_composed_overrides(*bench_composed_dirs, "{image: 4, audio: 4}", "{audio: 1}"),  # image in layer 3, audio in 1
        "data.synthetic_lengths=fixed", "data.synthetic_max_text=254", "data.synthetic_samples=16",
        "data.max_images_per_row=2", "batch.seq_len=512", "batch.micro_batch_size=2", "batch.global_batch_size=2",
    ]
    plan_command = [sys.executable, "-m", "fusiontrain", "plan", "--config", str(TINY_CONFIG), "--json", "--gpus", "1", "--gpu", "cpu"]
    train_args = [
        *("-m", "fusiontrain", "train", "--config", str(TINY_CONFIG), *overrides),
        *(f"output_dir={tmp_path}", "max_steps=2", "data.num_workers=0", "eval.every_n_steps=0"),
    ]
    _, (plan_run,) = run_world(
        train_args, nproc=1, beside=[[*plan_command, *overrides]], timeout=240, env={"MALLOC_MMAP_THRESHOLD_": "65536"}
    )
    plan = json.loads(plan_run.stdout[plan_run.stdout.index("{") :])
    assert "2 images per row" in plan["summary"][2] and "2 audio items per row" in plan["summary"][2]
    assert "(200 encoder tokens)" in plan["summary"][2]  # two full 2 s windows
    assert {"image encoder", "audio encoder"} <= set(plan["memory_bytes"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(row["real_token_share"] == 1.0 for row in rows)  # every row full
    assert all(row["modality/image/items"] == row["modality/audio/items"] == 4 for row in rows)  # 2 of each a row
    predicted, measured = plan["peak_bytes"], rows[1]["peak_memory_bytes"]  # step 1: the optimizer state exists
    assert abs(predicted - measured) <= 0.10 * measured, (
        f"predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    )
