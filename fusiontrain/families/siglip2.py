"""SigLIP2 NaFlex vision towers (``Siglip2VisionModel``, or the vision half of a full
``Siglip2Model``) as encoders.

SigLIP2's fixed-resolution checkpoints are ``siglip`` model_type (``SiglipModel``) and are read by
the ``siglip`` family; this family reads the NaFlex ones (``siglip2_vision_model`` / ``siglip2``).

The Siglip2 image processor resizes an image, keeping its aspect ratio, to at most
``max_num_patches`` (P) patches of ``p x p`` pixels and pads the patch sequence to P. An image thus
yields a variable number of valid tokens. :class:`NaflexImage` packs a row's valid tokens: image k
starts at the sum of the previous images' token counts, and ``collate`` adds ``token_index`` so
:class:`Siglip2NaflexTowerEncoder` gathers the valid tokens of the tower's padded output.

Shapes: b rows, i images per row, P = max_num_patches, c = 3 * p * p patch values, s_e packed
encoder tokens per row, d_e tower width, d decoder width.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import nn

from fusiontrain.data.image_format import ImageFormat, ImageInput
from fusiontrain.families.encoder import EncoderFamily
from fusiontrain.families.hf_tower import MLPProjectionHead, canonical_vision_tower_key, vision_tower_tensor_names
from fusiontrain.modules import register_fusion_module


def siglip2_vision_config_from_dict(config: dict) -> Any:
    """The ``Siglip2VisionConfig`` of a ``siglip2_vision_model`` dict, or a full ``siglip2`` one's
    ``vision_config``.

    Raises:
        ValueError: another model_type.
    """
    import transformers

    model_type = config.get("model_type")
    if model_type == "siglip2_vision_model":
        return transformers.Siglip2VisionConfig.from_dict(config)
    if model_type == "siglip2":
        return transformers.Siglip2Config.from_dict(config).vision_config
    raise ValueError(f"expected a SigLIP2 NaFlex config (siglip2_vision_model or siglip2), got {model_type!r}")


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
        offsets: list[list[int]] = []
        width = 0
        for images in per_row:
            row, total = [], 0
            for image in images:
                row.append(total)
                total += self.num_tokens(image)
            offsets.append(row)
            width = max(width, total)
        return offsets, width

    def collate(self, per_row: list[list[ImageInput]]) -> dict[str, torch.Tensor] | None:
        """``pixel_values`` ``[b, i, P, c]``, ``pixel_attention_mask`` ``[b, i, P]``,
        ``spatial_shapes`` ``[b, i, 2]`` (padding slots hold :meth:`pad_slot`), and
        ``token_index`` ``[b, s_e]`` long: for each packed column, its patch's position in the
        row's flattened ``[i * P]`` tower outputs (padding columns point at 0)."""
        stacked = super().collate(per_row)
        if stacked is None:
            return None
        offsets, width = self.layout(per_row)
        token_index = torch.zeros(len(per_row), width, dtype=torch.long)
        for row, images in enumerate(per_row):
            for k, image in enumerate(images):
                valid = image["pixel_attention_mask"].nonzero().flatten()
                token_index[row, offsets[row][k] : offsets[row][k] + valid.numel()] = k * self.max_num_patches + valid
        stacked["token_index"] = token_index
        return stacked

    def describe(self) -> str:
        return f"NaFlex, up to {self.max_num_patches} patches of {self.patch_size} px"


