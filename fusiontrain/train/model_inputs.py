"""What the data pipeline feeds a model: its image format, input folders and the collators'
formats, and, for a model with an encoder per modality, the modalities beside images (their names
in the size table, their row limits)."""

from __future__ import annotations

from typing import Any

from torch import nn

from fusiontrain.config import DataConfig, TrainConfig
from fusiontrain.data.image_format import ImageFormat
from fusiontrain.families import InputFolders
from fusiontrain.source.model_source import ModelSource


def other_names(inputs: InputFolders) -> tuple[str, ...]:
    """The modalities beside images a model takes (its size table's extra columns), in order."""
    return tuple(other.name for other in inputs.others)


def other_limits(data: DataConfig, inputs: InputFolders) -> tuple[tuple[int, int], ...]:
    """Each modality beside images' row limits, ``(items, encoder tokens)``, in :func:`other_names`'
    order: ``data.max_items_per_row`` (default ``data.max_images_per_row``) and
    ``data.max_item_tokens_per_row`` (default: those items times the most tokens one yields)."""
    limits = []
    for other in inputs.others:
        items = data.max_items_per_row.get(other.name, data.max_images_per_row)
        tokens = data.max_item_tokens_per_row.get(other.name, items * other.input_format.max_tokens_per_item)
        limits.append((items, tokens))
    return tuple(limits)


def model_inputs(config: TrainConfig, source: ModelSource, model: nn.Module) -> tuple[ImageFormat, InputFolders, Any]:
    """What the data pipeline feeds ``model``: its image format, its input folders (tokenizer,
    processors, the other modalities'), and what the collators take (:func:`collate_formats`).

    Raises:
        NotImplementedError: a model without an image encoder.
    """
    formats = source.family.input_formats(model)
    if "image" not in formats:
        raise NotImplementedError(
            f"this model's encoders take {sorted(formats)}; training needs an image encoder among them "
            "(model.compose.encoders: {image: <vision folder>, ...})"
        )
    inputs = source.input_folders(model)
    return formats["image"], inputs, collate_formats(formats["image"], inputs)


def collate_formats(image_format: ImageFormat, inputs: InputFolders) -> Any:
    """What the collators take: the image format, or (a model with other modalities too) the
    input formats by modality."""
    if not inputs.others:
        return image_format
    return {"image": image_format, **{other.name: other.input_format for other in inputs.others}}
