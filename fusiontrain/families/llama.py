"""Llama-style decoder pieces: the decoder every decoder family builds.

Shared by the Mllama and composed model families; :class:`LlamaDecoderArgs` switches cover what
other decoder families add (q/k/v biases, per-head q/k norms). Every builder creates modules on
the current default device, so wrapping a call in ``with torch.device("meta"):`` builds a model
without allocating its weights. The Llama decoder family itself is
:class:`fusiontrain.families.decoder.LlamaDecoder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from fusiontrain.modules import (
    FeedForward,
    FusionEmbedding,
    FusionLayer,
    Llama3RopeScaling,
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TanhGate,
    TransformerCrossAttentionLayer,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)


@dataclass(frozen=True)
class LlamaDecoderArgs:
    """Sizes of a Llama-family decoder.

    Attributes:
        vocab_size: rows of the pretrained embedding and outputs of the LM head (``v``).
        hidden_size: width ``d``.
        intermediate_size: MLP hidden width.
        num_heads: query heads.
        num_kv_heads: key/value heads.
        head_dim: features per head.
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: Llama 3 frequency scaling, or None.
        max_seq_len: longest sequence (and default cache length).
        attention_bias: biases on the self-attention q/k/v projections (none on the output
            projection), as in Qwen2 / Qwen2.5. Cross-attention layers never have them.
        qk_norm: a per-head RMSNorm over ``head_dim`` on the self-attention queries and keys,
            applied before RoPE, as in Qwen3. Cross-attention layers always have q/k norms.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    max_seq_len: int
    attention_bias: bool = False
    qk_norm: bool = False


def rope_from_hf_text_config(
    text: dict, *, default_theta: float = 500_000.0
) -> tuple[float, Llama3RopeScaling | None]:
    """RoPE base and scaling from either ``rope_parameters`` (transformers 5) or the older
    ``rope_theta`` + ``rope_scaling`` fields.

    Args:
        text: a HF text config dict.
        default_theta: the base when the config names none (the HF config class's
            ``default_theta``: 500000 for Mllama, 10000 for Llama, Qwen2, Qwen3 and Mistral).

    Raises:
        ValueError: a RoPE type other than ``default`` / ``llama3`` (yarn, linear, dynamic,
            longrope, ...), or RoPE parameters nested per layer type; the message names the field.
    """
    params = dict(text.get("rope_parameters") or {})
    legacy = text.get("rope_scaling") or {}
    nested = sorted(key for key, value in params.items() if isinstance(value, dict))
    if nested:
        raise ValueError(
            f"rope_parameters nested per layer type ({nested}) are not supported: "
            "our decoder uses one RoPE for all layers"
        )
    theta = params.get("rope_theta", text.get("rope_theta", default_theta))
    if "rope_type" in params or "type" in params:
        field, rope_type = "rope_parameters", params.get("rope_type", params.get("type"))
    else:
        field, rope_type = "rope_scaling", legacy.get("rope_type", legacy.get("type", "default"))
    source = params if "factor" in params else legacy
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(
            f"{field} has rope_type {rope_type!r}, which is not supported (only 'default' and 'llama3')"
        )
    scaling = Llama3RopeScaling(
        factor=float(source["factor"]),
        low_freq_factor=float(source["low_freq_factor"]),
        high_freq_factor=float(source["high_freq_factor"]),
        original_max_seq_len=int(source["original_max_position_embeddings"]),
    )
    return float(theta), scaling


