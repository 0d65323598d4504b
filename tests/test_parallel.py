"""fusiontrain.parallel.fsdp: block discovery, activation checkpointing, mixed precision, FSDP2 units.

Activation checkpointing is compared bitwise with an unwrapped twin; the FSDP tests shard a
meta-built twin in a single-process gloo group, fill it from a reference model's state dict and
compare logits and gradients with that reference.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from fusiontrain.train.loss import chunked_cross_entropy_sum
from fusiontrain.weights.hf_checkpoint import copy_rows_into
from fusiontrain.weights.lora import LoraSettings, add_lora
from fusiontrain.families.mllama.model import build_mllama
from fusiontrain.modules import FusionLayer
from fusiontrain.modules.fusion import get_fusion_params
from fusiontrain.modules.blocks import block_stacks
from fusiontrain.modules.lora import is_lora_parameter, select_lora_targets
from fusiontrain.parallel.fsdp import (
    apply_activation_checkpointing,
    canonical_parameters,
    checkpoint_every,
    copy_only_parameters,
    lookup_tables_only,
    mixed_precision_policy,
    parallelize,
    shard_model,
)
from fusiontrain.parallel.precision import StorageDtypes, store_parameters
from fusiontrain.torch_private import fsdp_param_group
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
    # model.frozen_dtype below model.dtype: fp32 compute casts the bf16 shards up; bf16 compute as before
    mixed = {torch.float32, torch.bfloat16}
    assert mixed_precision_policy("auto", cpu, mixed).param_dtype == torch.float32
    assert mixed_precision_policy("fp32", cuda, mixed | {torch.int64}).param_dtype == torch.float32
    assert mixed_precision_policy("bf16", cpu, mixed).param_dtype == torch.bfloat16
    assert mixed_precision_policy("fp32", cpu, {torch.bfloat16}).param_dtype is None  # model.dtype: bfloat16


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


def test_only_a_unit_of_lookup_tables_skips_its_gather_in_backward(mesh) -> None:
    """The embeddings' unit is not gathered in backward (their backward reads no weight); a unit
    holding anything else (a norm, a linear layer) is."""
    assert lookup_tables_only(nn.Embedding(5, 3)) and lookup_tables_only(random_mllama().decoder.tok_embeddings)
    assert not lookup_tables_only(nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3)))
    assert not lookup_tables_only(nn.Linear(3, 3)) and not lookup_tables_only(nn.Sequential())
    model = _meta_twin()
    shard_model(model, mesh, mp_policy=mixed_precision_policy("auto", torch.device("cpu")))
    groups = {name: fsdp_param_group(module) for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    in_backward = {name: group.unshard_in_backward for name, group in groups.items() if group is not None}
    assert in_backward.pop("decoder.tok_embeddings") is False
    # (the units of frozen blocks hold no FSDP parameters over one rank: copy_only_parameters)
    assert len(in_backward) >= 4 and set(in_backward.values()) == {True}


def test_over_one_rank_fsdp_leaves_out_the_frozen_parameters_it_would_only_copy(mesh) -> None:
    """Over a shard dimension of one rank, FSDP2 would copy a frozen parameter stored in the
    compute dtype into a new buffer at every unshard, and do nothing else for it: such parameters
    stay plain tensors, and a unit holding nothing else has no parameter group (never gathered).
    Trainable parameters, and frozen ones that FSDP2 casts to another compute dtype, are its
    DTensors; over more ranks nothing is left out."""
    model = _meta_twin()
    shard_model(model, mesh, mp_policy=mixed_precision_policy("auto", torch.device("cpu")))
    params = canonical_parameters(model)
    frozen = {name for name, param in params.items() if not param.requires_grad}
    assert frozen and len(frozen) < len(params)
    assert {name for name, param in params.items() if not isinstance(param, DTensor)} == frozen
    units = {name: module for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    leaves = {  # units with no unit inside (blocks, projection heads): their parameters are their own
        name: module for name, module in units.items() if not any(isinstance(m, FSDPModule) for m in list(module.modules())[1:])
    }
    frozen_units = [name for name, module in leaves.items() if not any(p.requires_grad for p in module.parameters())]
    trained_units = [name for name, module in leaves.items() if any(p.requires_grad for p in module.parameters())]
    assert frozen_units and trained_units
    assert all(fsdp_param_group(units[name]) is None for name in frozen_units)  # never gathered
    assert all(fsdp_param_group(units[name]) is not None for name in trained_units)  # fusion parameters

    cast = _meta_twin()  # computed in bf16: FSDP2 casts the frozen fp32 parameters at each unshard
    shard_model(cast, mesh, mp_policy=mixed_precision_policy("bf16", torch.device("cpu")))
    assert all(isinstance(param, DTensor) for param in cast.parameters())

    class TwoRanks:  # the one thing copy_only_parameters asks of a mesh
        ndim = 1

        def size(self, dim: int) -> int:
            return 2

    assert copy_only_parameters(_meta_twin(), TwoRanks(), MixedPrecisionPolicy()) == set()


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
    # One rank: the frozen parameters (fp32, computed in fp32) stay out of FSDP (copy_only_parameters).
    assert all(isinstance(p, DTensor) == p.requires_grad for p in model.parameters())

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


# -- frozen weights stored in bf16 (model.frozen_dtype) --------------------------------------------------


def _with_lora(model: nn.Module) -> nn.Module:
    """``model`` with rank-2 LoRA on the decoder's q/v projections (trainable, inside frozen blocks)."""
    modules = select_lora_targets(model, sides=("decoder",), targets=("q_proj", "v_proj"))
    add_lora(model, LoraSettings(2, 4.0, 0.0, tuple(modules)))
    return model


