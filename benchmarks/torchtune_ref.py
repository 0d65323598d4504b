"""torchtune 0.6.1 reference models for equivalence tests, and the weight map into fusiontrain.

Only ``torchtune.modules`` pieces (plus ``Llama3ScaledRoPE``) are used: importing
``torchtune.models.llama3_2_vision`` pulls in torchvision, which does not import beside the CPU
torch wheel. torchtune is imported plainly: a missing or broken install is an error, never a skip.

Weight map (torchtune state dict -> fusiontrain state dict):

- Inside a ``FusionLayer`` torchtune's state-dict hook drops the ``layer.`` infix of the pretrained
  half (``layers.1.attn.q_proj.weight``); ours keeps the parameter name
  (``layers.1.layer.attn.q_proj.weight``). ``fusion_layer.*`` keys are the same in both.
- ``FusionEmbedding``: both produce ``weight`` and ``fusion_embedding.weight``.
- RoPE'd projections (self-attention ``q_proj`` / ``k_proj``) need their output rows permuted,
  see :func:`interleaved_to_half_rows`. Cross-attention has no RoPE and needs no permutation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchtune import modules as tt
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import model_fusion as tt_fusion

from fusiontrain.families.llama import FusedSlot, LlamaDecoderArgs, llama_fused_decoder
from fusiontrain.modules import Llama3RopeScaling

__all__ = [
    "copy_tt_into_ours",
    "interleaved_to_half_rows",
    "ours_fused_decoder",
    "randomize_",
    "set_gates_",
    "tiny_args",
    "tt",
    "tt_cross_attention_layer",
    "tt_fused_decoder",
    "tt_fusion",
    "tt_param_name_to_ours",
    "tt_rope",
    "tt_self_attention_layer",
    "tt_to_ours_state_dict",
]


# ---------------------------------------------------------------------------------------------
# RoPE layouts
# ---------------------------------------------------------------------------------------------


def interleaved_to_half_rows(weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Permute the output rows of a q/k projection from torchtune's (Meta's) RoPE layout to ours
    (Hugging Face's "rotate half").

    torchtune rotates *adjacent pairs* of a head's features: features ``(2i, 2i+1)`` are the
    (real, imaginary) parts of complex number ``i``, rotated by angle ``pos * theta_i``.
    We rotate *halves*: feature ``i`` pairs with feature ``i + head_dim/2`` under the same angle
    ``pos * theta_i``. So a head's feature ``j`` in our layout must hold torchtune's feature
    ``2j`` for ``j < head_dim/2`` (the real parts) and ``2(j - head_dim/2) + 1`` otherwise
    (the imaginary parts): per head, rows ``[0, 2, 4, ..., 1, 3, 5, ...]``. This is the
    ``permute`` of transformers' ``convert_llama_weights_to_hf.py``.

    With q and k rows permuted the same way within each head, RoPE'd ``q_ours = P q_tt`` and
    ``k_ours = P k_tt`` for the same permutation ``P``, so every score ``q . k`` (a sum over the
    head's features) is unchanged; v and output_proj need nothing.

    Args:
        weight: ``[num_heads * head_dim, in_dim]`` (a ``Linear`` weight in torchtune layout).
        num_heads: heads in this projection (query heads for q_proj, kv heads for k_proj).
        head_dim: features per head.
    """
    out_dim, in_dim = weight.shape
    assert out_dim == num_heads * head_dim, (weight.shape, num_heads, head_dim)
    return (
        weight.reshape(num_heads, head_dim // 2, 2, in_dim)  # [head, pair i, real/imag, in]
        .transpose(1, 2)  # [head, real/imag, pair i, in]: all real parts, then all imaginary
        .reshape(out_dim, in_dim)
    )


# ---------------------------------------------------------------------------------------------
# torchtune reference builders (mirrors of fusiontrain.families.llama)
# ---------------------------------------------------------------------------------------------


def tiny_args(max_seq_len: int = 32) -> LlamaDecoderArgs:
    """GQA (4 query / 2 kv heads), Llama 3 RoPE scaling with a short original context so that
    the scaled, smoothed and untouched frequency bands are all exercised."""
    return LlamaDecoderArgs(
        vocab_size=48,
        hidden_size=64,
        intermediate_size=96,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=500_000.0,
        rope_scaling=Llama3RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=48
        ),
        max_seq_len=max_seq_len,
    )


