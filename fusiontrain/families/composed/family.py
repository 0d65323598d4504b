"""A composed model: any registered decoder family plus any registered encoder family, or one
encoder per modality, joined by new cross-attention layers (the ``composed`` model family).

The decoder gets a gated cross-attention layer fused (run first) into every layer ``index`` with
``(index + 1) % fusion_interval == 0`` and ``fusion_vocab_size`` new embedding rows (the first is
the image token); the encoder is the family's tower plus a projection head. No file holds these
fusion parameters: they start fresh (:func:`~fusiontrain.families.composed.compose.init_fusion_params`), with
the gates shut, so the model's logits equal the LM's until the gates open in training.

With an encoder per modality (``model.compose.encoders``), each modality ``m`` gets its own
cross-attention layers, in the layers with ``index % interval == offset`` (``fusion_placements``:
``m -> [interval, offset]``), and its own new embedding row (:func:`placeholder_rows`). Its folder
is role ``encoder.<m>``; the model's encoders are ``model.encoder[m]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.input_format import EncoderInputFormat
from fusiontrain.data.other_modality import OtherModality
from fusiontrain.families.decoder import DecoderFamily
from fusiontrain.families.encoder import EncoderFamily
from fusiontrain.families.model import InputFolders, ModelFamily, TrainableFlags
from fusiontrain.families.composed.compose import (
    DEFAULT_INITIALIZER_RANGE,
    fusion_slots,
    init_fusion_params,
    modality_fusion_slots,
)
from fusiontrain.weights.hf_checkpoint import HFCheckpoint
from fusiontrain.families.llama import llama_fused_decoder
from fusiontrain.weights.pretrained import PretrainedModel, WeightSource, check_routes_cover
from fusiontrain.modules import DeepFusionModel, FusionEmbedding, get_fusion_params
from fusiontrain.modules.blocks import encoders_by_modality

# New token rows a composed model adds (the image token is the first); checkpoints record it.
COMPOSED_FUSION_VOCAB_SIZE = 8
# The role prefix of a modality's encoder folder: role "encoder.audio" is model.compose.encoders.audio.
MODALITY_ROLE = "encoder."


def placeholder_rows(modalities: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Each modality's placeholder: its new embedding row (its token id is the pretrained
    vocabulary size plus the row). ``image`` keeps the first row, as with one encoder; the other
    modalities follow in their order.

    Raises:
        ValueError: more modalities than new rows.
    """
    ordered = [m for m in modalities if m == "image"] + [m for m in modalities if m != "image"]
    if len(ordered) > COMPOSED_FUSION_VOCAB_SIZE:
        raise ValueError(f"{len(ordered)} modalities, but a composed model has {COMPOSED_FUSION_VOCAB_SIZE} new token rows")
    return {modality: row for row, modality in enumerate(ordered)}


