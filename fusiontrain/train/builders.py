"""Builders from config sections: the model (with or without its weights) through its family
(:mod:`fusiontrain.families`), its pretrained folders, the image format its encoder takes, the
optimizer, and the per-rank batching
(the global-batch arithmetic itself is :mod:`fusiontrain.batch_layout`).

``prepare_model`` is what training uses: the model on the meta device plus the safetensors that
fill it. ``build_meta_model`` reads only ``config.json`` files, so a plan or a dry run works from
a folder that holds a model's config and no weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fusiontrain.batch_layout import BatchLayout, batch_layout
from fusiontrain.config import BatchConfig, DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from fusiontrain.data import SyntheticImageText
from fusiontrain.data.formats import RecordDataset, SampleBuilder
from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.loader import StreamConfig
from fusiontrain.data.sources import load_records
from fusiontrain.families import (
    EXPORT_ROLE,
    InputFolders,
    ModelFamily,
    TrainableFlags,
    model_family,
    model_family_for_config,
)
from fusiontrain.families.model import read_config_json
from fusiontrain.source.export import prepare_fusiontrain_export, read_export_config
from fusiontrain.weights.lora import add_lora, attach_lora, lora_settings_from_config
from fusiontrain.weights.pretrained import PretrainedModel
from fusiontrain.checkpoint.peft import adapted_model_loader, adapter_settings, peft_layout


def _trainable_flags(config: ModelConfig) -> TrainableFlags:
    return TrainableFlags(config.decoder_trainable, config.encoder_trainable, config.fusion_trainable)


def configured_family(config: ModelConfig) -> tuple[ModelFamily, dict[str, str]]:
    """The model family the ``model`` section selects and its pretrained folders by role (a
    fusiontrain export names its family in its own config)."""
    if config.fusiontrain_export is not None:
        return model_family(read_export_config(config.fusiontrain_export)["family"]), {
            EXPORT_ROLE: config.fusiontrain_export
        }
    return model_family_for_config(config)


def model_settings(config: ModelConfig) -> dict:
    """The settings a checkpoint records to rebuild the configured model (beyond its folders)."""
    family, folders = configured_family(config)
    if EXPORT_ROLE in folders:
        exported = read_export_config(folders[EXPORT_ROLE])
        return {key: exported[key] for key in exported.get("settings", [])}
    return family.settings_from_config(config)


def prepare_model(config: ModelConfig, *, seed: int) -> PretrainedModel:
    """The configured model, on the meta device, with its weight sources (and LoRA, when
    ``model.lora`` asks for it)."""
    family, folders = configured_family(config)
    if EXPORT_ROLE in folders:
        pretrained = prepare_fusiontrain_export(folders[EXPORT_ROLE], **_trainable_flags(config).as_kwargs())
    else:
        pretrained = family.prepare(folders, family.settings_from_config(config), _trainable_flags(config), seed=seed)
    _add_lora(config, family, pretrained, from_export=EXPORT_ROLE in folders, seed=seed)
    return pretrained


def _add_lora(config: ModelConfig, family: ModelFamily, pretrained: PretrainedModel, *, from_export: bool, seed: int) -> None:
    """Attach ``model.lora``'s adapters: fresh ones, or a PEFT adapter folder's (``init_from``,
    loaded with its fusion weights right after the model is filled)."""
    lora = config.lora
    if lora.init_from is None:
        settings = lora_settings_from_config(pretrained.model, lora)
        if settings is not None:
            attach_lora(pretrained, settings, seed=seed)
        return
    layout = peft_layout(pretrained, hf_export=family.hf_export and not from_export, family_name=family.name)
    settings = adapter_settings(lora.init_from, layout)
    attach_lora(pretrained, settings, seed=seed)
    initialise = pretrained.init_fresh
    load = adapted_model_loader(lora.init_from, layout, settings)

    def init_then_load(model: nn.Module) -> None:
        initialise(model)
        load(model)

    pretrained.init_fresh = init_then_load


def build_meta_model(config: ModelConfig) -> nn.Module:
    """The configured model on the meta device, built from ``config.json`` files alone (no
    weights are read or needed); trainability set as configured."""
    family, folders = configured_family(config)
    if EXPORT_ROLE in folders:
        model = prepare_fusiontrain_export(folders[EXPORT_ROLE], **_trainable_flags(config).as_kwargs()).model
    else:
        configs = {
            role: read_config_json(folder, f"config key '{family.config_keys[role]}'") for role, folder in folders.items()
        }
        model = family.build_meta(configs, family.settings_from_config(config), _trainable_flags(config))
    if config.lora.init_from is not None:
        raise ValueError(
            "a model built from config.json alone (plan, --dry-run) cannot read model.lora.init_from's adapter against "
            "weights; plan with model.lora.rank / targets set to the adapter's and without init_from"
        )
    settings = lora_settings_from_config(model, config.lora)
    if settings is not None:
        add_lora(model, settings)
    return model


def model_folders(config: ModelConfig) -> dict[str, str]:
    """The pretrained folders of the configured model, by role."""
    return configured_family(config)[1]


def image_format(config: ModelConfig, model: nn.Module) -> ImageFormat:
    """How the configured model's encoder takes one image."""
    return configured_family(config)[0].image_format(model)


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


