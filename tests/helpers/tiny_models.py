"""Tiny fusiontrain models with random weights and open gates, for tests that need no HF folder."""

from __future__ import annotations

import torch

from fusiontrain import tiny
from fusiontrain.families.llama import LlamaDecoderArgs
from fusiontrain.families.mllama.model import MllamaArgs, build_mllama
from fusiontrain.modules import DeepFusionModel, Llama3RopeScaling, TanhGate
from fusiontrain.families.mllama.vision import MllamaVisionArgs

VOCAB = 128
IMAGE_TOKEN = VOCAB  # the first extra row, as in HF Mllama


def tiny_mllama_args(max_seq_len: int = 64) -> MllamaArgs:
    """6-layer text stack with cross-attention at 1 and 4; 4+2-layer ViT with 28 px tiles."""
    text = LlamaDecoderArgs(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=500_000.0,
        rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 32),
        max_seq_len=max_seq_len,
    )
    vision = MllamaVisionArgs(
        hidden_size=32,
        num_heads=4,
        intermediate_size=64,
        num_layers=4,
        num_global_layers=2,
        intermediate_layers_indices=(1, 3),
        image_size=28,
        patch_size=14,
        max_num_tiles=2,
        num_aspect_ratios=3,
    )
    return MllamaArgs(text, 6, (1, 4), vision, IMAGE_TOKEN)


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


def random_pixels(batch_images: list[list[int]], seed: int = 0, max_tiles: int = 2) -> dict[str, torch.Tensor]:
    """HF-processor-shaped encoder input. ``batch_images[k]`` lists sample k's aspect-ratio ids
    (1: 1x1, 2: 1x2, 3: 2x1); tiles beyond an image's ratio and missing images are zero."""
    tiles_of = {1: 1, 2: 2, 3: 2}
    generator = torch.Generator().manual_seed(seed)
    b, n_img = len(batch_images), max(1, max(len(images) for images in batch_images))
    pixels = torch.zeros(b, n_img, max_tiles, 3, 28, 28)
    ratio_ids = torch.zeros(b, n_img, dtype=torch.long)
    tile_mask = torch.zeros(b, n_img, max_tiles, dtype=torch.long)
    for k, images in enumerate(batch_images):
        for j, ratio in enumerate(images):
            n_tiles = tiles_of[ratio]
            pixels[k, j, :n_tiles] = torch.randn(n_tiles, 3, 28, 28, generator=generator)
            ratio_ids[k, j] = ratio
            tile_mask[k, j, :n_tiles] = 1
    return {"pixel_values": pixels, "aspect_ratio_ids": ratio_ids, "aspect_ratio_mask": tile_mask}


def mllama_batch_where_every_row_sees_an_image() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """An HF-style tiny Mllama batch in which every text row sees an image (transformers#39379
    differs from us on rows that see none). Sample 0: one 1x2 image at token 0. Sample 1: a 1x1
    image at token 0 and a 2x1 image at token 6; tokens 0-5 see the first image, tokens 6+ both
    (the Llama 3.2 rule keeps earlier images visible).

    Returns:
        tokens ``[2, 12]``, the processor's encoder input (``tiny.tiny_pixel_inputs``) and HF's
        ``cross_attention_mask`` ``[2, 12, 2 images, 2 tiles]``.
    """
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 100, (2, 12), generator=generator)
    tokens[0, 0] = tokens[1, 0] = tokens[1, 6] = tiny.IMAGE_TOKEN_ID
    pixels = tiny.tiny_pixel_inputs(tiny.tiny_mllama_config(), batch_images=[[2], [1, 3]])
    cross = torch.zeros(2, 12, 2, 2, dtype=torch.long)
    cross[0, :, 0, :2] = 1
    cross[1, :, 0, :1] = 1
    cross[1, 6:, 1, :2] = 1
    return tokens, pixels, cross
