"""A DeepFusionModel with an encoder per modality (image and audio), each with fusion layers of
its own: the fusion layers attend only to their modality, a modality may be absent, shut gates
give the plain decoder, KV-cached decoding equals the full forward, and the fusion parameters and
trainable flags cover both modalities.

The model is built from the library's own Llama blocks with random weights and toy encoders (a
linear feature map plus a registered projection head); the HF-loaded encoders and the composed
model are tested with their families."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusiontrain.families.llama import LlamaDecoderArgs, llama_cross_attention_layer, llama_self_attention_layer
from fusiontrain.modules import (
    DeepFusionModel,
    FusionEmbedding,
    FusionLayer,
    RMSNorm,
    TanhGate,
    TransformerDecoder,
    get_fusion_params,
    register_fusion_module,
)
from tests.helpers.tiny_models import open_gates

ARGS = LlamaDecoderArgs(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8,
    rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_seq_len=64,
)
# Layer index -> the modalities fused there: image alone, audio alone, both (image first).
FUSED = {1: ("image",), 2: ("audio",), 3: ("image", "audio")}
NUM_LAYERS = 4
S, S_IMAGE, S_AUDIO = 12, 5, 7  # text tokens; encoder tokens per row of each modality
AUDIO_FROM = 6  # tokens from here on see the clip


class ToyEncoder(nn.Module):
    """``{key}`` ``[b, n, c]`` -> ``[b, n, d]``: a linear map, a block stack of two tanh-linear
    blocks (``layers``: what checkpointing and FSDP units work on), then a registered projection."""

    def __init__(self, key: str, in_dim: int, width: int) -> None:
        super().__init__()
        self.key = key
        self.features = nn.Linear(in_dim, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(2))
        self.projection = register_fusion_module(nn.Linear(16, width))

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        h = self.features(inputs[self.key])
        for layer in self.layers:
            h = layer(h)
        return self.projection(h)


def _decoder(fused: dict[int, tuple[str, ...]]) -> TransformerDecoder:
    layers: list[nn.Module] = []
    for index in range(NUM_LAYERS):
        layer = llama_self_attention_layer(ARGS)
        if index in fused:
            layer = FusionLayer(layer, {modality: llama_cross_attention_layer(ARGS) for modality in fused[index]})
        layers.append(layer)
    return TransformerDecoder(
        tok_embeddings=FusionEmbedding(ARGS.vocab_size, 2, ARGS.hidden_size), layers=layers,
        max_seq_len=ARGS.max_seq_len, num_heads=ARGS.num_heads, head_dim=ARGS.head_dim,
        norm=RMSNorm(ARGS.hidden_size), output=nn.Linear(ARGS.hidden_size, ARGS.vocab_size, bias=False),
    )


def _model(seed: int = 0, fused: dict[int, tuple[str, ...]] = FUSED, **flags: bool) -> DeepFusionModel:
    torch.manual_seed(seed)
    encoders = {"image": ToyEncoder("pixels", 6, ARGS.hidden_size), "audio": ToyEncoder("input_features", 4, ARGS.hidden_size)}
    model = DeepFusionModel(_decoder(fused), encoders, **flags)
    with torch.no_grad():
        for param in model.parameters():  # RMSNorm scales and gates start at 1 and 0: give them values too
            param.normal_(0.0, 0.3) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    open_gates(model, seed)
    return model.eval()


def _inputs(seed: int = 1, b: int = 2) -> tuple[torch.Tensor, dict, dict]:
    """Tokens ``[b, S]``; both encoders' inputs; masks: every token sees the image, tokens from
    AUDIO_FROM on see the clip."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS.vocab_size, (b, S), generator=generator)
    tokens[:, 0], tokens[:, AUDIO_FROM] = ARGS.vocab_size, ARGS.vocab_size + 1  # the two placeholders (new rows)
    encoder_input = {
        "image": {"pixels": torch.randn(b, S_IMAGE, 6, generator=generator)},
        "audio": {"input_features": torch.randn(b, S_AUDIO, 4, generator=generator)},
    }
    audio_mask = torch.zeros(b, S, S_AUDIO, dtype=torch.bool)
    audio_mask[:, AUDIO_FROM:] = True
    masks = {"image": torch.ones(b, S, S_IMAGE, dtype=torch.bool), "audio": audio_mask}
    return tokens, encoder_input, masks


def _shut_gates(model: nn.Module, modality: str | None = None) -> None:
    """Zero the tanh gates of every fusion layer (or only of ``modality``'s)."""
    with torch.no_grad():
        for layer in model.decoder.layers:
            if isinstance(layer, FusionLayer):
                for name, part in layer.fusion_layer.items():
                    if modality in (None, name):
                        for gate in (part.ca_scale, part.mlp_scale):
                            assert isinstance(gate, TanhGate)
                            gate.scale.zero_()


