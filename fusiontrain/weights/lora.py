"""LoRA on a built model: which linears, with what rank, and their initial values.

:class:`LoraSettings` is what a run decides (from ``model.lora``, or from a PEFT adapter folder)
and what a checkpoint's manifest records under ``lora``, so that export, inference and resume
rebuild the same adapted model: the rank, alpha and dropout, and the exact linears adapted (our
module names). :func:`attach_lora` adds the adapters to a model on the meta device, before it is
parallelized, and makes its :class:`~fusiontrain.weights.pretrained.PretrainedModel` give them
their initial values after loading (``lora_A`` Kaiming-uniform from the run's seed, ``lora_B``
zero), on one rank or sharded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fusiontrain.weights.hf_checkpoint import copy_rows_into
from fusiontrain.weights.pretrained import PretrainedModel
from fusiontrain.modules.lora import (
    initial_lora_value,
    is_lora_parameter,
    lora_modules,
    select_lora_targets,
    wrap_linears,
)

# Offset of the LoRA initialisation's generator from the run seed (the fusion parameters use the seed).
_LORA_SEED_OFFSET = 104_729


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA of a model.

    Attributes:
        rank: ``r``.
        alpha: scale numerator (``scaling = alpha / r``).
        dropout: dropout on the LoRA input in training.
        modules: our names of the adapted linears (``decoder.layers.0.attn.q_proj``, ...).
    """

    rank: int
    alpha: float
    dropout: float
    modules: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "modules": list(self.modules)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> LoraSettings:
        """Read what :meth:`to_dict` wrote; ``where`` names the file for the error."""
        try:
            settings = cls(int(data["rank"]), float(data["alpha"]), float(data["dropout"]), tuple(map(str, data["modules"])))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: 'lora' must hold rank, alpha, dropout and modules ({error!r})") from None
        if settings.rank < 1 or not settings.modules:
            raise ValueError(f"{where}: 'lora' needs rank >= 1 and at least one module, got {data!r}")
        return settings


def lora_settings_from_config(model: nn.Module, config: Any) -> LoraSettings | None:
    """The LoRA that ``config`` (the ``model.lora`` section) asks of ``model``, or None when
    ``model.lora.rank`` is 0. (A PEFT adapter in ``init_from`` is read by
    :func:`fusiontrain.weights.peft.adapter_settings`.)"""
    if config.rank == 0:
        return None
    modules = select_lora_targets(model, sides=config.sides, targets=config.targets)
    return LoraSettings(config.rank, config.alpha, config.dropout, tuple(modules))


def lora_settings_of(model: nn.Module) -> LoraSettings | None:
    """The LoRA ``model`` carries (read from its :class:`LoRALinear` modules), or None."""
    modules = lora_modules(model)
    if not modules:
        return None
    first = next(iter(modules.values()))
    if any((m.rank, m.alpha, type(m.dropout)) != (first.rank, first.alpha, type(first.dropout)) for m in modules.values()):
        raise ValueError("the model's LoRA modules differ in rank, alpha or dropout; one setting per model is supported")
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return LoraSettings(first.rank, first.alpha, dropout, tuple(modules))


def add_lora(model: nn.Module, settings: LoraSettings) -> None:
    """Wrap the linears ``settings.modules`` of ``model`` (before any parallel wrapping)."""
    wrap_linears(model, settings.modules, rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout)


def init_lora_params(model: nn.Module, *, seed: int) -> set[str]:
    """Give every LoRA parameter its initial value (see :func:`initial_lora_value`), drawn in fp32
    on the CPU from one generator in module order, one full tensor at a time; a sharded parameter
    keeps its own rows. So the values depend on neither device, dtype nor rank count.

    Returns:
        The names of the parameters set (canonical).
    """
    generator = torch.Generator().manual_seed(seed + _LORA_SEED_OFFSET)
    done = set()
    for module_name, module in lora_modules(model).items():
        for local in ("lora_A.weight", "lora_B.weight"):
            param = module.get_parameter(local)
            full = initial_lora_value(f"{module_name}.{local}", param.shape, generator)
            with torch.no_grad():
                copy_rows_into(param, lambda start, stop, full=full, param=param: full[start:stop].to(param.dtype))
            done.add(f"{module_name}.{local}")
    return done


def attach_lora(pretrained: PretrainedModel, settings: LoraSettings, *, seed: int) -> None:
    """Add LoRA to ``pretrained.model`` (on the meta device) and have ``pretrained.load`` initialise
    the adapters after the other fresh parameters."""
    add_lora(pretrained.model, settings)
    names = {name for name, _ in pretrained.model.named_parameters() if is_lora_parameter(name)}
    pretrained.fresh_parameters = set(pretrained.fresh_parameters) | names
    previous: Callable[[nn.Module], Any] | None = pretrained.init_fresh

    def init_fresh(model: nn.Module) -> None:
        if previous is not None:
            previous(model)
        init_lora_params(model, seed=seed)

    pretrained.init_fresh = init_fresh


def lora_shapes(model: nn.Module, settings: LoraSettings) -> dict[str, tuple[int, ...]]:
    """The full shapes of the LoRA matrices ``settings`` adds to ``model`` (not yet adapted)."""
    shapes = {}
    for module in settings.modules:
        linear = model.get_submodule(module)
        shapes[f"{module}.lora_A.weight"] = (settings.rank, linear.in_features)
        shapes[f"{module}.lora_B.weight"] = (linear.out_features, settings.rank)
    return shapes
