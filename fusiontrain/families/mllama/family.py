"""Llama 3.2 Vision (HF ``MllamaForConditionalGeneration``): the ``mllama`` model family.

Its builder and weight map are :mod:`fusiontrain.families.mllama.model`, its tiled ViT
:mod:`fusiontrain.families.mllama.vision`; this file is what the rest of fusiontrain asks.

Images are tiled: the checkpoint's ``MllamaImageProcessor`` fits each image to the best canvas of
up to ``t = max_num_tiles`` tiles and keeps, per image, ``pixel_values`` ``[t, 3, H, W]`` (unused
tiles zero), ``aspect_ratio_ids`` (0-dim, 1-based) and ``aspect_ratio_mask`` ``[t]``. Every image
occupies ``t * p`` encoder-token columns (``p`` tokens per tile); text sees only those of its real
tiles, as ``MllamaProcessor``'s ``cross_attention_mask`` says.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from fusiontrain.data.image_format import ImageFormat, ImageInput
from fusiontrain.families.model import (
    InputFolders,
    ModelFamily,
    TrainableFlags,
    read_config_json,
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
from fusiontrain.families.mllama.vision import MllamaVisionEncoder


class MllamaTiles(ImageFormat):
    """Mllama's tiled images (see the module docstring).

    Args:
        image_size: tile height and width ``H = W``.
        tokens_per_tile: ``p`` encoder tokens per tile.
        max_num_tiles: ``t``.
    """

    def __init__(self, image_size: int, tokens_per_tile: int, max_num_tiles: int) -> None:
        self.image_size = image_size
        self.tokens_per_tile = tokens_per_tile
        self.max_num_tiles = max_num_tiles
        self.max_tokens_per_image = tokens_per_tile * max_num_tiles

    def process(self, image_processor: Any, image: Image.Image) -> ImageInput:
        out = image_processor([[image]], return_tensors="pt")
        return {
            "pixel_values": out["pixel_values"][0, 0].float(),
            "aspect_ratio_ids": out["aspect_ratio_ids"][0, 0].long(),
            "aspect_ratio_mask": out["aspect_ratio_mask"][0, 0].long(),
        }

    def check_processor(self, image_processor: Any, folder: Any) -> None:
        """An ``MllamaImageProcessor`` with this model's tile count, whose aspect-ratio ids index
        the model's ``supported_aspect_ratios`` (when ``folder`` holds the model's config)."""
        if not type(image_processor).__name__.startswith("MllamaImageProcessor"):
            raise ValueError(f"an Mllama model takes an MllamaImageProcessor, got {type(image_processor).__name__}")
        if image_processor.max_image_tiles != self.max_num_tiles:
            raise ValueError(
                f"the image processor makes up to {image_processor.max_image_tiles} tiles per image, "
                f"the model takes {self.max_num_tiles}"
            )
        if folder is not None and (Path(folder) / "config.json").is_file():
            check_aspect_ratios(image_processor, read_config_json(folder, "the Mllama folder"))

    def seen_columns(self, image: ImageInput) -> torch.Tensor:
        real_tiles = image["aspect_ratio_mask"].nonzero().flatten()
        return (real_tiles[:, None] * self.tokens_per_tile + torch.arange(self.tokens_per_tile)).flatten()

    def blank(self) -> ImageInput:
        return self.pad_slot()

    def pad_slot(self) -> ImageInput:
        """A padding slot keeps one "real" tile, as ``MllamaImageProcessor`` does: its vision
        attention then has keys to attend to (no fully masked row, hence no NaN)."""
        tile_mask = torch.zeros(self.max_num_tiles, dtype=torch.long)
        tile_mask[0] = 1
        return {
            "pixel_values": torch.zeros(self.max_num_tiles, 3, self.image_size, self.image_size),
            "aspect_ratio_ids": torch.tensor(0),
            "aspect_ratio_mask": tile_mask,
        }

    def synthetic(self, generator: torch.Generator, shift: float) -> ImageInput:
        size = self.image_size
        tiles = torch.zeros(self.max_num_tiles, 3, size, size)
        tiles[0] = torch.randn(3, size, size, generator=generator) * 0.5 + shift
        tile_mask = torch.zeros(self.max_num_tiles, dtype=torch.long)
        tile_mask[0] = 1
        return {"pixel_values": tiles, "aspect_ratio_ids": torch.tensor(1), "aspect_ratio_mask": tile_mask}

    def worst_case(self) -> ImageInput:
        """Every tile real."""
        return {
            "pixel_values": torch.zeros(self.max_num_tiles, 3, self.image_size, self.image_size),
            "aspect_ratio_ids": torch.tensor(1),
            "aspect_ratio_mask": torch.ones(self.max_num_tiles, dtype=torch.long),
        }

    def describe(self) -> str:
        return f"{self.max_num_tiles} tiles of {self.image_size} px"


def check_aspect_ratios(image_processor: Any, config: dict) -> None:
    """Raise ``ValueError`` unless the processor's aspect-ratio ids (1-based indices into
    ``get_all_supported_aspect_ratios(max_image_tiles)``) index the model's
    ``vision_config.supported_aspect_ratios`` the same way."""
    from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

    ours = [list(ratio) for ratio in get_all_supported_aspect_ratios(image_processor.max_image_tiles)]
    model = [list(ratio) for ratio in config.get("vision_config", {}).get("supported_aspect_ratios", [])]
    if ours != model:
        raise ValueError(
            f"the image processor's aspect ratios {ours} (max_image_tiles={image_processor.max_image_tiles}) "
            f"differ from the model's supported_aspect_ratios {model}"
        )


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
