"""What the data pipeline needs to know about an image encoder's input: the :class:`ImageFormat`
contract.

Every image encoder family implements one (``fusiontrain/families/``); the data code (transforms,
collation, packing, masks, synthetic data, the planner's worst case, inference prompts) only ever
calls these methods, so it never asks which encoder it feeds. What a batch of processed images is
(layout, collation, masks) is every modality's: :class:`~fusiontrain.data.input_format.EncoderInputFormat`;
an image format adds how one image is processed.

Shapes: b rows, i images per row, s_e encoder tokens per row.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from PIL import Image

from fusiontrain.data.input_format import EncoderInputFormat, ItemInput, encoder_mask_rows

# encoder_mask_rows is every modality's; it is re-exported here, where batch, packing and inference
# import it.
__all__ = ["ImageFormat", "ImageInput", "encoder_mask_rows"]

ImageInput = ItemInput


class ImageFormat(EncoderInputFormat):
    """How one encoder takes images.

    Attributes:
        image_size: height and width, in pixels, of what the image processor outputs per image or
            per tile (a probe checks the processor against it; 0 to skip the probe, e.g. for
            variable-resolution encoders).
        max_tokens_per_image: the most encoder tokens one image can yield (the planner's worst
            case, and the default column stride); :attr:`max_tokens_per_item` reads it.
        tokens_vary: True when :meth:`num_tokens` differs from image to image (measuring a
            sample's size then decodes its images); False when every image yields
            ``max_tokens_per_image``.
    """

    image_size: int
    max_tokens_per_image: int
    slots_key = "image_slots"

    @property
    def max_tokens_per_item(self) -> int:
        return self.max_tokens_per_image

    # -- one image ----------------------------------------------------------------------------------

    @abstractmethod
    def process(self, image_processor: Any, image: Image.Image) -> ImageInput:
        """The encoder's inputs for one RGB ``image``, through the model's own HF processor."""

    def check_processor(self, image_processor: Any, folder: Any) -> None:
        """Raise ``ValueError`` when ``image_processor`` (loaded from ``folder``) cannot feed this
        encoder. The default accepts any processor; the probe in ``ImageTransform`` checks sizes."""

    def describe(self) -> str:
        """A few words for messages and the plan, e.g. ``'up to 4 tiles of 560 px'``."""
        return f"{self.image_size} px, {self.max_tokens_per_image} tokens"