def decoder_args_from_hf_text_config(
    config: dict, *, default_theta: float = 500_000.0, attention_bias: bool = False, qk_norm: bool = False
) -> LlamaDecoderArgs:
    """Decoder sizes from a HF Llama-family text config dict (a ``LlamaConfig``, the
    ``text_config`` of an ``MllamaConfig``, or a Qwen2 / Qwen3 / Mistral config).

    Args:
        config: the config dict.
        default_theta: RoPE base when the config names none (see :func:`rope_from_hf_text_config`).
        attention_bias: set :attr:`LlamaDecoderArgs.attention_bias` (the family decides, not a field).
        qk_norm: set :attr:`LlamaDecoderArgs.qk_norm`.
    """
    theta, scaling = rope_from_hf_text_config(config, default_theta=default_theta)
    heads = config["num_attention_heads"]
    return LlamaDecoderArgs(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rms_norm_eps=config["rms_norm_eps"],
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=config["max_position_embeddings"],
        attention_bias=attention_bias,
        qk_norm=qk_norm,
    )


def _linear(in_dim: int, out_dim: int, *, bias: bool = False) -> nn.Linear:
    return nn.Linear(in_dim, out_dim, bias=bias)


def llama_mlp(args: LlamaDecoderArgs) -> FeedForward:
    """SwiGLU MLP, bias-free."""
    d, hidden = args.hidden_size, args.intermediate_size
    return FeedForward(gate_proj=_linear(d, hidden), down_proj=_linear(hidden, d), up_proj=_linear(d, hidden))


def llama_attention(args: LlamaDecoderArgs, *, qkv_bias: bool = False, **kwargs: Any) -> MultiHeadAttention:
    """GQA attention; ``kwargs`` add RoPE, q/k norms, causality.

    Args:
        args: the decoder sizes (its ``attention_bias`` / ``qk_norm`` are read by
            :func:`llama_self_attention_layer`, not here, so cross-attention stays as it is).
        qkv_bias: biases on the q/k/v projections ``[n_h * h_d]`` / ``[n_kv * h_d]``; the output
            projection is always bias-free.
        kwargs: passed to :class:`MultiHeadAttention`.
    """
    d, hd = args.hidden_size, args.head_dim
    return MultiHeadAttention(
        embed_dim=d,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        head_dim=hd,
        q_proj=_linear(d, args.num_heads * hd, bias=qkv_bias),
        k_proj=_linear(d, args.num_kv_heads * hd, bias=qkv_bias),
        v_proj=_linear(d, args.num_kv_heads * hd, bias=qkv_bias),
        output_proj=_linear(args.num_heads * hd, d),
        **kwargs,
    )


def llama_self_attention_layer(args: LlamaDecoderArgs) -> TransformerSelfAttentionLayer:
    """A Llama block: RMSNorm, GQA self-attention with RoPE, RMSNorm, SwiGLU.

    ``args.attention_bias`` adds q/k/v biases (``attn.q_proj.bias`` ...); ``args.qk_norm`` adds
    per-head RMSNorms (``attn.q_norm.scale`` / ``attn.k_norm.scale``, ``[h_d]``) applied before RoPE.
    """
    d, hd = args.hidden_size, args.head_dim
    norms: dict[str, nn.Module] = {}
    if args.qk_norm:
        norms = {"q_norm": RMSNorm(hd, args.rms_norm_eps), "k_norm": RMSNorm(hd, args.rms_norm_eps)}
    attn = llama_attention(
        args,
        qkv_bias=args.attention_bias,
        pos_embeddings=RotaryPositionalEmbeddings(hd, args.rope_theta, args.rope_scaling),
        is_causal=True,
        **norms,
    )
    return TransformerSelfAttentionLayer(
        attn,
        llama_mlp(args),
        sa_norm=RMSNorm(d, args.rms_norm_eps),
        mlp_norm=RMSNorm(d, args.rms_norm_eps),
    )


