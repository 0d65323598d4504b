"""The demo of a model with two encoders (``make demo-audio-vision``, or ``python -m fusiontrain
demo --audio-vision``), on 2 CPU processes in about a minute and a half.

1. Writes the base of a tiny composed model with :mod:`fusiontrain.tiny`: a Llama decoder, a
   SigLIP vision tower and a Whisper audio encoder. Draws shapes (:func:`fusiontrain.demo.draw_shape`)
   and synthesizes clips (tones of three pitches and chirps rising or falling, each short or long),
   and writes caption records of an image, a clip or both ("a red circle and a short high tone"),
   plus held-out ones: every drawing, every clip, and pairs of them.
2. Trains on 2 gloo ranks under ``torchrun`` with packing and checkpoints.
3. Exports the last checkpoint in fusiontrain's format, reloads it, and compares its logits with
   the checkpoint's.
4. Captions the held-out images, clips and pairs with the export by KV-cached greedy decoding, in
   the layout training used (BOS, the image token, the audio token), and counts the right captions.

The decoder is random, so it trains whole (``model.decoder_trainable``), as in the Mllama demo;
the encoders stay frozen, and their projection heads (fusion parameters) learn to read them. The
config is package data (``fusiontrain/demo_audio_vision.yaml``), and the outputs go to
``--output-dir``. Writing the clips needs the ``[audio]`` extra (``soundfile``).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fusiontrain.demo import COLORS, SHAPES, demo_config, draw_shape, print_losses, torchrun_command, training_env

if TYPE_CHECKING:
    from fusiontrain.inference.load import LoadedModel

DEMO_CONFIG = "demo_audio_vision.yaml"  # package data, as demo.yaml
SAMPLE_RATE = 16_000  # the tiny Whisper's feature extractor's: the clips need no resampling
PITCHES = {"low": 300.0, "mid": 1000.0, "high": 3000.0}  # tones, in Hz
CHIRPS = {"rising": (300.0, 3000.0), "falling": (3000.0, 300.0)}  # exponential sweeps, from and to, in Hz
LENGTHS = {"short": 0.3, "long": 0.8}  # seconds, in the tiny Whisper's 1 s window
SOUNDS = (*PITCHES, *CHIRPS)
DRAWING_SIZE = (48, 48)
# The demo's SigLIP sees a drawing as 3 x 3 patches of 16 px: a square fills the corner patches, a
# circle leaves their corners white, a triangle leaves the top ones nearly white.
IMAGE_SIZE, PATCH_SIZE = 48, 16
# The demo's Whisper starts from 15 times transformers' init_std (0.02). At 0.02, what its
# convolutions make of a clip is a few percent of its sinusoidal positions, and the frozen random
# tower would convey little but a clip's length.
WHISPER_INIT_STD = 0.3
TRAIN_RECORDS = 1500

Drawing = tuple[str, str]  # (shape, colour)
Sound = tuple[str, str]  # (sound, length)


@dataclass(frozen=True)
class Item:
    """One caption record: its image, its clip (either may be None) and its caption."""

    caption: str
    image: Path | None = None
    audio: Path | None = None


# -- the data ------------------------------------------------------------------------------------


def sound_caption(sound: str, length: str) -> str:
    """The caption of a clip: ``"a short low tone"``, ``"a long rising chirp"``."""
    return f"a {length} {sound} {'tone' if sound in PITCHES else 'chirp'}"


def synthesize(sound: str, length: str, rng: random.Random) -> np.ndarray:
    """A float32 clip at :data:`SAMPLE_RATE`: a tone of pitch ``sound`` (:data:`PITCHES`) or a
    chirp (:data:`CHIRPS`), ``length`` long (:data:`LENGTHS`). The length (by up to 10%), the
    frequencies (5%) and the loudness vary with ``rng``; a faint noise is added, and 10 ms fades
    keep the ends from clicking."""
    seconds = LENGTHS[length] * rng.uniform(0.9, 1.1)
    start, end = (PITCHES[sound], PITCHES[sound]) if sound in PITCHES else CHIRPS[sound]
    start, end = start * rng.uniform(0.95, 1.05), end * rng.uniform(0.95, 1.05)
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    frequency = start * (end / start) ** (t / seconds)
    wave = rng.uniform(0.3, 0.6) * np.sin(2 * np.pi * np.cumsum(frequency) / SAMPLE_RATE)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 0.01, len(t))
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.01)
    return ((wave + noise) * fade).astype(np.float32)


def write_dataset(folder: Path, drawings: list[Drawing | None], sounds: list[Sound | None], seed: int) -> list[Item]:
    """One caption record per index ``k``: the drawing ``drawings[k]`` and the clip ``sounds[k]``,
    either of which may be None, captioned "a red circle", "a short high tone" or "a red circle
    and a short high tone". Writes the images, the clips (WAV) and ``captions.jsonl`` (paths
    relative to it) into ``folder``; returns the records."""
    import soundfile

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    items, lines = [], []
    for index, (drawing, sound) in enumerate(zip(drawings, sounds, strict=True)):
        image = audio = None
        captions, record = [], {}
        if drawing is not None:
            shape, color = drawing
            image = folder / "images" / f"{index}.png"
            draw_shape(shape, color, DRAWING_SIZE, rng).save(image)
            captions.append(f"a {color} {shape}")
            record["image"] = image.relative_to(folder).as_posix()
        if sound is not None:
            audio = folder / "clips" / f"{index}.wav"
            soundfile.write(audio, synthesize(*sound, rng), SAMPLE_RATE)
            captions.append(sound_caption(*sound))
            record["audio"] = audio.relative_to(folder).as_posix()
        record["text"] = " and ".join(captions)
        items.append(Item(record["text"], image, audio))
        lines.append(json.dumps(record))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return items


def training_set(folder: Path, count: int, seed: int) -> list[Item]:
    """``count`` records of random drawings and clips: a quarter images, a quarter clips and half
    pairs (where the model learns to tell both apart while it sees both)."""
    rng = random.Random(seed)
    drawings: list[Drawing | None] = []
    sounds: list[Sound | None] = []
    for index in range(count):
        kind = index % 4  # 0: an image, 1: a clip, 2 and 3: both
        drawings.append((rng.choice(SHAPES), rng.choice(list(COLORS))) if kind != 1 else None)
        sounds.append((rng.choice(SOUNDS), rng.choice(list(LENGTHS))) if kind != 0 else None)
    return write_dataset(folder, drawings, sounds, seed + 1)


def held_out_set(folder: Path, seed: int) -> list[Item]:
    """Every drawing alone (9), every clip alone (10), then 10 pairs that hold every drawing and
    every clip at least once."""
    drawings = [(shape, color) for color in COLORS for shape in SHAPES]
    sounds = [(sound, length) for sound in SOUNDS for length in LENGTHS]
    paired = [drawings[k % len(drawings)] for k in range(len(sounds))]
    return write_dataset(
        folder, [*drawings, *[None] * len(sounds), *paired], [*[None] * len(drawings), *sounds, *sounds], seed
    )


# -- the model and its run -----------------------------------------------------------------------


def write_base(folder: Path) -> dict[str, Path]:
    """The tiny base's folders by role: ``decoder`` (:func:`fusiontrain.tiny.save_tiny_llama`),
    ``image`` (the tiny SigLIP for :data:`IMAGE_SIZE` px images of :data:`PATCH_SIZE` px patches,
    and its PIL processor) and ``audio`` (the tiny Whisper initialised with
    :data:`WHISPER_INIT_STD`, and the feature extractor of its 1 s window)."""
    from transformers import SiglipImageProcessorPil, SiglipVisionModel, WhisperFeatureExtractor, WhisperModel

    from fusiontrain import tiny

    decoder, _ = tiny.save_tiny_llama(folder / "llama", seed=0)
    image, audio = folder / "siglip", folder / "whisper"
    torch.manual_seed(1)
    siglip = tiny.tiny_siglip_vision_config(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    SiglipVisionModel(siglip).save_pretrained(image)
    SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(image)
    whisper = tiny.tiny_whisper_config(init_std=WHISPER_INIT_STD)
    torch.manual_seed(2)
    WhisperModel(whisper).save_pretrained(audio)
    WhisperFeatureExtractor(
        feature_size=whisper.num_mel_bins,
        sampling_rate=SAMPLE_RATE,
        hop_length=160,
        chunk_length=tiny.WHISPER_CHUNK_SECONDS,
    ).save_pretrained(audio)
    return {"decoder": decoder, "image": image, "audio": audio}


def training_overrides(base: dict[str, Path], out: Path) -> list[str]:
    """The ``key=value`` overrides the demo adds to its config: the paths it generated under ``out``."""
    return [
        f"model.compose.decoder={base['decoder']}",
        f"model.compose.encoders={{image: {base['image']}, audio: {base['audio']}}}",
        f"output_dir={out / 'run'}",
        f"data.train.path={out / 'train' / 'captions.jsonl'}",
    ]


# -- captions ------------------------------------------------------------------------------------


def prompt_inputs(loaded: LoadedModel, item: Item) -> tuple[torch.Tensor, dict[str, Any] | None, dict[str, Any] | None]:
    """``item``'s prompt as training lays a caption record out (BOS, the image token, the audio
    token), ``[1, s]``, and its encoder inputs and masks by modality, as the collators build them."""
    from fusiontrain.data.batch import Sample, encoder_rows
    from fusiontrain.data.formats import image_spans
    from fusiontrain.data.sources import open_image

    builder = loaded.builder
    audio = builder.others["audio"]
    tokens, images, clips = [loaded.tokenizer.bos_token_id], [], []
    if item.image is not None:
        tokens.append(loaded.image_token_id)
        images.append(builder.transform(open_image(item.image.absolute(), None)))
    if item.audio is not None:
        tokens.append(audio.token_id)
        clips.append(audio.process(builder.feature_extractors["audio"], item.audio.absolute(), None))
    prompt = torch.tensor(tokens)
    sample = Sample(prompt, prompt, images=images, image_spans=image_spans(tokens, loaded.image_token_id))
    if clips:
        sample.other_items, sample.other_spans = {"audio": clips}, {"audio": image_spans(tokens, audio.token_id)}
    encoder_mask, encoder_input = encoder_rows([[(sample, 0)]], loaded.input_formats, len(tokens))
    return prompt[None], encoder_input, encoder_mask


@torch.no_grad()
def prompt_logits(loaded: LoadedModel, item: Item) -> torch.Tensor:
    """The model's logits ``[1, s, v]`` over ``item``'s prompt."""
    prompt, encoder_input, encoder_mask = prompt_inputs(loaded, item)
    return loaded.model(prompt, encoder_input=encoder_input, encoder_mask=encoder_mask)


def caption(loaded: LoadedModel, item: Item) -> str:
    """The caption the model gives ``item``'s image and clip, by greedy KV-cached decoding."""
    from fusiontrain.inference.generation import generate

    prompt, encoder_input, encoder_mask = prompt_inputs(loaded, item)
    tokens = generate(
        loaded.model,
        prompt,
        max_new_tokens=48,
        encoder_input=encoder_input,
        encoder_mask=encoder_mask,
        stop_token_ids=loaded.stop_token_ids(),
    )
    return loaded.tokenizer.decode(tokens[0, prompt.shape[1] :], skip_special_tokens=True).strip()


