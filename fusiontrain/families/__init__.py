"""Model families: everything that differs between them lives here, behind one seam.

- A *decoder family* (:class:`~fusiontrain.families.decoder.DecoderFamily`) turns a HF causal LM
  into our decoder.
- An *encoder family* (:class:`~fusiontrain.families.encoder.EncoderFamily`) turns a HF vision
  or audio model into our encoder and says what its inputs are.
- A *model family* (:class:`~fusiontrain.families.model.ModelFamily`: ``mllama``, ``composed``) is
  what a run config selects and a checkpoint's manifest names.

To add a family, write its file here and add one line to the matching registry in
:mod:`fusiontrain.families.registry` (docs/adding-a-family.md).

Layer: above ``data``; may import data, weights, flops, parallel, modules, batch_layout and
torch_private.

The names below come from :mod:`fusiontrain.families.registry`, imported on first use (PEP 562),
not with the package: a dataloader worker that unpickles an input format
(:mod:`fusiontrain.families.mllama.tiles`, :mod:`~fusiontrain.families.fixed_size_image`,
:mod:`~fusiontrain.families.siglip2_image`, :mod:`~fusiontrain.families.whisper_audio`) then
imports no model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "DECODER_FAMILIES",
    "ENCODER_FAMILIES",
    "MODEL_FAMILIES",
    "InputFolders",
    "ModelFamily",
    "TrainableFlags",
    "decoder_family_for",
    "encoder_family_for",
    "model_family",
    "model_family_of",
]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from fusiontrain.families.registry import (
        DECODER_FAMILIES,
        ENCODER_FAMILIES,
        MODEL_FAMILIES,
        InputFolders,
        ModelFamily,
        TrainableFlags,
        decoder_family_for,
        encoder_family_for,
        model_family,
        model_family_of,
    )


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("fusiontrain.families.registry"), name)
    globals()[name] = value  # later lookups skip this function
    return value
