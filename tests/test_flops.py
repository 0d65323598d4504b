"""fusiontrain.flops.count: the analytic count equals torch's FlopCounterMode on tiny models, exactly.

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

import logging
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fusiontrain.flops import count as flops
from fusiontrain.flops import peak
from fusiontrain.data import Batch
from fusiontrain.modules.masks import block_causal_mask
from fusiontrain.train.loss import chunked_cross_entropy_sum
from fusiontrain.modules import TransformerSelfAttentionLayer
from fusiontrain.parallel.fsdp import apply_activation_checkpointing
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


def _measure(
    model: torch.nn.Module, inputs: dict, *, mask=None, backward: bool = True, num_chunks: int = 1, labels=None
):
    """(forward, backward) FLOPs that FlopCounterMode sees for one trainer-style step (every
    position a target unless ``labels`` say otherwise)."""
    tokens = inputs["tokens"]
    labels = tokens if labels is None else labels
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(backward):
            hidden = model(
                tokens, mask=mask, encoder_input=inputs.get("encoder_input"), encoder_mask=inputs.get("encoder_mask")
            )
            loss = chunked_cross_entropy_sum(hidden, labels, model.decoder.output, num_chunks=num_chunks)
        forward = counter.get_total_flops()
        if backward:
            loss.backward()
        total = counter.get_total_flops()
    return forward, total - forward


def _count(model: torch.nn.Module, inputs: dict, **kwargs) -> flops.FlopCount:
    """The analytic count, the encoder's images read from ``encoder_input`` (Mllama encodes the
    real image slots only: 3 of the 4 here)."""
    b, s = inputs["tokens"].shape
    kwargs.setdefault("attention_pairs", b * s * s)  # what the counter multiplies
    return flops.step_flops(model, num_rows=b, seq_len=s, encoder_input=inputs.get("encoder_input"), **kwargs)


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


def test_output_projection_counts_targets_only() -> None:
    """The loss projects the target positions only: with prompt and padding positions ignored, the
    counter sees ``2 n d v`` per projection pass, and so does the count of a batch carrying its
    target index."""
    model = _training_model()
    inputs = _inputs()
    labels = inputs["tokens"].clone()
    labels[0, :5] = -100
    labels[1, 9:] = -100
    n = B * S - 12
    batch = Batch(
        tokens=inputs["tokens"],
        labels=labels,
        input_pos=torch.zeros_like(labels),
        is_real=torch.ones_like(labels, dtype=torch.bool),
        encoder_input=inputs["encoder_input"],
        encoder_mask=inputs["encoder_mask"],
    ).with_target_index(-100)
    count = flops.micro_batch_flops(model, batch, attention_pairs=B * S * S)
    assert count == _count(model, inputs, targets=n)
    assert count.parts["decoder.output"][0] == 2 * n * model.decoder.output.in_features * model.decoder.output.out_features
    assert (count.forward, count.backward) == _measure(model, inputs, labels=labels)
    everything = _count(model, inputs)
    assert everything.forward - count.forward == 2 * (B * S - n) * model.decoder.output.weight.numel()


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
    from fusiontrain.families import TrainableFlags, model_family

    vision = tiny.tiny_clip_vision_config() if family == "clip" else tiny.tiny_siglip_vision_config()
    torch.manual_seed(0)
    model = model_family("composed").build(
        tiny.tiny_llama_config().to_dict(),
        vision.to_dict(),
        fusion_interval=2,
        fusion_vocab_size=1,
        flags=TrainableFlags(encoder_trainable=encoder_trainable),
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
    assert peak.mfu(6e15, 2.0, 1e15, 4) == pytest.approx(0.75)
    assert peak.mfu(1e12, 1.0, 1e12) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        peak.mfu(1.0, 0.0, 1e12, 1)


@pytest.mark.parametrize(
    ("name", "expected"),
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
def test_peak_flops_by_name(name: str, expected: float | None) -> None:
    if expected is None:
        with pytest.raises(ValueError, match="no peak"):
            peak.peak_flops_for_name(name)
    else:
        assert peak.peak_flops_for_name(name) == expected


def test_cpu_peak_is_measured_once() -> None:
    first = peak.device_peak_flops("cpu")
    assert math.isfinite(first) and first > 1e8
    assert peak.device_peak_flops(torch.device("cpu")) == first  # cached: measured once per process


# -- encoders counted generically (fusiontrain.flops.probe) ----------------------------------------


class _ToyBlock(torch.nn.Module):
    """Pre-norm self-attention (SDPA, key-padding mask) and a GELU MLP, both residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)
        self.norm2 = torch.nn.LayerNorm(width)
        self.fc1 = torch.nn.Linear(width, 2 * width)
        self.fc2 = torch.nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``[b, n, w]``, ``mask`` ``[b, 1, 1, n]`` bool or None -> ``[b, n, w]``."""
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(attn.transpose(1, 2).reshape(b, n, w))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class ToyEncoder(torch.nn.Module):
    """A user's own encoder, unknown to the analytic count: linear patch embedding, 2 blocks, a
    registered projection head. ``patches`` ``[b, n, 3 p p]`` (n varies), ``patch_mask``
    ``[b, n]`` bool -> ``[b, n, d]``. It reads the mask's values (``all()``), as HF code does."""

    def __init__(self, patch_dim: int = 12, width: int = 32, decoder_dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        from fusiontrain.modules import register_fusion_module

        self.patch_embed = torch.nn.Linear(patch_dim, width)
        self.blocks = torch.nn.ModuleList([_ToyBlock(width, heads) for _ in range(2)])
        self.norm = torch.nn.LayerNorm(width)
        self.projection = register_fusion_module(torch.nn.Linear(width, decoder_dim))

    def forward(self, patches: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        mask = None if bool(patch_mask.all()) else patch_mask[:, None, None, :]
        x = self.patch_embed(patches)
        for block in self.blocks:
            x = block(x, mask)
        return self.projection(self.norm(x))


def _toy_model(**flags: bool) -> torch.nn.Module:
    """The tiny Mllama decoder (open gates) fused with a ToyEncoder, trainer-style."""
    from fusiontrain.modules import DeepFusionModel

    decoder = random_mllama().decoder
    torch.manual_seed(1)
    model = DeepFusionModel(decoder, ToyEncoder(), **flags).train()
    model.set_skip_output_projection(True)
    return model


def _toy_inputs(num_patches: int = 6, seq_len: int = 12) -> dict:
    generator = torch.Generator().manual_seed(0)
    patch_mask = torch.ones(B, num_patches, dtype=torch.bool)
    patch_mask[1, num_patches // 2 :] = False  # the second row's image is smaller
    return {
        "tokens": torch.randint(0, 128, (B, seq_len), generator=generator),
        "encoder_input": {"patches": torch.randn(B, num_patches, 12, generator=generator), "patch_mask": patch_mask},
        "encoder_mask": torch.rand(B, seq_len, num_patches, generator=generator) > 0.3,
    }


def _measure_encoder(encoder: torch.nn.Module, encoder_input: dict) -> tuple[int, int]:
    """(forward, backward) FLOPs FlopCounterMode sees for the real encoder, real tensors."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = encoder(**encoder_input)
        forward = counter.get_total_flops()
        if out.requires_grad:
            out.backward(torch.ones_like(out))
        return forward, counter.get_total_flops() - forward


def _generic_count(model: torch.nn.Module, inputs: dict, **kwargs) -> flops.FlopCount:
    b, s = inputs["tokens"].shape
    kwargs.setdefault("attention_pairs", b * s * s)
    return flops.step_flops(model, num_rows=b, seq_len=s, encoder_input=inputs["encoder_input"], **kwargs)


TOY_FLAGS = pytest.mark.parametrize(
    "flags",
    [{}, {"encoder_trainable": True}, {"fusion_trainable": False, "decoder_trainable": True}],
    ids=["fusion_only", "encoder_trainable", "frozen_encoder_and_head"],
)


@pytest.mark.parametrize(
    ("flags", "num_patches"),
    [({}, 6), ({"encoder_trainable": True}, 9), ({"fusion_trainable": False, "decoder_trainable": True}, 6)],
    ids=["fusion_only", "encoder_trainable", "frozen_encoder_and_head"],
)
def test_unknown_encoder_step_matches_counter(flags: dict, num_patches: int) -> None:
    """A whole training step with an encoder the analytic count does not know: the generic
    encoder count plus the analytic decoder count equal FlopCounterMode on the real step."""
    model = _toy_model(**flags)
    inputs = _toy_inputs(num_patches)
    forward, backward = _measure(model, inputs)
    count = _generic_count(model, inputs)
    assert (count.forward, count.backward) == (forward, backward)
    assert count.parts["encoder"][0] > 0 and count.parts["fusion.cross_attention"][0] > 0
    assert not any(name in count.parts for name in ("encoder.vision", "encoder.projection"))


@TOY_FLAGS
def test_unknown_encoder_part_matches_real_encoder(flags: dict) -> None:
    """The ``encoder`` part equals FlopCounterMode on the real encoder's forward + backward, and
    trainability sets the backward: a frozen encoder with a trainable head costs the head's weight
    gradient only (its input needs none); a trainable encoder more; a frozen head nothing."""
    model = _toy_model(**flags)
    inputs = _toy_inputs()
    count = _generic_count(model, inputs)
    assert count.parts["encoder"] == _measure_encoder(model.encoder, inputs["encoder_input"])
    fwd, bwd = count.parts["encoder"]
    head = model.encoder.projection
    head_weight_grad = 2 * B * 6 * head.in_features * head.out_features
    if flags.get("encoder_trainable"):
        assert bwd > fwd
    elif flags.get("fusion_trainable", True):
        assert bwd == head_weight_grad
    else:
        assert bwd == 0
        # nothing sends a gradient into the frozen embeddings: no k/v input gradients
        assert count.parts["fusion.cross_attention"][1] < 2 * count.parts["fusion.cross_attention"][0]


def test_unknown_encoder_through_micro_batch_flops() -> None:
    model = _toy_model()
    inputs = _toy_inputs()
    batch = Batch(
        tokens=inputs["tokens"],
        labels=inputs["tokens"],
        input_pos=torch.zeros_like(inputs["tokens"]),
        is_real=torch.ones_like(inputs["tokens"], dtype=torch.bool),
        encoder_input=inputs["encoder_input"],
        encoder_mask=inputs["encoder_mask"],
    )
    expected = _generic_count(model, inputs, attention_pairs=None)
    assert flops.micro_batch_flops(model, batch) == expected
    assert flops.micro_batch_flops_or_none(model, batch) == expected
    from fusiontrain.flops import probe as flop_probe

    flop_probe.clear_encoder_cache()
    with torch.inference_mode():  # a training step's count, whatever the caller's grad mode
        assert flops.micro_batch_flops(model, batch) == expected
    assert flops.step_flops(model, num_rows=B, seq_len=12) != expected  # text only
    with pytest.raises(ValueError, match="pass encoder_input"):
        flops.step_flops(model, num_rows=B, seq_len=12, images=B)


def test_generic_count_runs_once_per_shape() -> None:
    """Cached per (encoder, input shapes, requires-grad pattern): a new shape or trainability
    re-runs the fake trace, new values of the same shapes do not."""
    from unittest import mock

    from fusiontrain.flops import probe as flop_probe

    model = _toy_model()
    with mock.patch.object(flop_probe, "_trace_encoder", wraps=flop_probe._trace_encoder) as trace:
        first = _generic_count(model, _toy_inputs(6))
        again = _toy_inputs(6)
        again["encoder_input"] = {k: v.clone() for k, v in again["encoder_input"].items()}
        again["encoder_input"]["patch_mask"].fill_(True)  # other values, same shapes
        assert _generic_count(model, again) == first
        assert trace.call_count == 1
        _generic_count(model, _toy_inputs(9))
        assert trace.call_count == 2
        model.encoder.patch_embed.requires_grad_(True)
        trainable = _generic_count(model, _toy_inputs(6))
        assert trace.call_count == 3
        assert trainable.parts["encoder"][1] > first.parts["encoder"][1]
        _generic_count(model, _toy_inputs(6))
        assert trace.call_count == 3


class _ValueReadingEncoder(torch.nn.Module):
    """Branches on the value of its (floating-point) pixels: fake tensors have none."""

    def __init__(self) -> None:
        super().__init__()
        from fusiontrain.modules import register_fusion_module

        self.projection = register_fusion_module(torch.nn.Linear(12, 64))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if patches.abs().max().item() > 100:
            patches = patches / 100
        return self.projection(patches)


def test_uncountable_encoder_gives_none_and_one_warning(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from unittest import mock

    from fusiontrain.flops import probe as flop_probe
    from fusiontrain.modules import DeepFusionModel

    model = DeepFusionModel(random_mllama().decoder, _ValueReadingEncoder()).train()
    tokens = torch.randint(0, 128, (B, 12))
    batch = Batch(
        tokens=tokens,
        labels=tokens,
        input_pos=torch.zeros_like(tokens),
        is_real=torch.ones_like(tokens, dtype=torch.bool),
        encoder_input={"patches": torch.randn(B, 6, 12)},
        encoder_mask=torch.ones(B, 12, 6, dtype=torch.bool),
    )
    with pytest.raises(Exception, match="DataDependent|_local_scalar_dense"):
        flops.micro_batch_flops(model, batch)  # the plain count raises ...

    monkeypatch.setattr(flops, "_warned_unavailable", False)
    caplog.set_level(logging.WARNING, logger="fusiontrain.flops.count")
    with mock.patch.object(flop_probe, "_trace_encoder", wraps=flop_probe._trace_encoder) as trace:
        assert flops.micro_batch_flops_or_none(model, batch) is None  # ... this one does not
        assert flops.micro_batch_flops_or_none(model, batch) is None
        assert trace.call_count == 0  # the failure was cached by the first call above
    warnings = [r for r in caplog.records if r.name == "fusiontrain.flops.count" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "_ValueReadingEncoder" in warnings[0].getMessage() and "EncoderCountError" in warnings[0].getMessage()

    # a counting failure of any other kind (here: an unknown decoder layer) is caught as well
    broken = _toy_model()
    broken.decoder.layers[0] = torch.nn.Identity()
    assert flops.micro_batch_flops_or_none(broken, batch) is None
    assert len([r for r in caplog.records if r.name == "fusiontrain.flops.count"]) == 1  # still one warning


@pytest.mark.parametrize("flags", [{}, {"encoder_trainable": True}, {"fusion_trainable": False}])
def test_generic_count_equals_analytic_mllama_encoder(flags: dict) -> None:
    """Cross-check: the generic count of Mllama's tiled ViT (run under no_grad when frozen) equals
    the analytic one, forward and backward."""
    from fusiontrain.flops import probe as flop_probe

    model = _training_model(**flags)
    pixels = random_pixels(IMAGES)
    pixels["image_slots"] = (pixels["aspect_ratio_ids"].flatten() > 0).nonzero().squeeze(1)  # as the collator lists them
    # 3 images: the padding slot is not encoded; each row still has 2 slots' columns
    analytic = flops.step_flops(model, num_rows=B, seq_len=S, images=3, encoder_seq_len=2 * 2 * 5).parts
    cost = flop_probe.measure_encoder_flops(model.encoder, pixels)
    expected = [sum(part) for part in zip(analytic["encoder.vision"], analytic["encoder.projection"])]
    assert [cost.forward, cost.backward] == expected
    assert cost.output_shape[:2] == (B, 2 * 2 * 5)


@pytest.mark.parametrize("family", ["siglip2", "dinov2"])
def test_generic_count_hf_towers(family: str) -> None:
    """New HF towers, unknown to the analytic count. SigLIP2 NaFlex resizes its position
    embeddings to the values of ``spatial_shapes`` (kept real); the grid differs per image."""
    import transformers

    if family == "siglip2":
        config = transformers.Siglip2VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4, num_patches=16
        )
        tower = transformers.Siglip2VisionModel(config)
        mask = torch.ones(B, 16, dtype=torch.long)
        mask[1, 12:] = 0  # a 3x4 grid, padded to 16 patches
        encoder_input = {
            "pixel_values": torch.randn(B, 16, 48),
            "pixel_attention_mask": mask,
            "spatial_shapes": torch.tensor([[4, 4], [3, 4]]),
        }
    else:
        config = transformers.Dinov2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16
        )
        tower = transformers.Dinov2Model(config)
        encoder_input = {"pixel_values": torch.randn(B, 3, 16, 16)}

    class TowerEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            from fusiontrain.modules import register_fusion_module

            self.tower = tower
            self.projection = register_fusion_module(torch.nn.Linear(32, 64))

        def forward(self, **kwargs: torch.Tensor) -> torch.Tensor:
            return self.projection(self.tower(**kwargs).last_hidden_state)

    from fusiontrain.flops import probe as flop_probe

    encoder = TowerEncoder().train()
    cost = flop_probe.measure_encoder_flops(encoder, encoder_input)
    assert (cost.forward, cost.backward) == _measure_encoder(encoder, encoder_input)
    assert cost.output_shape == (B, 16 if family == "siglip2" else 17, 64) and cost.output_requires_grad


def test_generic_count_of_fsdp_sharded_meta_encoder() -> None:
    """Meta parameters, and FSDP2 shards (DTensors over meta) behind activation-checkpoint wrappers,
    count like the real encoder: full shapes, no FSDP hook (no collective: with its hooks this meta
    encoder would fail to unshard) and no recompute; other hooks still run."""
    from torch.distributed.fsdp import fully_shard

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh

    from fusiontrain.flops import probe as flop_probe
    from fusiontrain.plan.trace import fake_process_group

    encoder_input = _toy_inputs()["encoder_input"]
    plain = ToyEncoder()
    plain.patch_embed.requires_grad_(False)
    expected = flop_probe.measure_encoder_flops(plain, encoder_input)
    assert (expected.forward, expected.backward) == _measure_encoder(plain, encoder_input)

    with torch.device("meta"):
        on_meta = ToyEncoder()
    on_meta.patch_embed.requires_grad_(False)
    assert flop_probe.measure_encoder_flops(on_meta, encoder_input) == expected

    calls = {"user": 0, "distributed": 0}

    def user_hook(*_: object) -> None:
        calls["user"] += 1

    def distributed_hook(*_: object) -> None:
        calls["distributed"] += 1

    distributed_hook.__module__ = "torch.distributed.fsdp.test_only"
    with fake_process_group(4):
        mesh = init_device_mesh("cpu", (4,))
        with torch.device("meta"):
            sharded = ToyEncoder()
        sharded.patch_embed.requires_grad_(False)
        sharded.blocks[0] = checkpoint_wrapper(sharded.blocks[0])
        for block in sharded.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        sharded.norm.register_forward_hook(user_hook)
        sharded.norm.register_forward_hook(distributed_hook)
        assert sharded.patch_embed.weight.to_local().shape[0] == 32 // 4
        got = flop_probe.measure_encoder_flops(sharded, encoder_input)
    assert got == expected
    assert calls == {"user": 1, "distributed": 0}


@pytest.mark.parametrize("encoder_trainable", [False, True], ids=["fusion-only", "encoders-trained"])
def test_an_encoder_per_modality_matches_counter(encoder_trainable: bool) -> None:
    """Vision (SigLIP) and audio (Whisper, counted analytically: every clip runs the whole window,
    the projection only the packed real tokens) on one decoder, each modality's cross-attention
    over its own s_e, exactly as FlopCounterMode sees the step; a batch without audio runs neither
    the audio encoder nor its cross-attention."""
    from fusiontrain import tiny
    from fusiontrain.data.batch import Sample, collate_padded
    from fusiontrain.families import TrainableFlags, model_family

    family = model_family("composed")
    torch.manual_seed(0)
    model = family.build(
        tiny.tiny_llama_config().to_dict(),
        {"image": tiny.tiny_siglip_vision_config().to_dict(), "audio": tiny.tiny_whisper_config().to_dict()},
        fusion_interval=2,
        fusion_vocab_size=2,
        fusion_placements={"image": [2, 1], "audio": [4, 0]},
        flags=TrainableFlags(encoder_trainable=encoder_trainable),
    ).train()
    model.set_skip_output_projection(True)
    formats = family.input_formats(model)
    generator = torch.Generator().manual_seed(1)

    def clip(frames: int) -> dict:
        return formats["audio"]._clip(frames, torch.randn(tiny.WHISPER_MEL_BINS, frames, generator=generator))

    image = {"pixel_values": torch.randn(3, 28, 28, generator=generator)}
    samples = [
        Sample(tokens=torch.randint(0, 128, (12,)), labels=torch.zeros(12, dtype=torch.long), images=[image],
               image_spans=[(1, 12)], other_items={"audio": [clip(37), clip(100)]}, other_spans={"audio": [(3, 6), (6, 12)]}),
        Sample(tokens=torch.randint(0, 128, (10,)), labels=torch.zeros(10, dtype=torch.long),
               other_items={"audio": [clip(9)]}, other_spans={"audio": [(2, 10)]}),
    ]
    batch = collate_padded(samples, 16, formats)
    assert batch.encoder_mask["audio"].shape[-1] == 19 + 50  # the first row's real tokens: ceil(37/2) + 50
    inputs = {"tokens": batch.tokens, "encoder_input": batch.encoder_input, "encoder_mask": batch.encoder_mask}
    forward, backward = _measure(model, inputs)
    count = flops.micro_batch_flops(model, batch, attention_pairs=batch.tokens.numel() * batch.tokens.shape[1])
    assert (count.forward, count.backward) == (forward, backward)
    assert count.parts["encoder.audio"][0] > 0 and (count.parts["encoder.audio"][1] > 0) == encoder_trainable

    image_only = collate_padded([Sample(tokens=samples[0].tokens, labels=samples[0].labels, images=[image], image_spans=[(1, 12)])], 16, formats)
    inputs = {"tokens": image_only.tokens, "encoder_input": image_only.encoder_input, "encoder_mask": image_only.encoder_mask}
    forward, backward = _measure(model, inputs)
    count = flops.micro_batch_flops(model, image_only, attention_pairs=image_only.tokens.numel() * image_only.tokens.shape[1])
    assert (count.forward, count.backward) == (forward, backward) and "encoder.audio" not in count.parts
