"""Compose a :class:`DeepFusionModel` from a HF Llama causal LM and a HF CLIP / SigLIP vision tower.

- :func:`llama_args_from_config` reads the decoder's sizes from a Llama ``config.json`` dict.
- :func:`fusion_slots` places a new cross-attention layer in every ``fusion_interval``-th layer.
- :func:`llama_lm_weight_map` routes a ``LlamaForCausalLM`` checkpoint to our decoder.
- :func:`init_fusion_params` gives the new (fusion) parameters their deterministic initial values.
- :func:`compose_from_hf` does all of it and loads both checkpoints, tensor by tensor.
- :func:`image_token_layout` tells a data pipeline the image token id and tokens per image.

Unlike an Mllama checkpoint, no file holds the fusion parameters: the cross-attention layers, the
projection head and the new embedding rows start fresh, with the tanh gates shut, so the composed
model's logits equal the base LM's until the gates open in training.

Shapes: b batch, s tokens, s_e encoder tokens, d decoder width, d_e tower width, v vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fusiontrain.models.hf_checkpoint import HFCheckpoint, TensorRoute, copy_rows_into, materialize
from fusiontrain.models.hf_vision import (
    HFVisionTowerEncoder,
    build_vision_tower,
    canonical_vision_tower_key,
    vision_tower_config_from_dict,
    vision_tower_tensor_names,
    vision_tower_weight_map,
)
from fusiontrain.models.llama import (
    FusedSlot,
    LlamaDecoderArgs,
    decoder_args_from_hf_text_config,
    llama_fused_decoder,
)
from fusiontrain.models.pretrained import PretrainedModel, WeightSource, check_routes_cover
from fusiontrain.modules import DeepFusionModel, FusionEmbedding, RMSNorm, TanhGate, get_fusion_params

DEFAULT_INITIALIZER_RANGE = 0.02  # HF's LlamaConfig default


# -- decoder ----------------------------------------------------------------------------------------


def llama_args_from_config(config: dict) -> tuple[LlamaDecoderArgs, int]:
    """Decoder sizes and layer count from a HF ``LlamaConfig`` as stored in ``config.json``.

    Returns:
        ``(args, num_hidden_layers)``.
    """
    if config.get("model_type") != "llama":
        raise ValueError(
            f"expected a Llama causal LM config (model_type 'llama'), got model_type {config.get('model_type')!r}: "
            "pass the folder of a LlamaForCausalLM as decoder_path"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{flag}=true is not supported: our Llama layers have bias-free projections")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only 'silu')")
    args = decoder_args_from_hf_text_config(config)
    return args, config["num_hidden_layers"]


def fusion_slots(num_layers: int, fusion_interval: int) -> list[FusedSlot]:
    """One slot per decoder layer; layer ``index`` gets a new cross-attention layer, run before it,
    when ``(index + 1) % fusion_interval == 0`` (torchtune's ``llama3_2_vision`` placement).

    A composed model has no source stack of cross-attention layers, so a fused slot's
    ``cross_index`` is only a marker (any non-None value makes ``llama_fused_decoder`` build a
    cross-attention layer); we set it to the slot's own index. No weight map reads it.
    """
    if fusion_interval < 1:
        raise ValueError(f"fusion_interval must be >= 1, got {fusion_interval}")
    if fusion_interval > num_layers:
        raise ValueError(
            f"fusion_interval={fusion_interval} exceeds the decoder's {num_layers} layers, so no layer would be "
            f"fused; use a fusion_interval <= {num_layers}"
        )
    return [
        FusedSlot(index, index if (index + 1) % fusion_interval == 0 else None, fusion_first=True)
        for index in range(num_layers)
    ]


_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
_MLP = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

# Stored tensors a Llama checkpoint may hold that are not parameters (old transformers saved RoPE's
# inverse frequencies; we compute them).
_IGNORED_LM_SUFFIXES = ("rotary_emb.inv_freq",)


def llama_lm_weight_map(
    slots: list[FusedSlot], checkpoint_keys: list[str], *, tie_word_embeddings: bool
) -> list[TensorRoute]:
    """Routes from a ``LlamaForCausalLM`` checkpoint to the pretrained half of our decoder.

    A fused slot's self-attention layer lives under ``layer.``; its cross-attention layer (under
    ``fusion_layer.``) has no route. ``lm_head.weight`` fills the output projection; when the
    checkpoint has none and ``tie_word_embeddings`` is set, ``embed_tokens`` fills it instead.
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
            "pass a LlamaForCausalLM folder (not a bare LlamaModel)"
        )
    for index, slot in enumerate(slots):
        hf = f"model.layers.{slot.self_index}"
        ours = f"decoder.layers.{index}" + ("" if slot.cross_index is None else ".layer")
        routes += [TensorRoute(f"{hf}.self_attn.{h}.weight", f"{ours}.attn.{o}.weight") for h, o in _ATTN.items()]
        routes += [TensorRoute(f"{hf}.mlp.{h}.weight", f"{ours}.mlp.{o}.weight") for h, o in _MLP.items()]
        routes += [
            TensorRoute(f"{hf}.input_layernorm.weight", f"{ours}.sa_norm.scale"),
            TensorRoute(f"{hf}.post_attention_layernorm.weight", f"{ours}.mlp_norm.scale"),
        ]
    return routes


