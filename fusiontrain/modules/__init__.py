"""Model building blocks that honour torchtune's ``DeepFusionModel`` contract: attention (with the
packed and flex_attention seam), KV caches, RoPE, layers, transformer and fusion layers, the
model's block stacks, and LoRA's linear.

Layer: the lowest above ``batch_layout``; imports torch (and numpy) only, private torch names
through ``torch_private``."""

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

__all__ = [
    "DeepFusionModel",
    "FeedForward",
    "FusionEmbedding",
    "FusionLayer",
    "KVCache",
    "Llama3RopeScaling",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryPositionalEmbeddings",
    "TanhGate",
    "TransformerCrossAttentionLayer",
    "TransformerDecoder",
    "TransformerSelfAttentionLayer",
    "attend",
    "delete_kv_caches",
    "disable_kv_cache",
    "get_fusion_params",
    "register_fusion_module",
    "set_trainable_params",
]
