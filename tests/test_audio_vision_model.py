"""A composed model with two encoders, vision (SigLIP) and audio (Whisper), on one Llama decoder,
built from tiny HF folders by compose_from_hf: shut gates give transformers' LlamaForCausalLM for
a record holding an image and a clip; packed rows mixing image, audio and image+audio samples
equal each sample alone; a clip changes only its own sample's logits, after its placeholder; the
recorded source rebuilds the same model.

Inputs go through the real processing (the SigLIP image processor, the Whisper feature extractor
on a synthesized tone) and the real collators, given the input formats by modality."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusiontrain import tiny
from fusiontrain.data.batch import Sample, collate_padded
from fusiontrain.data.packing import PackedRow, collate_rows
from fusiontrain.families import model_family
from fusiontrain.families.composed.compose import init_fusion_params
from fusiontrain.families.composed.family import placeholder_rows
from fusiontrain.models import compose_from_hf
from fusiontrain.modules import FusionLayer, TanhGate
from fusiontrain.source.model_source import ModelSource

PLACEMENTS = {"image": (2, 1), "audio": (4, 0)}  # image in layers 1 and 3, audio in layer 0 (of 4)
RATE = 16_000
SEQ = 32


@pytest.fixture(scope="module")
def model_and_formats(tiny_llama_dir: Path, tiny_siglip_dir: Path, tiny_whisper_dir: Path):
    model = compose_from_hf(
        tiny_llama_dir, {"image": tiny_siglip_dir, "audio": tiny_whisper_dir}, fusion_placements=PLACEMENTS
    ).eval()
    family = model_family("composed")
    return model, family.input_formats(model)


@pytest.fixture(scope="module")
def processors(tiny_siglip_dir: Path, tiny_whisper_dir: Path):
    from transformers import AutoImageProcessor, WhisperFeatureExtractor

    return AutoImageProcessor.from_pretrained(tiny_siglip_dir), WhisperFeatureExtractor.from_pretrained(tiny_whisper_dir)


def _image(processors, formats, colour: tuple[int, int, int]) -> dict:
    return formats["image"].process(processors[0], Image.new("RGB", (40, 30), colour))


def _clip(processors, formats, hertz: float, seconds: float) -> dict:
    t = np.arange(int(RATE * seconds), dtype=np.float32) / RATE
    return formats["audio"].process(processors[1], (0.4 * np.sin(2 * np.pi * hertz * t)).astype(np.float32), RATE)


def _sample(length: int, seed: int, image: dict | None = None, image_at: int = 0, clip: dict | None = None, clip_at: int = 0) -> Sample:
    """Random text of ``length`` tokens with an image and/or a clip, each seen from its
    placeholder to the end of the sample."""
    rows = placeholder_rows(["image", "audio"])
    tokens = torch.randint(0, tiny.TEXT_VOCAB_SIZE, (length,), generator=torch.Generator().manual_seed(seed))
    sample = Sample(tokens=tokens, labels=tokens.roll(-1))
    if image is not None:
        tokens[image_at] = tiny.TEXT_VOCAB_SIZE + rows["image"]
        sample.images, sample.image_spans = [image], [(image_at, length)]
    if clip is not None:
        tokens[clip_at] = tiny.TEXT_VOCAB_SIZE + rows["audio"]
        sample.other_items, sample.other_spans = {"audio": [clip]}, {"audio": [(clip_at, length)]}
    return sample


@torch.no_grad()
def _open_gates(model: torch.nn.Module) -> None:
    gates = [module for module in model.modules() if isinstance(module, TanhGate)]
    assert len(gates) == 2 * 3  # image in 2 layers, audio in 1: attention and MLP gates each
    for k, gate in enumerate(gates):
        gate.scale.fill_(0.4 + 0.1 * k)


def test_the_layers_and_placeholders_of_each_modality(model_and_formats) -> None:
    model, formats = model_and_formats
    fused = {
        index: layer.modalities for index, layer in enumerate(model.decoder.layers) if isinstance(layer, FusionLayer)
    }
    assert fused == {0: ("audio",), 1: ("image",), 3: ("image",)}
    assert placeholder_rows(["audio", "image"]) == {"image": 0, "audio": 1}
    assert type(formats["audio"]).__name__ == "WhisperClips" and formats["audio"].max_tokens_per_item == 50


def test_shut_gates_equal_the_base_lm_for_a_record_with_an_image_and_a_clip(
    model_and_formats, processors, tiny_llama_dir: Path
) -> None:
    """Fresh fusion parameters (gates shut): the logits are transformers' LlamaForCausalLM's, the
    placeholders reading the mean row of the LM's embeddings."""
    from transformers import LlamaForCausalLM

    model, formats = model_and_formats
    sample = _sample(20, 0, image=_image(processors, formats, (200, 30, 30)), image_at=2,
                     clip=_clip(processors, formats, 440.0, 0.37), clip_at=9)
    batch = collate_padded([sample], SEQ, formats)
    assert set(batch.encoder_input) == {"image", "audio"}
    hf = LlamaForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        got = model(batch.tokens, **batch.model_inputs())
        table = hf.get_input_embeddings().weight
        embeds = table[batch.tokens.clamp(max=table.shape[0] - 1)]
        embeds[batch.tokens >= tiny.TEXT_VOCAB_SIZE] = table.mean(dim=0)
        want = hf(inputs_embeds=embeds).logits
    torch.testing.assert_close(got[0, :20], want[0, :20], atol=1e-5, rtol=0)


