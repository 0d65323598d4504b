"""The run's model: its source (:class:`~fusiontrain.source.model_source.ModelSource`) with what
trains and the LoRA adapters ``model.lora`` asks for.

:func:`prepare_model` is what training uses: the model on the meta device plus the safetensors that
fill it. :func:`build_meta_model` reads only ``config.json`` files, so a plan, a dry run or
``prepare`` works from a folder that holds a model's config and no weights.
"""

from __future__ import annotations

from torch import nn

from fusiontrain.config import ModelConfig
from fusiontrain.families import TrainableFlags
from fusiontrain.source.model_source import ModelSource
from fusiontrain.weights.lora import add_lora, attach_lora, lora_settings_from_config
from fusiontrain.weights.peft import adapted_model_loader, adapter_settings, peft_layout
from fusiontrain.weights.pretrained import PretrainedModel


def trainable_flags(config: ModelConfig) -> TrainableFlags:
    """What trains (``model.*_trainable``)."""
    return TrainableFlags(config.decoder_trainable, config.encoder_trainable, config.fusion_trainable)


def prepare_model(config: ModelConfig, source: ModelSource, *, seed: int) -> PretrainedModel:
    """The configured model, on the meta device, with its weight sources (and LoRA, when
    ``model.lora`` asks for it)."""
    pretrained = source.prepare(trainable_flags(config), seed=seed)
    lora = config.lora
    if lora.init_from is None:
        settings = lora_settings_from_config(pretrained.model, lora)
        if settings is not None:
            attach_lora(pretrained, settings, seed=seed)
        return pretrained
    # A PEFT adapter folder's LoRA, loaded with its fusion weights right after the model is filled.
    layout = peft_layout(pretrained, hf_export=source.has_hf_layout, family_name=source.family.name)
    settings = adapter_settings(lora.init_from, layout)
    attach_lora(pretrained, settings, seed=seed)
    initialise = pretrained.init_fresh
    load = adapted_model_loader(lora.init_from, layout, settings)

    def init_then_load(model: nn.Module) -> None:
        initialise(model)
        load(model)

    pretrained.init_fresh = init_then_load
    return pretrained


def build_meta_model(config: ModelConfig, source: ModelSource) -> nn.Module:
    """The configured model on the meta device, built from ``config.json`` files alone (no
    weights are read or needed); trainability and LoRA as configured.

    Raises:
        ValueError: ``model.lora.init_from`` is set (its adapter is read against weights).
    """
    model = source.build_meta(trainable_flags(config))
    if config.lora.init_from is not None:
        raise ValueError(
            "a model built from config.json alone (plan, --dry-run) cannot read model.lora.init_from's adapter against "
            "weights; plan with model.lora.rank / targets set to the adapter's and without init_from"
        )
    settings = lora_settings_from_config(model, config.lora)
    if settings is not None:
        add_lora(model, settings)
    return model
