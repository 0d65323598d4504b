"""Packed attention (fusiontrain.modules.packed) against the dense-mask path it replaces on CPU.

Every comparison is against an independent computation: SDPA over the whole rows under the dense
block-diagonal (self) or encoder (cross) mask, outputs and gradients, at fp32.
"""

from __future__ import annotations

import pytest
import torch

from fusiontrain.data.batch import Batch
from fusiontrain.families.llama import LlamaDecoderArgs, llama_cross_attention_layer
from fusiontrain.modules.attention import attend
from fusiontrain.modules.masks import block_causal_mask, encoder_block_mask
from fusiontrain.modules.packed import CrossAttentionLayout, cross_attention_layout, padded_length, self_attention_layout

ATOL = 2e-6  # fp32 rounding: the same sums in another order


def close(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    """Equal up to fp32 rounding, scaled by the reference's magnitude (a gradient of size 6 sums
    hundreds of products; a few ulps of it exceed ATOL, and how many depends on the CPU's kernels)."""
    return (ours - reference).abs().max() <= ATOL * max(1.0, reference.abs().max().item())


def segments(*rows: list[int]) -> torch.Tensor:
    """``[b, s]`` segment ids from each row's segment lengths."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def qkv(b: int, s: int, n_h: int, n_kv: int, h_d: int = 8) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(b, n, s, h_d, requires_grad=True) for n in (n_h, n_kv, n_kv)]


def grads(output: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
    return list(torch.autograd.grad((output * weights).sum(), inputs))


@pytest.mark.parametrize("n_kv", [4, 2], ids=["mha", "gqa"])
def test_self_attention_layout_equals_the_dense_block_causal_mask(n_kv: int) -> None:
    # Many segments (lengths 1 to 70, several padded to one group), a single segment, and a row
    # ending in padding (its own segment).
    ids = segments([3, 1, 17, 70, 5, 5, 5, 22, 32, 33, 31], [224], [100, 90, 34])
    q, k, v = qkv(3, 224, 4, n_kv)
    layout = self_attention_layout(ids)
    assert sum(g.count for g in layout.groups) == 11 + 1 + 3
    assert len(layout.groups) < 15  # segments share calls

    dense = attend(q, k, v, mask=block_causal_mask(ids))
    packed = attend(q, k, v, mask=layout)
    assert (packed - dense).abs().max() <= ATOL
    for ours, reference in zip(grads(packed, [q, k, v]), grads(dense, [q, k, v])):
        assert close(ours, reference)


def test_self_attention_layout_refuses_a_segment_split_in_two() -> None:
    ids = torch.tensor([[0, 0, 1, 1, 0, 2]])
    with pytest.raises(ValueError, match="row 0.*contiguous"):
        self_attention_layout(ids)


def test_group_lengths_round_up_by_at_most_an_eighth_above_256() -> None:
    lengths = torch.tensor([1, 31, 32, 33, 256, 257, 600, 1024, 1025]).numpy()
    assert padded_length(lengths).tolist() == [32, 32, 32, 64, 256, 288, 640, 1024, 1152]


def cross_layer(n_kv: int) -> torch.nn.Module:
    args = LlamaDecoderArgs(
        vocab_size=16, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=n_kv, head_dim=8,
        rms_norm_eps=1e-5, rope_theta=10_000.0, rope_scaling=None, max_seq_len=64,
    )  # fmt: skip
    torch.manual_seed(0)
    layer = llama_cross_attention_layer(args)
    with torch.no_grad():  # open the gates (shut at init), so images change the output
        layer.ca_scale.scale.fill_(0.7)
        layer.mlp_scale.scale.fill_(-0.4)
    return layer


def packed_encoder_mask() -> torch.Tensor:
    """``[2, 40, 30]``: row 0 holds two samples (images of 10 encoder tokens at columns 0-9 and
    10-19, the first seen by tokens 2-11, the second by 15-24 with 3 of its columns padding),
    then text that sees no image; row 1 has tokens that see two images at once, then one."""
    mask = torch.zeros(2, 40, 30, dtype=torch.bool)
    mask[0, 2:12, 0:10] = True
    mask[0, 15:25, 10:17] = True
    mask[1, 0:5, 0:20] = True
    mask[1, 5:33, 10:20] = True
    return mask


@pytest.mark.parametrize("n_kv", [4, 2], ids=["mha", "gqa"])
def test_gathered_cross_attention_equals_the_dense_encoder_mask(n_kv: int) -> None:
    layer = cross_layer(n_kv)
    mask = packed_encoder_mask()
    torch.manual_seed(1)
    x = torch.randn(2, 40, 32, requires_grad=True)
    encoder = torch.randn(2, 30, 32, requires_grad=True)
    layout = cross_attention_layout(mask)
    assert layout.token_index.numel() == int(mask.any(-1).sum())

    dense = layer(x, encoder_input=encoder, encoder_mask=mask)
    packed = layer(x, encoder_input=encoder, encoder_mask=layout)
    assert (packed - dense).abs().max() <= ATOL
    sees_nothing = ~mask.any(-1)
    assert torch.equal(packed[sees_nothing], x[sees_nothing])  # exact zeros from both branches
    assert torch.equal(dense[sees_nothing], x[sees_nothing])
    inputs = [x, encoder, *layer.parameters()]
    for ours, reference in zip(grads(packed, inputs), grads(dense, inputs)):
        assert (ours - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item())


def test_gathered_cross_attention_with_no_token_seeing_an_image_keeps_every_parameter_in_the_graph() -> None:
    # A rank's blank placeholder image: FSDP needs every parameter's (zero) gradient on every rank.
    layer = cross_layer(2)
    x = torch.randn(2, 12, 32, requires_grad=True)
    encoder = torch.randn(2, 10, 32, requires_grad=True)
    layout = cross_attention_layout(torch.zeros(2, 12, 10, dtype=torch.bool))
    out = layer(x, encoder_input=encoder, encoder_mask=layout)
    assert torch.equal(out, x)
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
    assert encoder.grad is not None and not encoder.grad.any()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_cross_attention_block_mask_equals_the_dense_encoder_mask() -> None:
    # The CUDA path, checked forward on the CPU (flex_attention has no CPU backward).
    layer = cross_layer(2)
    mask = packed_encoder_mask()
    x, encoder = torch.randn(2, 40, 32), torch.randn(2, 30, 32)
    with torch.no_grad():
        dense = layer(x, encoder_input=encoder, encoder_mask=mask)
        flex = layer(x, encoder_input=encoder, encoder_mask=encoder_block_mask(mask))
    assert (flex - dense).abs().max() <= ATOL


def test_batch_builds_layouts_on_the_host_and_carries_them() -> None:
    ids = segments([5, 3, 8], [16])
    mask = torch.zeros(2, 16, 4, dtype=torch.bool)
    mask[0, 0:5, 0:2] = True
    batch = Batch(
        tokens=torch.zeros(2, 16, dtype=torch.long), labels=torch.zeros(2, 16, dtype=torch.long),
        input_pos=torch.zeros(2, 16, dtype=torch.long), is_real=torch.ones(2, 16, dtype=torch.bool),
        segment_ids=ids, encoder_input={"pixel_values": torch.zeros(2, 1, 3)}, encoder_mask=mask,
    )  # fmt: skip
    moved = batch.to("cpu")  # builds the layouts on the host, then copies them along
    assert batch.layouts is not None and moved.layouts is not None and moved.layouts.belongs_to(moved)
    inputs = moved.model_inputs()
    assert inputs["mask"] is moved.layouts.self_attention
    assert isinstance(inputs["encoder_mask"], CrossAttentionLayout)
    assert inputs["encoder_mask"].token_index.tolist() == [0, 1, 2, 3, 4]
    # A replaced encoder mask (a rank's placeholder image) gets its own layout.
    moved.encoder_mask = torch.zeros_like(mask)
    assert moved.model_inputs()["encoder_mask"].token_index.numel() == 0
    text_only = Batch(tokens=batch.tokens, labels=batch.labels, input_pos=batch.input_pos, is_real=batch.is_real)
    assert text_only.model_inputs()["encoder_mask"] is None
    # Layouts need values: a batch mapped to meta tensors before they were built says so.
    fresh = Batch(tokens=batch.tokens, labels=batch.labels, input_pos=batch.input_pos, is_real=batch.is_real, segment_ids=ids)
    with pytest.raises(ValueError, match="real host values"):
        fresh.map(lambda t: t.to("meta")).model_inputs()
