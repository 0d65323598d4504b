"""fusiontrain.flops: the analytic count equals torch's FlopCounterMode on tiny models, exactly.

FlopCounterMode counts mm / addmm / bmm / convolution (and their backward ops) as autograd runs
them. Two things make the comparison honest:

- On CPU the default SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no flop
  formula, so attention would be invisible; the math backend (``SDPBackend.MATH``) decomposes it
  into the bmm ops autograd differentiates one operand at a time, exactly what the count models.
- The counter multiplies every attention as the full ``s x s`` square whatever the mask (causal,
  block-diagonal), while the MFU count takes the attended pairs. Comparisons with the counter pass
  ``attention_pairs = b * s * s``; the packed test checks that the attended-pairs count differs
  from that by exactly the masked-out pairs' FLOPs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fusiontrain import flops
from fusiontrain.data import Batch
from fusiontrain.data.packing import block_causal_mask
from fusiontrain.loss import chunked_cross_entropy_sum
from fusiontrain.modules import TransformerSelfAttentionLayer
from fusiontrain.parallel import apply_activation_checkpointing
from tests.helpers.tiny_models import random_mllama, random_pixels

B, S = 2, 16
IMAGES = [[1, 2], [3]]  # 2 rows x 2 image slots (the second row's second slot is padding)


def _training_model(**flags: bool) -> torch.nn.Module:
    model = random_mllama(**flags).train()
    model.set_skip_output_projection(True)  # as the trainer: the loss applies the output projection
    return model


def _inputs(seq_len: int = S) -> dict:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (B, seq_len), generator=generator)
    pixels = random_pixels(IMAGES)
    s_e = pixels["pixel_values"].shape[1] * 2 * 5  # image slots x 2 tiles x 5 tokens
    encoder_mask = torch.rand(B, seq_len, s_e, generator=generator) > 0.3
    return {"tokens": tokens, "encoder_input": pixels, "encoder_mask": encoder_mask}


def _measure(model: torch.nn.Module, inputs: dict, *, mask=None, backward: bool = True, num_chunks: int = 1):
    """(forward, backward) FLOPs that FlopCounterMode sees for one trainer-style step."""
    tokens = inputs["tokens"]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(backward):
            hidden = model(
                tokens, mask=mask, encoder_input=inputs.get("encoder_input"), encoder_mask=inputs.get("encoder_mask")
            )
            loss = chunked_cross_entropy_sum(hidden, tokens, model.decoder.output, num_chunks=num_chunks)
        forward = counter.get_total_flops()
        if backward:
            loss.backward()
        total = counter.get_total_flops()
    return forward, total - forward


def _count(model: torch.nn.Module, inputs: dict, **kwargs) -> flops.FlopCount:
    b, s = inputs["tokens"].shape
    images = 0 if inputs.get("encoder_input") is None else b * inputs["encoder_input"]["pixel_values"].shape[1]
    kwargs.setdefault("attention_pairs", b * s * s)  # what the counter multiplies
    return flops.step_flops(model, num_rows=b, seq_len=s, images=images, **kwargs)


def test_forward_only_matches_counter() -> None:
    model = _training_model()
    inputs = _inputs()
    forward, backward = _measure(model, inputs, backward=False)
    count = _count(model, inputs)
    assert backward == 0
    assert count.forward == forward
    assert count.parts["encoder.vision"][0] > 0 and count.parts["fusion.cross_attention"][0] > 0


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"decoder_trainable": True},
        {"encoder_trainable": True},
        {"fusion_trainable": False, "decoder_trainable": True},
    ],
    ids=["fusion_only", "decoder_trainable", "encoder_trainable", "decoder_only"],
)
def test_training_step_matches_counter(flags: dict) -> None:
    model = _training_model(**flags)
    inputs = _inputs()
    forward, backward = _measure(model, inputs)
    count = _count(model, inputs)
    assert (count.forward, count.backward) == (forward, backward)
    assert count.total == forward + backward


def test_fusion_only_backward_structure() -> None:
    """Frozen ViT (run under no_grad): no backward. Frozen decoder layers above the trainable fusion
    embedding rows: input gradients only (1x). Cross-attention, trainable with grad-requiring
    inputs: weight and input gradients (2x)."""
    count = _count(_training_model(), _inputs())
    parts = count.parts
    assert parts["encoder.vision"][1] == 0
    assert parts["decoder.mlp"][1] == parts["decoder.mlp"][0]
    assert parts["decoder.self_attention"][1] > parts["decoder.self_attention"][0]  # scores/values: 2x
    assert parts["decoder.output"][1] == parts["decoder.output"][0]
    assert parts["fusion.mlp"][1] == 2 * parts["fusion.mlp"][0]
    assert parts["fusion.cross_attention"][1] == 2 * parts["fusion.cross_attention"][0]
    assert parts["encoder.projection"][1] > parts["encoder.projection"][0]


def test_text_only_batch_skips_encoder_and_cross_attention() -> None:
    model = _training_model()
    inputs = {"tokens": _inputs()["tokens"]}
    forward, backward = _measure(model, inputs)
    count = _count(model, inputs)
    assert (count.forward, count.backward) == (forward, backward)
    assert not any(name.startswith(("encoder.", "fusion.")) for name in count.parts)


def test_packed_batch() -> None:
    """Block-diagonal causal mask: the counter (dense) matches the count with ``b * s * s`` pairs;
    the MFU count (attended pairs from the segment ids) is lower by exactly the masked pairs."""
    model = _training_model(decoder_trainable=True)
    inputs = _inputs()
    lengths = [[5, 7, 4], [10, 3, 3]]
    segment_ids = torch.tensor([[k for k, n in enumerate(row) for _ in range(n)] for row in lengths])
    mask = block_causal_mask(segment_ids)
    forward, backward = _measure(model, inputs, mask=mask)
    dense = _count(model, inputs)
    assert (dense.forward, dense.backward) == (forward, backward)

    pairs = flops.packed_attention_pairs(segment_ids)
    assert pairs == int(mask.sum()) == sum(n * (n + 1) // 2 for row in lengths for n in row)
    batch = Batch(
        tokens=inputs["tokens"],
        labels=inputs["tokens"],
        input_pos=torch.zeros_like(inputs["tokens"]),
        is_real=torch.ones_like(inputs["tokens"], dtype=torch.bool),
        segment_ids=segment_ids,
        encoder_input=inputs["encoder_input"],
        encoder_mask=inputs["encoder_mask"],
    )
    attended = flops.micro_batch_flops(model, batch)
    assert attended == _count(model, inputs, attention_pairs=pairs)
    assert flops.micro_batch_flops(model, batch, attention_pairs=B * S * S) == dense

    self_layers = [m for m in model.decoder.modules() if isinstance(m, TransformerSelfAttentionLayer)]
    width = sum(layer.attn.num_heads * layer.attn.head_dim for layer in self_layers)
    # per layer: 2 matmuls of 2 * width * pairs; backward 2x with every operand trainable
    assert dense.forward - attended.forward == 4 * width * (B * S * S - pairs)
    assert dense.backward - attended.backward == 8 * width * (B * S * S - pairs)


def test_default_pairs_are_causal() -> None:
    model = _training_model()
    causal = flops.step_flops(model, num_rows=B, seq_len=S, images=4)
    explicit = flops.step_flops(model, num_rows=B, seq_len=S, images=4, attention_pairs=B * S * (S + 1) // 2)
    assert causal == explicit
    assert flops.causal_attention_pairs(B, S) == B * S * (S + 1) // 2
    unpacked = Batch(
        tokens=torch.zeros(B, S, dtype=torch.long),
        labels=torch.zeros(B, S, dtype=torch.long),
        input_pos=torch.zeros(B, S, dtype=torch.long),
        is_real=torch.ones(B, S, dtype=torch.bool),
    )
    assert flops.micro_batch_flops(model, unpacked) == flops.step_flops(model, num_rows=B, seq_len=S)


def test_chunked_loss_flops_frozen_projection_are_model_flops() -> None:
    """Fusion-only (frozen output projection): the chunked loss takes the hidden states' gradient
    during forward, so the counter sees exactly the model FLOPs, the output projection's input
    gradient moved from backward to forward, and nothing recomputed."""
    model = _training_model()
    inputs = _inputs()
    count = _count(model, inputs)
    forward, backward = _measure(model, inputs, num_chunks=2)
    projection = count.parts["decoder.output"][0]
    assert count.parts["decoder.output"][1] == projection  # input gradient only: the weight is frozen
    assert forward == count.forward + projection
    assert backward == count.backward - projection


def test_recompute_is_not_counted() -> None:
    """A trainable output projection is recomputed chunk by chunk in backward: the counter sees
    its forward twice, the model-FLOPs count once. Activation-checkpoint wrappers change nothing."""
    model = _training_model(decoder_trainable=True)
    inputs = _inputs()
    count = _count(model, inputs)
    forward, backward = _measure(model, inputs, num_chunks=2)
    assert forward == count.forward
    assert backward == count.backward + count.parts["decoder.output"][0]

    apply_activation_checkpointing(model, 1)
    assert _count(model, inputs) == count


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("encoder_trainable", [False, True])
def test_hf_tower_models_match_counter(family: str, encoder_trainable: bool) -> None:
    """CLIP / SigLIP towers (SigLIP's pooling head runs in forward but gets no backward)."""
    from fusiontrain import tiny
    from fusiontrain.models.compose import build_composed_model

    vision = tiny.tiny_clip_vision_config() if family == "clip" else tiny.tiny_siglip_vision_config()
    torch.manual_seed(0)
    model = build_composed_model(
        tiny.tiny_llama_config().to_dict(),
        vision.to_dict(),
        fusion_interval=2,
        fusion_vocab_size=1,
        encoder_trainable=encoder_trainable,
    ).train()
    model.set_skip_output_projection(True)
    images_per_row, n_tok = 2, model.encoder.tokens_per_image
    inputs = {
        "tokens": torch.randint(0, 128, (B, 12)),
        "encoder_input": {"pixel_values": torch.randn(B, images_per_row, 3, 28, 28)},
        "encoder_mask": torch.ones(B, 12, images_per_row * n_tok, dtype=torch.bool),
    }
    forward, backward = _measure(model, inputs)
    count = _count(model, inputs)
    assert (count.forward, count.backward) == (forward, backward)
    assert (count.parts["encoder.vision"][1] > 0) == encoder_trainable


def test_flop_count_sums() -> None:
    a = flops.FlopCount(3, 5, {"x": (3, 5)})
    b = flops.FlopCount(1, 2, {"x": (1, 0), "y": (0, 2)})
    total = sum([a, b])
    assert (total.forward, total.backward, total.total) == (4, 7, 11)
    assert total.parts == {"x": (4, 5), "y": (0, 2)}


def test_mfu() -> None:
    assert flops.mfu(6e15, 2.0, 1e15, 4) == pytest.approx(0.75)
    assert flops.mfu(1e12, 1.0, 1e12) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        flops.mfu(1.0, 0.0, 1e12, 1)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 SXM5 80GB", 989.4e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA B200", 2.25e15),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA GB200", None),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_by_name(name: str, peak: float | None) -> None:
    if peak is None:
        with pytest.raises(ValueError, match="no peak"):
            flops.peak_flops_for_name(name)
    else:
        assert flops.peak_flops_for_name(name) == peak


def test_cpu_peak_is_measured_once() -> None:
    first = flops.device_peak_flops("cpu")
    assert math.isfinite(first) and first > 1e8
    assert flops.device_peak_flops(torch.device("cpu")) == first  # cached: measured once per process
