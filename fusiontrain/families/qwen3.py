"""Qwen3 causal LMs (``Qwen3ForCausalLM``, model_type ``qwen3``) as decoders.

Facts from transformers 5.23 ``modeling_qwen3`` / ``configuration_qwen3``:

- Each attention layer has ``q_norm`` / ``k_norm``: RMSNorms over ``head_dim`` (eps
  ``rms_norm_eps``), applied per head to q and k BEFORE RoPE.
- ``attention_bias`` (default false) puts biases on all four projections, o_proj included; our
  decoder has none on the output projection, so it is refused.
- ``head_dim`` is a config field with default 128 (not ``hidden_size // num_attention_heads``).
- Sliding-window attention works as in Qwen2 (``use_sliding_window``, ``sliding_window``,
  ``max_window_layers``, ``layer_types``).
- Small Qwen3 models tie the LM head to the embedding (``tie_word_embeddings: true``, no
  ``lm_head.weight`` stored); :meth:`DecoderFamily.weight_map` handles that.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fusiontrain.families.qwen2 import HF_DEFAULT_ROPE_THETA, QWEN2_DEFAULTS, Qwen2Decoder
from fusiontrain.weights.hf_checkpoint import TensorRoute
from fusiontrain.families.llama import LlamaDecoderArgs, decoder_args_from_hf_text_config

# ``Qwen3Config``'s defaults for every field read here (transformers 5.23).
QWEN3_DEFAULTS: dict[str, Any] = {**QWEN2_DEFAULTS, "head_dim": 128, "attention_bias": False}


class Qwen3Decoder(Qwen2Decoder):
    """Qwen3: Llama's stack plus per-head q/k RMSNorms before RoPE; bias-free projections.

    Shares Qwen2's config checks (hidden_act, sliding window, RoPE); its layers have no biases.
    """

    name = "qwen3"
    model_types = ("qwen3",)
    hf_defaults: ClassVar[dict[str, Any]] = QWEN3_DEFAULTS

    def check_config(self, config: dict) -> None:
        """Qwen2's checks, plus refusing ``attention_bias: true``."""
        if self.with_defaults(config)["attention_bias"]:
            raise ValueError(
                f"attention_bias=true is not supported for {self.name}: it adds a bias to o_proj as well, "
                "and our decoder's output projection is bias-free"
            )
        super().check_config(config)

    def decoder_args(self, config: dict) -> LlamaDecoderArgs:
        """Llama-style sizes with ``qk_norm=True`` (and no biases)."""
        return decoder_args_from_hf_text_config(
            self.with_defaults(config), default_theta=HF_DEFAULT_ROPE_THETA, qk_norm=True
        )

    def layer_routes(self, args: LlamaDecoderArgs, hf: str, ours: str) -> list[TensorRoute]:
        """Llama's routes plus ``self_attn.{q,k}_norm.weight`` ``[h_d]``."""
        routes = super().layer_routes(args, hf, ours)
        if args.qk_norm:
            routes += [
                TensorRoute(f"{hf}.self_attn.{norm}.weight", f"{ours}.attn.{norm}.scale")
                for norm in ("q_norm", "k_norm")
            ]
        return routes
