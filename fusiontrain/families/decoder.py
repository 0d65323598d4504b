"""The decoder seam: what a HF causal-LM family must say to become a fusion model's decoder.

A :class:`DecoderFamily` reads the family's ``config.json`` into :class:`LlamaDecoderArgs` (our
decoder is one parameterised Llama-style stack: GQA, RoPE, RMSNorm, SwiGLU, with optional q/k/v
biases and per-head q/k RMSNorms), and routes the family's stored tensors to our parameter names.
Every family of today (Llama, Qwen2 / Qwen2.5, Qwen3, Mistral) stores its layers under the same HF
names, so :class:`DecoderFamily` implements the routes once; a family overrides
:meth:`DecoderFamily.check_config` (refusing what our stack does not compute, naming the field)
and declares what differs through :meth:`DecoderFamily.decoder_args`.

Nothing outside ``fusiontrain/families/`` knows which families exist: code asks the registry
(:func:`fusiontrain.families.decoder_family_for`).
"""

from __future__ import annotations

from typing import ClassVar

from fusiontrain.weights.hf_checkpoint import TensorRoute
from fusiontrain.families.llama import FusedSlot, LlamaDecoderArgs, decoder_args_from_hf_text_config

_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
_MLP = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


class DecoderFamily:
    """A HF causal-LM family (``*ForCausalLM``) usable as the decoder of a composed model.

    Attributes:
        name: the registry key (also written into checkpoints and exports).
        model_types: the ``config.json`` ``model_type`` values this family reads.
        ignored_suffixes: stored tensors that are not parameters (old transformers saved RoPE's
            inverse frequencies; we compute them).
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    ignored_suffixes: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)

    def check_config(self, config: dict) -> None:
        """Raise ``ValueError`` naming the config field when ``config`` asks for something our
        decoder does not compute. The default checks Llama's fields."""
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag):
                raise ValueError(f"{flag}=true is not supported for {self.name}: its projections are bias-free here")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only 'silu')")

    # The RoPE base a config that names none gets (transformers' ``default_theta``: 10000 for
    # every causal LM family here; Mllama's text config, read elsewhere, defaults to 500000).
    default_rope_theta: ClassVar[float] = 10_000.0

    def decoder_args(self, config: dict) -> LlamaDecoderArgs:
        """Our decoder's sizes for ``config`` (a ``config.json`` dict of this family)."""
        return decoder_args_from_hf_text_config(config, default_theta=self.default_rope_theta)

    def args_from_config(self, config: dict) -> tuple[LlamaDecoderArgs, int]:
        """``(args, num_hidden_layers)`` after checking the model type and the features."""
        if config.get("model_type") not in self.model_types:
            raise ValueError(
                f"expected a {self.name} causal LM config (model_type one of {list(self.model_types)}), got "
                f"model_type {config.get('model_type')!r}"
            )
        self.check_config(config)
        return self.decoder_args(config), config["num_hidden_layers"]

    def weight_map(
        self, args: LlamaDecoderArgs, slots: list[FusedSlot], checkpoint_keys: list[str], *, tie_word_embeddings: bool
    ) -> list[TensorRoute]:
        """Routes from a ``*ForCausalLM`` checkpoint to the pretrained half of our decoder.

        A fused slot's self-attention layer lives under ``layer.``; its cross-attention layer
        (under ``fusion_layer.``) has no route. ``lm_head.weight`` fills the output projection; when
        the checkpoint has none and ``tie_word_embeddings`` is set, ``embed_tokens`` fills it.
        """
        routes = [
            TensorRoute("model.embed_tokens.weight", "decoder.tok_embeddings.weight"),
            TensorRoute("model.norm.weight", "decoder.norm.scale"),
        ]
        if "lm_head.weight" in checkpoint_keys:
            routes.append(TensorRoute("lm_head.weight", "decoder.output.weight"))
        elif tie_word_embeddings:
            routes.append(TensorRoute("model.embed_tokens.weight", "decoder.output.weight"))
        else:
            raise ValueError(
                "the decoder checkpoint has no lm_head.weight and config.json does not set tie_word_embeddings: "
                f"pass a {self.name} *ForCausalLM folder (not a bare base model)"
            )
        for index, slot in enumerate(slots):
            hf = f"model.layers.{slot.self_index}"
            ours = f"decoder.layers.{index}" + ("" if slot.cross_index is None else ".layer")
            routes += self.layer_routes(args, hf, ours)
        return routes

    def layer_routes(self, args: LlamaDecoderArgs, hf: str, ours: str) -> list[TensorRoute]:
        """Routes of one layer: HF prefix ``hf`` (``model.layers.N``) to our prefix ``ours``."""
        routes = [TensorRoute(f"{hf}.self_attn.{h}.weight", f"{ours}.attn.{o}.weight") for h, o in _ATTN.items()]
        routes += [TensorRoute(f"{hf}.mlp.{h}.weight", f"{ours}.mlp.{o}.weight") for h, o in _MLP.items()]
        routes += [
            TensorRoute(f"{hf}.input_layernorm.weight", f"{ours}.sa_norm.scale"),
            TensorRoute(f"{hf}.post_attention_layernorm.weight", f"{ours}.mlp_norm.scale"),
        ]
        return routes


class LlamaDecoder(DecoderFamily):
    """Llama causal LMs (``LlamaForCausalLM``, model_type ``llama``): Llama 2 / 3 / 3.1 / 3.2,
    bias-free projections, optional Llama 3 RoPE scaling. The base class computes them as they
    are; every other decoder family specialises it."""

    name = "llama"
    model_types = ("llama",)
