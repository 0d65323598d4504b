"""Decoder families (Llama, Qwen2 / Qwen2.5, Qwen3, Mistral): a HF ``*ForCausalLM`` saved with
``save_pretrained`` becomes our fused decoder with the same logits.

Each reference is Hugging Face's own model, built from a tiny config object. Every RMSNorm weight
and every q/k/v bias is set to random values away from their inits (ones / zeros), so a missing,
swapped or wrongly ordered route shows in the logits; :func:`test_parity_can_fail` shows that it
does. Cross-attention is fused at every second layer; its gates start shut (``TanhGate`` at 0), so
the fused decoder must reproduce the plain LM.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fusiontrain import tiny
from fusiontrain.families import DECODER_FAMILIES, decoder_family_for
from fusiontrain.families.decoder import DecoderFamily
from fusiontrain.weights.hf_checkpoint import HFCheckpoint, TensorRoute, load_routes
from fusiontrain.families.llama import FusedSlot, LlamaDecoderArgs, llama_fused_decoder
from fusiontrain.modules import MultiHeadAttention, TanhGate, TransformerDecoder

ATOL = 1e-5
FUSION_VOCAB = 8
VOCAB = tiny.TEXT_VOCAB_SIZE  # 128
MAX_POSITIONS = 64

# Shapes shared by the non-Llama tiny configs: hidden 64, 4 heads / 2 KV heads, 4 layers.
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": MAX_POSITIONS,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "tie_word_embeddings": False,
    "bos_token_id": tiny.BOS_TOKEN_ID,
    "eos_token_id": tiny.EOS_TOKEN_ID,
    "pad_token_id": tiny.PAD_TOKEN_ID,
}

# name -> (HF config class, HF causal-LM class, config overrides)
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    # head_dim 32 != hidden_size / heads (16): the field must be read.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "qwen3_tied": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None, "rms_norm_eps": 1e-5}),
    # A window as long as the context is exactly full causal attention, so it is accepted.
    "mistral_window_eq_context": ("MistralConfig", "MistralForCausalLM", {"sliding_window": MAX_POSITIONS}),
    # Sliding window switched on, but only from layer 4 of 4 on: no layer slides.
    "qwen2_window_no_layers": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 4},
    ),
}


def _hf_config(variant: str, **overrides: Any) -> Any:
    """A tiny transformers config for ``variant`` (eager attention)."""
    import transformers

    config_cls, _, variant_overrides = VARIANTS[variant]
    if variant == "llama":
        return tiny.tiny_llama_config(**overrides)  # llama3 RoPE scaling, eps 1e-5
    config = getattr(transformers, config_cls)(**{**_COMMON, **variant_overrides, **overrides})
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def _perturb_norms_and_biases(model: nn.Module, seed: int) -> None:
    """RMSNorm weights to ``1 + 0.3 N(0, 1)`` and biases to ``0.5 N(0, 1)`` (HF inits them to
    ones / zeros, which would hide a missing route)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.copy_(0.5 * torch.randn(param.shape, generator=generator))
        elif "norm" in name:
            param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))


def _save_hf(variant: str, folder: Path, seed: int = 0) -> tuple[Path, nn.Module]:
    """Build, perturb and save a tiny HF causal LM; returns the folder and the model (eval)."""
    import transformers

    _, model_cls, _ = VARIANTS[variant]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(_hf_config(variant)).eval()
    _perturb_norms_and_biases(model, seed + 1)
    model.save_pretrained(folder)
    return folder, model


class _Holder(nn.Module):
    """Gives the decoder the ``decoder.`` prefix that weight maps target."""

    def __init__(self, decoder: TransformerDecoder) -> None:
        super().__init__()
        self.decoder = decoder


def _slots(num_layers: int) -> list[FusedSlot]:
    """Plain layers, with a new cross-attention layer fused into every second one."""
    return [FusedSlot(i, i if (i + 1) % 2 == 0 else None) for i in range(num_layers)]