def build_stream_config(
    data: DataConfig, batch: BatchConfig, image_format: ImageFormat, *, ignore_index: int
) -> StreamConfig:
    """How each rank turns samples into micro-batches (packing or padding, row sizes, the
    encoder-token capacity of a row, strictness)."""
    max_encoder_tokens = data.max_encoder_tokens_per_row
    if max_encoder_tokens is None:
        max_encoder_tokens = data.max_images_per_row * image_format.max_tokens_per_image
    return StreamConfig(
        seq_len=batch.seq_len,
        micro_batch_size=batch.micro_batch_size,
        packing=data.packing,
        padding_free=data.padding_free,
        max_images=data.max_images_per_row,
        max_open_rows=data.packing_open_rows,
        max_encoder_tokens=max_encoder_tokens,
        strict=data.strict,
        ignore_index=ignore_index,
    )


def build_dataset(
    config: TrainConfig, image_format: ImageFormat, inputs: InputFolders, model: nn.Module, *, split: str
) -> RecordDataset | SyntheticImageText | None:
    """The configured dataset for ``split`` ("train" or "eval"); None when no eval split is set.

    Args:
        config: the run config (``data``, ``batch.seq_len`` and ``seed`` are read).
        image_format: the encoder's image format.
        inputs: where the model's tokenizer and image processor are (its family says).
        model: the model (synthetic data reads its vocabulary; the image token is the first new
            embedding row unless the tokenizer has its own).
        split: "train" or "eval".
    """
    data = config.data
    if data.format == "synthetic":
        vocab_size = model.decoder.tok_embeddings.vocab_size
        num_samples = data.synthetic_samples if split == "train" else max(64, data.synthetic_samples // 8)
        return SyntheticImageText(
            num_samples,
            vocab_size=vocab_size,
            image_token_id=vocab_size,
            image_format=image_format,
            max_text=data.synthetic_max_text,
            lengths=data.synthetic_lengths,
            seed=config.seed if split == "train" else config.seed + 7919,
        )
    source = data.train if split == "train" else data.eval
    if source.path is None:
        return None
    return RecordDataset(load_records(source.path, split=source.split), sample_builder(config, image_format, inputs))


def sample_builder(config: TrainConfig, image_format: ImageFormat, inputs: InputFolders) -> SampleBuilder:
    """Turns the configured data's records into samples (tokens, labels, images)."""
    data = config.data
    return SampleBuilder(
        inputs.text_dir,
        image_format,
        image_dir=inputs.image_dir,
        format=data.format,
        train_on=data.train_on,
        max_len=config.batch.seq_len,
        too_long=data.too_long,
        image_token_id=inputs.image_token_id,
    )


def data_description(config: DataConfig, split: str) -> str:
    """Names the configured data of ``split`` ("train" or "eval") for people, in config terms:
    ``data.train.path=/data/train.jsonl (data.format=chat)``, or the synthetic set's size."""
    if config.format == "synthetic":
        return f"the synthetic data (data.synthetic_samples={config.synthetic_samples})"
    source = config.train if split == "train" else config.eval
    hub_split = f", split {source.split!r}" if source.split != "train" else ""
    return f"data.{split}.path={source.path} (data.format={config.format}{hub_split})"


def lr_multiplier(step: int, config: OptimConfig, max_steps: int) -> float:
    """LR at ``step`` as a fraction of ``optim.lr``: linear warmup, then constant, linear or
    cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps)
    progress = min(1.0, progress)
    decay = 1.0 - progress if config.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * decay


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then decay (:func:`lr_multiplier`), stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config, max_steps))


def build_batch_layout(batch: BatchConfig, parallel: ParallelConfig, world_size: int) -> BatchLayout:
    """How ``world_size`` ranks split each optimizer step (see :mod:`fusiontrain.batch_layout`).

    Raises:
        ValueError: the mesh does not fit the world, or the global batch does not split evenly.
    """
    return batch_layout(
        world_size=world_size,
        dp_replicate=parallel.dp_replicate,
        dp_shard=parallel.dp_shard,
        micro_batch_size=batch.micro_batch_size,
        grad_accum_steps=batch.grad_accum_steps,
        global_batch_size=batch.global_batch_size,
    )
