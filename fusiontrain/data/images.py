"""One decoded image -> the encoder's inputs for it, through the model's own HF image processor.

What the inputs are is the encoder family's business (its
:class:`~fusiontrain.data.image_format.ImageFormat`): Mllama keeps a tiled image's
``pixel_values`` ``[t, 3, H, W]`` with its aspect-ratio id and tile mask, a CLIP / SigLIP tower
``pixel_values`` ``[3, H, W]``, and so on. Nothing is re-implemented: each image goes through the
processor's ``__call__`` on its own, so the values are the processor's by construction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fusiontrain.data.image_format import ImageFormat


class ImageTransform:
    """Turns a PIL image into one image's encoder inputs.

    Args:
        image_processor: the HF image processor of the model's encoder.
        image_format: what the encoder expects; checked against the processor
            (:meth:`ImageFormat.check_processor`, then a probe image's pixel size when the format
            has a fixed ``image_size``).

    Raises:
        ValueError: the processor does not produce what ``image_format`` describes.
    """

    def __init__(self, image_processor: Any, image_format: ImageFormat, *, folder: str | Path | None = None) -> None:
        self.image_processor = image_processor
        self.image_format = image_format
        image_format.check_processor(image_processor, folder)
        size = image_format.image_size
        if size:
            probe = self(Image.new("RGB", (size + 3, size - 5), (127, 64, 32)))
            if tuple(probe["pixel_values"].shape[-2:]) != (size, size):
                raise ValueError(
                    f"the image processor {type(image_processor).__name__} gives "
                    f"{tuple(probe['pixel_values'].shape[-2:])} pixel tiles, the model takes {(size, size)}"
                )

    @classmethod
    def from_pretrained(cls, folder: str | Path, image_format: ImageFormat) -> ImageTransform:
        """The transform of the image processor saved in ``folder`` (``AutoImageProcessor``, no
        remote code)."""
        from transformers import AutoImageProcessor

        return cls(AutoImageProcessor.from_pretrained(folder, trust_remote_code=False), image_format, folder=folder)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """Encoder inputs for ``image`` (RGB)."""
        return self.image_format.process(self.image_processor, image)