def _build_ours(
    folder: Path,
    *,
    args_change: dict[str, Any] | None = None,
    drop_routes: str | None = None,
) -> tuple[_Holder, list[str]]:
    """Our fused decoder filled from ``folder`` through its family's weight map.

    Args:
        folder: a saved HF causal LM.
        args_change: fields of the family's :class:`LlamaDecoderArgs` to override (fault injection).
        drop_routes: leave out routes whose HF key contains this (fault injection).

    Returns:
        The model (eval) and the names of the parameters no route filled.
    """
    config = json.loads((folder / "config.json").read_text())
    family = decoder_family_for(config)
    args, num_layers = family.args_from_config(config)
    if args_change:
        args = dataclasses.replace(args, **args_change)
    slots = _slots(num_layers)
    torch.manual_seed(123)
    holder = _Holder(llama_fused_decoder(args, slots, fusion_vocab_size=FUSION_VOCAB))
    checkpoint = HFCheckpoint(folder)
    routes = family.weight_map(
        args, slots, checkpoint.keys(), tie_word_embeddings=bool(config.get("tie_word_embeddings", False))
    )
    if drop_routes is not None:
        routes = [route for route in routes if drop_routes not in route.hf_key]
    used = {route.hf_key for route in routes}
    unused = sorted(set(checkpoint.keys()) - used)
    if drop_routes is None:
        assert not unused, f"stored tensors no route reads: {unused}"
    unfilled = load_routes(dict(holder.named_parameters()), checkpoint, routes, strict=False)
    return holder.eval(), unfilled


def _tokens(b: int = 3, s: int = 12, seed: int = 0) -> torch.Tensor:
    """``[b, s]`` token ids from the pretrained vocabulary."""
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module]]:
    """Every variant, saved once per module."""
    return {variant: _save_hf(variant, tmp_path_factory.mktemp(variant)) for variant in VARIANTS}


def _fusion_param(name: str) -> bool:
    return ".fusion_layer." in name or name.startswith("decoder.tok_embeddings.fusion_embedding.")


# ----------------------------------------------------------------------------------------------
# Parity with HF
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_logits_match_hf(saved: dict, variant: str) -> None:
    folder, hf = saved[variant]
    ours, unfilled = _build_ours(folder)
    # Only the new fusion parameters stay freshly initialised, and the gates are shut.
    assert unfilled and all(_fusion_param(name) for name in unfilled), unfilled
    gates = [m for m in ours.modules() if isinstance(m, TanhGate)]
    assert len(gates) == 2 * 2 and all(gate.scale.abs().max() == 0 for gate in gates)
    for seed, (b, s) in enumerate([(3, 12), (1, 1), (2, MAX_POSITIONS)]):
        tokens = _tokens(b, s, seed)
        diff = _max_diff(ours.decoder(tokens), hf(tokens).logits)
        assert diff < ATOL, f"{variant} b={b} s={s}: max |diff| {diff:.3g}"


@pytest.mark.parametrize("variant", ["qwen2", "qwen3", "mistral"])
@torch.no_grad()
def test_kv_cached_decoding_matches_hf(saved: dict, variant: str) -> None:
    """Prefill 5 tokens, then decode one at a time from the KV cache (k-norm before RoPE before
    caching): each step's logits equal HF's full forward."""
    folder, hf = saved[variant]
    ours, _ = _build_ours(folder)
    tokens = _tokens(2, 11, seed=5)
    expected = hf(tokens).logits
    decoder = ours.decoder
    decoder.setup_caches(2, torch.float32, decoder_max_seq_len=tokens.shape[1])
    prefill = 5
    steps = [decoder(tokens[:, :prefill], input_pos=torch.arange(prefill)[None].expand(2, -1))]
    for position in range(prefill, tokens.shape[1]):
        steps.append(decoder(tokens[:, position : position + 1], input_pos=torch.full((2, 1), position)))
    diff = _max_diff(torch.cat(steps, dim=1), expected)
    assert diff < ATOL, f"{variant}: cached decoding max |diff| {diff:.3g}"