def _linear(i: int, o: int) -> nn.Linear:
    return nn.Linear(i, o, bias=False)


def _tt_mlp(a: LlamaDecoderArgs) -> tt.FeedForward:
    d, h = a.hidden_size, a.intermediate_size
    return tt.FeedForward(gate_proj=_linear(d, h), down_proj=_linear(h, d), up_proj=_linear(d, h))


def tt_rope(a: LlamaDecoderArgs) -> nn.Module:
    if a.rope_scaling is None:
        return tt.RotaryPositionalEmbeddings(a.head_dim, a.max_seq_len, a.rope_theta)
    s = a.rope_scaling
    return Llama3ScaledRoPE(
        a.head_dim,
        max_seq_len=a.max_seq_len,
        base=a.rope_theta,
        scale_factor=s.factor,
        low_freq_factor=s.low_freq_factor,
        high_freq_factor=s.high_freq_factor,
        old_context_len=s.original_max_seq_len,
    )


def tt_self_attention_layer(a: LlamaDecoderArgs) -> tt.TransformerSelfAttentionLayer:
    d, hd = a.hidden_size, a.head_dim
    attn = tt.MultiHeadAttention(
        embed_dim=d,
        num_heads=a.num_heads,
        num_kv_heads=a.num_kv_heads,
        head_dim=hd,
        q_proj=_linear(d, a.num_heads * hd),
        k_proj=_linear(d, a.num_kv_heads * hd),
        v_proj=_linear(d, a.num_kv_heads * hd),
        output_proj=_linear(a.num_heads * hd, d),
        pos_embeddings=tt_rope(a),
        max_seq_len=a.max_seq_len,
        is_causal=True,
    )
    return tt.TransformerSelfAttentionLayer(
        attn,
        _tt_mlp(a),
        sa_norm=tt.RMSNorm(d, a.rms_norm_eps),
        mlp_norm=tt.RMSNorm(d, a.rms_norm_eps),
    )


def tt_cross_attention_layer(a: LlamaDecoderArgs) -> tt.TransformerCrossAttentionLayer:
    d, hd = a.hidden_size, a.head_dim
    attn = tt.MultiHeadAttention(
        embed_dim=d,
        num_heads=a.num_heads,
        num_kv_heads=a.num_kv_heads,
        head_dim=hd,
        q_proj=_linear(d, a.num_heads * hd),
        k_proj=_linear(d, a.num_kv_heads * hd),
        v_proj=_linear(d, a.num_kv_heads * hd),
        output_proj=_linear(a.num_heads * hd, d),
        q_norm=tt.RMSNorm(hd, a.rms_norm_eps),
        k_norm=tt.RMSNorm(hd, a.rms_norm_eps),
        pos_embeddings=None,
        max_seq_len=a.max_seq_len,
        is_causal=False,
    )
    return tt.TransformerCrossAttentionLayer(
        attn,
        _tt_mlp(a),
        ca_norm=tt.RMSNorm(d, a.rms_norm_eps),
        mlp_norm=tt.RMSNorm(d, a.rms_norm_eps),
        ca_scale=tt.TanhGate(),
        mlp_scale=tt.TanhGate(),
    )


def tt_fused_decoder(
    a: LlamaDecoderArgs, slots: Sequence[FusedSlot], *, fusion_vocab_size: int
) -> tt.TransformerDecoder:
    """torchtune twin of :func:`fusiontrain.families.llama.llama_fused_decoder`."""
    layers: list[nn.Module] = []
    for slot in slots:
        layer: nn.Module = tt_self_attention_layer(a)
        if slot.cross_index is not None:
            layer = tt_fusion.FusionLayer(layer, tt_cross_attention_layer(a), fusion_first=slot.fusion_first)
        layers.append(layer)
    return tt.TransformerDecoder(
        tok_embeddings=tt_fusion.FusionEmbedding(a.vocab_size, fusion_vocab_size, a.hidden_size),
        layers=nn.ModuleList(layers),
        max_seq_len=a.max_seq_len,
        num_heads=a.num_heads,
        head_dim=a.head_dim,
        norm=tt.RMSNorm(a.hidden_size, a.rms_norm_eps),
        output=_linear(a.hidden_size, a.vocab_size),
    )


