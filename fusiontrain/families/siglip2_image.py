"""SigLIP2 NaFlex's image format: variable-resolution images as patch sequences.

Apart from the family (:mod:`fusiontrain.families.siglip2`), because dataloader workers unpickle
it: importing this module imports no model code.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from fusiontrain.data.image_format import ImageFormat, ImageInput
from fusiontrain.data.input_format import packed_layout, packed_token_index


class NaflexImage(ImageFormat):
    """One image = the Siglip2 processor's patch sequence, padded to P patches, of which the first
    ``num_tokens`` are valid; a row's images are packed (no padding columns between them).

    Per image: ``pixel_values`` ``[P, c]`` float, ``pixel_attention_mask`` ``[P]`` long,
    ``spatial_shapes`` ``[2]`` long (patch rows, patch columns).

    Args:
        patch_size: ``p``.
        max_num_patches: ``P``.
        num_channels: image channels (3).
    """

    tokens_vary = True  # each image's patch grid follows its aspect ratio

    def __init__(self, patch_size: int, max_num_patches: int, num_channels: int = 3) -> None:
        self.image_size = 0  # variable resolution: no fixed-size probe
        self.patch_size = patch_size
        self.max_num_patches = max_num_patches
        self.patch_dim = num_channels * patch_size * patch_size
        self.max_tokens_per_image = max_num_patches

    # -- one image ----------------------------------------------------------------------------------

    def check_processor(self, image_processor: Any, folder: Any) -> None:
        got = (getattr(image_processor, "patch_size", None), getattr(image_processor, "max_num_patches", None))
        if got != (self.patch_size, self.max_num_patches):
            raise ValueError(
                f"the image processor in {folder} makes (patch_size, max_num_patches) = {got}, but the encoder takes "
                f"{(self.patch_size, self.max_num_patches)}: use the Siglip2 processor saved with the model"
            )

    def process(self, image_processor: Any, image: Image.Image) -> ImageInput:
        out = image_processor(images=[image], return_tensors="pt")
        pixel_values = out["pixel_values"][0].float()
        if tuple(pixel_values.shape) != (self.max_num_patches, self.patch_dim):
            raise ValueError(
                f"the image processor made pixel_values {list(pixel_values.shape)}, expected "
                f"[{self.max_num_patches}, {self.patch_dim}]: use the Siglip2 processor saved with the model"
            )
        image_input = {
            "pixel_values": pixel_values,
            "pixel_attention_mask": out["pixel_attention_mask"][0].long(),
            "spatial_shapes": out["spatial_shapes"][0].long(),
        }
        self._check(image_input)
        return image_input

    def _check(self, image: ImageInput) -> None:
        """Raise unless the valid patches are a prefix matching ``spatial_shapes``."""
        n = int(image["pixel_attention_mask"].sum())
        rows, cols = (int(v) for v in image["spatial_shapes"])
        if n < 1 or n != rows * cols or not bool(image["pixel_attention_mask"][:n].all()):
            raise ValueError(f"invalid NaFlex image: {n} valid patches, spatial shape {rows}x{cols}")

    def num_tokens(self, image: ImageInput) -> int:
        return int(image["pixel_attention_mask"].sum())

    def _image(self, rows: int, cols: int, patches: torch.Tensor | None = None) -> ImageInput:
        n = rows * cols
        pixel_values = torch.zeros(self.max_num_patches, self.patch_dim)
        if patches is not None:
            pixel_values[:n] = patches
        mask = torch.zeros(self.max_num_patches, dtype=torch.long)
        mask[:n] = 1
        return {"pixel_values": pixel_values, "pixel_attention_mask": mask, "spatial_shapes": torch.tensor([rows, cols])}

    def blank(self) -> ImageInput:
        """One valid (zero) patch."""
        return self._image(1, 1)

    def pad_slot(self) -> ImageInput:
        """One valid patch, so the tower never sees a fully masked sequence (its attention rows
        would be NaN); :meth:`layout` gives padding slots no columns."""
        return self.blank()

    def synthetic(self, generator: torch.Generator, shift: float) -> ImageInput:
        """A random patch grid of at most P patches, normal pixels times 0.5 plus ``shift``."""
        rows = int(torch.randint(1, self.max_num_patches + 1, (), generator=generator))
        cols = int(torch.randint(1, self.max_num_patches // rows + 1, (), generator=generator))
        patches = torch.randn(rows * cols, self.patch_dim, generator=generator) * 0.5 + shift
        return self._image(rows, cols, patches)

    def worst_case(self) -> ImageInput:
        """All P patches valid (the most columns and the most attention)."""
        rows = max(r for r in range(1, int(self.max_num_patches**0.5) + 1) if self.max_num_patches % r == 0)
        return self._image(rows, self.max_num_patches // rows)

    # -- a batch ------------------------------------------------------------------------------------

    def layout(self, per_row: list[list[ImageInput]]) -> tuple[list[list[int]], int]:
        """Packed: image k of a row starts at the sum of the previous images' token counts;
        ``s_e`` is the longest row's sum."""
        return packed_layout([[self.num_tokens(image) for image in images] for images in per_row])

    def collate(self, per_row: list[list[ImageInput]]) -> dict[str, torch.Tensor] | None:
        """``pixel_values`` ``[b, i, P, c]``, ``pixel_attention_mask`` ``[b, i, P]``,
        ``spatial_shapes`` ``[b, i, 2]`` (padding slots hold :meth:`pad_slot`), and
        ``token_index`` ``[b, s_e]`` long: for each packed column, its patch's position in the
        row's flattened ``[i * P]`` tower outputs (padding columns point at 0; an image's valid
        patches are a prefix of its P, :meth:`_check`)."""
        stacked = super().collate(per_row)
        if stacked is None:
            return None
        counts = [[self.num_tokens(image) for image in images] for images in per_row]
        stacked["token_index"] = packed_token_index(counts, self.max_num_patches)
        return stacked

    def describe(self) -> str:
        return f"NaFlex, up to {self.max_num_patches} patches of {self.patch_size} px"
