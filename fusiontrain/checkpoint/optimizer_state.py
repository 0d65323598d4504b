"""The optimizer's state in a checkpoint: keyed by parameter names (:class:`OptimizerState`,
DCP's own optimizer state dict, so sharded DTensors stay sharded and reshard on load), and split
into its tensors, which DCP saves as safetensors, and a JSON skeleton for the rest
(:func:`split_tensors`), so that nothing needs a pickle."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from fusiontrain.checkpoint.layout import CheckpointError

_TENSOR = "__tensor__"  # a skeleton's placeholder for a tensor: {"__tensor__": its path}


def split_tensors(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """``(skeleton, tensors)`` of a nested state dict: ``tensors`` every tensor by its path
    (``state/<param>/exp_avg``), ``skeleton`` the rest as JSON-able data, each tensor replaced by
    ``{"__tensor__": path}``.

    Raises:
        CheckpointError: a value that JSON cannot hold (it would need a pickle).
    """
    if isinstance(state, torch.Tensor):
        return {_TENSOR: prefix}, {prefix: state}
    if isinstance(state, dict):
        skeleton, tensors = {}, {}
        for key, value in state.items():
            if not isinstance(key, str) or key == _TENSOR:
                raise CheckpointError(f"state key {key!r} at {prefix or '/'} cannot be saved as JSON")
            skeleton[key], found = split_tensors(value, f"{prefix}/{key}" if prefix else key)
            tensors.update(found)
        return skeleton, tensors
    if isinstance(state, (list, tuple)):
        skeleton, tensors = [], {}
        for index, value in enumerate(state):
            item, found = split_tensors(value, f"{prefix}/{index}")
            skeleton.append(item)
            tensors.update(found)
        return skeleton, tensors
    if state is None or isinstance(state, (bool, int, float, str)):
        return state, {}
    raise CheckpointError(f"state value at {prefix or '/'} is a {type(state).__name__}, which JSON cannot hold")


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_tensors`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        return {key: join_tensors(value, tensors) for key, value in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(value, tensors) for value in skeleton]
    return skeleton


def tensor_names(skeleton: Any) -> set[str]:
    """The tensor paths a :func:`split_tensors` skeleton refers to."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return {skeleton[_TENSOR]}
        return set().union(*(tensor_names(value) for value in skeleton.values())) if skeleton else set()
    if isinstance(skeleton, list):
        return set().union(*(tensor_names(value) for value in skeleton)) if skeleton else set()
    return set()


class OptimizerState(Stateful):
    """The optimizer's state keyed by parameter names (sharded DTensors stay sharded), so DCP can
    save it and reload it onto another sharding."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)
