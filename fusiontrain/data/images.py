"""One decoded image -> the encoder's inputs for it, through the model's own HF image processor.

- Mllama: the checkpoint's ``MllamaImageProcessor`` (PIL backend here) fits the image to the best
  tile canvas, resizes, pads, normalises and splits it into tiles; per image we keep
  ``pixel_values`` ``[t, 3, H, W]`` (``t = max_image_tiles``, unused tiles zero),
  ``aspect_ratio_ids`` (0-dim, 1-based) and ``aspect_ratio_mask`` ``[t]``, exactly the processor's
  values for that image.
- A CLIP / SigLIP tower (composed models): the tower's own image processor; per image
  ``pixel_values`` ``[3, H, W]``.

Nothing is re-implemented: each image goes through the processor's ``__call__`` on its own, so the
values are the processor's by construction (the tests also compare with ``MllamaProcessor`` on
whole samples).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fusiontrain.data.batch import ImageSpec


class ImageTransform:
    """Turns a PIL image into one image's encoder inputs (see :class:`ImageSpec` for the layout).

    Args:
        image_processor: the HF image processor (``MllamaImageProcessor*`` for ``spec.kind ==
            "mllama"``, a CLIP / SigLIP image processor for ``"tower"``).
        spec: what the encoder expects; checked against the processor's output on a probe image.

    Raises:
        ValueError: the processor does not produce what ``spec`` describes.
    """

    def __init__(self, image_processor: Any, spec: ImageSpec) -> None:
        self.image_processor = image_processor
        self.spec = spec
        is_mllama = type(image_processor).__name__.startswith("MllamaImageProcessor")
        if is_mllama != (spec.kind == "mllama"):
            raise ValueError(
                f"ImageSpec kind {spec.kind!r} does not fit image processor {type(image_processor).__name__}"
            )
        if is_mllama and image_processor.max_image_tiles != spec.max_num_tiles:
            raise ValueError(
                f"the image processor makes up to {image_processor.max_image_tiles} tiles per image, "
                f"the model takes {spec.max_num_tiles}"
            )
        probe = self(Image.new("RGB", (spec.image_size + 3, spec.image_size - 5), (127, 64, 32)))
        expected = (spec.image_size, spec.image_size)
        if tuple(probe["pixel_values"].shape[-2:]) != expected:
            raise ValueError(
                f"the image processor gives {tuple(probe['pixel_values'].shape[-2:])} pixel tiles, "
                f"the model takes {expected}"
            )

    @classmethod
    def from_pretrained(cls, folder: str | Path, spec: ImageSpec) -> ImageTransform:
        """The transform of the image processor saved in ``folder`` (``AutoImageProcessor``).

        For Mllama, also checks that the processor's aspect-ratio ids index the model's
        ``supported_aspect_ratios`` (``config.json``), when the folder holds a config.
        """
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(folder)
        transform = cls(image_processor, spec)
        config_file = Path(folder) / "config.json"
        if spec.kind == "mllama" and config_file.is_file():
            check_mllama_aspect_ratios(image_processor, json.loads(config_file.read_text()))
        return transform

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """Encoder inputs for ``image`` (RGB)."""
        if self.spec.kind == "mllama":
            out = self.image_processor([[image]], return_tensors="pt")
            return {
                "pixel_values": out["pixel_values"][0, 0].float(),
                "aspect_ratio_ids": out["aspect_ratio_ids"][0, 0].long(),
                "aspect_ratio_mask": out["aspect_ratio_mask"][0, 0].long(),
            }
        out = self.image_processor(images=[image], return_tensors="pt")
        return {"pixel_values": out["pixel_values"][0].float()}


def check_mllama_aspect_ratios(image_processor: Any, config: dict) -> None:
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
