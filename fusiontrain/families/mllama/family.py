"""Llama 3.2 Vision (HF ``MllamaForConditionalGeneration``): the ``mllama`` model family.

Its builder and weight map are :mod:`fusiontrain.families.mllama.model`, its tiled ViT
:mod:`fusiontrain.families.mllama.vision`, its image format (tiled images)
:mod:`fusiontrain.families.mllama.tiles`; this file is what the rest of fusiontrain asks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusiontrain.data.image_format import ImageFormat
from fusiontrain.families.model import (
    InputFolders,
    ModelFamily,
    TrainableFlags,
)
from fusiontrain.weights.hf_checkpoint import HFCheckpoint, TensorRoute
from fusiontrain.families.mllama.model import (
    build_mllama,
    legacy_mllama_key,
    mllama_args_from_config,
    mllama_weight_map,
    prepare_mllama,
)
from fusiontrain.weights.pretrained import PretrainedModel
from fusiontrain.families.mllama.tiles import MllamaTiles
from fusiontrain.families.mllama.vision import MllamaVisionEncoder


class MllamaFamily(ModelFamily):
    """Llama 3.2 Vision, from one HF folder (``model.hf_mllama``)."""

    name = "mllama"
    roles = ("hf_mllama",)
    config_keys = {"hf_mllama": "model.hf_mllama"}
    config_files = {"hf_mllama": "mllama_config.json"}
    hf_export = True
    hf_model_types = ("mllama",)

    def folders_from_config(self, model_config: Any) -> dict[str, str] | None:
        return None if model_config.hf_mllama is None else {"hf_mllama": model_config.hf_mllama}

    def build_meta(self, configs: dict[str, dict], settings: dict[str, Any], flags: TrainableFlags) -> nn.Module:
        with torch.device("meta"):
            return build_mllama(mllama_args_from_config(configs["hf_mllama"]), **flags.as_kwargs())

    def prepare(
        self, folders: dict[str, str | Path], settings: dict[str, Any], flags: TrainableFlags, *, seed: int
    ) -> PretrainedModel:
        return prepare_mllama(folders["hf_mllama"], **flags.as_kwargs())

    def image_format(self, model: nn.Module) -> ImageFormat:
        args = model.encoder.vision.args
        return MllamaTiles(args.image_size, args.tokens_per_tile, args.max_num_tiles)

    def input_folders(self, folders: dict[str, str | Path], model: nn.Module) -> InputFolders:
        folder = Path(folders["hf_mllama"])
        return InputFolders(text_dir=folder, image_dir=None, image_token_id=None)  # MllamaProcessor's own

    def owns(self, model: nn.Module) -> bool:
        return isinstance(getattr(model, "encoder", None), MllamaVisionEncoder)

    def hf_layout(self, configs: dict[str, dict]) -> tuple[list[TensorRoute], dict[str, tuple[int, ...]]]:
        """Our weight map, and the shapes of transformers' own ``MllamaForConditionalGeneration``
        built on the meta device from the config."""
        from transformers import MllamaConfig, MllamaForConditionalGeneration

        config = configs["hf_mllama"]
        with torch.device("meta"):
            hf_model = MllamaForConditionalGeneration._from_config(MllamaConfig.from_dict(config))
        shapes = {name: tuple(tensor.shape) for name, tensor in hf_model.state_dict().items()}
        routes = mllama_weight_map(mllama_args_from_config(config))
        unrouted = sorted(set(shapes) - {route.hf_key for route in routes})
        if unrouted:
            raise ValueError(f"transformers' Mllama holds tensors our weight map does not fill: {unrouted[:3]}")
        return routes, shapes

    def hf_uses_legacy_names(self, folders: dict[str, Path]) -> bool:
        """``language_model.model.*``: what transformers 5.23's ``save_pretrained`` writes and the
        Hub holds; the in-memory names are ``model.language_model.*`` (both load)."""
        return any(key.startswith("language_model.") for key in HFCheckpoint(folders["hf_mllama"]).keys())

    def hf_stored_name(self, name: str, *, legacy: bool) -> str:
        return legacy_mllama_key(name) if legacy else name