def _row_logits(model, rows: list[PackedRow], formats) -> torch.Tensor:
    batch = collate_rows(rows, SEQ, formats)
    with torch.no_grad():
        return model(batch.tokens, **batch.model_inputs())


def test_packed_rows_mixing_image_audio_and_both_equal_each_sample_alone(model_and_formats, processors) -> None:
    """Fp32, with fusion weights large enough that an item moves the logits by 1e-3 to 1e-2
    (fresh ones, std 0.02, move them by about 2e-5: as much as packing's reordered sums may)."""
    model, formats = model_and_formats
    model = copy.deepcopy(model)
    init_fusion_params(model, seed=1, std=0.3)
    _open_gates(model)
    samples = [
        _sample(9, 1, image=_image(processors, formats, (10, 200, 10)), image_at=1),  # image only
        _sample(11, 2, clip=_clip(processors, formats, 660.0, 0.2), clip_at=3),  # audio only
        _sample(14, 3, image=_image(processors, formats, (10, 10, 220)), image_at=0,
                clip=_clip(processors, formats, 300.0, 0.61), clip_at=6),  # both
        _sample(6, 4),  # text only
    ]
    rows = [PackedRow(), PackedRow()]
    for key, (row, sample) in enumerate(zip([0, 0, 1, 1], samples)):
        rows[row].add(key, sample)
    packed = _row_logits(model, rows, formats)
    offsets = [(0, 0), (0, 9), (1, 0), (1, 14)]
    for sample, (row, start) in zip(samples, offsets):
        alone = collate_padded([sample], SEQ, formats)
        with torch.no_grad():
            want = model(alone.tokens, **alone.model_inputs())[0, : len(sample)]
        torch.testing.assert_close(packed[row, start : start + len(sample)], want, atol=2e-5, rtol=0)

    # Another clip in the third sample: only its logits change, and only from its audio placeholder on.
    samples[2].other_items = {"audio": [_clip(processors, formats, 900.0, 0.61)]}  # same length: same shapes
    changed = _row_logits(model, rows, formats)
    assert torch.equal(changed[0], packed[0])  # the other row
    assert torch.equal(changed[1, :6], packed[1, :6]) and torch.equal(changed[1, 14:], packed[1, 14:])
    assert (changed[1, 6:14] - packed[1, 6:14]).abs().amax(dim=-1).min() > 1e-3  # 50x the tolerance above


