"""Compose a :class:`DeepFusionModel` from a HF causal LM and a HF vision model, of any registered
decoder and encoder family (:mod:`fusiontrain.families`).

- :func:`fusion_slots` places a new cross-attention layer in every ``fusion_interval``-th layer;
  :func:`modality_fusion_slots` places one per modality, at that modality's interval and offset.
- :func:`init_fusion_params` gives the new (fusion) parameters their deterministic initial values.
- :func:`image_token_layout` tells a data pipeline the image token id and tokens per image.

Unlike an Mllama checkpoint, no file holds the fusion parameters: the cross-attention layers, the
projection head and the new embedding rows start fresh, with the tanh gates shut, so the composed
model's logits equal the base LM's until the gates open in training.

Shapes: b batch, s tokens, s_e encoder tokens, d decoder width, d_e tower width, v vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fusiontrain.weights.hf_checkpoint import copy_rows_into
from fusiontrain.families.llama import FusedSlot
from fusiontrain.modules import DeepFusionModel, FusionEmbedding, RMSNorm, TanhGate, get_fusion_params

DEFAULT_INITIALIZER_RANGE = 0.02  # HF's LlamaConfig default


# -- decoder ----------------------------------------------------------------------------------------


def fusion_slots(num_layers: int, fusion_interval: int) -> list[FusedSlot]:
    """One slot per decoder layer; layer ``index`` gets a new cross-attention layer, run before it,
    when ``(index + 1) % fusion_interval == 0`` (torchtune's ``llama3_2_vision`` placement).

    A composed model has no source stack of cross-attention layers, so a fused slot's
    ``cross_index`` is only a marker (any non-None value makes ``llama_fused_decoder`` build a
    cross-attention layer); we set it to the slot's own index. No weight map reads it.
    """
    if fusion_interval < 1:
        raise ValueError(f"fusion_interval must be >= 1, got {fusion_interval}")
    if fusion_interval > num_layers:
        raise ValueError(
            f"fusion_interval={fusion_interval} exceeds the decoder's {num_layers} layers, so no layer would be "
            f"fused; use a fusion_interval <= {num_layers}"
        )
    return [
        FusedSlot(index, index if (index + 1) % fusion_interval == 0 else None, fusion_first=True)
        for index in range(num_layers)
    ]


def modality_fusion_slots(num_layers: int, placements: Mapping[str, tuple[int, int]]) -> list[FusedSlot]:
    """One slot per decoder layer for a model with an encoder per modality: layer ``index`` gets
    a new cross-attention layer for modality ``m`` (run before the layer, in ``placements``'
    order) when ``index % interval == offset``, ``(interval, offset) = placements[m]``. An offset
    of ``interval - 1`` is :func:`fusion_slots`' placement.

    Raises:
        ValueError: an interval below 1, an offset outside ``[0, interval)``, or a modality that
            no layer would fuse.
    """
    for modality, (interval, offset) in placements.items():
        if interval < 1 or not 0 <= offset < interval:
            raise ValueError(
                f"modality {modality!r}: fusion interval {interval} and offset {offset} must satisfy interval >= 1 and "
                "0 <= offset < interval"
            )
        if offset >= num_layers:
            raise ValueError(
                f"modality {modality!r}: fusion offset {offset} is past the decoder's {num_layers} layers, so no layer "
                f"would fuse it; use an offset below {num_layers}"
            )
    slots = []
    for index in range(num_layers):
        modalities = tuple(m for m, (interval, offset) in placements.items() if index % interval == offset)
        slots.append(FusedSlot(index, index if modalities else None, fusion_first=True, modalities=modalities or None))
    return slots


# -- fusion parameters ------------------------------------------------------------------------------


@torch.no_grad()
def init_fusion_params(model: nn.Module, *, seed: int, std: float = DEFAULT_INITIALIZER_RANGE) -> set[str]:
    """Give every fusion parameter of ``model`` its initial value, deterministically from ``seed``.

    - ``nn.Linear`` weights: normal(0, ``std``), as HF initialises Llama and Mllama's
      cross-attention layers (``initializer_range``); biases: 0.
    - RMSNorm scales and LayerNorm weights: 1; LayerNorm biases: 0.
    - Tanh gates: 0, so every new branch starts shut and the model computes the base LM.
    - New embedding rows: the mean of the pretrained rows (Hewitt, 2021, "Initializing New Word
      Embeddings for Pretrained Language Models"). A row drawn at random can have a norm and
      direction unlike any the LM was trained on and perturb every later hidden state; the mean
      row stays inside that distribution, so the LM reads an image token as a bland, average
      token. The rows start equal and separate once trained.

    Random values are drawn on the CPU in fp32 from one ``torch.Generator`` in module order, one
    full tensor at a time, then cast; a sharded (DTensor) parameter keeps only its own rows. So
    the values depend on neither ``device``, ``dtype`` nor the number of ranks. Parameters are
    matched by identity, not by name, and module wrappers own no parameters of their own, so the
    values do not depend on activation-checkpoint or compile wrappers either.

    Returns:
        The names of the parameters initialised (all of ``get_fusion_params(model)``).

    Raises:
        TypeError: a fusion parameter belongs to a module type with no rule here.
    """
    fusion = get_fusion_params(model)
    name_of = {id(param): name for name, param in fusion.items()}
    generator = torch.Generator().manual_seed(seed)
    done: set[str] = set()
    for module in model.modules():
        if isinstance(module, FusionEmbedding):
            rows = module.fusion_embedding.weight
            base = module.weight.full_tensor() if isinstance(module.weight, DTensor) else module.weight
            mean_row = base.mean(dim=0, dtype=torch.float32)
            new_rows = mean_row.expand(rows.shape)
            copy_rows_into(rows, lambda start, stop, rows=new_rows: rows[start:stop])
            done.add(name_of[id(rows)])
            continue
        for local, param in module.named_parameters(recurse=False):
            name = name_of.get(id(param))
            if name is None or name in done:
                continue
            full = _initial_value(module, local, param, generator, std, name)
            copy_rows_into(param, lambda start, stop, full=full: full[start:stop])
            done.add(name)
    if done != set(fusion):
        raise RuntimeError(f"fusion parameters left uninitialised: {sorted(set(fusion) - done)[:5]}")
    return done


def _initial_value(
    module: nn.Module, local: str, param: torch.Tensor, generator: torch.Generator, std: float, name: str
) -> torch.Tensor:
    if isinstance(module, nn.Linear) and local == "weight":
        return torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    if isinstance(module, (nn.Linear, nn.LayerNorm)) and local == "bias":
        return torch.zeros(param.shape)
    if (isinstance(module, RMSNorm) and local == "scale") or (isinstance(module, nn.LayerNorm) and local == "weight"):
        return torch.ones(param.shape)
    if isinstance(module, TanhGate):
        return torch.zeros(param.shape)
    raise TypeError(f"no initialisation rule for fusion parameter {name!r} of a {type(module).__name__}")


# -- composition ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTokenLayout:
    """How a composed model expects images in the token stream.

    Attributes:
        image_token_id: id of the image token, the first new embedding row (``vocab_size``).
        tokens_per_image: encoder tokens ``n_tok`` each image contributes to ``s_e``.
        vocab_size: pretrained vocabulary ``v`` (ids ``>= v`` read new rows).
        fusion_vocab_size: new embedding rows (ids ``v .. v + fusion_vocab_size - 1``).
    """

    image_token_id: int
    tokens_per_image: int
    vocab_size: int
    fusion_vocab_size: int


def image_token_layout(model: DeepFusionModel) -> ImageTokenLayout:
    """The :class:`ImageTokenLayout` of a model built by :func:`compose_from_hf`, read from its
    modules (so it also holds for a rebuilt or reloaded model).

    With ``i`` images per sample, ``encoder_mask`` is ``[b, s, i * tokens_per_image]``; image
    ``k`` owns columns ``k * tokens_per_image .. (k + 1) * tokens_per_image - 1``.
    """
    embeddings, encoder = model.decoder.tok_embeddings, model.encoder
    if not isinstance(embeddings, FusionEmbedding) or not hasattr(encoder, "tokens_per_image"):
        raise TypeError("image_token_layout expects a model built by compose_from_hf with a fixed-size encoder")
    return ImageTokenLayout(
        image_token_id=embeddings.vocab_size,
        tokens_per_image=encoder.tokens_per_image,
        vocab_size=embeddings.vocab_size,
        fusion_vocab_size=embeddings.fusion_vocab_size,
    )
