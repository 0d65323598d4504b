"""Llama causal LMs (``LlamaForCausalLM``, model_type ``llama``) as decoders."""

from __future__ import annotations

from fusiontrain.families.decoder import DecoderFamily


class LlamaDecoder(DecoderFamily):
    """Llama 2 / 3 / 3.1 / 3.2: bias-free projections, optional Llama 3 RoPE scaling."""

    name = "llama"
    model_types = ("llama",)