def _modalities_of(roles: Mapping[str, Any]) -> list[str]:
    """The modalities of the encoder roles among ``roles`` (``encoder.<m>``), in order."""
    return [role.removeprefix(MODALITY_ROLE) for role in roles if role.startswith(MODALITY_ROLE)]

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

    def _shorthand_encoder_family(self, config: dict) -> EncoderFamily:
        """The family of the one encoder ``model.compose.encoder`` names: an image encoder.

        Raises:
            ValueError: an encoder of another modality (Whisper's audio): those go under
                ``model.compose.encoders``, by modality.
        """
        family = self.encoder_family(config)
        if family.modality != "image":
            raise ValueError(
                f"config key 'model.compose.encoder' names a {family.name} checkpoint, which encodes {family.modality}; "
                f"that key takes one image encoder: put {family.modality} encoders under model.compose.encoders: "
                f"{{{family.modality}: <folder>}} (beside image: <folder> for a vision encoder)"
            )
        return family

    def _encoder_family_of(self, encoder: nn.Module) -> EncoderFamily:
        for family in self.encoders.values():
            if family.owns(encoder):
                return family
        raise TypeError(f"no registered encoder family built a {type(encoder).__name__}")

    def _encoders_of(self, model: nn.Module) -> dict[str | None, nn.Module]:
        """The model's encoders by modality (``{None: encoder}`` for one encoder)."""
        return encoders_by_modality(model)

    # -- roles ------------------------------------------------------------------------------------

    def roles_of(self, folders: Mapping[str, Any]) -> tuple[str, ...]:
        modalities = _modalities_of(folders)
        return ("decoder", *(MODALITY_ROLE + m for m in modalities)) if modalities else self.roles

    def config_key_of(self, role: str) -> str:
        if role.startswith(MODALITY_ROLE):
            return f"model.compose.encoders.{role.removeprefix(MODALITY_ROLE)}"
        return self.config_keys[role]

    def config_file_of(self, role: str) -> str:
        if role.startswith(MODALITY_ROLE):
            return f"encoder_{role.removeprefix(MODALITY_ROLE)}_config.json"
        return self.config_files[role]

    def config_key_groups(self) -> list[tuple[str, ...]]:
        return [*super().config_key_groups(), ("model.compose.decoder", "model.compose.encoders")]

    def export_subfolder(self, role: str) -> str | None:
        """A modality beside images keeps its feature extractor in ``processor_<m>/`` of an export
        (its ``preprocessor_config.json`` would clash with the image processor's at the top)."""
        modality = role.removeprefix(MODALITY_ROLE) if role.startswith(MODALITY_ROLE) else None
        return None if modality in (None, "image") else f"processor_{modality}"

    # -- from the run config ----------------------------------------------------------------------

    def folders_from_config(self, model_config: Any) -> dict[str, str] | None:
        compose = model_config.compose
        if compose.encoders:
            return {"decoder": compose.decoder, **{MODALITY_ROLE + m: folder for m, folder in compose.encoders.items()}}
        if compose.decoder is None and compose.encoder is None:
            return None
        return {"decoder": compose.decoder, "encoder": compose.encoder}

    def settings_from_config(self, model_config: Any) -> dict[str, Any]:
        compose = model_config.compose
        settings: dict[str, Any] = {"fusion_interval": compose.fusion_interval, "fusion_vocab_size": COMPOSED_FUSION_VOCAB_SIZE}
        if compose.encoders:
            placements = {}
            for modality in compose.encoders:
                interval = compose.fusion_intervals.get(modality, compose.fusion_interval)
                placements[modality] = [interval, compose.fusion_offsets.get(modality, interval - 1)]
            settings["fusion_placements"] = placements
        return settings

    def check_settings(self, base: dict[str, Any]) -> None:
        interval, vocab = base.get("fusion_interval"), base.get("fusion_vocab_size")
        if not isinstance(interval, int) or not isinstance(vocab, int):
            raise ValueError(
                f"a composed base needs integer fusion_interval and fusion_vocab_size, got {interval!r} and {vocab!r}"
            )
        placements = base.get("fusion_placements")
        if placements is not None and not (
            isinstance(placements, dict)
            and all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in placements.values())
        ):
            raise ValueError(f"a composed base's fusion_placements maps modality -> [interval, offset], got {placements!r}")

    # -- building ---------------------------------------------------------------------------------

    def build_meta(self, configs: dict[str, dict], settings: dict[str, Any], flags: TrainableFlags) -> nn.Module:
        with torch.device("meta"):
            return self.build(configs["decoder"], self._encoder_configs(configs), flags=flags, **settings)

    @staticmethod
    def _encoder_configs(configs: Mapping[str, Any]) -> Any:
        """The encoder's config (one encoder), or the encoders' by modality, from ``configs`` (or
        folders) by role."""
        modalities = _modalities_of(configs)
        return {m: configs[MODALITY_ROLE + m] for m in modalities} if modalities else configs["encoder"]

    def build(
        self,
        decoder_config: dict,
        encoder_config: dict,
        *,
        fusion_interval: int,
        fusion_vocab_size: int,
        fusion_placements: Mapping[str, list[int] | tuple[int, int]] | None = None,
        flags: TrainableFlags = TrainableFlags(),
    ) -> DeepFusionModel:
        """The composed model with fresh weights on the current default device.

        ``encoder_config`` is one encoder's ``config.json`` dict, or (with ``fusion_placements``)
        a mapping from modality to one, each placed at its ``[interval, offset]``."""
        args, num_layers = self.decoder_family(decoder_config).args_from_config(decoder_config)
        if fusion_placements is None:
            slots = fusion_slots(num_layers, fusion_interval)
            decoder = llama_fused_decoder(args, slots, fusion_vocab_size=fusion_vocab_size)
            encoder = self._shorthand_encoder_family(encoder_config).build(encoder_config, args.hidden_size)
            return DeepFusionModel(decoder, encoder, **flags.as_kwargs())
        if set(fusion_placements) != set(encoder_config):
            raise ValueError(
                f"fusion_placements names {sorted(fusion_placements)}, the encoders {sorted(encoder_config)}: each modality "
                "needs both"
            )
        placements = {m: (int(fusion_placements[m][0]), int(fusion_placements[m][1])) for m in encoder_config}
        decoder = llama_fused_decoder(args, modality_fusion_slots(num_layers, placements), fusion_vocab_size=fusion_vocab_size)
        encoders = {m: self._modality_encoder_family(m, config).build(config, args.hidden_size) for m, config in encoder_config.items()}
        return DeepFusionModel(decoder, encoders, **flags.as_kwargs())

    def _modality_encoder_family(self, modality: str, config: dict) -> EncoderFamily:
        """The family of modality ``modality``'s encoder: one that encodes that modality when it
        is one a registered family encodes (an audio model under ``image`` is an error); any
        family for a modality of the user's own naming (``video`` frames by a vision tower).

        Raises:
            ValueError: a known modality given an encoder of another.
        """
        family = self.encoder_family(config)
        known = {f.modality for f in self.encoders.values()}
        if modality in known and family.modality != modality:
            raise ValueError(
                f"config key 'model.compose.encoders.{modality}' names a {family.name} checkpoint, which encodes "
                f"{family.modality}, not {modality}"
            )
        return family

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
        encoder_folders = self._encoder_configs(folders)  # one folder, or one per modality
        by_modality = encoder_folders if isinstance(encoder_folders, Mapping) else {None: encoder_folders}
        encoder_checkpoints: dict[str | None, tuple[EncoderFamily, HFCheckpoint]] = {}
        for modality, folder in by_modality.items():
            encoder_family = self.encoder_family(HFCheckpoint(folder).config)
            encoder_checkpoints[modality] = (encoder_family, HFCheckpoint(folder, key_renamer=encoder_family.key_renamer))
        args, num_layers = decoder_family.args_from_config(decoder_checkpoint.config)
        placements = settings.get("fusion_placements")
        slots = (
            fusion_slots(num_layers, fusion_interval)
            if placements is None
            else modality_fusion_slots(num_layers, {m: (p[0], p[1]) for m, p in placements.items()})
        )
        encoder_configs = {m: checkpoint.config for m, (_, checkpoint) in encoder_checkpoints.items()}
        with torch.device("meta"):
            model = self.build(
                decoder_checkpoint.config,
                encoder_configs[None] if None in encoder_configs else encoder_configs,
                fusion_interval=fusion_interval,
                fusion_vocab_size=fusion_vocab_size,
                fusion_placements=placements,
                flags=flags,
            )

        decoder_keys = decoder_checkpoint.keys()
        tie = bool(decoder_checkpoint.config.get("tie_word_embeddings", False))
        decoder_source = WeightSource(
            decoder_checkpoint, decoder_family.weight_map(args, slots, decoder_keys, tie_word_embeddings=tie)
        )
        stored = {key for key in decoder_keys if not key.endswith(decoder_family.ignored_suffixes)}
        check_routes_cover(decoder_source, stored, "decoder")
        encoder_sources = []
        encoders = self._encoders_of(model)
        for modality, (encoder_family, encoder_checkpoint) in encoder_checkpoints.items():
            prefix = "encoder." if modality is None else f"encoder.{modality}."
            source = WeightSource(encoder_checkpoint, encoder_family.weight_map(encoders[modality], prefix=prefix))
            what = "encoder" if modality is None else f"{modality} encoder"
            check_routes_cover(source, encoder_family.expected_tensors(encoder_checkpoint.keys()), what)
            encoder_sources.append(source)

        std = decoder_checkpoint.config.get("initializer_range", DEFAULT_INITIALIZER_RANGE)
        return PretrainedModel(
            model,
            [decoder_source, *encoder_sources],
            fresh_parameters=set(get_fusion_params(model)),
            init_fresh=lambda m: init_fusion_params(m, seed=seed, std=std),
            init_buffers=self.init_buffers,
        )

    def init_buffers(self, model: nn.Module) -> None:
        for encoder in self._encoders_of(model).values():
            self._encoder_family_of(encoder).init_buffers(encoder)

    # -- what the model takes ---------------------------------------------------------------------

    def image_format(self, model: nn.Module) -> ImageFormat:
        """The image encoder's format: the one encoder's, or with an encoder per modality the
        ``image`` encoder's (:meth:`input_formats` gives every modality's).

        Raises:
            ValueError: a model with an encoder per modality, none of which takes images.
        """
        modalities = getattr(model, "modalities", None)
        if modalities is None:
            return self._encoder_family_of(model.encoder).image_format(model.encoder)
        if "image" not in modalities:
            raise ValueError(
                f"this composed model's encoders take {', '.join(modalities)}, and none takes images: "
                "ask input_formats for their formats"
            )
        return self._encoder_family_of(model.encoder["image"]).image_format(model.encoder["image"])

    def input_formats(self, model: nn.Module) -> dict[str, EncoderInputFormat]:
        if getattr(model, "modalities", None) is None:
            return super().input_formats(model)
        return {m: self._encoder_family_of(model.encoder[m]).input_format(model.encoder[m]) for m in model.modalities}

    def input_folders(self, folders: dict[str, str | Path], model: nn.Module) -> InputFolders:
        vocab_size = model.decoder.tok_embeddings.vocab_size  # new rows start there
        image_folder = folders.get("encoder", folders.get(MODALITY_ROLE + "image"))
        others: list[OtherModality] = []
        modalities = getattr(model, "modalities", None)
        if modalities is not None:
            rows, formats = placeholder_rows(modalities), self.input_formats(model)
            others = [
                OtherModality(m, formats[m], Path(folders[MODALITY_ROLE + m]), vocab_size + rows[m])
                for m in modalities
                if m != "image"
            ]
        image = None if image_folder is None else Path(image_folder)
        return InputFolders(Path(folders["decoder"]), image, vocab_size + placeholder_rows(["image"])["image"], tuple(others))

    def owns(self, model: nn.Module) -> bool:
        embeddings = getattr(getattr(model, "decoder", None), "tok_embeddings", None)
        if not isinstance(embeddings, FusionEmbedding) or getattr(model, "encoder", None) is None:
            return False
        return all(any(f.owns(encoder) for f in self.encoders.values()) for encoder in self._encoders_of(model).values())

    def export_config(self, configs: dict[str, dict]) -> dict[str, Any]:
        decoder = self.decoder_family(configs["decoder"]).name
        modalities = _modalities_of(configs)
        if modalities:
            names = {m: self.encoder_family(configs[MODALITY_ROLE + m]).name for m in modalities}
            return {"decoder_family": decoder, "encoder_families": names}
        return {"decoder_family": decoder, "encoder_family": self.encoder_family(configs["encoder"]).name}
