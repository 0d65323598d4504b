"""The image format of the encoders that take one fixed-size image (CLIP, SigLIP, DINOv2 towers).

Apart from the encoder families (:mod:`fusiontrain.families.encoder`), because dataloader workers
unpickle it: importing this module imports no model code.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from fusiontrain.data.image_format import ImageFormat, ImageInput


class FixedSizeImage(ImageFormat):
    """One ``pixel_values`` ``[3, H, W]`` per image (``H = W = image_size``), normalised by the
    tower's own image processor, yielding ``tokens_per_image`` encoder tokens."""

    def __init__(self, image_size: int, tokens_per_image: int) -> None:
        self.image_size = image_size
        self.max_tokens_per_image = tokens_per_image

    def process(self, image_processor: Any, image: Image.Image) -> ImageInput:
        pixels = image_processor(images=[image], return_tensors="pt")["pixel_values"][0].float()
        if pixels.dim() != 3 or pixels.shape[0] != 3:
            raise ValueError(
                f"the image processor {type(image_processor).__name__} gives pixel_values {list(pixels.shape)} per "
                "image, which does not fit an encoder taking one [3, H, W] image: use the encoder's own processor"
            )
        return {"pixel_values": pixels}

    def blank(self) -> ImageInput:
        return {"pixel_values": torch.zeros(3, self.image_size, self.image_size)}

    def synthetic(self, generator: torch.Generator, shift: float) -> ImageInput:
        size = self.image_size
        return {"pixel_values": torch.randn(3, size, size, generator=generator) * 0.5 + shift}
