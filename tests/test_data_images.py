"""ImageTransform gives, per image, exactly what the model's HF image processor gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fusiontrain import tiny
from fusiontrain.families.mllama.tiles import MllamaTiles
from fusiontrain.families.fixed_size_image import FixedSizeImage
from fusiontrain.data.images import ImageTransform

MLLAMA_SPEC = MllamaTiles(image_size=tiny.IMAGE_SIZE, tokens_per_tile=5, max_num_tiles=2)
TOWER_SPEC = FixedSizeImage(image_size=tiny.IMAGE_SIZE, tokens_per_image=5)

# (width, height): square, wide, tall, very wide / tall, smaller and larger than a tile.
SIZES = [(28, 28), (56, 28), (28, 56), (100, 30), (30, 100), (13, 9), (9, 200), (75, 61)]


def drawn(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width // 2, height // 3), fill=(200, 30, 90))
    draw.line((0, height - 1, width - 1, 0), fill=(0, 255, 0), width=3)
    return image


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_mllama_image_matches_processor(tiny_mllama_dir: Path, width: int, height: int) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_mllama_dir)
    transform = ImageTransform.from_pretrained(tiny_mllama_dir, MLLAMA_SPEC)
    image = drawn(width, height, seed=width * height)
    ours = transform(image)
    ref = processor.image_processor([[image]], return_tensors="pt")
    assert ours["pixel_values"].shape == (2, 3, 28, 28) and ours["pixel_values"].dtype == torch.float32
    assert ours["aspect_ratio_ids"].shape == () and ours["aspect_ratio_mask"].shape == (2,)
    assert torch.equal(ours["pixel_values"], ref["pixel_values"][0, 0])
    assert torch.equal(ours["aspect_ratio_ids"], ref["aspect_ratio_ids"][0, 0])
    assert torch.equal(ours["aspect_ratio_mask"], ref["aspect_ratio_mask"][0, 0])
    n_tiles = int(ours["aspect_ratio_mask"].sum())
    expected_ratio = {1: [1, 1], 2: [1, 2], 3: [2, 1]}[int(ours["aspect_ratio_ids"])]
    assert n_tiles == expected_ratio[0] * expected_ratio[1]
    assert (ours["pixel_values"][n_tiles:] == 0).all()


def test_mllama_tiles_follow_aspect_ratio(tiny_mllama_dir: Path) -> None:
    transform = ImageTransform.from_pretrained(tiny_mllama_dir, MLLAMA_SPEC)
    ids = {size: int(transform(drawn(*size, seed=0))["aspect_ratio_ids"]) for size in [(28, 28), (56, 28), (28, 56)]}
    # HF's aspect ratios are (tiles high, tiles wide): (1, 2) is a wide image.
    assert ids == {(28, 28): 1, (56, 28): 2, (28, 56): 3}


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize(("width", "height"), SIZES[:5])
def test_tower_image_matches_processor(tiny_clip_dir: Path, tiny_siglip_dir: Path, tower: str, width: int, height: int) -> None:
    from transformers import AutoImageProcessor

    folder = tiny_clip_dir if tower == "clip" else tiny_siglip_dir
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor).__name__ == ("CLIPImageProcessorPil" if tower == "clip" else "SiglipImageProcessorPil")
    transform = ImageTransform.from_pretrained(folder, TOWER_SPEC)
    image = drawn(width, height, seed=3)
    ours = transform(image)
    assert ours.keys() == {"pixel_values"} and ours["pixel_values"].shape == (3, 28, 28)
    assert torch.equal(ours["pixel_values"], processor(image, return_tensors="pt")["pixel_values"][0])


def test_spec_must_fit_the_processor(tiny_mllama_dir: Path, tiny_clip_dir: Path) -> None:
    with pytest.raises(ValueError, match="takes an MllamaImageProcessor"):
        ImageTransform.from_pretrained(tiny_clip_dir, MLLAMA_SPEC)
    with pytest.raises(ValueError, match="does not fit"):
        ImageTransform.from_pretrained(tiny_mllama_dir, TOWER_SPEC)
    with pytest.raises(ValueError, match="tiles per image"):
        ImageTransform.from_pretrained(tiny_mllama_dir, MllamaTiles(28, 5, max_num_tiles=4))
    with pytest.raises(ValueError, match="pixel tiles"):
        ImageTransform.from_pretrained(tiny_clip_dir, FixedSizeImage(32, 5))


def test_mllama_aspect_ratios_must_match_the_model(tiny_mllama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_mllama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["supported_aspect_ratios"] = [[1, 1], [2, 1], [1, 2]]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="supported_aspect_ratios"):
        ImageTransform.from_pretrained(folder, MLLAMA_SPEC)