def test_the_recorded_source_rebuilds_the_same_model(
    model_and_formats, tiny_llama_dir: Path, tiny_siglip_dir: Path, tiny_whisper_dir: Path
) -> None:
    """What a checkpoint's manifest records (roles encoder.image and encoder.audio, the placements)
    builds the model again, weights and all; each encoder is its HF tower's."""
    from transformers import SiglipVisionModel, WhisperModel

    model, _ = model_and_formats
    source = ModelSource(
        model_family("composed"),
        {"decoder": tiny_llama_dir, "encoder.image": tiny_siglip_dir, "encoder.audio": tiny_whisper_dir},
        {"fusion_interval": 4, "fusion_vocab_size": 8, "fusion_placements": {m: list(p) for m, p in PLACEMENTS.items()}},
    )
    entry = source.manifest_entry()
    assert set(entry["folders"]) == {"decoder", "encoder.image", "encoder.audio"}
    assert ModelSource.recorded_roles(entry) == ("decoder", "encoder.image", "encoder.audio")
    again = ModelSource.from_manifest(entry, {role: Path(folder) for role, folder in entry["folders"].items()}).load()
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    whisper = WhisperModel.from_pretrained(tiny_whisper_dir).encoder.state_dict()
    assert all(torch.equal(model.encoder["audio"].tower.state_dict()[k], v) for k, v in whisper.items())
    siglip = SiglipVisionModel.from_pretrained(tiny_siglip_dir).state_dict()
    assert all(torch.equal(model.encoder["image"].tower.state_dict()[k], v) for k, v in siglip.items())


def test_a_known_modality_takes_only_an_encoder_of_that_modality(tiny_llama_dir: Path, tiny_whisper_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"'model.compose.encoders.image' names a whisper checkpoint, which encodes audio, not image"):
        compose_from_hf(tiny_llama_dir, {"image": tiny_whisper_dir})


def test_kv_cached_generation_with_an_image_and_a_clip_follows_the_full_forward(model_and_formats, processors) -> None:
    """generate() with the prompt's encoder inputs and masks by modality: each greedy token is the
    argmax of the full (uncached) forward over the prompt and the tokens before it."""
    from fusiontrain.inference.generation import generate

    model, formats = model_and_formats
    model = copy.deepcopy(model)
    init_fusion_params(model, seed=2, std=0.3)
    _open_gates(model)
    sample = _sample(12, 5, image=_image(processors, formats, (90, 90, 200)), image_at=1,
                     clip=_clip(processors, formats, 520.0, 0.3), clip_at=5)
    batch = collate_padded([sample], 12, formats)
    with torch.no_grad():
        out = generate(model, batch.tokens, max_new_tokens=5, encoder_input=batch.encoder_input, encoder_mask=batch.encoder_mask)
        assert out.shape == (1, 17)
        for n in range(12, 17):
            masks = {m: torch.cat([mask, mask[:, -1:].expand(1, n - 12, -1)], dim=1) for m, mask in batch.encoder_mask.items()}
            full = model(out[:, :n], encoder_input=batch.encoder_input, encoder_mask=masks)
            assert int(full[0, -1].argmax()) == int(out[0, n])


def test_the_step_counts_each_modality_items_and_seen_tokens_but_not_placeholders(model_and_formats, processors) -> None:
    """The per-modality metrics (``modality/<m>/items``, ``/encoder_tokens``) of a packed batch:
    every real item and its seen columns; the blank slots every rank runs count nothing."""
    from fusiontrain.data.batch import with_placeholder_items
    from fusiontrain.train.step import modality_counts

    _, formats = model_and_formats
    clips = [_clip(processors, formats, 660.0, 0.2), _clip(processors, formats, 300.0, 0.61)]
    images = [_image(processors, formats, (10, 200, 10)), _image(processors, formats, (10, 10, 220))]
    rows = [PackedRow(), PackedRow()]
    rows[0].add(0, _sample(9, 1, image=images[0], image_at=1))
    rows[0].add(1, _sample(11, 2, clip=clips[0], clip_at=3))
    rows[1].add(2, _sample(14, 3, image=images[1], clip=clips[1], clip_at=6))
    counts = modality_counts(collate_rows(rows, SEQ, formats), formats)
    clip_tokens = sum(formats["audio"].num_tokens(clip) for clip in clips)
    assert clip_tokens == 10 + 31  # 0.2 s and 0.61 s: ceil(frames / 2) of 100 frames a second
    image_tokens = sum(formats["image"].num_tokens(image) for image in images)
    assert counts.tolist() == [[2, image_tokens], [2, clip_tokens]]

    text_only = PackedRow()
    text_only.add(0, _sample(7, 5))
    blanks = with_placeholder_items(collate_rows([text_only], SEQ, formats), formats)
    assert set(blanks.encoder_input) == {"image", "audio"}
    assert modality_counts(blanks, formats).tolist() == [[0, 0], [0, 0]]
