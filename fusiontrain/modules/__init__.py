"""Model building blocks that honour torchtune's ``DeepFusionModel`` contract: attention (with the
packed and flex_attention seam), KV caches, RoPE, layers, transformer and fusion layers, the
model's block stacks, and LoRA's linear.

Layer: the lowest above ``batch_layout``; imports torch (and numpy) only, private torch names
through ``torch_private``.

The names below are imported on first use (PEP 562), not with the package: a module that needs
only the packed layouts or the masks (the data code, and so every dataloader worker) does not
import the attention kernels and, with them, torch's compiler (about 0.9 s per process)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it.
_EXPORTS = {
    "DeepFusionModel": "fusiontrain.modules.fusion",
    "FeedForward": "fusiontrain.modules.layers",
    "FusionEmbedding": "fusiontrain.modules.fusion",
    "FusionLayer": "fusiontrain.modules.fusion",
    "KVCache": "fusiontrain.modules.kv_cache",
    "Llama3RopeScaling": "fusiontrain.modules.rope",
    "MultiHeadAttention": "fusiontrain.modules.attention",
    "RMSNorm": "fusiontrain.modules.layers",
    "RotaryPositionalEmbeddings": "fusiontrain.modules.rope",
    "TanhGate": "fusiontrain.modules.layers",
    "TransformerCrossAttentionLayer": "fusiontrain.modules.transformer",
    "TransformerDecoder": "fusiontrain.modules.transformer",
    "TransformerSelfAttentionLayer": "fusiontrain.modules.transformer",
    "attend": "fusiontrain.modules.attention",
    "delete_kv_caches": "fusiontrain.modules.attention",
    "disable_kv_cache": "fusiontrain.modules.attention",
    "get_fusion_params": "fusiontrain.modules.fusion",
    "register_fusion_module": "fusiontrain.modules.fusion",
    "set_trainable_params": "fusiontrain.modules.fusion",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from fusiontrain.modules.attention import MultiHeadAttention, attend, delete_kv_caches, disable_kv_cache
    from fusiontrain.modules.fusion import (
        DeepFusionModel,
        FusionEmbedding,
        FusionLayer,
        get_fusion_params,
        register_fusion_module,
        set_trainable_params,
    )
    from fusiontrain.modules.kv_cache import KVCache
    from fusiontrain.modules.layers import FeedForward, RMSNorm, TanhGate
    from fusiontrain.modules.rope import Llama3RopeScaling, RotaryPositionalEmbeddings
    from fusiontrain.modules.transformer import (
        TransformerCrossAttentionLayer,
        TransformerDecoder,
        TransformerSelfAttentionLayer,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
