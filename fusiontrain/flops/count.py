"""Model FLOPs of a training step.

:func:`step_flops` counts the matmul FLOPs (``2 * m * n * k`` per ``[m, k] @ [k, n]``, and the
same for the patch convolution) of one micro-batch's forward and backward, reading every width
from the model's modules. :func:`micro_batch_flops` takes the numbers from a
:class:`~fusiontrain.data.Batch`. :func:`fusiontrain.flops.peak.mfu` divides by time and a device peak.

What is counted (forward; ``T = b * s`` token slots, ``P`` attended self-attention pairs,
``s_e`` encoder tokens per row, ``w = n_h * h_d`` the query width, ``w_kv = n_kv * h_d``):

- self-attention layer: projections ``2T (d w + 2 d w_kv + w d)``, scores and values ``4 w P``;
- cross-attention layer: ``q``/``o`` on text ``2T (d w + w d)``, ``k``/``v`` on the encoder tokens
  of every row ``2 (b s_e) 2 d w_kv``, scores and values ``4 w T s_e`` (dense: every token is
  multiplied with every encoder token, whatever the encoder mask says);
- MLPs: ``2T`` times the sum of ``in * out`` of their linears (SwiGLU: ``3 d f``);
- output projection ``2 n d v`` over the ``n`` target positions only (the loss gathers them and
  projects nothing else, :mod:`fusiontrain.train.loss`; ``n = T`` when no target index is known), so
  prompt, image-token and padding positions cost nothing there (per-token rules such as PaLM's
  ``6 N`` count the projection at every token; this count follows the work the step does); see
  "recompute" below;
- encoder: the patch convolution, every ViT / tower layer (dense attention over the tokens of an
  image: Mllama's ``t * p_pad`` padded tile tokens, all ``max_num_tiles`` tiles of every image
  slot the encoder runs on: padding slots only when ``image_slots`` does not list the real ones), SigLIP's attention-pooling head (it
  runs in forward although its output is unused), and the projection head.

Encoders. Mllama's tiled ViT and the HF CLIP / SigLIP towers (their modules' ``count_flops``) are counted
analytically, as above. Any other encoder (SigLIP2 NaFlex, DINOv2, a user's own module) is counted
generically by :func:`fusiontrain.flops.probe.measure_encoder_flops`: its forward and backward run
once per input shape on fake tensors under ``torch.utils.flop_counter.FlopCounterMode``, with the
same conventions (SDPA through its math backend, so attention backward is 2x, not the 2.5x
FlopCounterMode gives fused kernels; attention over the full square; no recompute; see that
module). It needs the encoder's actual input (``encoder_input``) and reports one part,
``encoder``. A count that cannot be made (an encoder whose forward reads tensor values that fake
tensors lack, a decoder layer this module does not know) raises; :func:`micro_batch_flops_or_none`
turns that into None and one logged warning, so MFU is reported as unavailable and training goes
on.

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

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fusiontrain.flops.probe import measure_encoder_flops
from fusiontrain.flops.rules import (
    FlopCount,
    Tally,
    any_trainable,
    count_linear,
    count_mlp,
    count_multi_head_attention,
    count_self_attention_layer,
    unwrap,
)
from fusiontrain.modules.fusion import FusionLayer
from fusiontrain.modules.transformer import (
    TransformerCrossAttentionLayer,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

__all__ = [
    "FlopCount",
    "causal_attention_pairs",
    "micro_batch_flops",
    "micro_batch_flops_or_none",
    "packed_attention_pairs",
    "step_flops",
]

logger = logging.getLogger("fusiontrain.flops.count")

# -- the count ------------------------------------------------------------------------------------

def _cross_attention_layer(
    tally: Tally,
    layer: TransformerCrossAttentionLayer,
    *,
    tokens: int,
    encoder_tokens: int,
    pairs: int,
    x_grad: bool,
    encoder_grad: bool,
) -> bool:
    """Gated cross-attention to the encoder embeddings, then a gated MLP."""
    normed = x_grad or any_trainable(layer.ca_norm)
    attn = count_multi_head_attention(
        tally,
        "fusion.cross_attention",
        layer.attn,
        q_tokens=tokens,
        kv_tokens=encoder_tokens,
        pairs=pairs,
        x_grad=normed,
        y_grad=encoder_grad,
    )
    h = x_grad or attn or any_trainable(layer.ca_scale)
    mlp = count_mlp(tally, "fusion.mlp", layer.mlp, tokens, h or any_trainable(layer.mlp_norm))
    return h or mlp or any_trainable(layer.mlp_scale)

def _decoder(
    tally: Tally,
    decoder: TransformerDecoder,
    *,
    num_rows: int,
    seq_len: int,
    attention_pairs: int,
    encoder_seq_len: int | Mapping[str, int],
    encoder_grad: bool | Mapping[str, bool],
    targets: int | None,
) -> None:
    """The decoder's FLOPs; with an encoder per modality, ``encoder_seq_len`` and ``encoder_grad``
    by modality (a modality absent from them: its cross-attention layers do not run)."""
    tokens = num_rows * seq_len
    h = any_trainable(decoder.tok_embeddings)

    def layer_flops(layer: nn.Module, h: bool, modality: str | None = None) -> bool:
        layer = unwrap(layer)
        if isinstance(layer, FusionLayer):
            if not layer.fusion_first:
                h = layer_flops(layer.layer, h)
            for m, part in layer.fusion_parts():
                h = layer_flops(part, h, m)
            return layer_flops(layer.layer, h) if layer.fusion_first else h
        if isinstance(layer, TransformerCrossAttentionLayer):
            seen = encoder_seq_len.get(modality, 0) if isinstance(encoder_seq_len, Mapping) else encoder_seq_len
            if not seen:  # no encoder input: the layer returns its input
                return h
            grad = encoder_grad.get(modality, False) if isinstance(encoder_grad, Mapping) else encoder_grad
            return _cross_attention_layer(
                tally,
                layer,
                tokens=tokens,
                encoder_tokens=num_rows * seen,
                pairs=tokens * seen,
                x_grad=h,
                encoder_grad=grad,
            )
        if isinstance(layer, TransformerSelfAttentionLayer):
            return count_self_attention_layer(
                tally, ("decoder.self_attention", "decoder.mlp"), layer, tokens=tokens, pairs=attention_pairs, x_grad=h
            )
        raise TypeError(f"don't know how to count FLOPs of a {type(layer).__name__} decoder layer")

    for layer in decoder.layers:
        h = layer_flops(layer, h)
    projected = tokens if targets is None else targets
    count_linear(tally, "decoder.output", decoder.output, projected, h or any_trainable(decoder.norm))

# -- encoders -------------------------------------------------------------------------------------

def _known_encoder_counter(encoder: nn.Module) -> Any:
    """The encoder's own analytic count, or None for an encoder counted generically: a family
    whose encoder it can count analytically gives the module a method
    ``count_flops(tally, images, columns=None) -> (tokens per image slot, embeddings require
    grad)``, ``columns`` the batch's encoder columns when known (Mllama's ViT, the CLIP / SigLIP
    towers, Whisper, which packs its clips' real tokens and projects those only)."""
    method = getattr(encoder, "count_flops", None)
    return method if callable(method) else None


