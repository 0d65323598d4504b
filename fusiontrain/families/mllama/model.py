"""Llama 3.2 Vision (HF ``MllamaForConditionalGeneration``) as a :class:`DeepFusionModel`.

- :func:`mllama_args_from_config` reads sizes from a HF ``config.json`` dict.
- :func:`build_mllama` builds the model (on the meta device inside ``with torch.device("meta")``).
- :func:`mllama_weight_map` says which HF tensor fills which of our parameters.
- :func:`prepare_mllama` builds the model on the meta device with the weight source that fills it
  (:func:`fusiontrain.models.load_hf_mllama` allocates and fills it, one tensor at a time).
- :func:`encoder_mask_from_cross_attention_mask` turns HF's ``cross_attention_mask`` into ours.

Fusion parameters follow torchtune's ``llama3_2_vision`` split: the cross-attention layers, the
projection head (global vision layers + projector) and the 8 extra token rows.

HF's flat text stack interleaves cross-attention layers with self-attention layers; ours wraps
each cross-attention layer with its neighbour in a ``FusionLayer`` (see
:func:`~fusiontrain.families.llama.fuse_layer_stack`). Token ids are HF's: the image token
(``image_token_index``, 128256 for Llama 3.2) is the first of the extra rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fusiontrain.weights.hf_checkpoint import HFCheckpoint, TensorRoute
from fusiontrain.families.llama import (
    FusedSlot,
    LlamaDecoderArgs,
    fuse_layer_stack,
    llama_fused_decoder,
    decoder_args_from_hf_text_config,
)
from fusiontrain.weights.pretrained import PretrainedModel, WeightSource, check_routes_cover
from fusiontrain.modules import DeepFusionModel
from fusiontrain.families.mllama.vision import MllamaVisionArgs, MllamaVisionEncoder

MLLAMA_FUSION_VOCAB_SIZE = 8  # HF's embed_tokens has vocab_size + 8 rows


@dataclass(frozen=True)
class MllamaArgs:
    """Everything needed to build an Mllama ``DeepFusionModel``."""

    text: LlamaDecoderArgs
    num_text_layers: int  # the flat HF stack, cross-attention layers included
    cross_attention_layers: tuple[int, ...]
    vision: MllamaVisionArgs
    image_token_id: int

    @property
    def slots(self) -> list[FusedSlot]:
        return fuse_layer_stack(self.num_text_layers, self.cross_attention_layers)


def mllama_args_from_config(config: dict) -> MllamaArgs:
    """Sizes from a HF ``MllamaConfig`` as stored in ``config.json``."""
    if config.get("model_type") != "mllama":
        raise ValueError(f"expected an Mllama config (model_type 'mllama'), got {config.get('model_type')!r}")
    text, vision = config["text_config"], config["vision_config"]
    decoder = decoder_args_from_hf_text_config(text)
    vision_args = MllamaVisionArgs(
        hidden_size=vision["hidden_size"],
        num_heads=vision["attention_heads"],
        intermediate_size=vision["intermediate_size"],
        num_layers=vision["num_hidden_layers"],
        num_global_layers=vision["num_global_layers"],
        intermediate_layers_indices=tuple(vision["intermediate_layers_indices"]),
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        max_num_tiles=vision["max_num_tiles"],
        num_aspect_ratios=len(vision["supported_aspect_ratios"]),
        norm_eps=vision["norm_eps"],
        num_channels=vision.get("num_channels", 3),
    )
    if vision_args.output_dim != vision["vision_output_dim"]:
        raise ValueError(
            f"vision_output_dim {vision['vision_output_dim']} != hidden_size * (1 + len(intermediate_layers_indices))"
            f" = {vision_args.output_dim}"
        )
    return MllamaArgs(
        text=decoder,
        num_text_layers=text["num_hidden_layers"],
        cross_attention_layers=tuple(text["cross_attention_layers"]),
        vision=vision_args,
        image_token_id=config.get("image_token_index", text["vocab_size"]),
    )


def build_mllama(
    args: MllamaArgs,
    *,
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
) -> DeepFusionModel:
    """Build the model with fresh weights on the current default device (use the meta device
    to defer allocation)."""
    decoder = llama_fused_decoder(args.text, args.slots, fusion_vocab_size=MLLAMA_FUSION_VOCAB_SIZE)
    encoder = MllamaVisionEncoder(args.vision, decoder_dim=args.text.hidden_size)
    return DeepFusionModel(
        decoder,
        encoder,
        decoder_trainable=decoder_trainable,
        encoder_trainable=encoder_trainable,
        fusion_trainable=fusion_trainable,
    )


# -- weight map -------------------------------------------------------------------------------------

_LEGACY_PREFIXES = (  # the layout of checkpoints written before transformers 4.52
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_model.", "model.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def canonical_mllama_key(key: str) -> str:
    """Map a stored tensor name, in the current or the legacy HF layout, to the current one."""
    for old, new in _LEGACY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def legacy_mllama_key(key: str) -> str:
    """The reverse of :func:`canonical_mllama_key`: a current HF tensor name in the legacy layout
    (the one transformers 5.23's ``save_pretrained`` writes)."""
    for old, new in _LEGACY_PREFIXES:
        if key.startswith(new):
            return old + key[len(new) :]
    return key


_PROJ = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
_MLP = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _text_self_routes(hf: str, ours: str) -> list[TensorRoute]:
    routes = [TensorRoute(f"{hf}.self_attn.{h}.weight", f"{ours}.attn.{o}.weight") for h, o in _PROJ.items()]
    routes += [TensorRoute(f"{hf}.mlp.{h}.weight", f"{ours}.mlp.{o}.weight") for h, o in _MLP.items()]
    routes += [
        TensorRoute(f"{hf}.input_layernorm.weight", f"{ours}.sa_norm.scale"),
        TensorRoute(f"{hf}.post_attention_layernorm.weight", f"{ours}.mlp_norm.scale"),
    ]
    return routes


def _text_cross_routes(hf: str, ours: str) -> list[TensorRoute]:
    routes = [TensorRoute(f"{hf}.cross_attn.{h}.weight", f"{ours}.attn.{o}.weight") for h, o in _PROJ.items()]
    routes += [TensorRoute(f"{hf}.mlp.{h}.weight", f"{ours}.mlp.{o}.weight") for h, o in _MLP.items()]
    routes += [
        TensorRoute(f"{hf}.cross_attn.q_norm.weight", f"{ours}.attn.q_norm.scale"),
        TensorRoute(f"{hf}.cross_attn.k_norm.weight", f"{ours}.attn.k_norm.scale"),
        TensorRoute(f"{hf}.input_layernorm.weight", f"{ours}.ca_norm.scale"),
        TensorRoute(f"{hf}.post_attention_layernorm.weight", f"{ours}.mlp_norm.scale"),
        TensorRoute(f"{hf}.cross_attn_attn_gate", f"{ours}.ca_scale.scale"),
        TensorRoute(f"{hf}.cross_attn_mlp_gate", f"{ours}.mlp_scale.scale"),
    ]
    return routes


def _vision_layer_routes(hf: str, ours: str, *, gated: bool) -> list[TensorRoute]:
    routes = [TensorRoute(f"{hf}.self_attn.{h}.weight", f"{ours}.attn.{o}.weight") for h, o in _PROJ.items()]
    for part in ("weight", "bias"):
        routes += [
            TensorRoute(f"{hf}.mlp.fc1.{part}", f"{ours}.mlp.w1.{part}"),
            TensorRoute(f"{hf}.mlp.fc2.{part}", f"{ours}.mlp.w2.{part}"),
            TensorRoute(f"{hf}.input_layernorm.{part}", f"{ours}.sa_norm.{part}"),
            TensorRoute(f"{hf}.post_attention_layernorm.{part}", f"{ours}.mlp_norm.{part}"),
        ]
    if gated:
        routes += [
            TensorRoute(f"{hf}.gate_attn", f"{ours}.sa_scale.scale"),
            TensorRoute(f"{hf}.gate_ffn", f"{ours}.mlp_scale.scale"),
        ]
    return routes


def mllama_weight_map(args: MllamaArgs) -> list[TensorRoute]:
    """Routes from every tensor of a HF Mllama checkpoint (current layout) to our parameters."""
    text_hf, vision_hf = "model.language_model", "model.vision_model"
    v, extra = args.text.vocab_size, MLLAMA_FUSION_VOCAB_SIZE
    routes = [
        TensorRoute(f"{text_hf}.embed_tokens.weight", "decoder.tok_embeddings.weight", (0, v)),
        TensorRoute(
            f"{text_hf}.embed_tokens.weight", "decoder.tok_embeddings.fusion_embedding.weight", (v, v + extra)
        ),
        TensorRoute(f"{text_hf}.norm.weight", "decoder.norm.scale"),
        TensorRoute("lm_head.weight", "decoder.output.weight"),
    ]
    for position, slot in enumerate(args.slots):
        ours = f"decoder.layers.{position}"
        if slot.cross_index is None:
            routes += _text_self_routes(f"{text_hf}.layers.{slot.self_index}", ours)
        else:
            routes += _text_self_routes(f"{text_hf}.layers.{slot.self_index}", f"{ours}.layer")
            routes += _text_cross_routes(f"{text_hf}.layers.{slot.cross_index}", f"{ours}.fusion_layer")

    vis = "encoder.vision"
    routes += [
        TensorRoute(f"{vision_hf}.patch_embedding.weight", f"{vis}.conv.weight"),
        TensorRoute(f"{vision_hf}.class_embedding", f"{vis}.class_embedding"),
        TensorRoute(f"{vision_hf}.gated_positional_embedding.embedding", f"{vis}.token_pos_embed.local_embedding"),
        TensorRoute(
            f"{vision_hf}.gated_positional_embedding.tile_embedding.weight",
            f"{vis}.token_pos_embed.tile_embedding.weight",
        ),
        TensorRoute(f"{vision_hf}.gated_positional_embedding.gate", f"{vis}.token_pos_embed.gate"),
    ]
    for hf_name, our_name in (("pre_tile", "pre_tile"), ("post_tile", "post_tile")):
        routes += [
            TensorRoute(f"{vision_hf}.{hf_name}_positional_embedding.embedding.weight", f"{vis}.{our_name}_pos_embed.embedding.weight"),
            TensorRoute(f"{vision_hf}.{hf_name}_positional_embedding.gate", f"{vis}.{our_name}_pos_embed.gate"),
        ]
    for part in ("weight", "bias"):
        routes += [
            TensorRoute(f"{vision_hf}.layernorm_pre.{part}", f"{vis}.ln_pre.{part}"),
            TensorRoute(f"{vision_hf}.layernorm_post.{part}", f"{vis}.ln_post.{part}"),
            TensorRoute(f"model.multi_modal_projector.{part}", f"encoder.projection.output.{part}"),
        ]
    for index in range(args.vision.num_layers):
        routes += _vision_layer_routes(f"{vision_hf}.transformer.layers.{index}", f"{vis}.layers.{index}", gated=False)
    for index in range(args.vision.num_global_layers):
        routes += _vision_layer_routes(
            f"{vision_hf}.global_transformer.layers.{index}", f"encoder.projection.layers.{index}", gated=True
        )
    return routes


def prepare_mllama(
    path: str | Path,
    *,
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
) -> PretrainedModel:
    """Build the model of a HF ``MllamaForConditionalGeneration`` folder on the meta device and
    check, from file headers only, that its tensors match; :meth:`PretrainedModel.load` fills it."""
    checkpoint = HFCheckpoint(path, key_renamer=canonical_mllama_key)
    args = mllama_args_from_config(checkpoint.config)
    with torch.device("meta"):
        model = build_mllama(
            args,
            decoder_trainable=decoder_trainable,
            encoder_trainable=encoder_trainable,
            fusion_trainable=fusion_trainable,
        )
    source = WeightSource(checkpoint, mllama_weight_map(args))
    check_routes_cover(source, set(checkpoint.keys()), "Mllama")
    return PretrainedModel(model, [source])


def encoder_mask_from_cross_attention_mask(
    cross_attention_mask: torch.Tensor, tokens_per_tile: int, num_tiles: int | None = None
) -> torch.Tensor:
    """HF's ``cross_attention_mask`` ``[b, s, n_img, n_tiles]`` (1 = token sees that tile) ->
    our ``encoder_mask`` ``[b, s, s_e]`` bool, ``s_e = n_img * num_tiles * tokens_per_tile``.

    Args:
        cross_attention_mask: as returned by ``MllamaProcessor``.
        tokens_per_tile: encoder tokens per tile, ``(image_size // patch_size) ** 2 + 1``.
        num_tiles: the encoder's ``max_num_tiles`` when the mask has fewer tile columns (they are
            padded as unseen); defaults to the mask's own.
    """
    b, s, n_img, n_tiles = cross_attention_mask.shape
    mask = cross_attention_mask.bool()
    if num_tiles is not None and num_tiles != n_tiles:
        if num_tiles < n_tiles:
            raise ValueError(f"cross_attention_mask has {n_tiles} tiles per image, more than num_tiles={num_tiles}")
        mask = torch.nn.functional.pad(mask, (0, num_tiles - n_tiles), value=False)
    return mask.repeat_interleave(tokens_per_tile, dim=-1).reshape(b, s, -1)
