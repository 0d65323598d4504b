"""The demos' generated data: real image and audio files whose captions say what is drawn and
heard."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusiontrain.demo import COLORS, SHAPES, draw_shape, write_dataset
from fusiontrain.demo_audio_vision import (
    CHIRPS,
    LENGTHS,
    PITCHES,
    SAMPLE_RATE,
    SOUNDS,
    held_out_set,
    sound_caption,
    synthesize,
    training_set,
)


def test_held_out_set_has_every_colour_and_shape_once(tmp_path: Path) -> None:
    pairs = write_dataset(tmp_path, None, seed=2)
    captions = [caption for _, caption in pairs]
    assert sorted(captions) == sorted(f"a {color} {shape}" for color in COLORS for shape in SHAPES)
    lines = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [(tmp_path / line["image"], line["text"]) for line in lines] == pairs
    for path, caption in pairs:
        image = Image.open(path).convert("RGB")
        color = COLORS[caption.split()[1]]
        pixels = np.asarray(image).reshape(-1, 3)
        assert (pixels == np.array(color)).all(axis=1).sum() > 0.2 * image.width * image.height


def test_shapes_differ_where_the_encoder_can_see_it() -> None:
    """Corners: a square fills them, a circle leaves them white, a triangle leaves the top ones."""
    white = (255, 255, 255)
    drawn = {shape: draw_shape(shape, "red", (48, 48), random.Random(0)) for shape in SHAPES}
    corner = lambda image, x, y: image.getpixel((x, y))  # noqa: E731
    assert corner(drawn["square"], 6, 6) != white and corner(drawn["square"], 41, 41) != white
    assert corner(drawn["circle"], 6, 6) == white and corner(drawn["circle"], 41, 41) == white
    assert corner(drawn["triangle"], 6, 6) == white and corner(drawn["triangle"], 41, 41) != white


# -- the two-encoder demo's data (fusiontrain/demo_audio_vision.py) ---------------------------------


def _dominant_hz(wave: np.ndarray) -> float:
    """The frequency of the largest peak of ``wave``'s spectrum (at the demo's sample rate)."""
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(len(wave), 1 / SAMPLE_RATE)[spectrum.argmax()])


def _check_clip(wave: np.ndarray, sound: str, length: str) -> None:
    """``wave`` is what ``sound`` and ``length`` say: its duration within 10% of the length's, a
    tone's spectral peak within 5% of its pitch (and nearest it of the three), a chirp's first
    quarter peaking nearer its start frequency than its end and its last quarter the other way."""
    assert abs(len(wave) / SAMPLE_RATE - LENGTHS[length]) <= 0.1 * LENGTHS[length] + 1e-3
    if sound in PITCHES:
        peak = _dominant_hz(wave)
        nearest = min(PITCHES, key=lambda name: abs(PITCHES[name] - peak))
        assert nearest == sound and abs(peak - PITCHES[sound]) <= 0.05 * PITCHES[sound] + SAMPLE_RATE / len(wave)
        return
    quarter = len(wave) // 4
    first, last = _dominant_hz(wave[:quarter]), _dominant_hz(wave[-quarter:])
    start, end = CHIRPS[sound]
    assert (first < last) == (start < end), (sound, first, last)
    assert abs(np.log(first / start)) < abs(np.log(first / end)) and abs(np.log(last / end)) < abs(np.log(last / start))


@pytest.mark.parametrize("length", sorted(LENGTHS))
@pytest.mark.parametrize("sound", SOUNDS)
def test_each_synthesized_clip_sounds_as_its_caption_says(sound: str, length: str) -> None:
    for seed in range(3):
        wave = synthesize(sound, length, random.Random(seed))
        assert wave.dtype == np.float32 and np.abs(wave).max() <= 1.0
        _check_clip(wave, sound, length)


def test_captions_name_the_sound_and_its_length() -> None:
    assert sound_caption("high", "short") == "a short high tone"
    assert sound_caption("falling", "long") == "a long falling chirp"
    assert len({sound_caption(sound, length) for sound in SOUNDS for length in LENGTHS}) == len(SOUNDS) * len(LENGTHS)


def _parse(caption: str) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """(colour, shape) and (length, sound) a caption names, either None when it names none."""
    drawing = sound = None
    for part in caption.split(" and "):
        words = part.split()
        if words[-1] in SHAPES:
            drawing = (words[1], words[2])
        else:
            sound = (words[1], words[2])
    return drawing, sound


def _shape_seen(image: Image.Image) -> str:
    """The shape a drawing on white shows by how much of its bounding box it fills: a square all
    of it, a circle pi / 4, a triangle half."""
    white = (255, 255, 255)
    inked = [(x, y) for y in range(image.height) for x in range(image.width) if image.getpixel((x, y)) != white]
    xs, ys = [x for x, _ in inked], [y for _, y in inked]
    fill = len(inked) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
    fills = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
    return min(fills, key=lambda shape: abs(fills[shape] - fill))


def _check_records(folder: Path, items: list) -> list[tuple[tuple[str, str] | None, tuple[str, str] | None]]:
    """``folder/captions.jsonl`` holds ``items``, and each record's files are what its caption
    says: the drawing's colour and shape, the clip's sound and length. Returns the parsed captions."""
    import soundfile

    lines = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    assert [line["text"] for line in lines] == [item.caption for item in items]
    parsed = [_parse(item.caption) for item in items]
    for line, item, (drawing, sound) in zip(lines, items, parsed):
        assert (item.image is not None, item.audio is not None) == (drawing is not None, sound is not None)
        assert ("image" in line, "audio" in line) == (drawing is not None, sound is not None)
        if drawing is not None:
            assert folder / line["image"] == item.image
            image = Image.open(item.image).convert("RGB")
            count, color = max(c for c in image.getcolors() if c[1] != (255, 255, 255))
            assert color == COLORS[drawing[0]] and count > 0.3 * image.width * image.height
            assert _shape_seen(image) == drawing[1], item
        if sound is not None:
            assert folder / line["audio"] == item.audio
            wave, rate = soundfile.read(item.audio, dtype="float32")
            assert rate == SAMPLE_RATE
            _check_clip(wave, sound[1], sound[0])
    return parsed


def test_held_out_records_hold_every_drawing_and_clip_and_their_captions_match_the_files(tmp_path: Path) -> None:
    parsed = _check_records(tmp_path, held_out_set(tmp_path, seed=3))
    images = [drawing for drawing, sound in parsed if sound is None]
    clips = [sound for drawing, sound in parsed if drawing is None]
    pairs = [(drawing, sound) for drawing, sound in parsed if drawing and sound]
    assert sorted(images) == sorted((color, shape) for color in COLORS for shape in SHAPES)
    assert sorted(clips) == sorted((length, sound) for sound in SOUNDS for length in LENGTHS)
    assert sorted(sound for _, sound in pairs) == sorted(clips)
    assert sorted({drawing for drawing, _ in pairs}) == sorted(images)


def test_training_records_are_a_quarter_images_a_quarter_clips_and_half_pairs(tmp_path: Path) -> None:
    items = training_set(tmp_path / "train", 40, seed=1)
    parsed = _check_records(tmp_path / "train", items)
    kinds = [(drawing is not None, sound is not None) for drawing, sound in parsed]
    assert kinds.count((True, False)) == kinds.count((False, True)) == 10 and kinds.count((True, True)) == 20
    assert [item.caption for item in training_set(tmp_path / "again", 40, seed=1)] == [item.caption for item in items]
