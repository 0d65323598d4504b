"""The public model API: build a :class:`~fusiontrain.modules.DeepFusionModel` from Hugging Face
folders, allocated and filled, in one call.

- :func:`load_hf_mllama`: a Llama 3.2 Vision (``MllamaForConditionalGeneration``) folder;
- :func:`load_fusiontrain_export`: a fusiontrain-format export, of any family;
- :func:`compose_from_hf`: any registered decoder LM plus any registered vision tower, joined by
  new cross-attention layers;
- :func:`encoder_mask_from_cross_attention_mask`: HF's Mllama ``cross_attention_mask`` as our
  ``encoder_mask``.

Layer: above :mod:`fusiontrain.source` and :mod:`fusiontrain.families`; training, planning and
inference never import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fusiontrain.families import TrainableFlags, model_family
from fusiontrain.families.composed.family import MODALITY_ROLE
from fusiontrain.families.mllama.model import build_mllama, encoder_mask_from_cross_attention_mask, mllama_args_from_config
from fusiontrain.modules import DeepFusionModel
from fusiontrain.source.model_source import ModelSource

__all__ = [
    "build_mllama",
    "compose_from_hf",
    "encoder_mask_from_cross_attention_mask",
    "load_fusiontrain_export",
    "load_hf_mllama",
    "mllama_args_from_config",
]


def load_hf_mllama(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
) -> DeepFusionModel:
    """Read a HF ``MllamaForConditionalGeneration`` folder into a :class:`DeepFusionModel`.

    The model is built on the meta device, allocated once in ``dtype`` on ``device``, and filled
    tensor by tensor from the safetensors files, so loading never holds two copies of the weights.

    Args:
        path: folder with ``config.json`` and safetensors (single file or sharded with an index).
        dtype: parameter dtype.
        device: where the parameters live.
        decoder_trainable, encoder_trainable, fusion_trainable: what trains (see DeepFusionModel).
    """
    source = ModelSource(model_family("mllama"), {"hf_mllama": Path(path)})
    flags = TrainableFlags(decoder_trainable, encoder_trainable, fusion_trainable)
    return source.load(flags, dtype=dtype, device=device)  # type: ignore[return-value]


def load_fusiontrain_export(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
) -> DeepFusionModel:
    """Rebuild the :class:`DeepFusionModel` of a ``fusiontrain``-format export (``python -m
    fusiontrain export --format fusiontrain``) and fill every parameter from its safetensors; no
    base folder is needed.

    Args:
        path: the export folder.
        dtype: parameter dtype (values are cast from the export's dtypes).
        device: where the parameters live.
        decoder_trainable, encoder_trainable, fusion_trainable: what trains (see DeepFusionModel).
    """
    flags = TrainableFlags(decoder_trainable, encoder_trainable, fusion_trainable)
    return ModelSource.from_export(path).load(flags, dtype=dtype, device=device)  # type: ignore[return-value]


def compose_from_hf(
    decoder_path: str | Path,
    encoder_path: str | Path | Mapping[str, str | Path],
    *,
    fusion_interval: int = 4,
    fusion_placements: Mapping[str, tuple[int, int]] | None = None,
    fusion_vocab_size: int = 8,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
    seed: int = 0,
) -> DeepFusionModel:
    """Join a HF Llama causal LM and a HF CLIP / SigLIP vision tower into a :class:`DeepFusionModel`.

    The decoder is the LM with a new gated cross-attention layer fused (run first) into every layer
    ``index`` with ``(index + 1) % fusion_interval == 0``, and ``fusion_vocab_size`` new embedding
    rows (the first, id ``vocab_size``, is the image token). The encoder is an
    family's tower plus a LLaVA-style projection head; it takes what the family's image format
    collates (``pixel_values`` for CLIP / SigLIP, as the tower's own HF image processor makes it).
    See :func:`~fusiontrain.families.composed.compose.image_token_layout` for the image token id
    and tokens per image.

    Everything is built on the meta device, allocated once in ``dtype`` on ``device``, and filled
    tensor by tensor from safetensors (nothing is unpickled). The fusion parameters, which no file
    holds, are initialised from ``seed``
    (:func:`~fusiontrain.families.composed.compose.init_fusion_params`): with the gates shut the
    model's logits equal the LM's.

    A tied LM (``tie_word_embeddings`` with no ``lm_head.weight`` stored) gets the embedding copied
    into the output projection; the two are separate parameters here, so the tie is not kept once
    the decoder trains.

    Args:
        decoder_path: folder of a ``LlamaForCausalLM`` (``config.json`` with model_type ``llama``;
            one safetensors file or shards with an index).
        encoder_path: folder of a ``CLIPVisionModel`` / ``SiglipVisionModel`` (model_type
            ``clip_vision_model`` / ``siglip_vision_model``), or of a full ``CLIPModel`` /
            ``SiglipModel`` (only its ``vision_model`` tensors are used); or a mapping from
            modality to the folder of its encoder (``{"image": ..., "audio": <Whisper>}``): the
            model then has an encoder per modality (``model.encoder[m]``), each with its own
            cross-attention layers and placeholder row
            (:func:`~fusiontrain.families.composed.family.placeholder_rows`).
        fusion_interval: fuse a cross-attention layer into every this-many decoder layers.
        fusion_placements: with an encoder per modality, ``modality -> (interval, offset)``: its
            cross-attention layers go into the layers with ``index % interval == offset``
            (default for a modality left out: ``(fusion_interval, fusion_interval - 1)``).
        fusion_vocab_size: new embedding rows (at least 1, the image token).
        dtype: parameter dtype.
        device: where the parameters live.
        decoder_trainable, encoder_trainable, fusion_trainable: what trains (see DeepFusionModel).
        seed: seed of the fusion parameters' initial values.

    Raises:
        FileNotFoundError: a folder, its ``config.json`` or its safetensors are missing.
        ValueError: a config of the wrong model_type or with unsupported features, or a checkpoint
            whose tensors do not match its config.
    """
    settings: dict[str, object] = {"fusion_interval": fusion_interval, "fusion_vocab_size": fusion_vocab_size}
    if isinstance(encoder_path, Mapping):
        placements = dict(fusion_placements or {})
        unknown = sorted(set(placements) - set(encoder_path))
        if unknown:
            raise ValueError(f"fusion_placements names {unknown}, which have no encoder folder ({sorted(encoder_path)})")
        settings["fusion_placements"] = {
            m: list(placements.get(m, (fusion_interval, fusion_interval - 1))) for m in encoder_path
        }
        folders = {"decoder": Path(decoder_path), **{MODALITY_ROLE + m: Path(f) for m, f in encoder_path.items()}}
    elif fusion_placements is not None:
        raise ValueError("fusion_placements places an encoder per modality: give encoder_path as a mapping by modality")
    else:
        folders = {"decoder": Path(decoder_path), "encoder": Path(encoder_path)}
    source = ModelSource(model_family("composed"), folders, settings)
    flags = TrainableFlags(decoder_trainable, encoder_trainable, fusion_trainable)
    return source.load(flags, dtype=dtype, device=device, seed=seed)  # type: ignore[return-value]