def _image_slots(encoder_input: Mapping[str, Any], num_rows: int, encoder: nn.Module | None = None) -> tuple[int, int]:
    """``(slots, encoded)`` of a known encoder's input: its item slots, ``b * i`` for an input
    ``[b, i, *item]`` or ``b`` for one item per row ``[b, *item]``; and those the encoder runs
    on, the real ones when the slots key lists them (padding slots are not encoded,
    :mod:`fusiontrain.modules.image_slots`). The encoder says which input it reads, how many
    dims one item's input has and its slots key (``item_input_key``, ``item_input_dims``,
    ``item_slots_key``; by default ``pixel_values`` of ``[c, h, w]`` images and ``image_slots``)."""
    key = getattr(encoder, "item_input_key", "pixel_values")
    item_dims = getattr(encoder, "item_input_dims", 3)
    slots_key = getattr(encoder, "item_slots_key", "image_slots")
    items = encoder_input.get(key)
    if not isinstance(items, torch.Tensor):
        raise ValueError(f"encoder_input has no {key} tensor (keys: {sorted(encoder_input)})")
    per_row = items.shape[1] if items.dim() == item_dims + 2 else 1
    slots = num_rows * per_row
    real = encoder_input.get(slots_key)
    return slots, (slots if real is None else len(real))

