"""Variant (d) of ``benchmarks/vs_hf.py``: torchtune 0.6.1 trains the same model from the same
HF checkpoint on the same padded batches, as its single-device recipe does.

The model is torchtune's own modules:

- the vision encoder from torchtune's builder ``llama3_2_vision_encoder`` (its CLIP ViT and
  ``Llama3VisionProjectionHead``);
- the decoder from ``torchtune.modules`` pieces (``MultiHeadAttention``, ``FusionLayer``,
  ``FusionEmbedding``, ``TransformerDecoder``, ``Llama3ScaledRoPE``), assembled by
  ``benchmarks/torchtune_ref.tt_fused_decoder`` exactly as ``llama3_2_vision_decoder`` does
  layer by layer. The builder itself cannot build the benchmark model: it puts a cross-attention
  layer *before* every ``fusion_interval``-th self-attention layer, while the benchmark Mllama's
  last cross-attention layer (HF index 7 of 8) comes *after* the last self-attention layer
  (torchtune's ``FusionLayer(fusion_first=False)``, which fusiontrain uses too). The builder also
  hard-codes Llama 3.1's RoPE scaling (original context 8192) and eps 1e-6 in the cross-attention
  norms; the helper reads both from the model's config, as HF does. With one tile per image (the
  benchmark model) the encoder also gets torchtune's tiled position embeddings, which its builder
  leaves out below two tiles (:func:`use_tiled_position_embeddings`);
- torchtune's ``DeepFusionModel(decoder, encoder, decoder_trainable=False,
  encoder_trainable=False, fusion_trainable=True)``: the fusion-only split of (a) and (b).

Weights: torchtune's own converter ``llama3_vision_hf_to_tune`` reads the HF safetensors (their
keys are the layout it expects); it numbers a cross-attention layer as the one before the next
self-attention layer, so the trailing one is moved to the last layer (:func:`rehome_fusion_layers`).
The step-0 loss, checked against (b)'s, is the independent check of the whole conversion. It
agrees to about 2e-5 relative, not 2e-7 as (a) does: on text alone torchtune's logits equal HF's
to 1.3e-6 (fp32 rounding), with an image they differ by up to 1.4e-2, so the difference lies in
the vision tower; a likely cause (not isolated here) is that HF's ViT, which fusiontrain
reproduces exactly (README), pads each tile's 65 tokens to 72 and lets real tokens attend to the
padding's keys, where torchtune's ViT has no padding tokens.

Training, as ``recipes/full_finetune_single_device.py``: ``CEWithChunkedOutputLoss`` with the
model's ``set_num_output_chunks`` (a list of ``[b, s / 8, v]`` logits chunks, upcast one by one),
labels shifted in the step, the mean loss times the target count backward, ``scale_grads`` by 1 /
target count, grad-norm clipping over ``model.parameters()``, AdamW step, ``zero_grad``. In bf16
the recipe builds the whole model in bf16 (weights and optimizer state; no autocast), and so does
this variant under ``--precision bf16``.

``torchtune.models.llama3_2_vision`` and ``torchtune.models.clip`` import torchvision in their
package ``__init__`` (for image transforms), and torchvision does not import beside the CPU torch
wheel (/work/shared/NOTES.md). :func:`torchtune_vision_modules` therefore registers the two packages
as bare package modules (their ``__path__`` only, ``__init__`` not run) before importing the two
submodules this variant uses, whose code runs unchanged.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file

from benchmarks.vs_hf_data import BETAS, EPS, IGNORE, LOSS_CHUNKS, LR, MAX_GRAD_NORM, trainer_stream, torchtune_inputs
from benchmarks.vs_hf_variants import Setup, Variant
from fusiontrain.config import TrainConfig
from fusiontrain.data import Batch
from fusiontrain.train.metrics import reset_peak_memory
from fusiontrain.families.llama import decoder_args_from_hf_text_config, fuse_layer_stack
from fusiontrain.families.mllama.model import MLLAMA_FUSION_VOCAB_SIZE

_PACKAGES_WITH_TORCHVISION = ("torchtune.models.clip", "torchtune.models.llama3_2_vision")


def torchtune_vision_modules() -> tuple[ModuleType, ModuleType]:
    """torchtune's ``llama3_2_vision._component_builders`` and ``._convert_weights`` without the
    torchvision its package ``__init__`` imports (see the module docstring)."""
    for package in _PACKAGES_WITH_TORCHVISION:
        if package not in sys.modules:
            spec = importlib.util.find_spec(package)
            if spec is None or spec.submodule_search_locations is None:
                raise ImportError(f"{package} is not an installed package (torchtune 0.6.1 is required: pip install -e .[reference])")
            sys.modules[package] = importlib.util.module_from_spec(spec)
    builders = importlib.import_module("torchtune.models.llama3_2_vision._component_builders")
    convert = importlib.import_module("torchtune.models.llama3_2_vision._convert_weights")
    return builders, convert


def rehome_fusion_layers(state: dict[str, torch.Tensor], converter_index: dict[int, int]) -> dict[str, torch.Tensor]:
    """Move ``decoder.layers.{n}.fusion_layer.*`` keys to the decoder layer that holds the
    cross-attention layer: ``converter_index`` maps the converter's layer number to ours (only
    the trailing cross-attention layer moves)."""
    pattern = re.compile(r"^decoder\.layers\.(\d+)\.fusion_layer\.")
    moved = {}
    for key, value in state.items():
        match = pattern.match(key)
        if match:
            index = int(match.group(1))
            if index not in converter_index:
                raise KeyError(f"torchtune's converter put a cross-attention layer at {index}; none is expected there")
            key = f"decoder.layers.{converter_index[index]}.fusion_layer.{key[match.end():]}"
        moved[key] = value
    return moved


def use_tiled_position_embeddings(clip: torch.nn.Module, vision: dict) -> None:
    """Give torchtune's ViT ``clip`` (built for one tile) the tiled position embeddings its
    builder gives it for more tiles. torchtune's ``clip_vision_encoder`` drops the tile
    embeddings at ``max_num_tiles == 1``; HF's Mllama keeps them (gated, indexed by the aspect
    ratio), so the same weights need them: torchtune's ``TiledTokenPositionalEmbedding`` and two
    ``TilePositionalEmbedding`` with ``max_num_tiles=1`` (``VisionTransformer`` applies whichever
    modules it holds)."""
    from torchtune.models.clip._position_embeddings import TiledTokenPositionalEmbedding, TilePositionalEmbedding

    width = vision["hidden_size"]
    clip.token_pos_embedding = TiledTokenPositionalEmbedding(
        max_num_tiles=1, embed_dim=width, tile_size=vision["image_size"], patch_size=vision["patch_size"]
    )
    clip.pre_tile_pos_embed = TilePositionalEmbedding(max_num_tiles=1, embed_dim=width)
    clip.post_tile_pos_embed = TilePositionalEmbedding(max_num_tiles=1, embed_dim=width)


def build_torchtune_model(folder: Path) -> torch.nn.Module:
    """torchtune's ``DeepFusionModel`` of the HF Mllama in ``folder``, its weights loaded (fp32,
    on the CPU)."""
    from torchtune.modules.model_fusion import DeepFusionModel

    from benchmarks.torchtune_ref import tt_fused_decoder

    builders, convert = torchtune_vision_modules()
    config = json.loads((folder / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    if vision["intermediate_size"] != 4 * vision["hidden_size"]:
        raise ValueError(f"torchtune's CLIP has an MLP of 4 x width; {folder} has {vision['intermediate_size']}")
    encoder = builders.llama3_2_vision_encoder(
        patch_size=vision["patch_size"],
        num_heads=vision["attention_heads"],
        clip_embed_dim=vision["hidden_size"],
        clip_num_layers=vision["num_hidden_layers"],
        clip_hidden_states=list(vision["intermediate_layers_indices"]),
        num_layers_projection=vision["num_global_layers"],
        decoder_embed_dim=text["hidden_size"],
        tile_size=vision["image_size"],
        max_num_tiles=vision["max_num_tiles"],
        in_channels=vision.get("num_channels", 3),
    )
    if vision["max_num_tiles"] == 1:
        use_tiled_position_embeddings(encoder.clip, vision)
    args = decoder_args_from_hf_text_config(text)
    slots = fuse_layer_stack(text["num_hidden_layers"], text["cross_attention_layers"])
    decoder = tt_fused_decoder(args, slots, fusion_vocab_size=MLLAMA_FUSION_VOCAB_SIZE)
    model = DeepFusionModel(decoder, encoder, decoder_trainable=False, encoder_trainable=False, fusion_trainable=True)

    cross = sorted(text["cross_attention_layers"])
    state = convert.llama3_vision_hf_to_tune(
        load_file(folder / "model.safetensors"),
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        dim=args.hidden_size,
        head_dim=args.head_dim,
        vocab_size=args.vocab_size,
        cross_attention_layers=cross,
        encoder_dim=vision["hidden_size"],
        tile_size=vision["image_size"],
        num_tiles=vision["max_num_tiles"],
        supported_aspect_ratios=[tuple(r) for r in vision["supported_aspect_ratios"]],
    )
    # the converter numbers HF cross-attention layer c as c - (cross-attention layers before c)
    converter_index = {
        slot.cross_index - sum(c < slot.cross_index for c in cross): layer
        for layer, slot in enumerate(slots)
        if slot.cross_index is not None
    }
    model.load_state_dict(rehome_fusion_layers(state, converter_index), strict=True)
    return model


class TorchtuneVariant(Variant):
    """(d): torchtune's model and recipe step (see the module docstring) on the padded batches of
    ``config`` (the stream (a) reads)."""

    key, name = "d", "(d) torchtune, padded"

    def __init__(self, folder: Path, config: TrainConfig, setup: Setup) -> None:
        from torchtune.modules.loss import CEWithChunkedOutputLoss

        self.setup = setup
        dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32
        self.model = build_torchtune_model(folder).to(device=setup.device, dtype=dtype).train()
        self.loss_fn = CEWithChunkedOutputLoss(num_output_chunks=LOSS_CHUNKS, ignore_index=IGNORE)
        self.model.set_num_output_chunks(self.loss_fn.num_output_chunks)
        params = list(self.model.parameters())
        self.params_total = sum(p.numel() for p in params)
        self.params_trainable = self.params_requires_grad = sum(p.numel() for p in params if p.requires_grad)
        self.optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, fused=True)
        self.optimizer.zero_grad()
        self.batches, _ = trainer_stream(config)
        ratios = json.loads((folder / "config.json").read_text())["vision_config"]["supported_aspect_ratios"]
        self.aspect_ratios = torch.tensor([[1, 1], *ratios])  # row 0: padding slots
        gc.collect()
        reset_peak_memory(setup.device)

    def step(self) -> tuple[Batch, float]:
        from torchtune.training import scale_grads

        batch = next(self.batches)
        inputs = self.setup.to_device(torchtune_inputs(batch, self.aspect_ratios))
        labels = inputs.pop("labels")
        num_tokens = (labels != IGNORE).sum()
        logits = self.model(**inputs)
        ignore = torch.full((labels.shape[0], 1), IGNORE, dtype=labels.dtype, device=labels.device)
        labels = torch.hstack((labels[..., 1:], ignore))  # the recipe's shift
        loss = self.loss_fn(logits, labels) * num_tokens
        del logits
        loss.backward()
        scale_grads(self.model, 1 / num_tokens)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item() / num_tokens.item()
        if self.steps_done == 0:
            self.step0_loss = loss_value
        self.steps_done += 1
        return batch, loss_value
