"""Mistral causal LMs (``MistralForCausalLM``, model_type ``mistral``) as decoders.

Facts from transformers 5.23 ``modeling_mistral`` / ``configuration_mistral``:

- Llama's layer exactly: bias-free projections (``attention_bias`` / ``mlp_bias`` are not read),
  SwiGLU, RMSNorm.
- ``head_dim`` defaults to ``hidden_size // num_attention_heads`` (Mistral Nemo sets it apart).
- ``sliding_window`` (default 4096; ``null`` in Mistral 7B v0.2 / v0.3) applies to EVERY layer;
  ``layer_types`` is ignored. A token sees keys at distances ``< sliding_window``.
- ``num_key_value_heads`` defaults to 8; ``max_position_embeddings`` to 131072.
"""

from __future__ import annotations

from typing import Any

from fusiontrain.families.decoder import DecoderFamily
from fusiontrain.families.qwen2 import HF_DEFAULT_ROPE_THETA
from fusiontrain.families.llama import LlamaDecoderArgs, decoder_args_from_hf_text_config, rope_from_hf_text_config

# ``MistralConfig``'s defaults for every field read here (transformers 5.23).
MISTRAL_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "sliding_window": 4096,
}


class MistralDecoder(DecoderFamily):
    """Mistral: Llama's stack; refused when its sliding window is shorter than the context."""

    name = "mistral"
    model_types = ("mistral",)

    @staticmethod
    def with_defaults(config: dict) -> dict:
        """``config`` with ``MistralConfig``'s defaults filled in for absent fields."""
        return {**MISTRAL_DEFAULTS, **config}

    def check_config(self, config: dict) -> None:
        """Refuse a non-silu ``hidden_act``, a ``sliding_window`` below ``max_position_embeddings``
        (a window at least that long is exactly full causal attention for every sequence our
        decoder accepts), and RoPE other than default / llama3."""
        config = self.with_defaults(config)
        if config["hidden_act"] != "silu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported for {self.name} (only 'silu')")
        window, max_positions = config["sliding_window"], config["max_position_embeddings"]
        if window is not None and window < max_positions:
            raise ValueError(
                f"sliding_window={window} < max_position_embeddings={max_positions} is not supported for "
                f"{self.name}: our decoder attends over the full causal context (sliding_window must be null "
                "or at least max_position_embeddings)"
            )
        rope_from_hf_text_config(config, default_theta=HF_DEFAULT_ROPE_THETA)

    def decoder_args(self, config: dict) -> LlamaDecoderArgs:
        """Llama-style sizes (no biases, no q/k norms)."""
        return decoder_args_from_hf_text_config(self.with_defaults(config), default_theta=HF_DEFAULT_ROPE_THETA)

    def args_from_config(self, config: dict) -> tuple[LlamaDecoderArgs, int]:
        """As :meth:`DecoderFamily.args_from_config`, with HF's defaults for absent fields."""
        return super().args_from_config(self.with_defaults(config))
