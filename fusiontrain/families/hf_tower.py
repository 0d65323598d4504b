"""What the Hugging Face vision-tower families share (CLIP and SigLIP in
:mod:`fusiontrain.families.clip_siglip`; SigLIP2 NaFlex and DINOv2 take the head and key helpers).

- :func:`vision_tower_config_from_dict` reads a tower's config from a ``config.json`` dict (a
  vision-only ``clip_vision_model`` / ``siglip_vision_model`` config, or the ``vision_config`` of a
  full ``clip`` / ``siglip`` one).
- :func:`build_vision_tower` builds the matching ``CLIPVisionModel`` / ``SiglipVisionModel``.
- :class:`MLPProjectionHead` is the LLaVA-style head ``Linear(d_e, d) -> GELU -> Linear(d, d)``, on
  flat tokens (:func:`project_tokens` runs it on ``[..., d_e]``).
- :func:`vision_tower_weight_map` routes a checkpoint's tensors to the tower's parameters, and
  :func:`vision_tower_tensor_names` says which stored tensors must all be used.

The tower is the unmodified HF module, so its state-dict keys under ``tower.`` are exactly the
ones ``save_pretrained`` writes in transformers 5 (older checkpoints prefix them with
``vision_model.``; :func:`canonical_vision_tower_key` strips that).

``transformers`` is imported only when a tower is built or inspected, never at module import.

Shapes: b batch, i images per sample, H, W pixel height and width, n_tok tokens per image (the
length of the tower's ``last_hidden_state``), d_e tower width, d decoder width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusiontrain.weights.hf_checkpoint import TensorRoute

# config.json model_type -> (transformers config class, whether it is a full image + text model)
_CONFIG_CLASSES = {
    "clip_vision_model": ("CLIPVisionConfig", False),
    "siglip_vision_model": ("SiglipVisionConfig", False),
    "clip": ("CLIPConfig", True),
    "siglip": ("SiglipConfig", True),
}
ACCEPTED_MODEL_TYPES = tuple(_CONFIG_CLASSES)

_LEGACY_PREFIX = "vision_model."


def vision_tower_config_from_dict(config: dict) -> Any:
    """The tower's HF config object from a ``config.json`` dict.

    Args:
        config: a ``CLIPVisionConfig`` / ``SiglipVisionConfig`` dict, or a full ``CLIPConfig`` /
            ``SiglipConfig`` dict (then its ``vision_config`` is used).

    Returns:
        A ``CLIPVisionConfig`` or ``SiglipVisionConfig``.
    """
    model_type = config.get("model_type")
    if model_type not in _CONFIG_CLASSES:
        raise ValueError(
            f"expected a CLIP or SigLIP config (model_type one of {list(ACCEPTED_MODEL_TYPES)}), got model_type "
            f"{model_type!r}: pass the folder of a CLIPVisionModel / SiglipVisionModel (or of a full "
            "CLIPModel / SiglipModel)"
        )
    import transformers

    class_name, is_full = _CONFIG_CLASSES[model_type]
    parsed = getattr(transformers, class_name).from_dict(config)
    return parsed.vision_config if is_full else parsed


def build_vision_tower(vision_config: Any) -> nn.Module:
    """A ``CLIPVisionModel`` or ``SiglipVisionModel`` for ``vision_config``, on the current default
    device (wrap the call in ``with torch.device("meta"):`` to defer allocation). Its non-persistent
    buffers then need the encoder's ``init_buffers`` once the tower is materialised."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    if isinstance(vision_config, CLIPVisionConfig):
        return CLIPVisionModel(vision_config)
    if isinstance(vision_config, SiglipVisionConfig):
        return SiglipVisionModel(vision_config)
    raise TypeError(f"expected a CLIPVisionConfig or SiglipVisionConfig, got {type(vision_config).__name__}")


def canonical_vision_tower_key(key: str) -> str:
    """A stored tensor name in transformers 5's flat layout: strips the ``vision_model.`` prefix of
    older ``CLIPVisionModel`` / ``SiglipVisionModel`` checkpoints and of full CLIP / SigLIP ones.
    Other names (a full model's ``text_model.*``, ``logit_scale``, ...) are left as they are."""
    return key[len(_LEGACY_PREFIX) :] if key.startswith(_LEGACY_PREFIX) else key


def vision_tower_weight_map(tower: nn.Module, prefix: str) -> list[TensorRoute]:
    """One route per tower parameter: canonical tensor ``name`` -> our ``prefix + name``.

    Args:
        tower: the HF tower.
        prefix: where the tower sits in the model being filled, e.g. ``"encoder.tower."``.
    """
    return [TensorRoute(name, f"{prefix}{name}") for name, _ in tower.named_parameters()]


# Tensors a CLIP / SigLIP folder may hold that are not the vision tower's: a full model's text tower,
# projections and logit scale/bias (also CLIPVisionModelWithProjection's visual_projection), and the
# position_ids that old transformers versions stored (the tower recomputes them).
_NOT_TOWER_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")
_NOT_TOWER_SUFFIXES = ("position_ids",)


def vision_tower_tensor_names(checkpoint_keys: list[str]) -> set[str]:
    """The canonical checkpoint tensors that must fill the tower: every tensor except those of the
    other parts of a full CLIP / SigLIP model (text tower, projections, logit scale) and stored
    ``position_ids`` buffers."""
    return {
        key
        for key in checkpoint_keys
        if not key.startswith(_NOT_TOWER_PREFIXES) and not key.endswith(_NOT_TOWER_SUFFIXES)
    }


class MLPProjectionHead(nn.Module):
    """LLaVA's projector: ``linear_2(gelu(linear_1(x)))``, ``d_e -> d -> d``, with biases.

    Args:
        encoder_dim: tower width ``d_e``.
        decoder_dim: decoder width ``d``.
    """

    def __init__(self, encoder_dim: int, decoder_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(encoder_dim, decoder_dim)
        self.linear_2 = nn.Linear(decoder_dim, decoder_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[n, d_e]`` (tokens flattened) -> ``[n, d]``; :func:`project_tokens` takes ``[..., d_e]``.

        Flat in and out because the head is an FSDP unit of its own: FSDP2 hooks a unit's output
        for its backward, and warns (on every run) when that output is a view, which is what
        ``nn.Linear`` returns for a 3-D input."""
        if x.dim() != 2:
            raise ValueError(f"the projection head takes flat tokens [n, d_e], got {list(x.shape)}: call project_tokens")
        return self.linear_2(F.gelu(self.linear_1(x)))


def project_tokens(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``features`` ``[..., d_e]`` through ``head``, which takes flat tokens ``[n, d_e]``
    (:class:`MLPProjectionHead`) -> ``[..., d]``."""
    return head(features.reshape(-1, features.shape[-1])).unflatten(0, features.shape[:-1])