def test_shut_gates_give_the_plain_decoder_and_open_ones_see_both_modalities() -> None:
    tokens, encoder_input, masks = _inputs()
    model = _model()
    plain = _decoder({})
    for part in ("tok_embeddings", "norm", "output"):
        getattr(plain, part).load_state_dict(getattr(model.decoder, part).state_dict())
    for index, layer in enumerate(model.decoder.layers):  # a fused layer's pretrained half is its .layer
        plain.layers[index].load_state_dict((layer.layer if isinstance(layer, FusionLayer) else layer).state_dict())
    with torch.no_grad():
        opened = model(tokens, encoder_input=encoder_input, encoder_mask=masks)
        _shut_gates(model)
        shut = model(tokens, encoder_input=encoder_input, encoder_mask=masks)
        want = plain(tokens)
    assert torch.equal(shut, want)
    assert not torch.allclose(opened, want, atol=1e-3)


def test_a_clip_changes_only_the_tokens_that_see_it_and_the_image_layers_never_read_it() -> None:
    tokens, encoder_input, masks = _inputs()
    model = _model()
    model.decoder.output_hidden_states = [2]  # the input of layer 2: after the image-only layer 1
    other = {**encoder_input, "audio": {"input_features": encoder_input["audio"]["input_features"] + 1.0}}
    with torch.no_grad():
        before_audio, logits = model(tokens, encoder_input=encoder_input, encoder_mask=masks)
        before_audio_changed, changed = model(tokens, encoder_input=other, encoder_mask=masks)
    assert torch.equal(before_audio, before_audio_changed)  # layers 0-1 fuse only the image
    assert torch.equal(logits[:, :AUDIO_FROM], changed[:, :AUDIO_FROM])
    assert (logits[:, AUDIO_FROM:] - changed[:, AUDIO_FROM:]).abs().amax(dim=-1).min() > 1e-4  # every later token


def test_an_absent_modality_leaves_its_fusion_layers_a_no_op() -> None:
    tokens, encoder_input, masks = _inputs()
    model = _model()
    with torch.no_grad():
        image_only = model(tokens, encoder_input={"image": encoder_input["image"]}, encoder_mask={"image": masks["image"]})
        as_none = model(tokens, encoder_input={**encoder_input, "audio": None}, encoder_mask=masks)
        _shut_gates(model, "audio")
        audio_shut = model(tokens, encoder_input=encoder_input, encoder_mask=masks)
        text_only = model(tokens)
        _shut_gates(model)
        all_shut = model(tokens, encoder_input=encoder_input, encoder_mask=masks)
    assert torch.equal(image_only, audio_shut) and torch.equal(as_none, audio_shut)
    assert torch.equal(text_only, all_shut)


def test_the_encoders_run_in_the_models_order_whatever_the_inputs_order() -> None:
    """Under FSDP every rank must meet the encoders' collectives in one order; a rank whose batch
    held only clips lists its blank image slot after them (with_placeholder_items), so the order
    of ``encoder_input`` must not decide which encoder runs first (it hung or crashed gloo)."""
    tokens, encoder_input, masks = _inputs()
    model = _model()
    ran: list[str] = []
    for modality in model.modalities:
        model.encoder[modality].register_forward_pre_hook(lambda *_, m=modality: ran.append(m))
    with torch.no_grad():
        forward = model(tokens, encoder_input=encoder_input, encoder_mask=masks)
        reversed_input = dict(reversed(list(encoder_input.items())))
        assert list(reversed_input) != list(model.modalities)
        backward = model(tokens, encoder_input=reversed_input, encoder_mask=dict(reversed(list(masks.items()))))
    assert ran == [*model.modalities, *model.modalities]
    assert torch.equal(forward, backward)


def test_kv_cached_decoding_equals_the_full_forward_for_both_modalities() -> None:
    """Prefill with both encoders, then one token at a time from the cached encoder keys and
    values (no encoder input), each step's masks the rows of the full masks; after
    reset_caches, the same again."""
    tokens, encoder_input, masks = _inputs(b=1)
    model = _model()
    with torch.no_grad():
        full = model(tokens, encoder_input=encoder_input, encoder_mask=masks)
        model.setup_caches(1, torch.float32, encoder_max_seq_len={"image": S_IMAGE, "audio": S_AUDIO}, decoder_max_seq_len=S)
        assert model.caches_are_setup() and model.caches_are_enabled()
        for _ in range(2):
            model.reset_caches()
            prefill = 4
            causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
            steps = [
                model(
                    tokens[:, :prefill], encoder_input=encoder_input, mask=causal[None, :prefill],
                    encoder_mask={k: v[:, :prefill] for k, v in masks.items()}, input_pos=torch.arange(prefill)[None],
                )
            ]
            for pos in range(prefill, S):
                steps.append(
                    model(
                        tokens[:, pos : pos + 1], mask=causal[None, pos : pos + 1],
                        encoder_mask={k: v[:, pos : pos + 1] for k, v in masks.items()}, input_pos=torch.tensor([[pos]]),
                    )
                )
            torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=5e-5, rtol=1e-4)  # logits of order 1