def _frozen_bf16_twin(lora: bool, sharding: str, mixed_precision: str, mesh) -> nn.Module:
    """A meta twin with frozen parameters stored in bf16, parallelized as the trainer does it."""
    model = _with_lora(_meta_twin()) if lora else _meta_twin()
    store_parameters(model, StorageDtypes(trainable=torch.float32, frozen=torch.bfloat16))
    parallelize(model, mesh, torch.device("cpu"), mixed_precision=mixed_precision, fusion_layer_sharding=sharding)
    return model


def _unit_dtypes(model: nn.Module) -> dict[str, set[tuple[torch.dtype, bool]]]:
    """Each FSDP unit (by the path of its first module) -> {(stored dtype, requires_grad)} of the
    shards it manages."""
    units: dict[int, tuple[str, set]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None and id(group) not in units:
                units[id(group)] = (name or "<root>", {(p.sharded_param.dtype, p.sharded_param.requires_grad) for p in group.fsdp_params})
    return dict(units.values())


def _check_unit_dtypes(model: nn.Module) -> set[str]:
    """Every FSDP unit stores its frozen shards bf16 and its trained ones fp32; returns the units
    that hold both."""
    units = _unit_dtypes(model)
    assert all(dtype == (torch.float32 if trains else torch.bfloat16) for unit in units.values() for dtype, trains in unit)
    return {name for name, unit in units.items() if len({dtype for dtype, _ in unit}) == 2}


def test_frozen_bf16_storage_with_lora_in_whole_units_computes_fp32_on_rounded_weights(mesh) -> None:
    """Frozen shards stored bf16 beside trained fp32 ones in the same unit (a whole FusionLayer,
    LoRA inside a frozen block, the embeddings with their new rows; FSDP2 asks one dtype of the
    trained parameters of a unit only). With fp32 compute the bf16 shards are cast up, so loss and
    gradients are those of an fp32 model whose frozen weights were rounded to bf16."""
    reference = _with_lora(random_mllama(seed=0))
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if is_lora_parameter(name):
                param.normal_(std=0.2)
    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for param in rounded.parameters():
            if not param.requires_grad:
                param.copy_(param.to(torch.bfloat16).float())
    model = _frozen_bf16_twin(True, "unit", "auto", mesh)
    mixed = _check_unit_dtypes(model)
    assert {"decoder.tok_embeddings", "decoder.layers.0", "decoder.layers.1"} <= mixed  # rows; LoRA; FusionLayer

    _fill_from(model, reference)
    model.eval()
    batch = _batch()
    want_loss, want = _loss_and_grads(rounded, batch)
    got_loss, got = _loss_and_grads(model, batch)
    reference.set_skip_output_projection(True)
    with torch.no_grad():
        hidden = reference(batch["tokens"], encoder_input=batch["encoder_input"], encoder_mask=batch["encoder_mask"])
        unrounded_loss = chunked_cross_entropy_sum(hidden, batch["labels"], reference.decoder.output, num_chunks=3)
    assert (unrounded_loss - want_loss).abs() > 4e-6 * want_loss  # 4x the tolerance below: the rounding shows
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    trained = [name for name, grad in want.items() if grad is not None]
    assert [name for name, grad in got.items() if grad is not None] == trained
    assert any(is_lora_parameter(name) for name in trained)
    for name in trained:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_frozen_bf16_storage_under_bf16_compute_equals_fp32_storage_bitwise(mesh) -> None:
    """bf16 compute casts fp32 frozen shards to bf16 before every all-gather; storing them in bf16
    does that cast once, at load: the same loss and gradients, bit for bit."""
    reference = random_mllama(seed=0)
    fp32_stored = _meta_twin()
    parallelize(fp32_stored, mesh, torch.device("cpu"), mixed_precision="bf16", fusion_layer_sharding="split")
    bf16_stored = _frozen_bf16_twin(False, "split", "bf16", mesh)
    # Over one rank the frozen bf16 parameters, stored in the compute dtype, stay out of FSDP
    # (copy_only_parameters), so no unit holds both dtypes; over two ranks the embeddings' unit
    # does (tests/test_precision.py runs that).
    assert _check_unit_dtypes(bf16_stored) == set()
    assert all(isinstance(p, DTensor) == p.requires_grad for p in bf16_stored.parameters())
    results = []
    for model in (fp32_stored, bf16_stored):
        _fill_from(model, reference)
        model.eval()
        results.append(_loss_and_grads(model, _batch()))
    (want_loss, want), (got_loss, got) = results
    assert {p.dtype for p in fp32_stored.parameters()} == {torch.float32}
    assert torch.equal(got_loss, want_loss)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] is None) == (want[name] is None), name
        if want[name] is not None:
            assert got[name].dtype == torch.float32 and torch.equal(got[name], want[name]), name
