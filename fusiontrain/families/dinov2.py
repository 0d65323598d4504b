"""DINOv2 vision towers (``Dinov2Model``, ``Dinov2WithRegistersModel``) as encoders.

Each image gives the tower's ``last_hidden_state``: the class token, the register tokens (when the
checkpoint has them) and the patches, after the tower's final LayerNorm, projected to the
decoder's width by a LLaVA-style :class:`~fusiontrain.families.hf_tower.MLPProjectionHead`.

Images are fixed-size (:class:`~fusiontrain.families.fixed_size_image.FixedSizeImage`) at the config's
``image_size``; there the tower's position-embedding interpolation is the identity. The
processor's output size is checked against it by the data pipeline's probe.

Shapes: b batch, i images per sample, H = W = image_size, n_tok = 1 + registers +
(image_size // patch_size)**2 tokens per image, s_e = i * n_tok encoder tokens, d_e tower width,
d decoder width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fusiontrain.data.image_format import ImageFormat
from fusiontrain.families.encoder import EncoderFamily
from fusiontrain.families.fixed_size_image import FixedSizeImage
from fusiontrain.families.hf_tower import MLPProjectionHead, project_tokens
from fusiontrain.modules import register_fusion_module
from fusiontrain.modules.image_slots import check_image_slots, place_slots, select_slots

# config.json model_type -> transformers (config class, model class)
_CLASSES = {
    "dinov2": ("Dinov2Config", "Dinov2Model"),
    "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel"),
}
# What a task model (e.g. Dinov2ForImageClassification) prefixes the tower's tensors with.
_TASK_PREFIXES = ("dinov2_with_registers.", "dinov2.")
# Tensors of a task model's head, not the tower's.
_NOT_TOWER_PREFIXES = ("classifier.",)
# Stored (pre-transformers-5) attention names -> the module names of transformers 5.23's towers
# (transformers' own conversion_mapping renames them the same way when loading).
_ATTENTION_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def dinov2_config_from_dict(config: dict) -> Any:
    """The ``Dinov2Config`` / ``Dinov2WithRegistersConfig`` of a ``config.json`` dict.

    Raises:
        ValueError: another model_type.
    """
    model_type = config.get("model_type")
    if model_type not in _CLASSES:
        raise ValueError(f"expected a DINOv2 config (model_type one of {sorted(_CLASSES)}), got {model_type!r}")
    import transformers

    return getattr(transformers, _CLASSES[model_type][0]).from_dict(config)


def build_dinov2_tower(config: Any) -> nn.Module:
    """A ``Dinov2Model`` / ``Dinov2WithRegistersModel`` for ``config`` on the current default device."""
    import transformers

    for config_class, model_class in _CLASSES.values():
        if type(config) is getattr(transformers, config_class):
            return getattr(transformers, model_class)(config)
    raise TypeError(f"expected a Dinov2Config or Dinov2WithRegistersConfig, got {type(config).__name__}")


class DinoV2TowerEncoder(nn.Module):
    """A HF DINOv2 tower followed by a projection head to the decoder's width.

    When no tower parameter requires grad and the pixels need none, the tower runs under
    ``torch.no_grad()``.

    Args:
        tower: a ``Dinov2Model`` or ``Dinov2WithRegistersModel``.
        decoder_dim: decoder width ``d``.
    """

    def __init__(self, tower: nn.Module, decoder_dim: int) -> None:
        super().__init__()
        from transformers import Dinov2Model, Dinov2WithRegistersModel

        if not isinstance(tower, (Dinov2Model, Dinov2WithRegistersModel)):
            raise TypeError(f"DinoV2TowerEncoder takes a Dinov2Model or Dinov2WithRegistersModel, got {type(tower).__name__}")
        config = tower.config
        if getattr(config, "use_swiglu_ffn", False):
            raise ValueError(
                "DINOv2 with use_swiglu_ffn (the giant checkpoints) is not supported: its stored fused "
                "mlp.weights_in must be split, which the encoder's key renaming cannot do"
            )
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        self.tower = tower
        self.projection = register_fusion_module(MLPProjectionHead(config.hidden_size, decoder_dim))
        self.decoder_dim = decoder_dim

    @property
    def image_size(self) -> int:
        """Height and width, in pixels, of the images the tower takes."""
        return self.tower.config.image_size

    @property
    def num_register_tokens(self) -> int:
        """Register tokens after the class token (0 for a plain ``Dinov2Model``)."""
        return getattr(self.tower.config, "num_register_tokens", 0)

    @property
    def tokens_per_image(self) -> int:
        """``n_tok = 1 + registers + (image_size // patch_size)**2``."""
        config = self.tower.config
        return 1 + self.num_register_tokens + (config.image_size // config.patch_size) ** 2

    def frozen_params(self) -> list[str]:
        """The masked-image-modelling mask token, which replaces patches only when ``bool_masked_pos``
        is given (never here): ``encoder_trainable`` leaves it frozen rather than in the optimizer
        with no gradient and no AdamW state (:class:`~fusiontrain.modules.DeepFusionModel`)."""
        return [f"tower.{name}" for name, _ in self.tower.named_parameters() if name == "embeddings.mask_token"]

    def block_lists(self) -> list[nn.ModuleList]:
        """The tower's transformer blocks (``encoder.layer``), for checkpointing, FSDP and compile."""
        return [self.tower.encoder.layer]

    @torch.no_grad()
    def init_buffers(self) -> None:
        """DINOv2 towers have no buffers; any buffer (a transformers change) raises rather than
        being left uninitialised after a meta-device build."""
        names = [name for name, _ in self.tower.named_buffers()]
        if names:
            raise RuntimeError(f"don't know how to rebuild the DINOv2 tower's buffers {names} after a meta-device build")

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's output before the projection.

        Args:
            pixel_values: ``[b, i, 3, H, W]`` or ``[b, 3, H, W]``, from the tower's own processor.

        Returns:
            ``[b, i * n_tok, d_e]``.
        """
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(1)
        channels, size = self.tower.config.num_channels, self.image_size
        if pixel_values.dim() != 5 or tuple(pixel_values.shape[2:]) != (channels, size, size):
            raise ValueError(
                f"pixel_values must be [b, i, {channels}, {size}, {size}] or [b, {channels}, {size}, {size}], got "
                f"{list(pixel_values.shape)}"
            )
        b, i = pixel_values.shape[:2]
        needs_grad = pixel_values.requires_grad or any(p.requires_grad for p in self.tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            hidden = self.tower(pixel_values=pixel_values.reshape(b * i, channels, size, size)).last_hidden_state
        return hidden.reshape(b, i * hidden.shape[1], hidden.shape[2])  # [b*i, n_tok, d_e] -> [b, i*n_tok, d_e]

    def forward(self, pixel_values: torch.Tensor, image_slots: torch.Tensor | None = None) -> torch.Tensor:
        """``pixel_values`` ``[b, i, 3, H, W]`` (or ``[b, 3, H, W]``) -> ``[b, i * n_tok, d]``.

        With ``image_slots`` (``[n]`` flat indices of the slots that hold an image) only those run,
        the others' columns are zeros (:mod:`fusiontrain.modules.image_slots`)."""
        if image_slots is None:
            return project_tokens(self.projection, self.features(pixel_values))
        b, i = pixel_values.shape[:2]
        check_image_slots(image_slots, b, i)
        embeddings = project_tokens(self.projection, self.features(select_slots(pixel_values, image_slots)[None]))  # [1, n * n_tok, d]
        per_image = embeddings.reshape(len(image_slots), -1, embeddings.shape[-1])  # [n, n_tok, d]
        return place_slots(per_image, image_slots, b, i).reshape(b, i * per_image.shape[1], -1)


class DinoV2Encoder(EncoderFamily):
    """DINOv2 (with or without registers): class + register + patch tokens after the final LayerNorm."""

    name = "dinov2"
    model_types = tuple(_CLASSES)

    def build(self, config: dict, decoder_dim: int) -> nn.Module:
        return DinoV2TowerEncoder(build_dinov2_tower(dinov2_config_from_dict(config)), decoder_dim=decoder_dim)

    def image_format(self, encoder: nn.Module) -> ImageFormat:
        return FixedSizeImage(encoder.image_size, encoder.tokens_per_image)

    def owns(self, encoder: nn.Module) -> bool:
        return isinstance(encoder, DinoV2TowerEncoder)

    def key_renamer(self, key: str) -> str:
        for prefix in _TASK_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        for old, new in _ATTENTION_RENAMES:
            key = key.replace(old, new)
        return key

    def expected_tensors(self, checkpoint_keys: list[str]) -> set[str]:
        return {key for key in checkpoint_keys if not key.startswith(_NOT_TOWER_PREFIXES)}
