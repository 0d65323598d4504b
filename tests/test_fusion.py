"""DeepFusionModel's trainable flags, fusion parameters, output chunks and state dicts."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fusiontrain.modules import (
    DeepFusionModel,
    FusionEmbedding,
    FusionLayer,
    get_fusion_params,
    register_fusion_module,
    set_trainable_params,
)
from tests.helpers.tiny_models import IMAGE_TOKEN, random_mllama, random_pixels


def _expected_fusion_names(model: DeepFusionModel) -> set[str]:
    """Fusion parameters by their structural definition, independent of get_fusion_params."""
    names = {"decoder.tok_embeddings.fusion_embedding.weight"}
    names |= {f"encoder.projection.{n}" for n, _ in model.encoder.projection.named_parameters()}
    for index, layer in enumerate(model.decoder.layers):
        if isinstance(layer, FusionLayer):
            names |= {f"decoder.layers.{index}.fusion_layer.{n}" for n, _ in layer.fusion_layer.named_parameters()}
    return names


def test_fusion_params_are_cross_attention_projection_head_and_new_rows() -> None:
    model = random_mllama()
    found = set(get_fusion_params(model))
    assert found == _expected_fusion_names(model)
    assert any(".fusion_layer.attn.q_proj" in n for n in found)
    assert any(n.startswith("encoder.projection.layers.") for n in found)
    assert "encoder.projection.output.weight" in found
    assert not any(n.startswith("encoder.vision.") for n in found)
    assert not any(".layer.attn." in n for n in found)
    assert "decoder.tok_embeddings.weight" not in found


@pytest.mark.parametrize("decoder_trainable,encoder_trainable,fusion_trainable", list(itertools.product([False, True], repeat=3)))
def test_trainable_flags_set_exactly_the_expected_parameters(
    decoder_trainable: bool, encoder_trainable: bool, fusion_trainable: bool
) -> None:
    model = random_mllama(
        decoder_trainable=decoder_trainable, encoder_trainable=encoder_trainable, fusion_trainable=fusion_trainable
    )
    fusion = _expected_fusion_names(model)
    expected = set()
    for name, _ in model.named_parameters():
        if name in fusion:
            if fusion_trainable:
                expected.add(name)
        elif name.startswith("decoder.") and decoder_trainable:
            expected.add(name)
        elif name.startswith("encoder.") and encoder_trainable:
            expected.add(name)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_default_training_reaches_only_fusion_params_and_flows_through_frozen_layers() -> None:
    """Fusion-only by default: a backward fills grads of fusion params only, including the first
    cross-attention layer, which sits below frozen decoder layers."""
    model = random_mllama().train()
    tokens = torch.randint(3, 128, (2, 10))
    tokens[:, 0] = IMAGE_TOKEN
    logits = model(tokens, encoder_input=random_pixels([[1], [2]]), encoder_mask=torch.ones(2, 10, 10, dtype=torch.bool))
    logits.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == _expected_fusion_names(model)
    first_cross = model.decoder.layers[1].fusion_layer.attn.q_proj.weight
    assert first_cross.grad.abs().sum() > 0


def test_output_chunks_concatenate_to_the_full_logits() -> None:
    model = random_mllama()
    tokens = torch.randint(3, 128, (2, 11))
    with torch.no_grad():
        full = model(tokens)
        model.set_num_output_chunks(4)
        chunks = model(tokens)
    assert isinstance(chunks, list) and len(chunks) == 4
    # equal up to matmul blocking: the chunks are multiplied as smaller matrices
    torch.testing.assert_close(torch.cat([c.float() for c in chunks], dim=1), full, atol=1e-6, rtol=1e-6)


def test_output_hidden_states_returns_layer_inputs_then_logits() -> None:
    model = random_mllama()
    model.decoder.output_hidden_states = [0, 2]
    tokens = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        outputs = model(tokens)
    assert len(outputs) == 3
    torch.testing.assert_close(outputs[0], model.decoder.tok_embeddings(tokens))
    assert outputs[-1].shape == (1, 5, 128)


def test_state_dict_round_trips_and_keys_are_parameter_names() -> None:
    source, target = random_mllama(seed=0), random_mllama(seed=1)
    state = source.state_dict()
    assert set(state) == {n for n, _ in source.named_parameters()}
    target.load_state_dict(state)
    tokens = torch.randint(3, 128, (1, 6))
    tokens[0, 1] = IMAGE_TOKEN
    inputs = dict(encoder_input=random_pixels([[3]]), encoder_mask=torch.ones(1, 6, 10, dtype=torch.bool))
    with torch.no_grad():
        assert torch.equal(source(tokens, **inputs), target(tokens, **inputs))


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_loading_a_pretrained_part_leaves_fusion_params_untouched(part: str) -> None:
    pretrained, model = random_mllama(seed=0), random_mllama(seed=1)
    fusion = get_fusion_params(model)
    fusion_before = {n: p.detach().clone() for n, p in fusion.items()}
    base_state = {
        k: v for k, v in getattr(pretrained, part).state_dict().items() if f"{part}.{k}" not in fusion
    }
    result = getattr(model, part).load_state_dict(base_state, strict=False)
    assert not result.unexpected_keys
    assert {f"{part}.{k}" for k in result.missing_keys} == {n for n in fusion if n.startswith(f"{part}.")}
    for name, param in model.named_parameters():
        if name in fusion:
            assert torch.equal(param, fusion_before[name]), name
        elif name.startswith(f"{part}."):
            assert torch.equal(param, pretrained.get_parameter(name)), name


def test_fusion_embedding_routes_ids_to_their_rows_and_grads() -> None:
    embedding = FusionEmbedding(vocab_size=10, fusion_vocab_size=3, embed_dim=4)
    tokens = torch.tensor([[0, 9, 10, 12, 5]])
    out = embedding(tokens)
    assert torch.equal(out[0, 1], embedding.weight[9])
    assert torch.equal(out[0, 3], embedding.fusion_embedding.weight[2])
    out.sum().backward()
    assert torch.equal(embedding.fusion_embedding.weight.grad[1], torch.zeros(4))  # id 11 unused
    assert embedding.fusion_embedding.weight.grad[0].abs().sum() > 0
    assert embedding.weight.grad[10:].numel() == 0 and embedding.weight.grad[1].abs().sum() == 0
    with pytest.raises(IndexError):
        embedding(torch.tensor([[13]]))


def test_register_fusion_module_and_set_trainable_params() -> None:
    head = register_fusion_module(nn.Linear(3, 3))
    model = nn.Sequential(nn.Linear(3, 3), head)
    assert set(get_fusion_params(model)) == {"1.weight", "1.bias"}
    set_trainable_params(model, {"0.bias"})
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.bias"]
    with pytest.raises(KeyError, match="no such parameters"):
        set_trainable_params(model, {"2.weight"})


def test_frozen_vision_encoder_keeps_no_activations() -> None:
    """Fusion-only: the pretrained ViT runs under no_grad (nothing saved for backward); the
    projection head, a fusion module, still builds a graph."""
    model = random_mllama().train()
    seen = {}
    model.encoder.vision.register_forward_hook(lambda m, i, out: seen.update(vision=out.hidden.requires_grad))
    model.encoder.projection.register_forward_hook(lambda m, i, out: seen.update(projection=out.requires_grad))
    model.encoder(**random_pixels([[1]]))
    assert seen == {"vision": False, "projection": True}
    trainable = random_mllama(encoder_trainable=True).train()
    trainable.encoder.vision.register_forward_hook(lambda m, i, out: seen.update(vision=out.hidden.requires_grad))
    trainable.encoder(**random_pixels([[1]]))
    assert seen["vision"] is True
