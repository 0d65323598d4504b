"""The benchmarks' models and inputs, shared with the tests (benchmarks never import from tests/;
tests may import from here).

- :func:`bench_mllama_config`: the "small but not trivial" Mllama every CPU benchmark trains.
- :func:`mllama_pixel_inputs`: random encoder inputs shaped as ``MllamaImageProcessor`` makes them.
- :func:`tiny_mllama_args` / :func:`random_pixels`: a 6-layer Mllama built directly from our args
  (no HF folder), and pixel inputs for it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch

from fusiontrain.families.llama import LlamaDecoderArgs
from fusiontrain.families.mllama.model import MllamaArgs
from fusiontrain.families.mllama.vision import MllamaVisionArgs
from fusiontrain.modules import Llama3RopeScaling
from fusiontrain.tiny import tiny_mllama_config

VOCAB = 128
IMAGE_TOKEN = VOCAB  # the first extra row, as in HF Mllama


def bench_mllama_config() -> Any:
    """The "small but not trivial" Mllama of the benchmarks: d=512, 8 text layers of which 2 are
    cross-attention (indices 3 and 7), 8 heads / 4 KV heads, MLP 1536, a 32k vocabulary; a vision
    tower of 4 + 2 global layers, width 256, one 112 px tile of 14 px patches (65 tokens)."""
    return tiny_mllama_config(
        text_config={
            "vocab_size": 32_000,
            "hidden_size": 512,
            "num_hidden_layers": 8,
            "cross_attention_layers": [3, 7],
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "intermediate_size": 1536,
            "max_position_embeddings": 4096,
        },
        vision_config={
            "hidden_size": 256,
            "attention_heads": 4,
            "intermediate_size": 1024,
            "num_hidden_layers": 4,
            "num_global_layers": 2,
            "intermediate_layers_indices": [1, 3],
            "vision_output_dim": 256 * 3,
            "image_size": 112,
            "patch_size": 14,
            "max_num_tiles": 1,
            "supported_aspect_ratios": [[1, 1]],
        },
        image_token_index=32_000,
    )


def mllama_pixel_inputs(
    config: Any,
    *,
    batch_images: list[list[int]],
    seed: int = 0,
    hf_padding_quirk: bool = True,
) -> dict[str, torch.Tensor]:
    """Random HF-style Mllama image inputs.

    Args:
        config: an ``MllamaConfig`` (or its ``vision_config``).
        batch_images: for each sample, the 1-based aspect-ratio id (index into
            ``supported_aspect_ratios`` plus one) of each of its images; e.g. ``[[1], [2, 3]]``
            means sample 0 has one 1x1 image and sample 1 has a 1x2 and a 2x1 image. A sample
            may have no images (``[]``).
        seed: seed for the pixel values.
        hf_padding_quirk: mimic ``MllamaImageProcessor``, which sets
            ``aspect_ratio_mask[..., 0] = 1`` for *every* image slot, padding slots included.
            With ``False``, padding image slots are all zeros.

    Returns:
        ``pixel_values`` float ``[b, max_imgs, max_tiles, 3, H, W]`` (standard normal for real
        tiles, zero for padding tiles/images), ``aspect_ratio_ids`` long ``[b, max_imgs]``
        (0 for padding images), ``aspect_ratio_mask`` long ``[b, max_imgs, max_tiles]``
        (1 for real tiles), where ``max_imgs = max(1, longest list)``.
    """
    vc = getattr(config, "vision_config", config)
    ratios = vc.supported_aspect_ratios
    max_tiles = vc.max_num_tiles
    size = vc.image_size
    channels = getattr(vc, "num_channels", 3)
    batch = len(batch_images)
    max_imgs = max([1] + [len(imgs) for imgs in batch_images])

    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.zeros(batch, max_imgs, max_tiles, channels, size, size)
    aspect_ratio_ids = torch.zeros(batch, max_imgs, dtype=torch.long)
    aspect_ratio_mask = torch.zeros(batch, max_imgs, max_tiles, dtype=torch.long)
    if hf_padding_quirk:
        aspect_ratio_mask[:, :, 0] = 1
    for i, imgs in enumerate(batch_images):
        for j, ar_id in enumerate(imgs):
            if not 1 <= ar_id <= len(ratios):
                raise ValueError(f"aspect ratio id {ar_id} not in 1..{len(ratios)}")
            n_tiles = math.prod(ratios[ar_id - 1])
            if n_tiles > max_tiles:
                raise ValueError(f"aspect ratio {ratios[ar_id - 1]} needs more than {max_tiles} tiles")
            aspect_ratio_ids[i, j] = ar_id
            aspect_ratio_mask[i, j, :n_tiles] = 1
            pixel_values[i, j, :n_tiles] = torch.randn(n_tiles, channels, size, size, generator=gen)
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": aspect_ratio_ids,
        "aspect_ratio_mask": aspect_ratio_mask,
    }


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


def random_pixels(batch_images: list[list[int]], seed: int = 0, max_tiles: int = 2) -> dict[str, torch.Tensor]:
    """Encoder input for :func:`tiny_mllama_args`' ViT. ``batch_images[k]`` lists sample k's
    aspect-ratio ids (1: 1x1, 2: 1x2, 3: 2x1); tiles beyond an image's ratio and missing images
    are zero (their aspect-ratio mask too)."""
    vision = SimpleNamespace(supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], max_num_tiles=max_tiles, image_size=28)
    return mllama_pixel_inputs(vision, batch_images=batch_images, seed=seed, hf_padding_quirk=False)