def test_cache_lengths_per_modality_reach_each_fusion_layer() -> None:
    model = _model()
    model.setup_caches(2, torch.float32, encoder_max_seq_len={"image": 5, "audio": 9}, decoder_max_seq_len=16)
    for layer in model.decoder.layers:
        if isinstance(layer, FusionLayer):
            for modality, part in layer.fusion_layer.items():
                assert part.attn.kv_cache.k_cache.shape[2] == {"image": 5, "audio": 9}[modality]
            assert layer.layer.attn.kv_cache.k_cache.shape[2] == 16
    with pytest.raises(ValueError, match=r"names \['video'\], for which this model has no encoder"):
        _model().setup_caches(1, torch.float32, encoder_max_seq_len={"image": 5, "audio": 9, "video": 3})


def test_fusion_params_and_trainable_flags_cover_every_modality() -> None:
    model = _model()
    names = set(get_fusion_params(model))
    expected = {"decoder.tok_embeddings.fusion_embedding.weight"}
    for modality in ("image", "audio"):
        expected |= {f"encoder.{modality}.projection.{n}" for n, _ in model.encoder[modality].projection.named_parameters()}
    for index, modalities in FUSED.items():
        for modality in modalities:
            part = model.decoder.layers[index].fusion_layer[modality]
            expected |= {f"decoder.layers.{index}.fusion_layer.{modality}.{n}" for n, _ in part.named_parameters()}
    assert names == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected  # fusion-only by default
    trained = _model(encoder_trainable=True, fusion_trainable=False)
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == {
        n for n, _ in trained.named_parameters() if n.startswith("encoder.") and n not in expected
    }
    assert any(n.startswith("encoder.audio.features.") for n, p in trained.named_parameters() if p.requires_grad)


def test_a_backward_reaches_both_modalities_fusion_parameters() -> None:
    tokens, encoder_input, masks = _inputs()
    model = _model().train()
    model(tokens, encoder_input=encoder_input, encoder_mask=masks).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == set(get_fusion_params(model))


def test_inputs_that_are_not_keyed_by_modality_are_refused_naming_the_fix() -> None:
    tokens, encoder_input, masks = _inputs()
    model = _model()
    with pytest.raises(ValueError, match=r"names \['pixels'\], for which this model has no encoder; it has \['image', 'audio'\]"):
        model(tokens, encoder_input=encoder_input["image"], encoder_mask=masks)
    with pytest.raises(TypeError, match="pass encoder_mask as a mapping from modality"):
        model(tokens, encoder_input=encoder_input, encoder_mask=masks["image"])
    with pytest.raises(ValueError, match="empty mapping"):
        DeepFusionModel(_decoder({}), {})
    one = DeepFusionModel(_decoder({}), ToyEncoder("pixels", 6, ARGS.hidden_size))
    with pytest.raises(TypeError, match="this model has one encoder"):
        one.setup_caches(1, torch.float32, encoder_max_seq_len={"image": 5})


def test_sharded_and_checkpointed_equals_the_plain_model(mesh) -> None:
    """FSDP2 units (every block of both encoders, each modality's fusion layer its own unit, both
    projection heads) with full activation checkpointing, in a world of one: the same loss and
    gradients as the unsharded model."""
    from torch.distributed.tensor import DTensor

    from fusiontrain.parallel.fsdp import parallelize

    tokens, encoder_input, masks = _inputs()
    reference, model = _model().train(), _model().train()
    units = parallelize(
        model, mesh, torch.device("cpu"), activation_checkpointing="full", mixed_precision="auto", fusion_layer_sharding="split"
    )
    for modality in ("image", "audio"):
        assert {f"encoder.{modality}.layers.0", f"encoder.{modality}.layers.1", f"encoder.{modality}.projection"} <= set(units)
    assert {"decoder.layers.3.layer", "decoder.layers.3.fusion_layer.image", "decoder.layers.3.fusion_layer.audio"} <= set(units)
    grads = []
    for net in (reference, model):
        loss = net(tokens, encoder_input=encoder_input, encoder_mask=masks).square().mean()
        loss.backward()
        grads.append(
            (loss.detach(), {
                name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                for name, p in net.named_parameters() if p.grad is not None
            })
        )
    (want_loss, want), (got_loss, got) = grads
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    assert {name.replace("._checkpoint_wrapped_module", "") for name in got} == set(want) == set(get_fusion_params(reference))
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name.replace("._checkpoint_wrapped_module", "")], rtol=1e-5, atol=1e-7, msg=name)


def test_lora_adapts_one_encoder_of_several_or_both() -> None:
    """LoRA side encoder.<modality> adapts that encoder's blocks only; side encoder adapts every
    encoder's; fusion layers never."""
    from fusiontrain.modules.lora import select_lora_targets

    model = _model()
    audio = select_lora_targets(model, sides=("encoder.audio",), targets=("all-linear",))
    assert audio == ["encoder.audio.layers.0.0", "encoder.audio.layers.1.0"]
    both = select_lora_targets(model, sides=("encoder",), targets=("all-linear",))
    assert sorted(both) == sorted([*audio, "encoder.image.layers.0.0", "encoder.image.layers.1.0"])
    with pytest.raises(ValueError, match="unknown LoRA side"):
        select_lora_targets(model, sides=("encoder.audio.x",), targets=("all-linear",))
