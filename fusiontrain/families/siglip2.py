"""SigLIP2 NaFlex vision towers (``Siglip2VisionModel``, or the vision half of a full
``Siglip2Model``) as encoders.

SigLIP2's fixed-resolution checkpoints are ``siglip`` model_type (``SiglipModel``) and are read by
the ``siglip`` family; this family reads the NaFlex ones (``siglip2_vision_model`` / ``siglip2``).

The Siglip2 image processor resizes an image, keeping its aspect ratio, to at most
``max_num_patches`` (P) patches of ``p x p`` pixels and pads the patch sequence to P. An image thus
yields a variable number of valid tokens. :class:`~fusiontrain.families.siglip2_image.NaflexImage` packs a row's valid tokens: image k
starts at the sum of the previous images' token counts, and ``collate`` adds ``token_index`` so
:class:`Siglip2NaflexTowerEncoder` gathers the valid tokens of the tower's padded output.

Shapes: b rows, i images per row, P = max_num_patches, c = 3 * p * p patch values, s_e packed
encoder tokens per row, d_e tower width, d decoder width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fusiontrain.data.image_format import ImageFormat
from fusiontrain.families.encoder import EncoderFamily
from fusiontrain.families.siglip2_image import NaflexImage
from fusiontrain.families.hf_tower import MLPProjectionHead, canonical_vision_tower_key, project_tokens, vision_tower_tensor_names
from fusiontrain.modules import register_fusion_module
from fusiontrain.modules.image_slots import check_image_slots, place_slots, select_slots


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

    #: transformers' tower reads ``spatial_shapes`` on the host (to resize its position
    #: embeddings): a device-to-host sync per forward on a GPU, and no run on the meta device.
    #: Encoders without this attribute read no input's values.
    reads_input_values_on_host = True

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

    def frozen_params(self) -> list[str]:
        """The tower's attention-pooling ``head`` (``vision_use_head``), which does not feed
        ``last_hidden_state``: ``encoder_trainable`` leaves it frozen rather than in the optimizer
        with no gradient and no AdamW state (:class:`~fusiontrain.modules.DeepFusionModel`)."""
        return [f"tower.{name}" for name, _ in self.tower.named_parameters() if "head" in name.split(".")[:2]]  # (vision_model.)head

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
        image_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The packed tower output before the projection.

        Args:
            pixel_values: ``[b, i, P, c]``.
            pixel_attention_mask: ``[b, i, P]`` (1 for valid patches).
            spatial_shapes: ``[b, i, 2]``.
            token_index: ``[b, s_e]`` long, indices into each row's ``[i * P]`` tower outputs.
            image_slots: ``[n]`` flat indices of the slots that hold an image, or None for all:
                only those run through the tower, the others' outputs are zeros (no column points
                at them; :mod:`fusiontrain.modules.image_slots`).

        Returns:
            ``[b, s_e, d_e]``.
        """
        if pixel_values.dim() != 4 or pixel_attention_mask.shape != pixel_values.shape[:3]:
            raise ValueError(
                f"expected pixel_values [b, i, P, c] and pixel_attention_mask [b, i, P], got "
                f"{list(pixel_values.shape)} and {list(pixel_attention_mask.shape)}"
            )
        b, i, p, c = pixel_values.shape
        inputs = (pixel_values, pixel_attention_mask, spatial_shapes)
        if image_slots is None:
            pixels, patch_mask, shapes = (x.flatten(0, 1) for x in inputs)  # b*i images
        else:
            check_image_slots(image_slots, b, i)
            pixels, patch_mask, shapes = (select_slots(x, image_slots) for x in inputs)  # n images
        needs_grad = pixel_values.requires_grad or any(q.requires_grad for q in self.tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            hidden = self.tower(
                pixel_values=pixels, pixel_attention_mask=patch_mask, spatial_shapes=shapes
            ).last_hidden_state  # [b*i or n, P, d_e]
        if image_slots is not None:
            hidden = place_slots(hidden, image_slots, b, i)
        hidden = hidden.reshape(b, i * p, hidden.shape[-1])
        return torch.gather(hidden, 1, token_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
        token_index: torch.Tensor,
        image_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See :meth:`features`; returns ``[b, s_e, d]``."""
        features = self.features(pixel_values, pixel_attention_mask, spatial_shapes, token_index, image_slots)
        return project_tokens(self.projection, features)


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