def main(args: argparse.Namespace) -> int:
    """Run the four stages of the module docstring into ``args.output_dir``, printing what each
    gives; 0 when done."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    out = Path(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    print(f"[1/4] a tiny Llama + SigLIP + Whisper base and {TRAIN_RECORDS} caption records of drawings, clips or both,"
          f" in {out}")
    base = write_base(out / "base")
    training_set(out / "train", TRAIN_RECORDS, seed=1)
    held_out = held_out_set(out / "held_out", seed=3)

    print("[2/4] training on 2 ranks (gloo) with packing and checkpoints")
    run, log = out / "run", out / "train.log"
    with demo_config(DEMO_CONFIG) as config_path, log.open("w") as sink:
        command = torchrun_command(config_path, training_overrides(base, out))
        if subprocess.run(command, env=training_env(), stdout=sink, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"training failed; see {log}")
    print_losses(run)

    print("[3/4] export the last checkpoint in fusiontrain's format and reload it")
    from fusiontrain.checkpoint.export import export_checkpoint
    from fusiontrain.checkpoint.layout import latest_complete
    from fusiontrain.inference.load import load_for_inference

    step, checkpoint = latest_complete(run)
    exported = load_for_inference(export_checkpoint(checkpoint, out / "exported", format="fusiontrain"))
    pair = held_out[-1]
    difference = (prompt_logits(exported, pair) - prompt_logits(load_for_inference(checkpoint), pair)).abs().max()
    print(f"      checkpoint step {step} -> {exported.path}: max |export - checkpoint| logits = {difference:.2e}")

    print("[4/4] captions of held-out images, clips and pairs by the export (KV-cached greedy decoding)")
    right: dict[str, list[bool]] = {"images": [], "clips": [], "pairs": []}
    for item in held_out:
        text = caption(exported, item)
        kind = "pairs" if item.image and item.audio else "images" if item.image else "clips"
        right[kind].append(text == item.caption)
        shown = " + ".join(path.relative_to(out / "held_out").as_posix() for path in (item.image, item.audio) if path)
        print(f"      {shown}: {text!r}" + ("" if text == item.caption else f"  (true: {item.caption!r})"))
    counts = ", ".join(f"{kind} {sum(flags)} of {len(flags)}" for kind, flags in right.items())
    print(f"      right captions: {counts}; {sum(map(sum, right.values()))} of {len(held_out)} in all")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0
