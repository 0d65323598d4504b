"""Builders from config sections: the model (with or without its weights), its pretrained
folders, the image format its encoder takes, the optimizer, and the per-rank batching.

``prepare_model`` is what training uses: the model on the meta device plus the safetensors that
fill it. ``build_meta_model`` reads only ``config.json`` files, so a plan or a dry run works from
a folder that holds a model's config and no weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fusiontrain.checkpoint.export import prepare_fusiontrain_export
from fusiontrain.config import BatchConfig, DataConfig, ModelConfig, OptimConfig
from fusiontrain.data import ImageSpec
from fusiontrain.data.loader import StreamConfig
from fusiontrain.models.compose import build_composed_model, prepare_composed
from fusiontrain.models.hf_vision import HFVisionTowerEncoder
from fusiontrain.models.mllama import build_mllama, mllama_args_from_config, prepare_mllama
from fusiontrain.models.pretrained import PretrainedModel
from fusiontrain.modules.vision import MllamaVisionEncoder

# New token rows a composed model adds (the image token is the first); a composed checkpoint
# records it, so it stays fixed.
COMPOSED_FUSION_VOCAB_SIZE = 8


def _trainable_flags(config: ModelConfig) -> dict[str, bool]:
    return dict(
        decoder_trainable=config.decoder_trainable,
        encoder_trainable=config.encoder_trainable,
        fusion_trainable=config.fusion_trainable,
    )


def prepare_model(config: ModelConfig, *, seed: int) -> PretrainedModel:
    """The configured model, on the meta device, with its weight sources."""
    flags = _trainable_flags(config)
    if config.hf_mllama is not None:
        return prepare_mllama(config.hf_mllama, **flags)
    if config.fusiontrain_export is not None:
        return prepare_fusiontrain_export(config.fusiontrain_export, **flags)
    return prepare_composed(
        config.compose.decoder,
        config.compose.encoder,
        fusion_interval=config.compose.fusion_interval,
        fusion_vocab_size=COMPOSED_FUSION_VOCAB_SIZE,
        seed=seed,
        **flags,
    )


def _read_config_json(folder: str, key: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"config key '{key}': {path} is missing; point it at a HF model folder")
    return json.loads(path.read_text())


def build_meta_model(config: ModelConfig) -> nn.Module:
    """The configured model on the meta device, built from ``config.json`` files alone (no
    weights are read or needed); trainability set as configured."""
    flags = _trainable_flags(config)
    if config.fusiontrain_export is not None:
        return prepare_fusiontrain_export(config.fusiontrain_export, **flags).model
    with torch.device("meta"):
        if config.hf_mllama is not None:
            return build_mllama(mllama_args_from_config(_read_config_json(config.hf_mllama, "model.hf_mllama")), **flags)
        return build_composed_model(
            _read_config_json(config.compose.decoder, "model.compose.decoder"),
            _read_config_json(config.compose.encoder, "model.compose.encoder"),
            fusion_interval=config.compose.fusion_interval,
            fusion_vocab_size=COMPOSED_FUSION_VOCAB_SIZE,
            **flags,
        )


def model_folders(config: ModelConfig) -> dict[str, str]:
    """The pretrained folders of the configured model, by role."""
    if config.hf_mllama is not None:
        return {"hf_mllama": config.hf_mllama}
    if config.fusiontrain_export is not None:
        return {"fusiontrain_export": config.fusiontrain_export}
    return {"decoder": config.compose.decoder, "encoder": config.compose.encoder}


def image_spec(model: nn.Module) -> ImageSpec:
    """How the model's encoder takes one image."""
    encoder = model.encoder
    if isinstance(encoder, MllamaVisionEncoder):
        args = encoder.vision.args
        return ImageSpec("mllama", args.image_size, args.max_num_tiles * args.tokens_per_tile, args.max_num_tiles)
    if isinstance(encoder, HFVisionTowerEncoder):
        return ImageSpec("tower", encoder.image_size, encoder.tokens_per_image)
    raise TypeError(f"no image format known for a {type(encoder).__name__} encoder")


def build_optimizer(model: nn.Module, config: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (fused on CUDA, foreach elsewhere). Weight decay
    applies to matrices; vectors (norm scales, biases, gates) are not decayed."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter is trainable: set model.fusion_trainable (or another *_trainable) to true")
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=config.betas, eps=config.eps, **fast
    )


def build_stream_config(data: DataConfig, batch: BatchConfig, *, ignore_index: int) -> StreamConfig:
    """How each rank turns samples into micro-batches (packing or padding, row sizes, strictness)."""
    return StreamConfig(
        seq_len=batch.seq_len,
        micro_batch_size=batch.micro_batch_size,
        packing=data.packing,
        max_images=data.max_images_per_row,
        max_open_rows=data.packing_open_rows,
        strict=data.strict,
        ignore_index=ignore_index,
    )
