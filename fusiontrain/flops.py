"""Model FLOPs of a training step, device peak FLOP/s, and model FLOPs utilisation (MFU).

:func:`step_flops` counts the matmul FLOPs (``2 * m * n * k`` per ``[m, k] @ [k, n]``, and the
same for the patch convolution) of one micro-batch's forward and backward, reading every width
from the model's modules. :func:`micro_batch_flops` takes the numbers from a
:class:`~fusiontrain.data.Batch`. :func:`mfu` divides by time and :func:`device_peak_flops`.

What is counted (forward; ``T = b * s`` token slots, ``P`` attended self-attention pairs,
``s_e`` encoder tokens per row, ``w = n_h * h_d`` the query width, ``w_kv = n_kv * h_d``):

- self-attention layer: projections ``2T (d w + 2 d w_kv + w d)``, scores and values ``4 w P``;
- cross-attention layer: ``q``/``o`` on text ``2T (d w + w d)``, ``k``/``v`` on the encoder tokens
  of every row ``2 (b s_e) 2 d w_kv``, scores and values ``4 w T s_e`` (dense: every token is
  multiplied with every encoder token, whatever the encoder mask says);
- MLPs: ``2T`` times the sum of ``in * out`` of their linears (SwiGLU: ``3 d f``);
- output projection ``2T d v`` (the chunked loss applies it; see "recompute" below);
- encoder: the patch convolution, every ViT / tower layer (dense attention over the tokens of an
  image: Mllama's ``t * p_pad`` padded tile tokens, all ``max_num_tiles`` tiles of every image
  slot, padding slots included, because that is what runs), SigLIP's attention-pooling head (it
  runs in forward although its output is unused), and the projection head.

Backward: every matmul whose output needs a gradient costs its forward FLOPs once per operand
that needs one: the weight gradient when the weight is trainable, the input gradient when the
input requires grad. Requires-grad is propagated through the model the way autograd does it: an
activation requires grad when its input does or a parameter on the way is trainable. So a frozen
decoder layer above a trainable fusion layer (or above the trainable fusion embedding rows, which
make every decoder activation require grad) costs 1x its forward in backward (input gradients
only), a trainable layer 2x, and a frozen encoder (run under ``no_grad``) 0x; the projection head
and cross-attention, trainable and fed by grad-requiring inputs, cost 2x. The attention core is
two matmuls per head, ``q k^T`` and ``probs v``, each with its operands' gradients.

Attention pairs. MFU counts only the (query, key) pairs that are attended, as is standard for
causal models: ``s (s + 1) / 2`` per unpacked row, ``sum n (n + 1) / 2`` over the segments of a
packed row (block-diagonal causal). Kernels do at least this much (flash/flex attention skip fully
masked blocks); ``torch.utils.flop_counter.FlopCounterMode`` instead counts every attention as the
full ``s * s`` square (and the PaLM / torchtitan ``12 L d s`` rule also counts the full square);
pass ``attention_pairs = b * s * s`` to reproduce that convention. Cross-attention and the encoder's
attention are counted dense, which is what their kernels compute.

Recompute is not counted: activation checkpointing and the chunked loss re-run forwards in
backward (hardware FLOPs, "HFU"), but model FLOPs count each op once; so does the recompute of
the attention scores inside flash-attention backward (FlopCounterMode counts that backward as
2.5x its forward, this count as 2x). Nor are non-matmul ops (norms, softmax, activations,
elementwise), as usual.

Only shapes and ``requires_grad`` are read, so a meta-device or FSDP-sharded model works too.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fusiontrain.modules.attention import MultiHeadAttention
from fusiontrain.modules.fusion import FusionLayer
from fusiontrain.modules.layers import FeedForward
from fusiontrain.modules.transformer import (
    TransformerCrossAttentionLayer,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)
from fusiontrain.modules.vision import _PAD_MULTIPLE, MllamaVisionEncoder

__all__ = [
    "PEAK_FLOPS",
    "FlopCount",
    "causal_attention_pairs",
    "device_peak_flops",
    "measure_matmul_flops",
    "mfu",
    "micro_batch_flops",
    "packed_attention_pairs",
    "peak_flops_for_name",
    "step_flops",
]


# -- the count ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward + backward.

    Attributes:
        forward: forward FLOPs.
        backward: backward FLOPs (weight and input gradients; no recompute).
        parts: ``{part: (forward, backward)}`` by component (``decoder.self_attention``,
            ``decoder.mlp``, ``decoder.output``, ``fusion.cross_attention``, ``fusion.mlp``,
            ``encoder.vision``, ``encoder.projection``), for inspection.
    """

    forward: int = 0
    backward: int = 0
    parts: Mapping[str, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def total(self) -> int:
        """Forward plus backward FLOPs."""
        return self.forward + self.backward

    def __add__(self, other: FlopCount) -> FlopCount:
        if not isinstance(other, FlopCount):
            return NotImplemented
        parts = dict(self.parts)
        for name, (fwd, bwd) in other.parts.items():
            old_fwd, old_bwd = parts.get(name, (0, 0))
            parts[name] = (old_fwd + fwd, old_bwd + bwd)
        return FlopCount(self.forward + other.forward, self.backward + other.backward, parts)

    def __radd__(self, other: Any) -> FlopCount:
        if other == 0:  # sum(counts)
            return self
        return NotImplemented


class _Tally:
    """Accumulates (forward, backward) FLOPs per part."""

    def __init__(self) -> None:
        self.parts: dict[str, list[int]] = {}

    def add(self, part: str, forward: int, grads: int) -> None:
        """One matmul-like op of ``forward`` FLOPs whose backward computes ``grads`` operand
        gradients, each as costly as the forward."""
        entry = self.parts.setdefault(part, [0, 0])
        entry[0] += forward
        entry[1] += forward * grads

    def result(self) -> FlopCount:
        parts = {name: (fwd, bwd) for name, (fwd, bwd) in self.parts.items()}
        return FlopCount(sum(f for f, _ in parts.values()), sum(b for _, b in parts.values()), parts)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside activation-checkpoint and ``torch.compile`` wrappers."""
    while True:
        inner = getattr(module, "_checkpoint_wrapped_module", None)
        if inner is None:
            inner = getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


def _trainable(*modules: nn.Module | nn.Parameter | None) -> bool:
    """Whether any parameter of ``modules`` requires grad."""
    for module in modules:
        if module is None:
            continue
        if isinstance(module, nn.Parameter):
            if module.requires_grad:
                return True
        elif any(p.requires_grad for p in module.parameters()):
            return True
    return False


def _linear(tally: _Tally, part: str, linear: nn.Module, tokens: int, x_grad: bool) -> bool:
    """``linear`` applied to ``tokens`` rows; returns whether its output requires grad."""
    linear = _unwrap(linear)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear projection, got {type(linear).__name__}")
    weight_grad = linear.weight.requires_grad
    tally.add(part, 2 * tokens * linear.in_features * linear.out_features, int(x_grad) + int(weight_grad))
    return x_grad or weight_grad or (linear.bias is not None and linear.bias.requires_grad)


def _attention_core(tally: _Tally, part: str, width: int, pairs: int, q: bool, k: bool, v: bool) -> bool:
    """``softmax(q k^T) v`` over ``pairs`` (query, key) pairs, all heads together ``width``
    features wide (``n_h * h_d``; GQA keys/values are shared, not narrower, in the matmuls)."""
    flops = 2 * width * pairs
    tally.add(part, flops, int(q) + int(k))  # scores = q @ k^T
    tally.add(part, flops, int(q or k) + int(v))  # out = probs @ v
    return q or k or v


def _multi_head_attention(
    tally: _Tally,
    part: str,
    attn: MultiHeadAttention,
    *,
    q_tokens: int,
    kv_tokens: int,
    pairs: int,
    x_grad: bool,
    y_grad: bool,
) -> bool:
    q = _linear(tally, part, attn.q_proj, q_tokens, x_grad) or _trainable(attn.q_norm)
    k = _linear(tally, part, attn.k_proj, kv_tokens, y_grad) or _trainable(attn.k_norm)
    v = _linear(tally, part, attn.v_proj, kv_tokens, y_grad)
    out = _attention_core(tally, part, attn.num_heads * attn.head_dim, pairs, q, k, v)
    return _linear(tally, part, attn.output_proj, q_tokens, out)


def _mlp(tally: _Tally, part: str, mlp: nn.Module, tokens: int, x_grad: bool) -> bool:
    mlp = _unwrap(mlp)
    if isinstance(mlp, FeedForward):
        hidden = _linear(tally, part, mlp.w1, tokens, x_grad)
        if mlp.w3 is not None:
            hidden = _linear(tally, part, mlp.w3, tokens, x_grad) or hidden
        return _linear(tally, part, mlp.w2, tokens, hidden)
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):  # HF CLIP / SigLIP MLP
        hidden = _linear(tally, part, mlp.fc1, tokens, x_grad)
        return _linear(tally, part, mlp.fc2, tokens, hidden)
    raise TypeError(f"don't know how to count FLOPs of a {type(mlp).__name__} MLP")


def _self_attention_layer(
    tally: _Tally,
    parts: tuple[str, str],
    layer: TransformerSelfAttentionLayer,
    *,
    tokens: int,
    pairs: int,
    x_grad: bool,
) -> bool:
    """``h = x + sa_scale(attn(sa_norm(x)))``; ``h + mlp_scale(mlp(mlp_norm(h)))``."""
    normed = x_grad or _trainable(layer.sa_norm)
    attn = _multi_head_attention(
        tally, parts[0], layer.attn, q_tokens=tokens, kv_tokens=tokens, pairs=pairs, x_grad=normed, y_grad=normed
    )
    h = x_grad or attn or _trainable(layer.sa_scale)
    mlp = _mlp(tally, parts[1], layer.mlp, tokens, h or _trainable(layer.mlp_norm))
    return h or mlp or _trainable(layer.mlp_scale)


def _cross_attention_layer(
    tally: _Tally,
    layer: TransformerCrossAttentionLayer,
    *,
    tokens: int,
    encoder_tokens: int,
    pairs: int,
    x_grad: bool,
    encoder_grad: bool,
) -> bool:
    """Gated cross-attention to the encoder embeddings, then a gated MLP."""
    normed = x_grad or _trainable(layer.ca_norm)
    attn = _multi_head_attention(
        tally,
        "fusion.cross_attention",
        layer.attn,
        q_tokens=tokens,
        kv_tokens=encoder_tokens,
        pairs=pairs,
        x_grad=normed,
        y_grad=encoder_grad,
    )
    h = x_grad or attn or _trainable(layer.ca_scale)
    mlp = _mlp(tally, "fusion.mlp", layer.mlp, tokens, h or _trainable(layer.mlp_norm))
    return h or mlp or _trainable(layer.mlp_scale)


def _decoder(
    tally: _Tally,
    decoder: TransformerDecoder,
    *,
    num_rows: int,
    seq_len: int,
    attention_pairs: int,
    encoder_seq_len: int,
    encoder_grad: bool,
) -> None:
    tokens = num_rows * seq_len
    h = _trainable(decoder.tok_embeddings)

    def layer_flops(layer: nn.Module, h: bool) -> bool:
        layer = _unwrap(layer)
        if isinstance(layer, FusionLayer):
            order = (layer.fusion_layer, layer.layer) if layer.fusion_first else (layer.layer, layer.fusion_layer)
            for part in order:
                h = layer_flops(part, h)
            return h
        if isinstance(layer, TransformerCrossAttentionLayer):
            if not encoder_seq_len:  # no encoder input: the layer returns its input
                return h
            return _cross_attention_layer(
                tally,
                layer,
                tokens=tokens,
                encoder_tokens=num_rows * encoder_seq_len,
                pairs=tokens * encoder_seq_len,
                x_grad=h,
                encoder_grad=encoder_grad,
            )
        if isinstance(layer, TransformerSelfAttentionLayer):
            return _self_attention_layer(
                tally, ("decoder.self_attention", "decoder.mlp"), layer, tokens=tokens, pairs=attention_pairs, x_grad=h
            )
        raise TypeError(f"don't know how to count FLOPs of a {type(layer).__name__} decoder layer")

    for layer in decoder.layers:
        h = layer_flops(layer, h)
    _linear(tally, "decoder.output", decoder.output, tokens, h or _trainable(decoder.norm))


# -- encoders -------------------------------------------------------------------------------------


def _conv_flops(conv: nn.Module, count: int, size: int) -> int:
    """FLOPs of ``conv`` (a 2-d convolution) over ``count`` square inputs of ``size`` pixels."""
    conv = _unwrap(conv)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an nn.Conv2d patch embedding, got {type(conv).__name__}")
    positions = 1
    for dim in range(2):
        kernel, stride, dilation = conv.kernel_size[dim], conv.stride[dim], conv.dilation[dim]
        if conv.padding == "same":
            out = size
        else:
            padding = 0 if conv.padding == "valid" else conv.padding[dim]
            out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        positions *= out
    per_position = conv.out_channels * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
    return 2 * count * positions * per_position


def _mllama_encoder(tally: _Tally, encoder: MllamaVisionEncoder, images: int) -> tuple[int, bool]:
    """Tiled ViT + projection head over ``images`` image slots; returns (tokens per image slot,
    whether the embeddings require grad)."""
    vision, head = encoder.vision, encoder.projection
    args = vision.args
    tiles = images * args.max_num_tiles
    p = args.tokens_per_tile
    p_pad = -(-p // _PAD_MULTIPLE) * _PAD_MULTIPLE
    seq = args.max_num_tiles * p_pad  # an image's tiles attend to each other
    tokens, pairs = images * seq, images * seq * seq

    # Pixels never require grad: the patch convolution only ever computes a weight gradient.
    conv_flops = _conv_flops(vision.conv, tiles, args.image_size)
    tally.add("encoder.vision", conv_flops, int(vision.conv.weight.requires_grad))
    x = _trainable(
        vision.conv, vision.class_embedding, vision.pre_tile_pos_embed, vision.token_pos_embed, vision.ln_pre
    )
    outputs = []
    for layer in vision.layers:
        x = _self_attention_layer(
            tally, ("encoder.vision", "encoder.vision"), _unwrap(layer), tokens=tokens, pairs=pairs, x_grad=x
        )
        outputs.append(x)
    intermediate = any(outputs[i] for i in args.intermediate_layers_indices)
    x = x or _trainable(vision.ln_post, vision.post_tile_pos_embed)

    for layer in head.layers:
        x = _self_attention_layer(
            tally, ("encoder.projection", "encoder.projection"), _unwrap(layer), tokens=tokens, pairs=pairs, x_grad=x
        )
    # The projector sees the real (unpadded) tile tokens only.
    embeddings = _linear(tally, "encoder.projection", head.output, images * args.max_num_tiles * p, x or intermediate)
    return args.max_num_tiles * p, embeddings


def _hf_tower_layer(tally: _Tally, layer: nn.Module, *, tokens: int, pairs: int, x_grad: bool) -> bool:
    """A CLIP / SigLIP encoder layer: pre-norm attention and MLP, both residual."""
    attn = layer.self_attn
    normed = x_grad or _trainable(layer.layer_norm1)
    q = _linear(tally, "encoder.vision", attn.q_proj, tokens, normed)
    k = _linear(tally, "encoder.vision", attn.k_proj, tokens, normed)
    v = _linear(tally, "encoder.vision", attn.v_proj, tokens, normed)
    out = _attention_core(tally, "encoder.vision", _unwrap(attn.q_proj).out_features, pairs, q, k, v)
    h = _linear(tally, "encoder.vision", attn.out_proj, tokens, out) or x_grad
    mlp = _mlp(tally, "encoder.vision", layer.mlp, tokens, h or _trainable(layer.layer_norm2))
    return h or mlp


def _siglip_pooling_head(tally: _Tally, head: nn.Module, images: int, n_tok: int) -> None:
    """SigLIP's attention-pooling head: one probe query per image attends to the image's tokens.
    It runs in forward, but its output (``pooler_output``) is not used: no backward."""
    attention = head.attention
    e = attention.embed_dim
    kv_dim = e if attention.kdim is None else attention.kdim
    if attention.kdim != attention.vdim:
        raise TypeError("SigLIP pooling head with different key and value widths is not supported")
    q_flops = 2 * images * e * e
    kv_flops = 2 * images * n_tok * kv_dim * 2 * e
    core = 2 * 2 * e * images * n_tok  # 1 query per image and head
    out_flops = 2 * images * e * attention.out_proj.out_features
    tally.add("encoder.vision", q_flops + kv_flops + core + out_flops, 0)
    mlp = head.mlp
    tally.add("encoder.vision", sum(2 * images * m.in_features * m.out_features for m in (mlp.fc1, mlp.fc2)), 0)


def _hf_tower_encoder(tally: _Tally, encoder: nn.Module, images: int) -> tuple[int, bool]:
    """HF CLIP / SigLIP tower + MLP projection head over ``images`` images."""
    tower = encoder.tower
    body = getattr(tower, "vision_model", tower)  # transformers < 5 nests the tower one level deeper
    embeddings = body.embeddings
    n_tok = encoder.tokens_per_image
    tokens, pairs = images * n_tok, images * n_tok * n_tok

    conv = embeddings.patch_embedding
    tally.add("encoder.vision", _conv_flops(conv, images, encoder.image_size), int(conv.weight.requires_grad))
    x = _trainable(embeddings, getattr(body, "pre_layrnorm", None))
    for layer in body.encoder.layers:
        x = _hf_tower_layer(tally, _unwrap(layer), tokens=tokens, pairs=pairs, x_grad=x)
    head = getattr(body, "head", None)
    if head is not None and getattr(body, "use_head", True):
        _siglip_pooling_head(tally, head, images, n_tok)
    # CLIP's post_layernorm only touches the pooled token; SigLIP's normalises last_hidden_state.
    x = x or _trainable(getattr(body, "post_layernorm", None))

    projection = encoder.projection
    hidden = _linear(tally, "encoder.projection", projection.linear_1, tokens, x)
    return n_tok, _linear(tally, "encoder.projection", projection.linear_2, tokens, hidden)


def _encoder(tally: _Tally, encoder: nn.Module, images: int) -> tuple[int, bool]:
    encoder = _unwrap(encoder)
    if isinstance(encoder, MllamaVisionEncoder):
        return _mllama_encoder(tally, encoder, images)
    from fusiontrain.models.hf_vision import HFVisionTowerEncoder

    if isinstance(encoder, HFVisionTowerEncoder):
        return _hf_tower_encoder(tally, encoder, images)
    raise TypeError(f"don't know how to count FLOPs of a {type(encoder).__name__} encoder")


# -- public API -----------------------------------------------------------------------------------


def causal_attention_pairs(num_rows: int, seq_len: int) -> int:
    """Attended (query, key) pairs of causal self-attention over unpacked rows: ``s (s + 1) / 2``
    per row."""
    return num_rows * seq_len * (seq_len + 1) // 2


def packed_attention_pairs(segment_ids: torch.Tensor) -> int:
    """Attended (query, key) pairs of block-diagonal causal attention, ``[b, s]`` segment ids:
    ``sum n (n + 1) / 2`` over the segments of every row (padding, a segment of its own, included:
    its tokens attend within it, exactly as ``block_causal_mask`` says)."""
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [b, s], got {list(segment_ids.shape)}")
    if segment_ids.numel() == 0:
        return 0
    ids = segment_ids.long()
    ids = ids - ids.min()
    span = int(ids.max()) + 1
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None] * span
    counts = torch.bincount((ids + rows).flatten())
    return int((counts * (counts + 1) // 2).sum())


def step_flops(
    model: nn.Module,
    *,
    num_rows: int,
    seq_len: int,
    attention_pairs: int | None = None,
    images: int = 0,
    encoder_seq_len: int | None = None,
) -> FlopCount:
    """Model FLOPs of one forward + backward of ``model`` on one micro-batch.

    Trainability is read from ``requires_grad`` of the model's parameters (as the trainer's
    ``*_trainable`` flags set them); sizes from its modules (FSDP, activation-checkpoint and
    compile wrappers are seen through).

    Args:
        model: a :class:`~fusiontrain.modules.DeepFusionModel` (or a bare ``TransformerDecoder``).
        num_rows: rows ``b`` of the micro-batch.
        seq_len: token slots ``s`` per row (padding included: it is computed).
        attention_pairs: attended (query, key) pairs of self-attention, summed over the rows;
            None means causal over whole rows (:func:`causal_attention_pairs`); packed rows pass
            :func:`packed_attention_pairs`; ``b * s * s`` counts the full square.
        images: image slots the encoder processes (``b * i`` with ``i`` the padded images per
            row; Mllama runs all ``max_num_tiles`` tiles of each). 0: a text-only micro-batch,
            where neither the encoder nor the cross-attention layers run.
        encoder_seq_len: encoder tokens ``s_e`` per row that cross-attention sees; by default
            ``images / num_rows`` times the tokens per image.

    Returns:
        The forward and backward FLOPs.
    """
    model = _unwrap(model)
    if num_rows < 0 or seq_len < 0 or images < 0:
        raise ValueError("num_rows, seq_len and images must be >= 0")
    if attention_pairs is None:
        attention_pairs = causal_attention_pairs(num_rows, seq_len)
    tally = _Tally()
    if isinstance(model, TransformerDecoder):
        decoder, encoder = model, None
    else:
        decoder, encoder = _unwrap(model.decoder), getattr(model, "encoder", None)

    encoder_grad = False
    if images:
        if encoder is None or not num_rows:
            raise ValueError(f"images={images} needs an encoder and num_rows > 0")
        tokens_per_image, encoder_grad = _encoder(tally, encoder, images)
        if encoder_seq_len is None:
            if images % num_rows:
                raise ValueError(f"images ({images}) is not a multiple of num_rows ({num_rows}): pass encoder_seq_len")
            encoder_seq_len = images // num_rows * tokens_per_image
    elif encoder_seq_len:
        raise ValueError("encoder_seq_len given for a micro-batch without images")
    _decoder(
        tally,
        decoder,
        num_rows=num_rows,
        seq_len=seq_len,
        attention_pairs=attention_pairs,
        encoder_seq_len=encoder_seq_len or 0,
        encoder_grad=encoder_grad,
    )
    return tally.result()


def micro_batch_flops(model: nn.Module, batch: Any, *, attention_pairs: int | None = None) -> FlopCount:
    """:func:`step_flops` for a :class:`~fusiontrain.data.Batch` as the trainer feeds it.

    Reads ``b, s`` from ``batch.tokens``; the attended self-attention pairs from
    ``batch.segment_ids`` (block-diagonal causal) or, without them, causal rows; the image slots
    from ``batch.encoder_input["pixel_values"]`` (``[b, i, ...]``) and ``s_e`` from
    ``batch.encoder_mask``. ``attention_pairs`` overrides the pairs (e.g. ``b * s * s``).
    Packed batches cost two small device syncs (the segment counts) when ``batch`` is on a GPU;
    pass the CPU batch to avoid them.
    """
    num_rows, seq_len = batch.tokens.shape
    if attention_pairs is None and getattr(batch, "segment_ids", None) is not None:
        attention_pairs = packed_attention_pairs(batch.segment_ids)
    images, encoder_seq_len = 0, None
    if batch.encoder_input is not None:
        pixels = batch.encoder_input["pixel_values"]
        images = num_rows * (pixels.shape[1] if pixels.dim() >= 5 else 1)
        if batch.encoder_mask is not None:
            encoder_seq_len = batch.encoder_mask.shape[-1]
    return step_flops(
        model,
        num_rows=num_rows,
        seq_len=seq_len,
        attention_pairs=attention_pairs,
        images=images,
        encoder_seq_len=encoder_seq_len,
    )


def mfu(flops_per_step: float, step_time_s: float, peak_flops_per_device: float, num_devices: int = 1) -> float:
    """Model FLOPs utilisation: ``flops_per_step / (step_time_s * peak_flops_per_device * num_devices)``.

    ``flops_per_step`` is the FLOPs of the whole step on all ``num_devices`` devices (the sum of
    :func:`step_flops` over every micro-batch of every rank); pass one rank's FLOPs with
    ``num_devices=1`` for that rank's MFU.
    """
    if step_time_s <= 0:
        raise ValueError(f"step_time_s must be > 0, got {step_time_s}")
    if peak_flops_per_device <= 0:
        raise ValueError(f"peak_flops_per_device must be > 0, got {peak_flops_per_device}")
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    return flops_per_step / (step_time_s * peak_flops_per_device * num_devices)


# -- peak FLOP/s ----------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) BF16 tensor-core peak per GPU, in FLOP/s. NVIDIA's datasheets quote
# sparse figures, twice these.
PEAK_FLOPS: dict[str, float] = {
    # H100 SXM5: 989.4 TFLOPS dense BF16 (1978.9 with sparsity), NVIDIA H100 Tensor Core GPU
    # Architecture whitepaper, table "H100 SXM5"; = 528 tensor cores x 1024 FLOP/clock x 1.83 GHz.
    "H100 SXM": 989.4e12,
    # H200 (SXM): datasheet "BF16 Tensor Core 1,979 TFLOPS" with sparsity -> ~989.5 dense; the same
    # GH100 compute as H100 SXM (only the memory differs), so the whitepaper's 989.4.
    "H200": 989.4e12,
    # A100: 312 TFLOPS dense BF16 (624 with sparsity), NVIDIA A100 datasheet; the same for the
    # SXM4 80GB / 40GB and PCIe variants.
    "A100": 312e12,
    # B200 (HGX B200, 1000 W): 2.25 PFLOPS dense BF16 (4.5 PFLOPS per GPU with sparsity; HGX B200
    # 8-GPU board: 36 PFLOPS sparse), NVIDIA Blackwell datasheet.
    "B200": 2.25e15,
}

# torch.cuda.get_device_name() -> table entry; first match wins. Names seen in the wild: "NVIDIA
# H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA B200".
# Word boundaries keep "GH200" / "GB200" (other peaks) from matching "H200" / "B200".
_NAME_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bh100\b"), "H100 SXM"),
    (re.compile(r"\bh200\b"), "H200"),
    (re.compile(r"\ba100\b"), "A100"),
    (re.compile(r"\bb200\b"), "B200"),
)
# Variants whose peak differs from the table's: H100 PCIe / NVL and H200 NVL run lower clocks and
# power; a MIG slice has a fraction of the SMs.
_OTHER_VARIANTS = {"H100 SXM": re.compile(r"\b(pcie|nvl)\b"), "H200": re.compile(r"\bnvl\b")}
_MIG = re.compile(r"\bmig\b")


def peak_flops_for_name(name: str) -> float:
    """Dense BF16 peak FLOP/s of the GPU called ``name`` (``torch.cuda.get_device_name()``).

    Raises:
        ValueError: for a GPU (or a variant, or a MIG slice) not in :data:`PEAK_FLOPS`.
    """
    lowered = name.lower()
    if not _MIG.search(lowered):
        for pattern, key in _NAME_PATTERNS:
            if pattern.search(lowered):
                variant = _OTHER_VARIANTS.get(key)
                if variant is None or not variant.search(lowered):
                    return PEAK_FLOPS[key]
                break
    raise ValueError(
        f"no peak FLOP/s known for GPU {name!r} (known: {', '.join(PEAK_FLOPS)}); pass the peak explicitly"
    )


@functools.lru_cache(maxsize=None)
def measure_matmul_flops(
    device: str = "cpu", *, size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32
) -> float:
    """Best FLOP/s of ``repeats`` ``[size, size] @ [size, size]`` matmuls on ``device``.

    A *measured*, not a nominal, peak: what this process achieves on a large matmul with its
    current threads, dtype and clocks (about 0.1 s on a CPU). Cached per process, so it is
    measured once, at the first call.
    """
    target = torch.device(device)
    a = torch.randn(size, size, device=target, dtype=dtype)
    b = torch.randn(size, size, device=target, dtype=dtype)
    out = torch.empty(size, size, device=target, dtype=dtype)

    def sync() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    torch.mm(a, b, out=out)  # warm up
    sync()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def device_peak_flops(device: torch.device | str | int | None = None) -> float:
    """Peak FLOP/s of one ``device``.

    CUDA: the dense BF16 entry of :data:`PEAK_FLOPS` matched against
    ``torch.cuda.get_device_name(device)`` (ValueError for an unknown GPU). CPU: a matmul peak
    *measured* now (fp32, :func:`measure_matmul_flops`), not a nominal figure, so MFU on a CPU is
    relative to the best this machine showed on a large matmul.

    Args:
        device: a device, its name or CUDA index; None for the current CUDA device, or the CPU
            when CUDA is unavailable.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    elif isinstance(device, int):
        device = torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda":
        return peak_flops_for_name(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return measure_matmul_flops("cpu")
    raise ValueError(f"no peak FLOP/s for a {device.type} device")
