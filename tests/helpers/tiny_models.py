"""Tiny fusiontrain models with random weights and open gates, for tests that need no HF folder
(the model args and pixel inputs are the benchmarks', :mod:`benchmarks.models`)."""

from __future__ import annotations

import torch

from benchmarks.models import IMAGE_TOKEN, VOCAB, mllama_pixel_inputs, random_pixels, tiny_mllama_args
from fusiontrain import tiny
from fusiontrain.families.mllama.model import build_mllama
from fusiontrain.modules import DeepFusionModel, TanhGate

__all__ = [
    "IMAGE_TOKEN",
    "VOCAB",
    "mllama_batch_where_every_row_sees_an_image",
    "open_gates",
    "random_mllama",
    "random_pixels",
    "tiny_mllama_args",
]


def open_gates(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every gate a distinct non-zero value, so images change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate") or isinstance(_owner(model, name), TanhGate):
                param.copy_(torch.rand(param.shape, generator=generator) * 1.2 + 0.3)


def _owner(model: torch.nn.Module, param_name: str) -> torch.nn.Module:
    return model.get_submodule(param_name.rpartition(".")[0])


def random_mllama(seed: int = 0, **flags: bool) -> DeepFusionModel:
    """A tiny Mllama-shaped DeepFusionModel with random weights and open gates, in eval mode."""
    torch.manual_seed(seed)
    model = build_mllama(tiny_mllama_args(), **flags)
    with torch.no_grad():
        model.decoder.tok_embeddings.fusion_embedding.weight.normal_()
    open_gates(model, seed)
    return model.eval()


def mllama_batch_where_every_row_sees_an_image() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """An HF-style tiny Mllama batch in which every text row sees an image (transformers#39379
    differs from us on rows that see none). Sample 0: one 1x2 image at token 0. Sample 1: a 1x1
    image at token 0 and a 2x1 image at token 6; tokens 0-5 see the first image, tokens 6+ both
    (the Llama 3.2 rule keeps earlier images visible).

    Returns:
        tokens ``[2, 12]``, the processor's encoder input (``benchmarks.models.mllama_pixel_inputs``) and HF's
        ``cross_attention_mask`` ``[2, 12, 2 images, 2 tiles]``.
    """
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 100, (2, 12), generator=generator)
    tokens[0, 0] = tokens[1, 0] = tokens[1, 6] = tiny.IMAGE_TOKEN_ID
    pixels = mllama_pixel_inputs(tiny.tiny_mllama_config(), batch_images=[[2], [1, 3]])
    cross = torch.zeros(2, 12, 2, 2, dtype=torch.long)
    cross[0, :, 0, :2] = 1
    cross[1, :, 0, :1] = 1
    cross[1, 6:, 1, :2] = 1
    return tokens, pixels, cross
