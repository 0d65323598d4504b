"""The demo's drawn dataset: real image files whose captions say what is drawn."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from fusiontrain.demo import COLORS, SHAPES, draw_shape, write_dataset


def test_held_out_set_has_every_colour_and_shape_once(tmp_path: Path) -> None:
    pairs = write_dataset(tmp_path, None, seed=2)
    captions = [caption for _, caption in pairs]
    assert sorted(captions) == sorted(f"a {color} {shape}" for color in COLORS for shape in SHAPES)
    lines = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [(tmp_path / line["image"], line["text"]) for line in lines] == pairs
    for path, caption in pairs:
        image = Image.open(path).convert("RGB")
        color = COLORS[caption.split()[1]]
        assert sum(1 for pixel in image.getdata() if pixel == color) > 0.2 * image.width * image.height


def test_shapes_differ_where_the_encoder_can_see_it() -> None:
    """Corners: a square fills them, a circle leaves them white, a triangle leaves the top ones."""
    white = (255, 255, 255)
    drawn = {shape: draw_shape(shape, "red", (48, 48), random.Random(0)) for shape in SHAPES}
    corner = lambda image, x, y: image.getpixel((x, y))  # noqa: E731
    assert corner(drawn["square"], 6, 6) != white and corner(drawn["square"], 41, 41) != white
    assert corner(drawn["circle"], 6, 6) == white and corner(drawn["circle"], 41, 41) == white
    assert corner(drawn["triangle"], 6, 6) == white and corner(drawn["triangle"], 41, 41) != white
