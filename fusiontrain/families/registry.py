"""The registries of model, decoder and encoder families, and the lookups over them.

:mod:`fusiontrain.families` re-exports every name here; see its docstring.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fusiontrain.families.clip_siglip import ClipEncoder, SiglipEncoder
from fusiontrain.families.composed.family import ComposedFamily, family_for_config
from fusiontrain.families.decoder import DecoderFamily, LlamaDecoder
from fusiontrain.families.dinov2 import DinoV2Encoder
from fusiontrain.families.encoder import EncoderFamily
from fusiontrain.families.mistral import MistralDecoder
from fusiontrain.families.mllama.family import MllamaFamily
from fusiontrain.families.model import InputFolders, ModelFamily, TrainableFlags  # noqa: F401 - re-exported
from fusiontrain.families.qwen2 import Qwen2Decoder
from fusiontrain.families.qwen3 import Qwen3Decoder
from fusiontrain.families.siglip2 import Siglip2NaflexEncoder
from fusiontrain.families.whisper import WhisperAudioEncoder


def _by_name(*families: Any) -> dict[str, Any]:
    return {family.name: family for family in families}


DECODER_FAMILIES: dict[str, DecoderFamily] = _by_name(LlamaDecoder(), Qwen2Decoder(), Qwen3Decoder(), MistralDecoder())
ENCODER_FAMILIES: dict[str, EncoderFamily] = _by_name(
    ClipEncoder(), SiglipEncoder(), DinoV2Encoder(), Siglip2NaflexEncoder(), WhisperAudioEncoder()
)
MODEL_FAMILIES: dict[str, ModelFamily] = _by_name(MllamaFamily(), ComposedFamily(DECODER_FAMILIES, ENCODER_FAMILIES))
# What this module offers is listed once, in fusiontrain.families.__all__ (which re-exports it).


def decoder_family_for(config: dict) -> DecoderFamily:
    """The decoder family that reads ``config`` (a ``config.json`` dict), by its ``model_type``."""
    return family_for_config(DECODER_FAMILIES, config, "decoder")


def encoder_family_for(config: dict) -> EncoderFamily:
    """The encoder family that reads ``config`` (a ``config.json`` dict), by its ``model_type``."""
    return family_for_config(ENCODER_FAMILIES, config, "encoder")


def model_family(name: str) -> ModelFamily:
    """The model family a manifest or export names.

    Raises:
        ValueError: no family has that name.
    """
    if name not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(MODEL_FAMILIES)}")
    return MODEL_FAMILIES[name]


def model_family_of(model: nn.Module) -> ModelFamily:
    """The family a built model belongs to.

    Raises:
        TypeError: no registered family recognises it.
    """
    for family in MODEL_FAMILIES.values():
        if family.owns(model):
            return family
    raise TypeError(f"no registered model family recognises a model with a {type(getattr(model, 'encoder', None)).__name__} encoder")
