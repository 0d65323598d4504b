"""The rules of the FLOP count: how many matmul FLOPs a module's forward costs, and how many its
backward adds, given which operands need gradients.

These are the building blocks :mod:`fusiontrain.flops.count` counts a model with, and what a model
family's analytic encoder count (``fusiontrain/families/``) uses. See :mod:`fusiontrain.flops.count`
for the conventions (model FLOPs, ``2 m n k`` per matmul, backward once per operand gradient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fusiontrain.modules.attention import MultiHeadAttention
from fusiontrain.modules.layers import FeedForward
from fusiontrain.modules.lora import LoRALinear
from fusiontrain.modules.transformer import TransformerSelfAttentionLayer
from fusiontrain.torch_private import checkpoint_wrapped_module, compiled_original_module


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward + backward.

    Attributes:
        forward: forward FLOPs.
        backward: backward FLOPs (weight and input gradients; no recompute).
        parts: ``{part: (forward, backward)}`` by component (``decoder.self_attention``,
            ``decoder.mlp``, ``decoder.output``, ``fusion.cross_attention``, ``fusion.mlp``,
            ``encoder.vision``, ``encoder.projection``; ``encoder``, projection head included, for
            an encoder counted generically), for inspection.
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


class Tally:
    """Accumulates (forward, backward) FLOPs per part."""

    def __init__(self) -> None:
        self.parts: dict[str, list[int]] = {}

    def add(self, part: str, forward: int, grads: int) -> None:
        """One matmul-like op of ``forward`` FLOPs whose backward computes ``grads`` operand
        gradients, each as costly as the forward."""
        self.add_measured(part, forward, forward * grads)

    def add_measured(self, part: str, forward: int, backward: int) -> None:
        """``forward`` and ``backward`` FLOPs counted elsewhere (the generic encoder count)."""
        entry = self.parts.setdefault(part, [0, 0])
        entry[0] += forward
        entry[1] += backward

    def result(self) -> FlopCount:
        parts = {name: (fwd, bwd) for name, (fwd, bwd) in self.parts.items()}
        return FlopCount(sum(f for f, _ in parts.values()), sum(b for _, b in parts.values()), parts)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside activation-checkpoint and ``torch.compile`` wrappers."""
    while True:
        inner = checkpoint_wrapped_module(module)
        if inner is None:
            inner = compiled_original_module(module)
        if inner is None:
            return module
        module = inner


def any_trainable(*modules: nn.Module | nn.Parameter | None) -> bool:
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


def count_linear(tally: Tally, part: str, linear: nn.Module, tokens: int, x_grad: bool) -> bool:
    """``linear`` applied to ``tokens`` rows; returns whether its output requires grad."""
    linear = unwrap(linear)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear projection, got {type(linear).__name__}")
    weight_grad = linear.weight.requires_grad
    tally.add(part, 2 * tokens * linear.in_features * linear.out_features, int(x_grad) + int(weight_grad))
    out_grad = x_grad or weight_grad or (linear.bias is not None and linear.bias.requires_grad)
    if isinstance(linear, LoRALinear):  # x A^T then (.) B^T: two thin matmuls beside the base one
        a_grad, b_grad = linear.lora_A.weight.requires_grad, linear.lora_B.weight.requires_grad
        tally.add(part, 2 * tokens * linear.in_features * linear.rank, int(x_grad) + int(a_grad))
        tally.add(part, 2 * tokens * linear.rank * linear.out_features, int(x_grad or a_grad) + int(b_grad))
        out_grad = out_grad or a_grad or b_grad
    return out_grad


def count_attention_core(tally: Tally, part: str, width: int, pairs: int, q: bool, k: bool, v: bool) -> bool:
    """``softmax(q k^T) v`` over ``pairs`` (query, key) pairs, all heads together ``width``
    features wide (``n_h * h_d``; GQA keys/values are shared, not narrower, in the matmuls)."""
    flops = 2 * width * pairs
    tally.add(part, flops, int(q) + int(k))  # scores = q @ k^T
    tally.add(part, flops, int(q or k) + int(v))  # out = probs @ v
    return q or k or v


def count_multi_head_attention(
    tally: Tally,
    part: str,
    attn: MultiHeadAttention,
    *,
    q_tokens: int,
    kv_tokens: int,
    pairs: int,
    x_grad: bool,
    y_grad: bool,
) -> bool:
    q = count_linear(tally, part, attn.q_proj, q_tokens, x_grad) or any_trainable(attn.q_norm)
    k = count_linear(tally, part, attn.k_proj, kv_tokens, y_grad) or any_trainable(attn.k_norm)
    v = count_linear(tally, part, attn.v_proj, kv_tokens, y_grad)
    out = count_attention_core(tally, part, attn.num_heads * attn.head_dim, pairs, q, k, v)
    return count_linear(tally, part, attn.output_proj, q_tokens, out)


def count_mlp(tally: Tally, part: str, mlp: nn.Module, tokens: int, x_grad: bool) -> bool:
    mlp = unwrap(mlp)
    if isinstance(mlp, FeedForward):
        hidden = count_linear(tally, part, mlp.w1, tokens, x_grad)
        if mlp.w3 is not None:
            hidden = count_linear(tally, part, mlp.w3, tokens, x_grad) or hidden
        return count_linear(tally, part, mlp.w2, tokens, hidden)
    raise TypeError(f"don't know how to count FLOPs of a {type(mlp).__name__} MLP")


def count_self_attention_layer(
    tally: Tally,
    parts: tuple[str, str],
    layer: TransformerSelfAttentionLayer,
    *,
    tokens: int,
    pairs: int,
    x_grad: bool,
) -> bool:
    """``h = x + sa_scale(attn(sa_norm(x)))``; ``h + mlp_scale(mlp(mlp_norm(h)))``."""
    normed = x_grad or any_trainable(layer.sa_norm)
    attn = count_multi_head_attention(
        tally, parts[0], layer.attn, q_tokens=tokens, kv_tokens=tokens, pairs=pairs, x_grad=normed, y_grad=normed
    )
    h = x_grad or attn or any_trainable(layer.sa_scale)
    mlp = count_mlp(tally, parts[1], layer.mlp, tokens, h or any_trainable(layer.mlp_norm))
    return h or mlp or any_trainable(layer.mlp_scale)


def conv_flops(conv: nn.Module, count: int, size: int) -> int:
    """FLOPs of ``conv`` (a 2-d convolution) over ``count`` square inputs of ``size`` pixels."""
    conv = unwrap(conv)
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