# -- fusion parameters ------------------------------------------------------------------------------


@torch.no_grad()
def init_fusion_params(model: nn.Module, *, seed: int, std: float = DEFAULT_INITIALIZER_RANGE) -> set[str]:
    """Give every fusion parameter of ``model`` its initial value, deterministically from ``seed``.

    - ``nn.Linear`` weights: normal(0, ``std``), as HF initialises Llama and Mllama's
      cross-attention layers (``initializer_range``); biases: 0.
    - RMSNorm scales and LayerNorm weights: 1; LayerNorm biases: 0.
    - Tanh gates: 0, so every new branch starts shut and the model computes the base LM.
    - New embedding rows: the mean of the pretrained rows (Hewitt, 2021, "Initializing New Word
      Embeddings for Pretrained Language Models"). A row drawn at random can have a norm and
      direction unlike any the LM was trained on and perturb every later hidden state; the mean
      row stays inside that distribution, so the LM reads an image token as a bland, average
      token. The rows start equal and separate once trained.

    Random values are drawn on the CPU in fp32 from one ``torch.Generator`` in module order, one
    full tensor at a time, then cast; a sharded (DTensor) parameter keeps only its own rows. So
    the values depend on neither ``device``, ``dtype`` nor the number of ranks.

    Returns:
        The names of the parameters initialised (all of ``get_fusion_params(model)``).

    Raises:
        TypeError: a fusion parameter belongs to a module type with no rule here.
    """
    fusion = get_fusion_params(model)
    generator = torch.Generator().manual_seed(seed)
    done: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, FusionEmbedding):
            name = f"{prefix}fusion_embedding.weight"
            base = module.weight.full_tensor() if isinstance(module.weight, DTensor) else module.weight
            mean_row = base.mean(dim=0, dtype=torch.float32)
            new_rows = mean_row.expand(module.fusion_embedding.weight.shape)
            copy_rows_into(module.fusion_embedding.weight, lambda start, stop, rows=new_rows: rows[start:stop])
            done.add(name)
            continue
        for local, param in module.named_parameters(recurse=False):
            name = prefix + local
            if name not in fusion or name in done:
                continue
            full = _initial_value(module, local, param, generator, std, name)
            copy_rows_into(param, lambda start, stop, full=full: full[start:stop])
            done.add(name)
    if done != set(fusion):
        raise RuntimeError(f"fusion parameters left uninitialised: {sorted(set(fusion) - done)[:5]}")
    return done


def _initial_value(
    module: nn.Module, local: str, param: torch.Tensor, generator: torch.Generator, std: float, name: str
) -> torch.Tensor:
    if isinstance(module, nn.Linear) and local == "weight":
        return torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    if isinstance(module, (nn.Linear, nn.LayerNorm)) and local == "bias":
        return torch.zeros(param.shape)
    if (isinstance(module, RMSNorm) and local == "scale") or (isinstance(module, nn.LayerNorm) and local == "weight"):
        return torch.ones(param.shape)
    if isinstance(module, TanhGate):
        return torch.zeros(param.shape)
    raise TypeError(f"no initialisation rule for fusion parameter {name!r} of a {type(module).__name__}")


