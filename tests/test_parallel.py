"""fusiontrain.parallel: block discovery, activation checkpointing, mixed precision, FSDP2 units.

Activation checkpointing is compared bitwise with an unwrapped twin; the FSDP tests shard a
meta-built twin in a single-process gloo group, fill it from a reference model's state dict and
compare logits and gradients with that reference.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fusiontrain.loss import chunked_cross_entropy_sum
from fusiontrain.models.hf_checkpoint import copy_rows_into
from fusiontrain.models.mllama import build_mllama
from fusiontrain.modules import FusionLayer
from fusiontrain.modules.fusion import get_fusion_params
from fusiontrain.parallel import (
    apply_activation_checkpointing,
    block_stacks,
    canonical_parameters,
    checkpoint_every,
    mixed_precision_policy,
    parallelize,
    shard_model,
)
from tests.helpers.tiny_models import IMAGE_TOKEN, VOCAB, random_mllama, random_pixels, tiny_mllama_args

STACKS = {"decoder.layers": 4, "encoder.vision.layers": 4, "encoder.projection.layers": 2}
FUSION_BLOCKS = {"decoder.layers": {1, 3}}  # the tiny model's FusionLayers (text layers 1 and 4)
TOKENS_PER_TILE = 5  # (28 // 14) ** 2 + 1
SEQ = 16


def _batch(image_tokens: bool = True) -> dict:
    """Two rows, images of 2 + 4 tiles (s_e = 2 images * 2 tiles * 5 = 20), an encoder mask where
    row 1's first tokens see no image, and labels with ignored prompt positions."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    if image_tokens:
        tokens[:, 0] = IMAGE_TOKEN
        tokens[1, 9] = IMAGE_TOKEN
    encoder_mask = torch.zeros(2, SEQ, 2 * 2 * TOKENS_PER_TILE, dtype=torch.bool)
    encoder_mask[0, :, :10] = True  # row 0: its 1x2 image
    encoder_mask[1, 3:, :5] = True  # row 1: the 1x1 image from token 3 on
    encoder_mask[1, 9:, 10:20] = True  # and the 2x1 image from token 9 on
    labels = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    labels[:, :3] = -100
    labels[1, -2:] = -100
    return {
        "tokens": tokens,
        "encoder_input": random_pixels([[2], [1, 3]]),
        "encoder_mask": encoder_mask,
        "labels": labels,
    }