def test_fixtures_exercise_biases_norms_and_tying(saved: dict) -> None:
    """The checkpoints have what the routes must carry: non-zero biases, non-unit q/k norms, and
    no lm_head in the tied Qwen3."""
    qwen2 = HFCheckpoint(saved["qwen2"][0])
    biases = [key for key in qwen2.keys() if key.endswith(".bias")]
    assert len(biases) == 4 * 3 and not any("o_proj" in key for key in biases)
    assert all(qwen2.read(key).abs().min() > 0 for key in biases)
    qwen3 = HFCheckpoint(saved["qwen3"][0])
    q_norms = [key for key in qwen3.keys() if key.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(q_norms) == 4 * 2
    assert all(qwen3.read(key).shape == (32,) and (qwen3.read(key) - 1).abs().max() > 0.1 for key in q_norms)
    assert not any(key.endswith(".bias") for key in qwen3.keys())
    assert "lm_head.weight" in qwen3.keys()
    assert "lm_head.weight" not in HFCheckpoint(saved["qwen3_tied"][0]).keys()


@pytest.mark.parametrize(
    ("variant", "fault"),
    [
        ("qwen2", "no q/k/v biases"),
        ("qwen3", "no q/k norms"),
        ("qwen3", "q/k norms after RoPE"),
        ("qwen3", "head_dim from hidden_size"),
        ("mistral", "other eps"),
    ],
)
@torch.no_grad()
def test_parity_can_fail(saved: dict, variant: str, fault: str) -> None:
    """Each thing the families add is needed: without it the logits are far from HF's."""
    folder, hf = saved[variant]
    if fault == "no q/k/v biases":
        ours, _ = _build_ours(folder, args_change={"attention_bias": False}, drop_routes=".bias")
    elif fault == "no q/k norms":
        ours, _ = _build_ours(folder, args_change={"qk_norm": False}, drop_routes="_norm.weight")
    elif fault == "q/k norms after RoPE":  # torchtune 0.6.1's order
        ours, _ = _build_ours(folder)
        _norms_after_rope(ours)
    elif fault == "head_dim from hidden_size":
        with pytest.raises(ValueError, match="does not fit"):
            _build_ours(folder, args_change={"head_dim": 16})
        return
    else:
        ours, _ = _build_ours(folder, args_change={"rms_norm_eps": 0.5})
    tokens = _tokens()
    diff = _max_diff(ours.decoder(tokens), hf(tokens).logits)
    assert diff > 1e-3, f"{variant} with {fault}: max |diff| only {diff:.3g}"


class _RopeThenNorm(nn.Module):
    """RoPE, then the per-head norm: torchtune 0.6.1's q/k-norm order.

    One RoPE module serves q and k; :class:`MultiHeadAttention` rotates q first, then k, so calls
    alternate between the q norm and the k norm.
    """

    def __init__(self, rope: nn.Module, q_norm: nn.Module, k_norm: nn.Module) -> None:
        super().__init__()
        self.rope, self.q_norm, self.k_norm = rope, q_norm, k_norm
        self.calls = 0

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[b, s, n, h_d]`` -> same."""
        norm = self.q_norm if self.calls % 2 == 0 else self.k_norm
        self.calls += 1
        return norm(self.rope(x, input_pos=input_pos))


def _norms_after_rope(model: nn.Module) -> None:
    """Rewire every self-attention with q/k norms to normalise after RoPE instead of before."""
    attentions = [
        m for m in model.modules() if isinstance(m, MultiHeadAttention) and m.pos_embeddings is not None
    ]
    assert len(attentions) == 4 and all(attn.q_norm is not None for attn in attentions)
    for attn in attentions:
        rope_then_norm = _RopeThenNorm(attn.pos_embeddings, attn.q_norm, attn.k_norm)
        attn.q_norm = attn.k_norm = None
        attn.pos_embeddings = rope_then_norm


# ----------------------------------------------------------------------------------------------
# Config reading and refusals
# ----------------------------------------------------------------------------------------------


def _config_dict(variant: str, hf_overrides: dict[str, Any] | None = None, **overrides: Any) -> dict:
    """The ``config.json`` dict of a tiny ``variant``: its HF config built with ``hf_overrides``
    (so derived fields such as ``layer_types`` follow), then ``overrides`` written over the dict
    (as in a hand-written or older ``config.json``)."""
    return {**_hf_config(variant, **(hf_overrides or {})).to_dict(), **overrides}


@pytest.mark.parametrize(
    ("variant", "family", "attention_bias", "qk_norm", "head_dim"),
    [
        ("llama", "llama", False, False, 16),
        ("qwen2", "qwen2", True, False, 16),
        ("qwen3", "qwen3", False, True, 32),
        ("mistral", "mistral", False, False, 16),
    ],
)
def test_registry_and_args(variant: str, family: str, attention_bias: bool, qk_norm: bool, head_dim: int) -> None:
    config = _config_dict(variant)
    found = decoder_family_for(config)
    assert found is DECODER_FAMILIES[family] and found.name == family
    args, num_layers = found.args_from_config(config)
    assert isinstance(args, LlamaDecoderArgs) and num_layers == 4
    assert (args.attention_bias, args.qk_norm, args.head_dim) == (attention_bias, qk_norm, head_dim)
    if family != "llama":
        assert args.rope_theta == 1_000_000.0 and args.rope_scaling is None


def test_unknown_model_type_lists_supported() -> None:
    with pytest.raises(ValueError, match="'gemma'") as error:
        decoder_family_for({"model_type": "gemma"})
    for model_type in ("llama", "mistral", "qwen2", "qwen3"):
        assert repr(model_type) in str(error.value)


def test_family_refuses_other_model_type() -> None:
    with pytest.raises(ValueError, match="model_type"):
        DECODER_FAMILIES["qwen2"].args_from_config(_config_dict("qwen3"))


_YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize(
    ("variant", "overrides", "match"),
    [
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}, "use_sliding_window"),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}, "use_sliding_window"),
        # an older config.json: no layer_types, so max_window_layers decides which layers slide
        (
            "qwen2",
            {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 3, "layer_types": None},
            "use_sliding_window",
        ),
        ("qwen2", {"layer_types": ["full_attention"] * 3 + ["sliding_attention"]}, "layer_types"),
        ("qwen2", {"layer_types": ["chunked_attention"] * 4}, "layer_types"),
        ("qwen3", {"attention_bias": True}, "attention_bias"),
        ("qwen2", {"hidden_act": "gelu"}, "hidden_act"),
        ("qwen3", {"hidden_act": "gelu"}, "hidden_act"),
        ("mistral", {"hidden_act": "gelu"}, "hidden_act"),
        ("mistral", {"sliding_window": 16}, "sliding_window"),
        ("mistral", {"sliding_window": MAX_POSITIONS - 1}, "sliding_window"),
        ("qwen2", {"rope_parameters": _YARN}, "rope_parameters"),
        ("qwen3", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}}, "rope_parameters"),
        ("mistral", {"rope_parameters": _YARN}, "rope_parameters"),
        (
            "qwen2",
            {"rope_parameters": None, "rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0}},
            "rope_scaling",
        ),
        (
            "qwen3",
            {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
            "rope_parameters",
        ),
    ],
)
def test_unsupported_fields_are_refused(variant: str, overrides: dict, match: str) -> None:
    sliding = {"use_sliding_window", "max_window_layers"} & set(overrides)
    if sliding and "layer_types" not in overrides:  # as transformers writes it: layer_types derived
        config = _config_dict(variant, hf_overrides=overrides)
        assert "sliding_attention" in config["layer_types"]
    else:
        config = _config_dict(variant, **overrides)
        for key in [key for key, value in overrides.items() if value is None]:
            del config[key]  # absent from config.json, not null
    family = decoder_family_for(config)
    with pytest.raises(ValueError, match=match):
        family.check_config(config)
    with pytest.raises(ValueError, match=match):
        family.args_from_config(config)


def test_window_boundary_is_exact(saved: dict) -> None:
    """A Mistral window one shorter than the context changes HF's logits on a full-length
    sequence (so refusing it is needed), while a window equal to the context does not (so
    accepting it is exact; its parity is in test_logits_match_hf)."""
    from transformers import MistralForCausalLM

    _, full = saved["mistral_window_eq_context"]
    shorter = MistralForCausalLM(_hf_config("mistral_window_eq_context", sliding_window=MAX_POSITIONS - 1)).eval()
    shorter.load_state_dict(full.state_dict())
    tokens = _tokens(1, MAX_POSITIONS, seed=3)
    with torch.no_grad():
        assert _max_diff(shorter(tokens).logits[:, -1], full(tokens).logits[:, -1]) > 1e-4
        assert _max_diff(shorter(tokens).logits[:, :-1], full(tokens).logits[:, :-1]) < ATOL


@pytest.mark.parametrize(
    ("variant", "dropped", "field", "hf_value"),
    [
        ("qwen3", "head_dim", "head_dim", 128),  # Qwen3Config's default, not hidden_size // heads
        ("mistral", "num_key_value_heads", "num_kv_heads", 8),  # MistralConfig's default
        ("qwen2", "rms_norm_eps", "rms_norm_eps", 1e-6),
        ("mistral", "rope_parameters", "rope_theta", 10_000.0),
    ],
)
def test_absent_fields_take_hf_defaults(variant: str, dropped: str, field: str, hf_value: Any) -> None:
    """A config.json without a field reads as HF's config class reads it."""
    import transformers

    config = _config_dict(variant)
    del config[dropped]
    if variant == "mistral":
        config["num_attention_heads"] = 8  # a multiple of the default 8 KV heads
    args, _ = decoder_family_for(config).args_from_config(config)
    assert getattr(args, field) == hf_value
    hf = getattr(transformers, VARIANTS[variant][0])(**{k: v for k, v in config.items() if k != "model_type"})
    hf_field = {"num_kv_heads": "num_key_value_heads"}.get(field, field)
    hf_actual = hf.rope_parameters["rope_theta"] if field == "rope_theta" else getattr(hf, hf_field)
    assert hf_actual == hf_value


def test_mistral_without_sliding_window_field_is_refused() -> None:
    """MistralConfig's default window (4096) is shorter than its default context (131072)."""
    config = _config_dict("mistral")
    del config["sliding_window"], config["max_position_embeddings"]
    with pytest.raises(ValueError, match="sliding_window=4096"):
        decoder_family_for(config).check_config(config)


def test_every_family_is_a_decoder_family() -> None:
    assert sorted(DECODER_FAMILIES) == ["llama", "mistral", "qwen2", "qwen3"]
    assert all(isinstance(family, DecoderFamily) for family in DECODER_FAMILIES.values())
    model_types = [t for family in DECODER_FAMILIES.values() for t in family.model_types]
    assert len(model_types) == len(set(model_types))


def test_bias_routes_target_our_names() -> None:
    """Route names, spelled out once (a typo in a family would otherwise fail only at load)."""
    config = _config_dict("qwen2")
    family = decoder_family_for(config)
    args, _ = family.args_from_config(config)
    routes = family.layer_routes(args, "model.layers.3", "decoder.layers.1.layer")
    assert TensorRoute("model.layers.3.self_attn.k_proj.bias", "decoder.layers.1.layer.attn.k_proj.bias") in routes
    qwen3 = decoder_family_for(_config_dict("qwen3"))
    args3, _ = qwen3.args_from_config(_config_dict("qwen3"))
    routes3 = qwen3.layer_routes(args3, "model.layers.0", "decoder.layers.0")
    assert TensorRoute("model.layers.0.self_attn.q_norm.weight", "decoder.layers.0.attn.q_norm.scale") in routes3
    assert not any(route.hf_key.endswith(".bias") for route in routes3)