# -- composition ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTokenLayout:
    """How a composed model expects images in the token stream.

    Attributes:
        image_token_id: id of the image token, the first new embedding row (``vocab_size``).
        tokens_per_image: encoder tokens ``n_tok`` each image contributes to ``s_e``.
        vocab_size: pretrained vocabulary ``v`` (ids ``>= v`` read new rows).
        fusion_vocab_size: new embedding rows (ids ``v .. v + fusion_vocab_size - 1``).
    """

    image_token_id: int
    tokens_per_image: int
    vocab_size: int
    fusion_vocab_size: int


def image_token_layout(model: DeepFusionModel) -> ImageTokenLayout:
    """The :class:`ImageTokenLayout` of a model built by :func:`compose_from_hf`, read from its
    modules (so it also holds for a rebuilt or reloaded model).

    With ``i`` images per sample, ``encoder_mask`` is ``[b, s, i * tokens_per_image]``; image
    ``k`` owns columns ``k * tokens_per_image .. (k + 1) * tokens_per_image - 1``.
    """
    embeddings, encoder = model.decoder.tok_embeddings, model.encoder
    if not isinstance(embeddings, FusionEmbedding) or not isinstance(encoder, HFVisionTowerEncoder):
        raise TypeError("image_token_layout expects a model built by compose_from_hf")
    return ImageTokenLayout(
        image_token_id=embeddings.vocab_size,
        tokens_per_image=encoder.tokens_per_image,
        vocab_size=embeddings.vocab_size,
        fusion_vocab_size=embeddings.fusion_vocab_size,
    )


def build_composed_model(
    decoder_config: dict,
    encoder_config: dict,
    *,
    fusion_interval: int,
    fusion_vocab_size: int,
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
) -> DeepFusionModel:
    """The composed model for a Llama ``config.json`` dict and a CLIP / SigLIP one, with fresh
    weights, on the current default device (a meta-device build needs
    ``model.encoder.init_buffers()`` once allocated)."""
    args, num_layers = llama_args_from_config(decoder_config)
    decoder = llama_fused_decoder(args, fusion_slots(num_layers, fusion_interval), fusion_vocab_size=fusion_vocab_size)
    encoder = HFVisionTowerEncoder(
        build_vision_tower(vision_tower_config_from_dict(encoder_config)), decoder_dim=args.hidden_size
    )
    return DeepFusionModel(
        decoder,
        encoder,
        decoder_trainable=decoder_trainable,
        encoder_trainable=encoder_trainable,
        fusion_trainable=fusion_trainable,
    )


def prepare_composed(
    decoder_path: str | Path,
    encoder_path: str | Path,
    *,
    fusion_interval: int = 4,
    fusion_vocab_size: int = 8,
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
    seed: int = 0,
) -> PretrainedModel:
    """Build the composed model on the meta device and check, from file headers only, that both
    checkpoints match their configs; :meth:`PretrainedModel.load` then fills it (see
    :func:`compose_from_hf` for the arguments)."""
    if fusion_vocab_size < 1:
        raise ValueError(
            f"fusion_vocab_size must be >= 1 (the image token is the first new row), got {fusion_vocab_size}"
        )
    decoder_checkpoint = HFCheckpoint(decoder_path)
    encoder_checkpoint = HFCheckpoint(encoder_path, key_renamer=canonical_vision_tower_key)
    _, num_layers = llama_args_from_config(decoder_checkpoint.config)
    slots = fusion_slots(num_layers, fusion_interval)
    with torch.device("meta"):
        model = build_composed_model(
            decoder_checkpoint.config,
            encoder_checkpoint.config,
            fusion_interval=fusion_interval,
            fusion_vocab_size=fusion_vocab_size,
            decoder_trainable=decoder_trainable,
            encoder_trainable=encoder_trainable,
            fusion_trainable=fusion_trainable,
        )
    encoder = model.encoder

    decoder_keys = decoder_checkpoint.keys()
    decoder_source = WeightSource(
        decoder_checkpoint,
        llama_lm_weight_map(
            slots, decoder_keys, tie_word_embeddings=bool(decoder_checkpoint.config.get("tie_word_embeddings", False))
        ),
    )
    check_routes_cover(
        decoder_source, {key for key in decoder_keys if not key.endswith(_IGNORED_LM_SUFFIXES)}, "decoder"
    )
    encoder_source = WeightSource(encoder_checkpoint, vision_tower_weight_map(encoder.tower, prefix="encoder.tower."))
    check_routes_cover(encoder_source, vision_tower_tensor_names(encoder_checkpoint.keys()), "encoder")

    # Our modules compute everything (RoPE included) from parameters; only the HF tower has buffers.
    own_buffers = [name for name, _ in model.named_buffers() if not name.startswith("encoder.tower.")]
    if own_buffers:
        raise RuntimeError(f"compose_from_hf does not know how to initialise buffers {own_buffers[:5]}")

    std = decoder_checkpoint.config.get("initializer_range", DEFAULT_INITIALIZER_RANGE)
    return PretrainedModel(
        model,
        [decoder_source, encoder_source],
        fresh_parameters=set(get_fusion_params(model)),
        init_fresh=lambda m: init_fusion_params(m, seed=seed, std=std),
        init_buffers=lambda m: m.encoder.init_buffers(),
    )


