"""Activation offloading (fusiontrain/parallel/offload.py, wired by fusiontrain/parallel/fsdp.py): gradients
bitwise equal with and without it, under FSDP2 in a world of one, with and without activation
checkpointing; the hooks ran (bytes counted), and no parameter was ever copied."""

from __future__ import annotations

import pytest
import torch

from fusiontrain.parallel.offload import ActivationOffloader
from fusiontrain.parallel.fsdp import apply_activation_offloading, canonical_parameters, parallelize
from fusiontrain.train.step import local_tensor
from tests.helpers.tiny_models import random_mllama
from tests.test_parallel import _batch, _fill_from, _loss_and_grads, _meta_twin


class _RecordingOffloader(ActivationOffloader):
    """Remembers the storage of every tensor it copies to the host."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"), min_bytes=0)  # the tiny model's tensors are small
        self.copied_storages: set[int] = set()

    def _to_host(self, tensor: torch.Tensor):
        self.copied_storages.add(tensor.untyped_storage().data_ptr())
        return super()._to_host(tensor)


def _train_one_step(mesh, checkpointing: str, offloading: str, offloader: ActivationOffloader | None):
    model = _meta_twin()
    parallelize(
        model,
        mesh,
        torch.device("cpu"),
        activation_checkpointing=checkpointing,
        fusion_layer_sharding="split",
        activation_offloading=offloading,
        offloader=offloader,
    )
    _fill_from(model, random_mllama(seed=0))
    model.train()
    loss, grads = _loss_and_grads(model, _batch())
    return model, loss, grads


@pytest.mark.parametrize("checkpointing, offloading", [("none", "all"), ("full", "checkpointed"), ("2", "all")])
def test_offloading_leaves_gradients_bitwise_equal(mesh, checkpointing: str, offloading: str) -> None:
    _, want_loss, want = _train_one_step(mesh, checkpointing, "none", None)
    offloader = _RecordingOffloader()
    model, got_loss, got = _train_one_step(mesh, checkpointing, offloading, offloader)

    assert torch.equal(got_loss, want_loss)
    assert got.keys() == want.keys()
    trained = [name for name, grad in want.items() if grad is not None]
    assert len(trained) > 10
    for name in want:
        assert (got[name] is None) == (want[name] is None), name
        if want[name] is not None:
            assert torch.equal(got[name], want[name]), name

    stats = offloader.stats
    assert stats.offloaded_tensors > 0 and stats.offloaded_bytes > 0  # the hooks ran and copied
    assert stats.reloaded_bytes >= stats.offloaded_bytes  # every copy came back (some twice)
    if checkpointing != "full":  # blocks that save their matmuls' weights: the parameters stayed
        assert stats.kept_bytes > 0
    parameters = set()
    for param in canonical_parameters(model).values():
        parameters.add(local_tensor(param).untyped_storage().data_ptr())  # frozen ones: plain over one rank
    assert not offloader.copied_storages & parameters


def test_checkpointed_offloads_only_block_inputs(mesh) -> None:
    """With every block checkpointed, 'checkpointed' copies what the checkpoints save: their
    inputs. Without checkpointing 'all' copies every activation of every block: much more."""
    counts = {}
    for checkpointing, offloading in (("full", "checkpointed"), ("none", "all")):
        offloader = ActivationOffloader(torch.device("cpu"), min_bytes=0)
        _train_one_step(mesh, checkpointing, offloading, offloader)
        counts[offloading] = offloader.stats.offloaded_bytes
    assert 0 < 4 * counts["checkpointed"] < counts["all"]


def test_checkpointed_offloading_needs_checkpointed_blocks() -> None:
    with pytest.raises(ValueError, match="no block is checkpointed: set parallel.activation_checkpointing"):
        apply_activation_offloading(_meta_twin(), "checkpointed", ActivationOffloader(torch.device("cpu")))
    with pytest.raises(ValueError, match="must be 'none', 'checkpointed' or 'all'"):
        apply_activation_offloading(_meta_twin(), "some", ActivationOffloader(torch.device("cpu")))
