"""Qwen2 / Qwen2.5 causal LMs (``Qwen2ForCausalLM``, model_type ``qwen2``) as decoders.

Facts from transformers 5.23 ``modeling_qwen2`` / ``configuration_qwen2``:

- q/k/v projections ALWAYS carry biases and o_proj never does; the config has no
  ``attention_bias`` field (one in ``config.json`` is ignored), nor an ``mlp_bias`` one.
- ``head_dim`` is not a config field; a ``head_dim`` in ``config.json`` is read all the same,
  else ``hidden_size // num_attention_heads``.
- Sliding-window attention runs only with ``use_sliding_window: true`` (else ``sliding_window`` is
  dropped), and then on the layers that ``layer_types`` marks ``sliding_attention`` (by default
  those from ``max_window_layers`` on). A token sees keys at distances ``< sliding_window``.
- Config defaults (used when ``config.json`` omits a field): :data:`QWEN2_DEFAULTS`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fusiontrain.families.decoder import DecoderFamily
from fusiontrain.weights.hf_checkpoint import TensorRoute
from fusiontrain.families.llama import LlamaDecoderArgs, decoder_args_from_hf_text_config, rope_from_hf_text_config

# ``Qwen2Config``'s defaults for every field read here (transformers 5.23).
QWEN2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
}

# ``RotaryEmbeddingConfigMixin.default_theta``: the RoPE base when the config names none.
HF_DEFAULT_ROPE_THETA = 10_000.0

_LAYER_TYPES = ("full_attention", "sliding_attention")


def refuse_qwen_sliding_window(config: dict) -> None:
    """Raise ``ValueError`` unless every layer of a Qwen2 / Qwen3 ``config`` (with defaults filled)
    attends over the full causal context, which is what our decoder computes.

    A sliding window of at least ``max_position_embeddings`` is exactly full causal attention:
    no sequence our decoder accepts (``max_seq_len = max_position_embeddings``) has a key
    ``sliding_window`` or more positions back.
    """
    window = config["sliding_window"] if config["use_sliding_window"] else None
    num_layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types")
    if layer_types is None:  # Qwen2Config.__post_init__'s derivation
        layer_types = [
            "sliding_attention" if window is not None and i >= config["max_window_layers"] else "full_attention"
            for i in range(num_layers)
        ]
    unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported (only {list(_LAYER_TYPES)})")
    sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if not sliding:
        return
    max_positions = config["max_position_embeddings"]
    if window is None:
        raise ValueError(
            f"layer_types marks layers {sliding} as 'sliding_attention' but use_sliding_window is false "
            "(so there is no window): not supported"
        )
    if window < max_positions:
        raise ValueError(
            f"use_sliding_window=true with sliding_window={window} < max_position_embeddings={max_positions} "
            f"(layers {sliding}, from layer_types / max_window_layers={config['max_window_layers']}) is not "
            "supported: our decoder attends over the full causal context"
        )


class Qwen2Decoder(DecoderFamily):
    """Qwen2 / Qwen2.5: Llama's stack plus biases on q/k/v (none on o_proj)."""

    name = "qwen2"
    model_types = ("qwen2",)
    hf_defaults: ClassVar[dict[str, Any]] = QWEN2_DEFAULTS

    def with_defaults(self, config: dict) -> dict:
        """``config`` with the HF config class's defaults filled in for absent fields."""
        return {**self.hf_defaults, **config}

    def check_config(self, config: dict) -> None:
        """Refuse a non-silu ``hidden_act``, sliding-window layers, and RoPE other than
        default / llama3 (see :func:`refuse_qwen_sliding_window`)."""
        config = self.with_defaults(config)
        if config["hidden_act"] != "silu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported for {self.name} (only 'silu')")
        refuse_qwen_sliding_window(config)
        rope_from_hf_text_config(config, default_theta=HF_DEFAULT_ROPE_THETA)

    def decoder_args(self, config: dict) -> LlamaDecoderArgs:
        """Llama-style sizes with ``attention_bias=True``."""
        return decoder_args_from_hf_text_config(
            self.with_defaults(config), default_theta=HF_DEFAULT_ROPE_THETA, attention_bias=True
        )

    def args_from_config(self, config: dict) -> tuple[LlamaDecoderArgs, int]:
        """As :meth:`DecoderFamily.args_from_config`, with HF's defaults for absent fields."""
        return super().args_from_config(self.with_defaults(config))

    def layer_routes(self, args: LlamaDecoderArgs, hf: str, ours: str) -> list[TensorRoute]:
        """Llama's routes plus ``self_attn.{q,k,v}_proj.bias`` ``[n_h * h_d]`` / ``[n_kv * h_d]``."""
        routes = super().layer_routes(args, hf, ours)
        if args.attention_bias:
            routes += [
                TensorRoute(f"{hf}.self_attn.{proj}.bias", f"{ours}.attn.{proj}.bias")
                for proj in ("q_proj", "k_proj", "v_proj")
            ]
        return routes