def compose_from_hf(
    decoder_path: str | Path,
    encoder_path: str | Path,
    *,
    fusion_interval: int = 4,
    fusion_vocab_size: int = 8,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
    seed: int = 0,
) -> DeepFusionModel:
    """Join a HF Llama causal LM and a HF CLIP / SigLIP vision tower into a :class:`DeepFusionModel`.

    The decoder is the LM with a new gated cross-attention layer fused (run first) into every layer
    ``index`` with ``(index + 1) % fusion_interval == 0``, and ``fusion_vocab_size`` new embedding
    rows (the first, id ``vocab_size``, is the image token). The encoder is an
    :class:`HFVisionTowerEncoder`: the tower plus a LLaVA-style projection head; it takes
    ``encoder_input={"pixel_values": ...}`` as the tower's own HF image processor makes it. See
    :func:`image_token_layout` for the image token id and tokens per image.

    Everything is built on the meta device, allocated once in ``dtype`` on ``device``, and filled
    tensor by tensor from safetensors (nothing is unpickled). The fusion parameters, which no file
    holds, are initialised from ``seed`` by :func:`init_fusion_params`: with the gates shut the
    model's logits equal the LM's.

    A tied LM (``tie_word_embeddings`` with no ``lm_head.weight`` stored) gets the embedding copied
    into the output projection; the two are separate parameters here, so the tie is not kept once
    the decoder trains.

    Args:
        decoder_path: folder of a ``LlamaForCausalLM`` (``config.json`` with model_type ``llama``;
            one safetensors file or shards with an index).
        encoder_path: folder of a ``CLIPVisionModel`` / ``SiglipVisionModel`` (model_type
            ``clip_vision_model`` / ``siglip_vision_model``), or of a full ``CLIPModel`` /
            ``SiglipModel`` (only its ``vision_model`` tensors are used).
        fusion_interval: fuse a cross-attention layer into every this-many decoder layers.
        fusion_vocab_size: new embedding rows (at least 1, the image token).
        dtype: parameter dtype.
        device: where the parameters live.
        decoder_trainable, encoder_trainable, fusion_trainable: what trains (see DeepFusionModel).
        seed: seed of the fusion parameters' initial values.

    Raises:
        FileNotFoundError: a folder, its ``config.json`` or its safetensors are missing.
        ValueError: a config of the wrong model_type or with unsupported features, or a checkpoint
            whose tensors do not match its config.
    """
    pretrained = prepare_composed(
        decoder_path,
        encoder_path,
        fusion_interval=fusion_interval,
        fusion_vocab_size=fusion_vocab_size,
        decoder_trainable=decoder_trainable,
        encoder_trainable=encoder_trainable,
        fusion_trainable=fusion_trainable,
        seed=seed,
    )
    materialize(pretrained.model.to(dtype), device)
    pretrained.load()
    return pretrained.model
