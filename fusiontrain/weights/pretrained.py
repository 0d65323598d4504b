"""A model built on the meta device, together with everything needed to give it its weights.

Building and loading are two steps so that a trainer can shard the model in between: build on
the meta device, parallelize, allocate, then :meth:`PretrainedModel.load` fills each rank's shards
straight from the safetensors files (only its own rows are read), initialises the parameters that
no file holds, and rebuilds non-persistent buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fusiontrain.weights.hf_checkpoint import HFCheckpoint, TensorRoute, load_routes


@dataclass
class WeightSource:
    """One checkpoint folder and the routes that take its tensors into the model."""

    checkpoint: HFCheckpoint
    routes: list[TensorRoute]


@dataclass
class PretrainedModel:
    """A model (on the meta device until allocated) and how to fill it.

    Attributes:
        model: the model.
        sources: the checkpoints that fill it.
        fresh_parameters: names of parameters that no checkpoint holds (a composed model's fusion
            parameters); :attr:`init_fresh` gives them their initial values.
        init_fresh: ``init_fresh(model)`` initialises ``fresh_parameters`` (plain or sharded).
        init_buffers: ``init_buffers(model)`` rebuilds non-persistent buffers after allocation.
    """

    model: nn.Module
    sources: list[WeightSource]
    fresh_parameters: set[str] = field(default_factory=set)
    init_fresh: Callable[[nn.Module], None] | None = None
    init_buffers: Callable[[nn.Module], None] | None = None

    @property
    def base_folders(self) -> list[Path]:
        """The folders the pretrained weights come from."""
        return [source.checkpoint.folder for source in self.sources]

    def load(self, params: dict[str, torch.Tensor] | None = None) -> None:
        """Fill the allocated model.

        Args:
            params: the model's parameters under their canonical names (a parallelized model's
                wrappers add prefixes; see ``fusiontrain.parallel.fsdp.canonical_parameters``).
                Defaults to ``named_parameters()``.
        """
        params = dict(self.model.named_parameters()) if params is None else params
        if self.init_buffers is not None:
            self.init_buffers(self.model)
        unfilled = set(params)
        for source in self.sources:
            unfilled &= set(load_routes(params, source.checkpoint, source.routes, strict=False))
        if unfilled != self.fresh_parameters:
            raise RuntimeError(
                "the checkpoints did not fill exactly the pretrained parameters: "
                f"unfilled {sorted(unfilled - self.fresh_parameters)[:5]}, "
                f"filled but expected fresh {sorted(self.fresh_parameters - unfilled)[:5]}"
            )
        if self.init_fresh is not None:
            self.init_fresh(self.model)


def check_routes_cover(source: WeightSource, expected: set[str], what: str) -> None:
    """Every routed tensor is stored and every ``expected`` stored tensor is routed, or a
    ValueError naming the folder and the first offenders. Run before allocating anything."""
    needed = {route.hf_key for route in source.routes}
    missing = sorted(needed - set(source.checkpoint.keys()))
    unused = sorted(expected - needed)
    if missing or unused:
        raise ValueError(
            f"{what} checkpoint {source.checkpoint.folder} does not match its config.json: missing tensors "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unused tensors {unused[:5]}"
            f"{' ...' if len(unused) > 5 else ''}"
        )