def _encoder(
    tally: Tally,
    encoder: nn.Module,
    *,
    num_rows: int,
    images: int,
    encoder_input: Mapping[str, Any] | None,
    encoder_seq_len: int | None,
) -> tuple[int, bool]:
    """Counts ``encoder`` on one micro-batch of ``num_rows`` rows; returns (``s_e``, the encoder
    tokens per row that cross-attention sees: ``encoder_seq_len`` when given; whether the
    embeddings require grad).

    Known encoders are counted analytically by their family from ``images`` (or, when 0, the image
    slots the encoder runs on for ``encoder_input``: its real ones when ``image_slots`` lists them);
    any other encoder generically from ``encoder_input``, its output ``[b, s_e, d]`` giving ``s_e``.
    """
    encoder = unwrap(encoder)
    known = _known_encoder_counter(encoder)
    if known is not None:
        slots = images
        if not images:
            slots, images = _image_slots(encoder_input, num_rows, encoder)
        columns = None if encoder_seq_len is None else num_rows * encoder_seq_len
        tokens_per_image, grad = known(tally, images, columns=columns)
        if encoder_seq_len is None:
            if slots % num_rows:
                raise ValueError(f"images ({slots}) is not a multiple of num_rows ({num_rows}): pass encoder_seq_len")
            encoder_seq_len = slots // num_rows * tokens_per_image
        return encoder_seq_len, grad

    if encoder_input is None:
        raise ValueError(
            f"a {type(encoder).__name__} encoder is counted by running it on fake tensors: pass encoder_input "
            "(the encoder's keyword arguments)"
        )
    cost = measure_encoder_flops(encoder, encoder_input)
    if len(cost.output_shape) != 3 or cost.output_shape[0] != num_rows:
        raise ValueError(
            f"{type(encoder).__name__} returned embeddings of shape {list(cost.output_shape)}; a fusion encoder "
            f"returns [b, s_e, d] with b = num_rows = {num_rows}"
        )
    tally.add_measured("encoder", cost.forward, cost.backward)
    return (cost.output_shape[1] if encoder_seq_len is None else encoder_seq_len), cost.output_requires_grad

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
    encoder_seq_len: int | Mapping[str, int] | None = None,
    encoder_input: Mapping[str, Any] | None = None,
    targets: int | None = None,
) -> FlopCount:
    """Model FLOPs of one forward + backward of ``model`` on one micro-batch.

    Trainability is read from ``requires_grad`` of the model's parameters (as the trainer's
    ``*any_trainable`` flags set them); sizes from its modules (FSDP, activation-checkpoint and
    compile wrappers are seen through).

    Args:
        model: a :class:`~fusiontrain.modules.DeepFusionModel` (or a bare ``TransformerDecoder``).
        num_rows: rows ``b`` of the micro-batch.
        seq_len: token slots ``s`` per row (padding included: it is computed).
        attention_pairs: attended (query, key) pairs of self-attention, summed over the rows;
            None means causal over whole rows (:func:`causal_attention_pairs`); packed rows pass
            :func:`packed_attention_pairs`; ``b * s * s`` counts the full square.
        images: image slots the encoder processes (``b * i`` with ``i`` the padded images per
            row; Mllama runs all ``max_num_tiles`` tiles of each), for the analytically counted
            encoders (Mllama, HF CLIP / SigLIP towers); 0 there means: from
            ``encoder_input`` when given (its real images only, when ``image_slots`` lists them). Other encoders ignore it. With
            ``images == 0`` and no ``encoder_input``, a text-only micro-batch: neither the encoder
            nor the cross-attention layers run.
        encoder_seq_len: encoder tokens ``s_e`` per row that cross-attention sees; by default
            ``images / num_rows`` times the tokens per image (analytic encoders) or the ``s_e`` of
            the encoder's output ``[b, s_e, d]`` (generic count).
        encoder_input: the encoder's keyword arguments (``batch.encoder_input``: real, meta or
            fake tensors of any shapes, e.g. SigLIP2 NaFlex's ``pixel_values``,
            ``pixel_attention_mask``, ``spatial_shapes``). Required by an encoder this module does
            not count analytically: it is run once per input shape on fake tensors
            (:func:`fusiontrain.flops.probe.measure_encoder_flops`). Giving it means the encoder runs.
        targets: target positions ``n`` the output projection runs on; None: every token slot.

    A model with an encoder per modality takes ``encoder_input`` (and ``encoder_seq_len``, if
    given) by modality: each encoder is counted on its own input, and each modality's
    cross-attention layers over its own ``s_e``; ``images`` is for one encoder.

    Returns:
        The forward and backward FLOPs.

    Raises:
        ValueError: inconsistent sizes. TypeError: a decoder layer or analytically counted
            encoder part of an unknown kind. Whatever the generic encoder count raises (e.g. an
            encoder that reads tensor values). :func:`micro_batch_flops_or_none` catches them all.
    """
    model = unwrap(model)
    if num_rows < 0 or seq_len < 0 or images < 0:
        raise ValueError("num_rows, seq_len and images must be >= 0")
    if attention_pairs is None:
        attention_pairs = causal_attention_pairs(num_rows, seq_len)
    tally = Tally()
    if isinstance(model, TransformerDecoder):
        decoder, encoder = model, None
    else:
        decoder, encoder = unwrap(model.decoder), getattr(model, "encoder", None)

    encoder_grad: bool | dict[str, bool] = False
    if getattr(model, "modalities", None) is not None:  # an encoder per modality: each counted alone
        if images:
            raise ValueError("images counts one encoder's slots; a model with an encoder per modality takes encoder_input")
        lengths: dict[str, int] = {}
        encoder_grad = {}
        for modality, inputs in (encoder_input or {}).items():
            if inputs is None:
                continue
            given = encoder_seq_len.get(modality) if isinstance(encoder_seq_len, Mapping) else None
            lengths[modality], encoder_grad[modality] = _encoder(
                tally, encoder[modality], num_rows=num_rows, images=0, encoder_input=inputs, encoder_seq_len=given
            )
        encoder_seq_len = lengths
    elif images or encoder_input is not None:
        if encoder is None or not num_rows:
            raise ValueError(f"images={images} / encoder_input need an encoder and num_rows > 0")
        encoder_seq_len, encoder_grad = _encoder(
            tally,
            encoder,
            num_rows=num_rows,
            images=images,
            encoder_input=encoder_input,
            encoder_seq_len=encoder_seq_len,
        )
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
        targets=targets,
    )
    return tally.result()

