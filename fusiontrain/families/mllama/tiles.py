"""Mllama's image format: tiled images.

The checkpoint's ``MllamaImageProcessor`` fits each image to the best canvas of up to
``t = max_num_tiles`` tiles and keeps, per image, ``pixel_values`` ``[t, 3, H, W]`` (unused tiles
zero), ``aspect_ratio_ids`` (0-dim, 1-based) and ``aspect_ratio_mask`` ``[t]``. Every image
occupies ``t * p`` encoder-token columns (``p`` tokens per tile); text sees only those of its real
tiles, as ``MllamaProcessor``'s ``cross_attention_mask`` says.

Apart from the family (:mod:`fusiontrain.families.mllama.family`), because dataloader workers
unpickle it: importing this module imports no model code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fusiontrain.data.image_format import ImageFormat, ImageInput


class MllamaTiles(ImageFormat):
    """Mllama's tiled images (see the module docstring).

    Args:
        image_size: tile height and width ``H = W``.
        tokens_per_tile: ``p`` encoder tokens per tile.
        max_num_tiles: ``t``.
    """

    def __init__(self, image_size: int, tokens_per_tile: int, max_num_tiles: int) -> None:
        self.image_size = image_size
        self.tokens_per_tile = tokens_per_tile
        self.max_num_tiles = max_num_tiles
        self.max_tokens_per_image = tokens_per_tile * max_num_tiles

    def process(self, image_processor: Any, image: Image.Image) -> ImageInput:
        out = image_processor([[image]], return_tensors="pt")
        return {
            "pixel_values": out["pixel_values"][0, 0].float(),
            "aspect_ratio_ids": out["aspect_ratio_ids"][0, 0].long(),
            "aspect_ratio_mask": out["aspect_ratio_mask"][0, 0].long(),
        }

    def check_processor(self, image_processor: Any, folder: Any) -> None:
        """An ``MllamaImageProcessor`` with this model's tile count, whose aspect-ratio ids index
        the model's ``supported_aspect_ratios`` (when ``folder`` holds the model's config)."""
        if not type(image_processor).__name__.startswith("MllamaImageProcessor"):
            raise ValueError(f"an Mllama model takes an MllamaImageProcessor, got {type(image_processor).__name__}")
        if image_processor.max_image_tiles != self.max_num_tiles:
            raise ValueError(
                f"the image processor makes up to {image_processor.max_image_tiles} tiles per image, "
                f"the model takes {self.max_num_tiles}"
            )
        if folder is not None and (Path(folder) / "config.json").is_file():
            # Here, not at the top: the model family's module imports the model code, which a
            # dataloader worker, unpickling this format, does not need.
            from fusiontrain.families.model import read_config_json

            check_aspect_ratios(image_processor, read_config_json(folder, "the Mllama folder"))

    def seen_columns(self, image: ImageInput) -> torch.Tensor:
        real_tiles = image["aspect_ratio_mask"].nonzero().flatten()
        return (real_tiles[:, None] * self.tokens_per_tile + torch.arange(self.tokens_per_tile)).flatten()

    def blank(self) -> ImageInput:
        return self.pad_slot()

    def pad_slot(self) -> ImageInput:
        """A padding slot keeps one "real" tile, as ``MllamaImageProcessor`` does: its vision
        attention then has keys to attend to (no fully masked row, hence no NaN)."""
        tile_mask = torch.zeros(self.max_num_tiles, dtype=torch.long)
        tile_mask[0] = 1
        return {
            "pixel_values": torch.zeros(self.max_num_tiles, 3, self.image_size, self.image_size),
            "aspect_ratio_ids": torch.tensor(0),
            "aspect_ratio_mask": tile_mask,
        }

    def synthetic(self, generator: torch.Generator, shift: float) -> ImageInput:
        size = self.image_size
        tiles = torch.zeros(self.max_num_tiles, 3, size, size)
        tiles[0] = torch.randn(3, size, size, generator=generator) * 0.5 + shift
        tile_mask = torch.zeros(self.max_num_tiles, dtype=torch.long)
        tile_mask[0] = 1
        return {"pixel_values": tiles, "aspect_ratio_ids": torch.tensor(1), "aspect_ratio_mask": tile_mask}

    def worst_case(self) -> ImageInput:
        """Every tile real."""
        return {
            "pixel_values": torch.zeros(self.max_num_tiles, 3, self.image_size, self.image_size),
            "aspect_ratio_ids": torch.tensor(1),
            "aspect_ratio_mask": torch.ones(self.max_num_tiles, dtype=torch.long),
        }

    def describe(self) -> str:
        return f"{self.max_num_tiles} tiles of {self.image_size} px"


def check_aspect_ratios(image_processor: Any, config: dict) -> None:
    """Raise ``ValueError`` unless the processor's aspect-ratio ids (1-based indices into
    ``get_all_supported_aspect_ratios(max_image_tiles)``) index the model's
    ``vision_config.supported_aspect_ratios`` the same way."""
    from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

    ours = [list(ratio) for ratio in get_all_supported_aspect_ratios(image_processor.max_image_tiles)]
    model = [list(ratio) for ratio in config.get("vision_config", {}).get("supported_aspect_ratios", [])]
    if ours != model:
        raise ValueError(
            f"the image processor's aspect ratios {ours} (max_image_tiles={image_processor.max_image_tiles}) "
            f"differ from the model's supported_aspect_ratios {model}"
        )