class Siglip2NaflexTowerEncoder(nn.Module):
    """A HF ``Siglip2VisionModel`` followed by a projection head; a row's images' valid tokens are
    gathered, packed, into ``[b, s_e, d]``.

    When no tower parameter requires grad and the pixels need none, the tower runs under
    ``torch.no_grad()``.

    Args:
        tower: a ``Siglip2VisionModel``.
        decoder_dim: decoder width ``d``.
        max_num_patches: ``P`` (the processor's; defaults to the config's ``num_patches``).
    """

    def __init__(self, tower: nn.Module, decoder_dim: int, max_num_patches: int | None = None) -> None:
        super().__init__()
        from transformers import Siglip2VisionModel

        if not isinstance(tower, Siglip2VisionModel):
            raise TypeError(f"Siglip2NaflexTowerEncoder takes a Siglip2VisionModel, got {type(tower).__name__}")
        self.tower = tower
        self.projection = register_fusion_module(MLPProjectionHead(tower.config.hidden_size, decoder_dim))
        self.decoder_dim = decoder_dim
        self.max_num_patches = tower.config.num_patches if max_num_patches is None else max_num_patches

    @property
    def patch_size(self) -> int:
        return self.tower.config.patch_size

    def block_lists(self) -> list[nn.ModuleList]:
        """The tower's transformer blocks (``encoder.layers``)."""
        return [self.tower.encoder.layers]

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Siglip2 vision towers have no buffers; any buffer (a transformers change) raises."""
        names = [name for name, _ in self.tower.named_buffers()]
        if names:
            raise RuntimeError(f"don't know how to rebuild the Siglip2 tower's buffers {names} after a meta-device build")

    def features(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
        token_index: torch.Tensor,
    ) -> torch.Tensor:
        """The packed tower output before the projection.

        Args:
            pixel_values: ``[b, i, P, c]``.
            pixel_attention_mask: ``[b, i, P]`` (1 for valid patches).
            spatial_shapes: ``[b, i, 2]``.
            token_index: ``[b, s_e]`` long, indices into each row's ``[i * P]`` tower outputs.

        Returns:
            ``[b, s_e, d_e]``.
        """
        if pixel_values.dim() != 4 or pixel_attention_mask.shape != pixel_values.shape[:3]:
            raise ValueError(
                f"expected pixel_values [b, i, P, c] and pixel_attention_mask [b, i, P], got "
                f"{list(pixel_values.shape)} and {list(pixel_attention_mask.shape)}"
            )
        b, i, p, c = pixel_values.shape
        needs_grad = pixel_values.requires_grad or any(q.requires_grad for q in self.tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            hidden = self.tower(
                pixel_values=pixel_values.reshape(b * i, p, c),
                pixel_attention_mask=pixel_attention_mask.reshape(b * i, p),
                spatial_shapes=spatial_shapes.reshape(b * i, 2),
            ).last_hidden_state  # [b*i, P, d_e]
        hidden = hidden.reshape(b, i * p, hidden.shape[-1])
        return torch.gather(hidden, 1, token_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
        token_index: torch.Tensor,
    ) -> torch.Tensor:
        """See :meth:`features`; returns ``[b, s_e, d]``."""
        return self.projection(self.features(pixel_values, pixel_attention_mask, spatial_shapes, token_index))


class Siglip2NaflexEncoder(EncoderFamily):
    """SigLIP2 NaFlex: the valid patches' tokens after ``post_layernorm``, packed per row."""

    name = "siglip2_naflex"
    model_types = ("siglip2_vision_model", "siglip2")

    def build(self, config: dict, decoder_dim: int) -> nn.Module:
        from transformers import Siglip2VisionModel

        return Siglip2NaflexTowerEncoder(Siglip2VisionModel(siglip2_vision_config_from_dict(config)), decoder_dim)

    def image_format(self, encoder: nn.Module) -> ImageFormat:
        return NaflexImage(encoder.patch_size, encoder.max_num_patches, encoder.tower.config.num_channels)

    def owns(self, encoder: nn.Module) -> bool:
        return isinstance(encoder, Siglip2NaflexTowerEncoder)

    def key_renamer(self, key: str) -> str:
        return canonical_vision_tower_key(key)

    def expected_tensors(self, checkpoint_keys: list[str]) -> set[str]:
        return vision_tower_tensor_names(checkpoint_keys)