def micro_batch_flops(model: nn.Module, batch: Any, *, attention_pairs: int | None = None) -> FlopCount:
    """:func:`step_flops` for a :class:`~fusiontrain.data.Batch` as the trainer feeds it.

    Reads ``b, s`` from ``batch.tokens``; the attended self-attention pairs from
    ``batch.segment_ids`` (block-diagonal causal) or, without them, causal rows; the encoder's
    input from ``batch.encoder_input`` (analytic encoders: the image slots of its
    ``pixel_values`` ``[b, i, ...]``; any other encoder: run on fake tensors of its shapes, once per
    shape) and ``s_e`` from ``batch.encoder_mask``. ``attention_pairs`` overrides the pairs (e.g.
    ``b * s * s``); the target positions from ``batch.target_index`` (its length: no device read)
    when set, every token slot otherwise. Packed batches cost two small device syncs (the segment
    counts) when ``batch`` is on a GPU, and so does a generic encoder count with integer inputs
    (copied to the CPU, once per shape); pass the CPU batch to avoid them.

    Raises:
        What :func:`step_flops` raises; see :func:`micro_batch_flops_or_none`.
    """
    num_rows, seq_len = batch.tokens.shape
    if attention_pairs is None and getattr(batch, "segment_ids", None) is not None:
        attention_pairs = packed_attention_pairs(batch.segment_ids)
    encoder_seq_len = None
    if batch.encoder_input is not None and batch.encoder_mask is not None:
        mask = batch.encoder_mask
        encoder_seq_len = {m: t.shape[-1] for m, t in mask.items()} if isinstance(mask, dict) else mask.shape[-1]
    return step_flops(
        model,
        num_rows=num_rows,
        seq_len=seq_len,
        attention_pairs=attention_pairs,
        encoder_seq_len=encoder_seq_len,
        encoder_input=batch.encoder_input,
        targets=None if getattr(batch, "target_index", None) is None else batch.target_index.numel(),
    )

_warned_unavailable = False  # micro_batch_flops_or_none warns once per process

def micro_batch_flops_or_none(model: nn.Module, batch: Any, *, attention_pairs: int | None = None) -> FlopCount | None:
    """:func:`micro_batch_flops`, or None when the count cannot be made, for any reason.

    The FLOP count only feeds MFU, so it must never stop training: any exception (an encoder
    that cannot run on fake tensors, a layer the analytic count does not know, inconsistent
    shapes) gives None, and the first one in the process is logged as one warning on the
    ``fusiontrain.flops.count`` logger, naming the encoder type and the error. Report MFU as unavailable
    (``null``) for that step. Failures of the generic encoder count are cached per input shape,
    so a failing encoder is traced once per shape, not once per step.
    """
    global _warned_unavailable
    try:
        return micro_batch_flops(model, batch, attention_pairs=attention_pairs)
    except Exception as error:
        if not _warned_unavailable:
            _warned_unavailable = True
            inner = unwrap(model)
            encoder = getattr(inner, "encoder", None)
            encoder_name = type(unwrap(encoder)).__name__ if encoder is not None else "none"
            logger.warning(
                "cannot count the FLOPs of %s (encoder %s): %s: %s. MFU is unavailable (reported as null) for "
                "every step whose count fails; training goes on. (Warned once per process.)",
                type(inner).__name__,
                encoder_name,
                type(error).__name__,
                error,
                exc_info=error,
            )
        return None
