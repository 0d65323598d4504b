"""CLIP and SigLIP vision towers (``CLIPVisionModel``, ``SiglipVisionModel``, or the vision half
of a full ``CLIPModel`` / ``SiglipModel``) as encoders. The modules are
:mod:`fusiontrain.families.hf_tower`; each image gives the tower's ``last_hidden_state``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fusiontrain.flops.rules import (
    Tally,
    any_trainable,
    conv_flops,
    count_attention_core,
    count_linear,
    count_mlp,
    unwrap,
)

from fusiontrain.data.image_format import ImageFormat
from fusiontrain.families.encoder import EncoderFamily, FixedSizeImage
from fusiontrain.families.model import EncoderFlopCounter
from fusiontrain.families.hf_tower import (
    HFVisionTowerEncoder,
    build_vision_tower,
    canonical_vision_tower_key,
    vision_tower_config_from_dict,
    vision_tower_tensor_names,
)


def _count_tower_layer(tally: Tally, layer: nn.Module, *, tokens: int, pairs: int, x_grad: bool) -> bool:
    """A CLIP / SigLIP encoder layer: pre-norm attention and MLP, both residual."""
    attn = layer.self_attn
    normed = x_grad or any_trainable(layer.layer_norm1)
    q = count_linear(tally, "encoder.vision", attn.q_proj, tokens, normed)
    k = count_linear(tally, "encoder.vision", attn.k_proj, tokens, normed)
    v = count_linear(tally, "encoder.vision", attn.v_proj, tokens, normed)
    out = count_attention_core(tally, "encoder.vision", unwrap(attn.q_proj).out_features, pairs, q, k, v)
    h = count_linear(tally, "encoder.vision", attn.out_proj, tokens, out) or x_grad
    mlp = count_mlp(tally, "encoder.vision", layer.mlp, tokens, h or any_trainable(layer.layer_norm2))
    return h or mlp


def _count_siglip_pooling_head(tally: Tally, head: nn.Module, images: int, n_tok: int) -> None:
    """SigLIP's attention-pooling head: one probe query per image attends to the image's tokens.
    It runs in forward, but its output (``pooler_output``) is not used: no backward."""
    attention = head.attention
    e = attention.embed_dim
    kv_dim = e if attention.kdim is None else attention.kdim
    if attention.kdim != attention.vdim:
        raise TypeError("SigLIP pooling head with different key and value widths is not supported")
    q_flops = 2 * images * e * e
    kv_flops = 2 * images * n_tok * kv_dim * 2 * e
    core = 2 * 2 * e * images * n_tok  # 1 query per image and head
    out_flops = 2 * images * e * attention.out_proj.out_features
    tally.add("encoder.vision", q_flops + kv_flops + core + out_flops, 0)
    mlp = head.mlp
    tally.add("encoder.vision", sum(2 * images * m.in_features * m.out_features for m in (mlp.fc1, mlp.fc2)), 0)


def count_hf_tower_encoder(
    tally: Tally, encoder: nn.Module, images: int, encoder_input: Mapping[str, Any] | None
) -> tuple[int, bool]:
    """HF CLIP / SigLIP tower + MLP projection head over ``images`` images (every slot runs:
    ``encoder_input`` changes nothing)."""
    tower = encoder.tower
    body = getattr(tower, "vision_model", tower)  # transformers < 5 nests the tower one level deeper
    embeddings = body.embeddings
    n_tok = encoder.tokens_per_image
    tokens, pairs = images * n_tok, images * n_tok * n_tok

    conv = embeddings.patch_embedding
    tally.add("encoder.vision", conv_flops(conv, images, encoder.image_size), int(conv.weight.requires_grad))
    x = any_trainable(embeddings, getattr(body, "pre_layrnorm", None))
    for layer in body.encoder.layers:
        x = _count_tower_layer(tally, unwrap(layer), tokens=tokens, pairs=pairs, x_grad=x)
    head = getattr(body, "head", None)
    if head is not None and getattr(body, "use_head", True):
        _count_siglip_pooling_head(tally, head, images, n_tok)
    # CLIP's post_layernorm only touches the pooled token; SigLIP's normalises last_hidden_state.
    x = x or any_trainable(getattr(body, "post_layernorm", None))

    projection = encoder.projection
    hidden = count_linear(tally, "encoder.projection", projection.linear_1, tokens, x)
    return n_tok, count_linear(tally, "encoder.projection", projection.linear_2, tokens, hidden)


class _HFTowerFamily(EncoderFamily):
    """What CLIP and SigLIP share: the unmodified HF tower and a LLaVA-style projection head."""

    tower_class: str

    def build(self, config: dict, decoder_dim: int) -> nn.Module:
        return HFVisionTowerEncoder(build_vision_tower(vision_tower_config_from_dict(config)), decoder_dim=decoder_dim)

    def image_format(self, encoder: nn.Module) -> ImageFormat:
        return FixedSizeImage(encoder.image_size, encoder.tokens_per_image)

    def owns(self, encoder: nn.Module) -> bool:
        return isinstance(encoder, HFVisionTowerEncoder) and type(encoder.tower).__name__ == self.tower_class

    def key_renamer(self, key: str) -> str:
        return canonical_vision_tower_key(key)

    def analytic_encoder_flops(self, encoder: nn.Module) -> EncoderFlopCounter | None:
        return count_hf_tower_encoder if self.owns(encoder) else None

    def expected_tensors(self, checkpoint_keys: list[str]) -> set[str]:
        return vision_tower_tensor_names(checkpoint_keys)


class ClipEncoder(_HFTowerFamily):
    """CLIP: patches plus the class token, before ``post_layernorm``."""

    name = "clip"
    model_types = ("clip_vision_model", "clip")
    tower_class = "CLIPVisionModel"


class SiglipEncoder(_HFTowerFamily):
    """SigLIP: patches only, after its final LayerNorm."""

    name = "siglip"
    model_types = ("siglip_vision_model", "siglip")
    tower_class = "SiglipVisionModel"