def llama_cross_attention_layer(args: LlamaDecoderArgs) -> TransformerCrossAttentionLayer:
    """A Llama 3.2 Vision cross-attention block: GQA attention to encoder embeddings with per-head
    q/k RMSNorms, a SwiGLU MLP, and tanh gates on both branches (shut at init)."""
    d, hd = args.hidden_size, args.head_dim
    attn = llama_attention(
        args, q_norm=RMSNorm(hd, args.rms_norm_eps), k_norm=RMSNorm(hd, args.rms_norm_eps), is_causal=False
    )
    return TransformerCrossAttentionLayer(
        attn,
        llama_mlp(args),
        ca_norm=RMSNorm(d, args.rms_norm_eps),
        mlp_norm=RMSNorm(d, args.rms_norm_eps),
        ca_scale=TanhGate(),
        mlp_scale=TanhGate(),
    )


@dataclass(frozen=True)
class FusedSlot:
    """One layer of our decoder and where its weights come from.

    Attributes:
        self_index: index, in the source stack, of the pretrained self-attention layer.
        cross_index: index, in the source stack, of the cross-attention layer fused with it
            (Mllama), the slot's own index for a new cross-attention layer (composed models, where
            no weight map reads it), or None for a plain layer.
        fusion_first: whether the cross-attention layer runs before the self-attention layer.
        modalities: for a model with an encoder per modality, the modalities whose new
            cross-attention layers this slot fuses, in the order they run (the fused layer then
            holds one per modality: :class:`~fusiontrain.modules.FusionLayer`); None for a model
            with one encoder.
    """

    self_index: int
    cross_index: int | None = None
    fusion_first: bool = True
    modalities: tuple[str, ...] | None = None


def fuse_layer_stack(num_layers: int, cross_attention_layers: list[int] | tuple[int, ...]) -> list[FusedSlot]:
    """Pair each cross-attention layer of a flat stack with a neighbouring self-attention layer.

    A flat stack (HF Mllama's layout) interleaves cross-attention layers among the self-attention
    ones. Each cross-attention layer joins the self-attention layer right after it (it runs first,
    as in Llama 3.2 Vision); a cross-attention layer at the end of the stack joins the one right
    before it instead and runs after it. The order of computation is unchanged.
    """
    cross = set(cross_attention_layers)
    if not cross <= set(range(num_layers)):
        raise ValueError(f"cross_attention_layers {sorted(cross)} fall outside a stack of {num_layers} layers")
    slots: list[FusedSlot] = []
    pending_cross: int | None = None
    for index in range(num_layers):
        if index in cross:
            if pending_cross is not None:
                raise ValueError(f"cross-attention layers {pending_cross} and {index} are adjacent; cannot fuse both")
            pending_cross = index
            continue
        slots.append(FusedSlot(index, pending_cross, True))
        pending_cross = None
    if pending_cross is not None:
        if not slots or slots[-1].cross_index is not None:
            raise ValueError(f"cross-attention layer {pending_cross} has no free self-attention layer to join")
        slots[-1] = FusedSlot(slots[-1].self_index, pending_cross, False)
    return slots


def llama_fused_decoder(
    args: LlamaDecoderArgs, slots: list[FusedSlot], *, fusion_vocab_size: int
) -> TransformerDecoder:
    """A decoder whose layers follow ``slots``, with ``fusion_vocab_size`` new embedding rows."""
    layers: list[nn.Module] = []
    for slot in slots:
        layer = llama_self_attention_layer(args)
        if slot.cross_index is not None:
            fusion: nn.Module | dict[str, nn.Module] = (
                llama_cross_attention_layer(args)
                if slot.modalities is None
                else {modality: llama_cross_attention_layer(args) for modality in slot.modalities}
            )
            layer = FusionLayer(layer, fusion, fusion_first=slot.fusion_first)
        layers.append(layer)
    return TransformerDecoder(
        tok_embeddings=FusionEmbedding(args.vocab_size, fusion_vocab_size, args.hidden_size),
        layers=layers,
        max_seq_len=args.max_seq_len,
        num_heads=args.num_heads,
        head_dim=args.head_dim,
        norm=RMSNorm(args.hidden_size, args.rms_norm_eps),
        output=_linear(args.hidden_size, args.vocab_size),
    )

