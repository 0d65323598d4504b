"""The end-to-end demo (``make demo``): a tiny Llama 3.2 Vision from a generated HF checkpoint.

It writes a tiny ``MllamaForConditionalGeneration`` folder (config, safetensors, tokenizer and
processor), loads it into a :class:`~fusiontrain.modules.DeepFusionModel`, checks its logits
against ``transformers`` on a drawn image, and prints a KV-cached greedy continuation. The weights
are random, so the continuation is gibberish until training lands (a later issue).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from fusiontrain.generation import generate
from fusiontrain.models import encoder_mask_from_cross_attention_mask, load_hf_mllama
from fusiontrain.modules import get_fusion_params
from fusiontrain.tiny import save_tiny_mllama


def draw_shape(kind: str, color: tuple[int, int, int], size: tuple[int, int] = (64, 40)) -> Image.Image:
    """A plain picture: one ``kind`` ("circle" or "square") of ``color`` on white."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=color)
    return image


def main(args: argparse.Namespace) -> int:
    from transformers import AutoProcessor, MllamaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    checkpoint_dir = output_dir / "tiny_mllama"
    print(f"[1/4] writing a tiny HF Llama 3.2 Vision checkpoint to {checkpoint_dir}")
    save_tiny_mllama(checkpoint_dir, seed=0)

    print("[2/4] loading it into a fusiontrain DeepFusionModel")
    model = load_hf_mllama(checkpoint_dir).eval()
    total = sum(p.numel() for p in model.parameters())
    fusion = sum(p.numel() for p in get_fusion_params(model).values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"      parameters: {total:,} in all, {fusion:,} fusion, {trainable:,} trainable (fusion only)")

    print("[3/4] one forward on a drawn image, against transformers")
    processor = AutoProcessor.from_pretrained(checkpoint_dir)
    batch = processor(
        images=[[draw_shape("circle", (220, 40, 40))]],
        text=["<|image|>a picture of"],
        add_special_tokens=False,
        return_tensors="pt",
    )
    encoder_input = {key: batch[key] for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    vision_args = model.encoder.vision.args
    encoder_mask = encoder_mask_from_cross_attention_mask(
        batch["cross_attention_mask"], vision_args.tokens_per_tile, vision_args.max_num_tiles
    )
    with torch.no_grad():
        logits = model(batch["input_ids"], encoder_input=encoder_input, encoder_mask=encoder_mask)
        reference = MllamaForConditionalGeneration.from_pretrained(checkpoint_dir, attn_implementation="eager")
        hf_logits = reference.eval()(**batch).logits
    print(f"      logits shape {tuple(logits.shape)}  (b, s, v)")
    print(f"      max |fusiontrain - transformers| = {(logits - hf_logits).abs().max().item():.2e}")

    print("[4/4] KV-cached greedy continuation (random weights: expect gibberish)")
    tokens = generate(
        model,
        batch["input_ids"],
        max_new_tokens=16,
        encoder_input=encoder_input,
        encoder_mask=encoder_mask,
        stop_token_ids=(processor.tokenizer.eos_token_id,),
    )
    prompt_length = batch["input_ids"].shape[1]
    print(f"      prompt:       {processor.tokenizer.decode(tokens[0, :prompt_length])!r}")
    print(f"      continuation: {processor.tokenizer.decode(tokens[0, prompt_length:])!r}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0
