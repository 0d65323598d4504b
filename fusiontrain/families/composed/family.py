"""A composed model: any registered decoder family plus any registered encoder family, joined by
new cross-attention layers (the ``composed`` model family).

The decoder gets a gated cross-attention layer fused (run first) into every layer ``index`` with
``(index + 1) % fusion_interval == 0`` and ``fusion_vocab_size`` new embedding rows (the first is
the image token); the encoder is the family's tower plus a projection head. No file holds these
fusion parameters: they start fresh (:func:`~fusiontrain.families.composed.compose.init_fusion_params`), with
the gates shut, so the model's logits equal the LM's until the gates open in training.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from fusiontrain.data.image_format import ImageFormat
from fusiontrain.families.decoder import DecoderFamily
from fusiontrain.families.encoder import EncoderFamily
from fusiontrain.families.model import InputFolders, ModelFamily, TrainableFlags
from fusiontrain.families.composed.compose import DEFAULT_INITIALIZER_RANGE, fusion_slots, init_fusion_params
from fusiontrain.weights.hf_checkpoint import HFCheckpoint
from fusiontrain.families.llama import llama_fused_decoder
from fusiontrain.weights.pretrained import PretrainedModel, WeightSource, check_routes_cover
from fusiontrain.modules import DeepFusionModel, FusionEmbedding, get_fusion_params

# New token rows a composed model adds (the image token is the first); checkpoints record it.
COMPOSED_FUSION_VOCAB_SIZE = 8

Family = TypeVar("Family", DecoderFamily, EncoderFamily)


def family_for_config(registry: Mapping[str, Family], config: dict, what: str) -> Family:
    """The family of ``registry`` that reads ``config`` (a ``config.json`` dict), by model type.

    Raises:
        ValueError: none does; the message lists the model types that are supported.
    """
    model_type = config.get("model_type")
    for family in registry.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for family in registry.values() for t in family.model_types)
    raise ValueError(
        f"no {what} family reads config.json model_type {model_type!r}; supported: {known} "
        "(docs/adding-a-family.md says how to add one)"
    )


class ComposedFamily(ModelFamily):
    """A decoder family and an encoder family from two HF folders (``model.compose.decoder`` and
    ``model.compose.encoder``).

    Args:
        decoders: the registered decoder families, by name.
        encoders: the registered encoder families, by name.
    """

    name = "composed"
    roles = ("decoder", "encoder")
    config_keys = {"decoder": "model.compose.decoder", "encoder": "model.compose.encoder"}
    config_files = {"decoder": "decoder_config.json", "encoder": "encoder_config.json"}

    def __init__(self, decoders: Mapping[str, DecoderFamily], encoders: Mapping[str, EncoderFamily]) -> None:
        self.decoders = decoders
        self.encoders = encoders

    def decoder_family(self, config: dict) -> DecoderFamily:
        return family_for_config(self.decoders, config, "decoder")

    def encoder_family(self, config: dict) -> EncoderFamily:
        return family_for_config(self.encoders, config, "encoder")

    def _encoder_family_of(self, encoder: nn.Module) -> EncoderFamily:
        for family in self.encoders.values():
            if family.owns(encoder):
                return family
        raise TypeError(f"no registered encoder family built a {type(encoder).__name__}")

    # -- from the run config ----------------------------------------------------------------------

    def folders_from_config(self, model_config: Any) -> dict[str, str] | None:
        compose = model_config.compose
        if compose.decoder is None and compose.encoder is None:
            return None
        return {"decoder": compose.decoder, "encoder": compose.encoder}

    def settings_from_config(self, model_config: Any) -> dict[str, Any]:
        return {
            "fusion_interval": model_config.compose.fusion_interval,
            "fusion_vocab_size": COMPOSED_FUSION_VOCAB_SIZE,
        }

    def check_settings(self, base: dict[str, Any]) -> None:
        interval, vocab = base.get("fusion_interval"), base.get("fusion_vocab_size")
        if not isinstance(interval, int) or not isinstance(vocab, int):
            raise ValueError(
                f"a composed base needs integer fusion_interval and fusion_vocab_size, got {interval!r} and {vocab!r}"
            )

    # -- building ---------------------------------------------------------------------------------

    def build_meta(self, configs: dict[str, dict], settings: dict[str, Any], flags: TrainableFlags) -> nn.Module:
        with torch.device("meta"):
            return self.build(configs["decoder"], configs["encoder"], flags=flags, **settings)

    def build(
        self,
        decoder_config: dict,
        encoder_config: dict,
        *,
        fusion_interval: int,
        fusion_vocab_size: int,
        flags: TrainableFlags = TrainableFlags(),
    ) -> DeepFusionModel:
        """The composed model with fresh weights on the current default device."""
        args, num_layers = self.decoder_family(decoder_config).args_from_config(decoder_config)
        decoder = llama_fused_decoder(args, fusion_slots(num_layers, fusion_interval), fusion_vocab_size=fusion_vocab_size)
        encoder = self.encoder_family(encoder_config).build(encoder_config, args.hidden_size)
        return DeepFusionModel(decoder, encoder, **flags.as_kwargs())

    def prepare(
        self, folders: dict[str, str | Path], settings: dict[str, Any], flags: TrainableFlags, *, seed: int
    ) -> PretrainedModel:
        fusion_interval, fusion_vocab_size = settings["fusion_interval"], settings["fusion_vocab_size"]
        if fusion_vocab_size < 1:
            raise ValueError(
                f"fusion_vocab_size must be >= 1 (the image token is the first new row), got {fusion_vocab_size}"
            )
        decoder_checkpoint = HFCheckpoint(folders["decoder"])
        decoder_family = self.decoder_family(decoder_checkpoint.config)
        encoder_probe = HFCheckpoint(folders["encoder"])
        encoder_family = self.encoder_family(encoder_probe.config)
        encoder_checkpoint = HFCheckpoint(folders["encoder"], key_renamer=encoder_family.key_renamer)
        args, num_layers = decoder_family.args_from_config(decoder_checkpoint.config)
        slots = fusion_slots(num_layers, fusion_interval)
        with torch.device("meta"):
            model = self.build(
                decoder_checkpoint.config,
                encoder_checkpoint.config,
                fusion_interval=fusion_interval,
                fusion_vocab_size=fusion_vocab_size,
                flags=flags,
            )

        decoder_keys = decoder_checkpoint.keys()
        tie = bool(decoder_checkpoint.config.get("tie_word_embeddings", False))
        decoder_source = WeightSource(
            decoder_checkpoint, decoder_family.weight_map(args, slots, decoder_keys, tie_word_embeddings=tie)
        )
        stored = {key for key in decoder_keys if not key.endswith(decoder_family.ignored_suffixes)}
        check_routes_cover(decoder_source, stored, "decoder")
        encoder_source = WeightSource(encoder_checkpoint, encoder_family.weight_map(model.encoder, prefix="encoder."))
        check_routes_cover(encoder_source, encoder_family.expected_tensors(encoder_checkpoint.keys()), "encoder")

        std = decoder_checkpoint.config.get("initializer_range", DEFAULT_INITIALIZER_RANGE)
        return PretrainedModel(
            model,
            [decoder_source, encoder_source],
            fresh_parameters=set(get_fusion_params(model)),
            init_fresh=lambda m: init_fusion_params(m, seed=seed, std=std),
            init_buffers=self.init_buffers,
        )

    def init_buffers(self, model: nn.Module) -> None:
        self._encoder_family_of(model.encoder).init_buffers(model.encoder)

    # -- what the model takes ---------------------------------------------------------------------

    def image_format(self, model: nn.Module) -> ImageFormat:
        return self._encoder_family_of(model.encoder).image_format(model.encoder)

    def input_folders(self, folders: dict[str, str | Path], model: nn.Module) -> InputFolders:
        image_token_id = model.decoder.tok_embeddings.vocab_size  # the first new row
        return InputFolders(Path(folders["decoder"]), Path(folders["encoder"]), image_token_id)

    def owns(self, model: nn.Module) -> bool:
        embeddings = getattr(getattr(model, "decoder", None), "tok_embeddings", None)
        encoder = getattr(model, "encoder", None)
        return isinstance(embeddings, FusionEmbedding) and any(f.owns(encoder) for f in self.encoders.values())

    def export_config(self, configs: dict[str, dict]) -> dict[str, Any]:
        return {
            "decoder_family": self.decoder_family(configs["decoder"]).name,
            "encoder_family": self.encoder_family(configs["encoder"]).name,
        }
