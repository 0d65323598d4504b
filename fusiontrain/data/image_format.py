"""What the data pipeline needs to know about an encoder's input: the :class:`ImageFormat` contract.

Every encoder family implements one (``fusiontrain/families/``); the data code (transforms,
collation, packing, masks, synthetic data, the planner's worst case, inference prompts) only ever
calls these methods, so it never asks which encoder it feeds.

One image, once processed, is a dict of tensors (the encoder's inputs for that image alone). In a
batch row, image ``k`` owns the encoder-token columns ``offsets[k] .. offsets[k] + num_tokens(k)``
of the row's ``s_e`` columns (:meth:`ImageFormat.layout`); of those, text may attend only to
:meth:`ImageFormat.seen_columns` (Mllama hides padding tiles, a variable-resolution encoder its
padding patches).

Shapes: b rows, i images per row, s_e encoder tokens per row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from PIL import Image

ImageInput = dict[str, torch.Tensor]


class ImageFormat(ABC):
    """How one encoder takes images.

    Attributes:
        image_size: height and width, in pixels, of what the image processor outputs per image or
            per tile (a probe checks the processor against it; 0 to skip the probe, e.g. for
            variable-resolution encoders).
        max_tokens_per_image: the most encoder tokens one image can yield (the planner's worst
            case, and the default column stride).
        tokens_vary: True when :meth:`num_tokens` differs from image to image (measuring a
            sample's size then decodes its images); False when every image yields
            ``max_tokens_per_image``.
    """

    image_size: int
    max_tokens_per_image: int
    # Whether images yield different token counts (then a sample's size needs its images decoded).
    tokens_vary: bool = False

    # -- one image ----------------------------------------------------------------------------------

    @abstractmethod
    def process(self, image_processor: Any, image: Image.Image) -> ImageInput:
        """The encoder's inputs for one RGB ``image``, through the model's own HF processor."""

    def check_processor(self, image_processor: Any, folder: Any) -> None:
        """Raise ``ValueError`` when ``image_processor`` (loaded from ``folder``) cannot feed this
        encoder. The default accepts any processor; the probe in ``ImageTransform`` checks sizes."""

    def num_tokens(self, image: ImageInput) -> int:
        """Encoder-token columns image ``image`` occupies in its row (default: the maximum)."""
        return self.max_tokens_per_image

    def seen_columns(self, image: ImageInput) -> torch.Tensor:
        """Indices, among the image's :meth:`num_tokens` columns, that text may attend to."""
        return torch.arange(self.num_tokens(image))

    @abstractmethod
    def blank(self) -> ImageInput:
        """A placeholder image that no token attends to (a rank with a text-only micro-batch still
        runs the encoder, so FSDP's collectives match across ranks)."""

    @abstractmethod
    def synthetic(self, generator: torch.Generator, shift: float) -> ImageInput:
        """A random image for synthetic data: normal pixels times 0.5 plus ``shift`` (the
        synthetic task reads the image's mean brightness)."""

    def worst_case(self) -> ImageInput:
        """The most expensive image the encoder can be given (the planner's worst case): by
        default :meth:`blank`, which for fixed-size encoders costs the same as any image."""
        return self.blank()

    # -- a batch ------------------------------------------------------------------------------------

    def layout(self, per_row: list[list[ImageInput]]) -> tuple[list[list[int]], int]:
        """Column offset of every image in its row, and ``s_e``, the columns per row.

        The default gives each image slot ``max_tokens_per_image`` columns: image ``k`` starts at
        ``k * max_tokens_per_image``, and ``s_e`` covers the most images of any row (the encoder
        runs on the zero-padded slots too). Formats whose encoder packs a row's tokens override it.
        """
        stride = self.max_tokens_per_image
        offsets = [[k * stride for k in range(len(images))] for images in per_row]
        return offsets, max((len(images) for images in per_row), default=0) * stride

    def collate(self, per_row: list[list[ImageInput]]) -> dict[str, torch.Tensor] | None:
        """The encoder's keyword arguments for ``b`` rows of images, or None without any image.

        The default stacks each key into ``[b, i, ...]``, zero-padding rows with fewer images
        (:meth:`pad_slot` fills a padding slot). When some slot is padding, ``image_slots`` lists
        the real ones, ``[n]`` int64 flat indices ``row * i + k``: the encoder runs on those only
        (:mod:`fusiontrain.modules.image_slots`; the key is absent when every slot holds an image).
        """
        max_images = max((len(images) for images in per_row), default=0)
        if max_images == 0:
            return None
        template = self.pad_slot()
        stacked = {
            key: value.expand(len(per_row), max_images, *value.shape).clone() for key, value in template.items()
        }
        for row, images in enumerate(per_row):
            for index, image in enumerate(images):
                for key, value in image.items():
                    stacked[key][row, index] = value
        if any(len(images) < max_images for images in per_row):
            stacked["image_slots"] = torch.tensor(
                [row * max_images + k for row, images in enumerate(per_row) for k in range(len(images))],
                dtype=torch.int64,
            )
        return stacked

    def pad_slot(self) -> ImageInput:
        """What fills an image slot that holds no image: zeros shaped like :meth:`blank`."""
        return {key: torch.zeros_like(value) for key, value in self.blank().items()}

    def describe(self) -> str:
        """A few words for messages and the plan, e.g. ``'up to 4 tiles of 560 px'``."""
        return f"{self.image_size} px, {self.max_tokens_per_image} tokens"


def encoder_mask_rows(
    per_row: list[list[ImageInput]],
    spans_per_row: list[list[tuple[int, int]]],
    image_format: ImageFormat,
    seq_len: int,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """The ``[b, s, s_e]`` encoder mask and the encoder inputs of ``b`` rows.

    Args:
        per_row: each row's images, in order.
        spans_per_row: for each row, each image's token span ``[start, end)`` in the row (its
            tokens may see it).
        image_format: the encoder's format.
        seq_len: ``s``.

    Returns:
        ``(encoder_mask, encoder_input)``, both None when no row has an image.
    """
    encoder_input = image_format.collate(per_row)
    if encoder_input is None:
        return None, None
    offsets, width = image_format.layout(per_row)
    mask = torch.zeros(len(per_row), seq_len, width, dtype=torch.bool)
    for row, (images, spans) in enumerate(zip(per_row, spans_per_row)):
        for image, (start, end), offset in zip(images, spans, offsets[row], strict=True):
            mask[row, start:end, offset + image_format.seen_columns(image)] = True
    return mask, encoder_input
