"""DeepFusionModel's trainable flags, fusion parameters, output chunks and state dicts."""

from __future__ import annotations

import copy
import importlib
import itertools
import pickle

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


class _UserAdapter(nn.Module):
    """A user's module declaring its new weights torchtune's way: ``fusion_params()`` returns
    local names. ``base`` is pretrained; ``adapter`` and ``scale`` are new."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.base = nn.Linear(dim, dim)
        self.adapter = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.ones(dim))

    def fusion_params(self) -> list[str]:
        return ["adapter.weight", "adapter.bias", "scale"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x)) * self.scale


class _UserEncoder(nn.Module):
    """Encoder made of a pretrained body and a user's adapter: ``images`` ``[b, s_e, d]`` in and out."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Linear(dim, dim)
        self.head = _UserAdapter(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


_USER_NEW = {"encoder.head.adapter.weight", "encoder.head.adapter.bias", "encoder.head.scale"}


@pytest.mark.parametrize("encoder_trainable,fusion_trainable", [(False, True), (True, False), (False, False)])
def test_user_module_with_fusion_params_trains_with_the_fusion_flag(
    encoder_trainable: bool, fusion_trainable: bool
) -> None:
    decoder = random_mllama().decoder
    dim = decoder.tok_embeddings.embed_dim
    model = DeepFusionModel(
        decoder,
        _UserEncoder(dim),
        decoder_trainable=False,
        encoder_trainable=encoder_trainable,
        fusion_trainable=fusion_trainable,
    )
    decoder_fusion = {n for n in get_fusion_params(model) if n.startswith("decoder.")}
    assert set(get_fusion_params(model)) == _USER_NEW | decoder_fusion
    assert "decoder.tok_embeddings.fusion_embedding.weight" in decoder_fusion
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = _USER_NEW | decoder_fusion if fusion_trainable else set()
    if encoder_trainable:
        expected |= {"encoder.body.weight", "encoder.body.bias", "encoder.head.base.weight", "encoder.head.base.bias"}
    assert trainable == expected
    if fusion_trainable:
        model.train()
        tokens = torch.randint(3, 128, (1, 6))
        images = torch.randn(1, 4, dim)
        model(tokens, encoder_input={"images": images}, encoder_mask=torch.ones(1, 6, 4, dtype=torch.bool)).sum().backward()
        assert model.encoder.head.adapter.weight.grad.abs().sum() > 0
        assert model.encoder.head.base.weight.grad is None and model.encoder.body.weight.grad is None


def test_set_trainable_params_with_get_fusion_params_reaches_a_user_module() -> None:
    model = nn.Sequential(nn.Linear(4, 4), _UserAdapter(4))
    set_trainable_params(model, get_fusion_params(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"1.adapter.weight", "1.adapter.bias", "1.scale"}


def test_register_fusion_module_gives_a_fusion_params_method_listing_its_parameters() -> None:
    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    assert not hasattr(module, "fusion_params")
    assert register_fusion_module(module) is module
    assert module.fusion_params() == ["0.weight", "0.bias", "2.weight"]
    # the method reads the module when called, so parameters added later are listed too
    module.extra = nn.Parameter(torch.zeros(1))
    assert module.fusion_params() == ["extra", "0.weight", "0.bias", "2.weight"]
    # as in torchtune, registration wins over a class's own fusion_params
    layer = register_fusion_module(FusionLayer(nn.Linear(2, 2), nn.Linear(2, 2)))
    assert set(layer.fusion_params()) == {"layer.weight", "layer.bias", "fusion_layer.weight", "fusion_layer.bias"}


def test_registered_module_survives_deepcopy_and_pickle_bound_to_the_copy() -> None:
    original = register_fusion_module(nn.Linear(2, 2))
    for clone in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
        clone.extra = nn.Parameter(torch.zeros(1))
        assert clone.fusion_params() == ["weight", "bias", "extra"]
        assert original.fusion_params() == ["weight", "bias"]
        assert set(get_fusion_params(nn.Sequential(clone))) == {"0.weight", "0.bias", "0.extra"}


def test_nested_declarations_are_listed_once_without_error() -> None:
    inner = register_fusion_module(nn.Linear(2, 2))
    layer = FusionLayer(nn.Linear(2, 2), nn.Sequential(inner, _UserAdapter(2)))
    model = nn.Sequential(layer, register_fusion_module(nn.Sequential(_UserAdapter(2))))
    names = list(get_fusion_params(model))
    assert len(names) == len(set(names))
    assert set(names) == {f"0.fusion_layer.{n}" for n, _ in layer.fusion_layer.named_parameters()} | {
        f"1.{n}" for n, _ in model[1].named_parameters()
    }


def _parity_tree(register) -> nn.Module:
    """A module tree that exercises every way of declaring fusion parameters."""

    class ListAttribute(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2))
            self.fusion_params = ["weight"]  # not callable: ignored by both

    class DeclaresNothing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(2, 2)

        def fusion_params(self) -> list[str]:
            return []

    projection = nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.Linear(2, 2))
    register(projection)
    inner = nn.Linear(2, 2)
    register(inner)
    return nn.ModuleDict(
        {
            "embed": FusionEmbedding(5, 2, 2),
            "layers": nn.ModuleList(
                [
                    nn.Linear(2, 2),
                    FusionLayer(nn.Linear(2, 2), nn.Sequential(inner, _UserAdapter(2))),
                    FusionLayer(nn.Linear(2, 2), nn.Linear(2, 2), fusion_first=False),
                ]
            ),
            "encoder": nn.Sequential(_UserEncoder(2), projection),
            "others": nn.ModuleList([ListAttribute(), DeclaresNothing()]),
        }
    )


def test_get_fusion_params_matches_torchtune() -> None:
    """Same names, same order, same tensors as torchtune's get_fusion_params on the same tree,
    whichever library registered the modules. torchtune must be importable: no skip."""
    torchtune_fusion = importlib.import_module("torchtune.modules.model_fusion")
    for register in (register_fusion_module, torchtune_fusion.register_fusion_module):
        tree = _parity_tree(register)
        ours, theirs = get_fusion_params(tree), torchtune_fusion.get_fusion_params(tree)
        assert list(ours) == list(theirs)
        assert all(ours[name] is theirs[name] for name in ours)
        assert "others.0.weight" not in ours and "others.1.proj.weight" not in ours
        assert {"encoder.0.head.scale", "layers.1.fusion_layer.0.weight", "encoder.1.2.bias"} <= set(ours)
    model = random_mllama()
    assert list(get_fusion_params(model)) == list(torchtune_fusion.get_fusion_params(model))
    assert list(get_fusion_params(model)) != []


def test_fusion_params_naming_a_non_parameter_is_an_error_naming_the_module() -> None:
    class Bogus(_UserAdapter):
        def fusion_params(self) -> list[str]:
            return ["adapter.weight", "adapter.nope"]

    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(Bogus(4)))
    with pytest.raises(ValueError, match=r"'1\.0' \(Bogus\).*adapter\.nope"):
        get_fusion_params(model)
    with pytest.raises(ValueError, match="root module"):
        get_fusion_params(Bogus(4))
    with pytest.raises(ValueError, match="adapter.nope"):
        DeepFusionModel(random_mllama().decoder, Bogus(64))
