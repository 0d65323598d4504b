"""Builders for model families, and the maps between Hugging Face checkpoints and our modules."""

from fusiontrain.families.composed.compose import compose_from_hf
from fusiontrain.families.mllama.model import (
    build_mllama,
    encoder_mask_from_cross_attention_mask,
    load_hf_mllama,
    mllama_args_from_config,
)

__all__ = [
    "build_mllama",
    "compose_from_hf",
    "encoder_mask_from_cross_attention_mask",
    "load_hf_mllama",
    "mllama_args_from_config",
]