def ours_fused_decoder(
    a: LlamaDecoderArgs, slots: Sequence[FusedSlot], *, fusion_vocab_size: int
) -> nn.Module:
    return llama_fused_decoder(a, list(slots), fusion_vocab_size=fusion_vocab_size)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Give every parameter random values, norms' scales included (``1 + 0.2 * N(0, 1)``), so a
    mis-mapped weight of any kind shows up in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("scale") and param.dim() == 1 and param.numel() > 1:  # RMSNorm scales
            param.copy_(1 + 0.2 * torch.randn(param.shape, generator=gen))
        elif param.dim() >= 2 and "embedding" not in name:
            param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
        else:
            param.copy_(torch.randn(param.shape, generator=gen))


@torch.no_grad()
def set_gates_(model: nn.Module, values: Sequence[float] = (0.7, -0.4)) -> list[float]:
    """Set every TanhGate scale (torchtune's or ours), cycling through ``values``; returns them."""
    used = []
    gates = [m for m in model.modules() if type(m).__name__ == "TanhGate"]
    for i, gate in enumerate(gates):
        value = values[i % len(values)] + 0.05 * (i // len(values))
        gate.scale.fill_(value)
        used.append(value)
    return used


def tt_to_ours_state_dict(
    tt_state: dict[str, torch.Tensor],
    *,
    fused_layer_prefixes: Sequence[str],
    rope_attn_prefixes: Sequence[str],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> dict[str, torch.Tensor]:
    """Map a torchtune state dict to fusiontrain's.

    Args:
        tt_state: torchtune ``state_dict()`` (FusionLayer/FusionEmbedding hooks applied).
        fused_layer_prefixes: prefixes (``"decoder.layers.1."``) of the FusionLayers, in our
            naming (same as torchtune's before the ``layer.`` infix).
        rope_attn_prefixes: prefixes of RoPE'd attention modules, in **our** naming
            (``"decoder.layers.1.layer.attn."``), whose ``q_proj``/``k_proj`` rows get permuted.
    """
    ours: dict[str, torch.Tensor] = {}
    for key, value in tt_state.items():
        new_key = key
        for prefix in fused_layer_prefixes:
            if key.startswith(prefix) and not key[len(prefix) :].startswith("fusion_layer."):
                new_key = prefix + "layer." + key[len(prefix) :]
                break
        for prefix in rope_attn_prefixes:
            if new_key == prefix + "q_proj.weight":
                value = interleaved_to_half_rows(value, num_heads, head_dim)
            elif new_key == prefix + "k_proj.weight":
                value = interleaved_to_half_rows(value, num_kv_heads, head_dim)
        ours[new_key] = value.clone()
    return ours


def rope_attention_prefixes(model: nn.Module) -> list[str]:
    """Prefixes (our naming) of every attention module of ``model`` that applies RoPE."""
    return [
        f"{name}." if name else ""
        for name, m in model.named_modules()
        if getattr(m, "pos_embeddings", None) is not None
    ]


def fusion_layer_prefixes(model: nn.Module) -> list[str]:
    """Prefixes of every FusionLayer (any library) in ``model``."""
    return [
        f"{name}." if name else ""
        for name, m in model.named_modules()
        if type(m).__name__ == "FusionLayer"
    ]


def copy_tt_into_ours(tt_model: nn.Module, ours: nn.Module) -> None:
    """Load ``tt_model``'s weights into ``ours`` (strict), applying the key map and RoPE permutation."""
    some_attn = next(m for m in ours.modules() if hasattr(m, "num_kv_heads"))
    mapped = tt_to_ours_state_dict(
        tt_model.state_dict(),
        fused_layer_prefixes=fusion_layer_prefixes(ours),
        rope_attn_prefixes=rope_attention_prefixes(ours),
        num_heads=some_attn.num_heads,
        num_kv_heads=some_attn.num_kv_heads,
        head_dim=some_attn.head_dim,
    )
    ours.load_state_dict(mapped, strict=True)


def tt_param_name_to_ours(name: str) -> str:
    """torchtune parameter name -> ours. Parameter names (unlike state-dict keys) keep the
    ``layer.`` infix in both libraries; they differ only in torchtune's FusionEmbedding, whose
    pretrained rows are the parameter ``embedding.weight`` where ours are ``weight``."""
    if name.endswith("tok_embeddings.embedding.weight"):
        return name[: -len("embedding.weight")] + "weight"
    return name