def _loss_and_grads(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.set_skip_output_projection(True)
    hidden = model(batch["tokens"], encoder_input=batch["encoder_input"], encoder_mask=batch["encoder_mask"])
    loss = chunked_cross_entropy_sum(hidden, batch["labels"], model.decoder.output, num_chunks=3)
    loss.backward()
    grads = {}
    for name, param in canonical_parameters(model).items():
        grad = param.grad
        grads[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad
    return loss.detach(), grads


# -- blocks and activation checkpointing ----------------------------------------------------------


def test_block_stacks_finds_the_three_stacks() -> None:
    model = random_mllama()
    found = {name: len(stack) for name, stack in block_stacks(model)}
    assert found == STACKS
    for name, stack in block_stacks(model):
        assert stack is model.get_submodule(name)


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_wraps_every_kth_block(every: int) -> None:
    model = random_mllama()
    names_before = [name for name, _ in model.named_parameters()]
    originals = {name: list(stack) for name, stack in block_stacks(model)}

    count = apply_activation_checkpointing(model, every)

    expected = {name: set(range(0, n, every)) for name, n in STACKS.items()}
    assert count == sum(len(indices) for indices in expected.values())
    for name, stack in block_stacks(model):
        assert len(stack) == STACKS[name]
        for index, block in enumerate(stack):
            if index in expected[name]:
                assert isinstance(block, CheckpointWrapper), (name, index)
                assert block.checkpoint_impl == CheckpointImpl.NO_REENTRANT
                assert block._checkpoint_wrapped_module is originals[name][index]
            else:
                assert block is originals[name][index], (name, index)
    if every == 1:  # FusionLayers are wrapped like any block
        for index in FUSION_BLOCKS["decoder.layers"]:
            inner = model.decoder.layers[index]._checkpoint_wrapped_module
            assert isinstance(inner, FusionLayer)
    assert list(canonical_parameters(model)) == names_before
    assert [name for name, _ in model.named_parameters()] != names_before  # the wrappers did rename


def test_checkpoint_every() -> None:
    assert [checkpoint_every(mode) for mode in ("none", "full", "1", "3")] == [0, 1, 1, 3]
    model = random_mllama()
    assert apply_activation_checkpointing(model, 0) == 0
    assert not any(isinstance(m, CheckpointWrapper) for m in model.modules())


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_is_exact(every: int) -> None:
    """Fusion-only training: same loss and gradients, bitwise, with and without checkpointing."""
    batch = _batch()
    reference, wrapped = random_mllama(seed=0), random_mllama(seed=0)
    assert apply_activation_checkpointing(wrapped, every) > 0
    want_loss, want = _loss_and_grads(reference, batch)
    got_loss, got = _loss_and_grads(wrapped, batch)

    assert torch.equal(got_loss, want_loss)
    assert got.keys() == want.keys()
    with_grad = [name for name, grad in want.items() if grad is not None]
    assert [name for name, grad in got.items() if grad is not None] == with_grad
    for name in with_grad:
        assert torch.equal(got[name], want[name]), name

    fusion = set(get_fusion_params(reference))
    trainable = {name for name, p in reference.named_parameters() if p.requires_grad}
    assert fusion == trainable and len(fusion) > 20
    assert set(with_grad) == fusion
    for name in fusion:  # what the reentrant variant loses
        assert got[name] is not None and got[name].abs().sum() > 0, name


def test_reentrant_checkpointing_would_be_caught() -> None:
    """The comparison above can fail: REENTRANT wrappers drop the projection head's grads (its
    input comes from the frozen ViT run under no_grad)."""
    batch = _batch()
    reference, wrapped = random_mllama(seed=0), random_mllama(seed=0)
    for _, stack in block_stacks(wrapped):
        for index in range(len(stack)):
            stack[index] = checkpoint_wrapper(stack[index], checkpoint_impl=CheckpointImpl.REENTRANT)
    _, want = _loss_and_grads(reference, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, got = _loss_and_grads(wrapped, batch)
    lost = [name for name in get_fusion_params(reference) if got[name] is None and want[name] is not None]
    assert any(name.startswith("encoder.projection.layers.") for name in lost)


# -- mixed precision ------------------------------------------------------------------------------


def test_mixed_precision_policy() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    auto_cpu = mixed_precision_policy("auto", cpu)
    assert auto_cpu.param_dtype is None and auto_cpu.reduce_dtype is None
    assert mixed_precision_policy("fp32", cpu).param_dtype is None
    assert mixed_precision_policy("fp32", cuda).param_dtype is None
    for mode, device in (("bf16", cpu), ("auto", cuda), ("bf16", cuda)):
        policy = mixed_precision_policy(mode, device)
        assert policy.param_dtype == torch.bfloat16, (mode, device)
        assert policy.reduce_dtype == torch.float32, (mode, device)


# -- FSDP2 in a world of one ----------------------------------------------------------------------


def _meta_twin() -> nn.Module:
    with torch.device("meta"):
        return build_mllama(tiny_mllama_args())


def _fill_from(model: nn.Module, reference: nn.Module) -> None:
    """Allocate a sharded meta-built model and copy the reference's weights into its shards."""
    model.to_empty(device="cpu")
    state = reference.state_dict()
    params = canonical_parameters(model)
    assert params.keys() == state.keys()
    assert not list(model.buffers())  # nothing that to_empty leaves uninitialised
    with torch.no_grad():
        for name, param in params.items():
            copy_rows_into(param, lambda start, stop, full=state[name]: full[start:stop])


def _expected_units(split: bool) -> list[str]:
    units = []
    for stack, n in STACKS.items():
        for index in range(n):
            if split and index in FUSION_BLOCKS.get(stack, ()):
                units += [f"{stack}.{index}.layer", f"{stack}.{index}.fusion_layer"]
            else:
                units.append(f"{stack}.{index}")
    return units + ["decoder.tok_embeddings", "decoder.norm+output", "encoder.projection", "<root>"]


@pytest.mark.parametrize("split", [False, True])
def test_shard_model_units_and_logits(mesh, split: bool) -> None:
    reference = random_mllama(seed=0)
    model = _meta_twin()
    units = shard_model(model, mesh, mp_policy=mixed_precision_policy("auto", torch.device("cpu")), split_fusion_layers=split)

    assert units == _expected_units(split)
    assert len(units) == 10 + 4 + (2 if split else 0)
    for unit in units:
        if unit == "<root>":
            modules = [model]
        elif unit == "decoder.norm+output":
            modules = [model.decoder.norm, model.decoder.output]
        else:
            modules = [model.get_submodule(unit)]
        assert all(isinstance(m, FSDPModule) for m in modules), unit
    if split:  # the FusionLayer wrapper itself is not a unit
        assert not isinstance(model.decoder.layers[1], FSDPModule)
    assert all(isinstance(p, DTensor) for p in model.parameters())

    _fill_from(model, reference)
    model.eval()
    batch = _batch()
    with torch.no_grad():
        want = reference(batch["tokens"], encoder_input=batch["encoder_input"], encoder_mask=batch["encoder_mask"])
        got = model(batch["tokens"], encoder_input=batch["encoder_input"], encoder_mask=batch["encoder_mask"])
    assert got.shape == want.shape == (2, SEQ, VOCAB)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert want.abs().max() > 1e-2


def test_parallelize_with_checkpointing_matches_reference_grads(mesh) -> None:
    """parallelize() (full AC + split fusion units + fp32) trains like the plain model."""
    reference = random_mllama(seed=0)
    model = _meta_twin()
    units = parallelize(
        model, mesh, torch.device("cpu"), activation_checkpointing="full", mixed_precision="auto", fusion_layer_sharding="split"
    )
    assert units == _expected_units(split=True)
    _fill_from(model, reference)
    model.eval()
    batch = _batch()
    want_loss, want = _loss_and_grads(reference, batch)
    got_loss, got = _loss_and_grads(model, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] is None) == (want[name] is None), name
        if want[name] is not None:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(got[name] is not None for name in get_fusion_params(reference))
