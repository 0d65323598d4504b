"""LoRA (Hu et al., 2021): a trainable low-rank update beside a frozen ``nn.Linear``.

:class:`LoRALinear` *is* the linear it replaces (an ``nn.Linear`` holding the very same ``weight``
and ``bias`` parameters, so their names, weight maps and checkpoints do not change) plus two small
linears under PEFT's names::

    y = x W^T + b + scaling * B(A(dropout(x))),   A: [r, in], B: [out, r], scaling = alpha / r

Parameters: ``<linear>.lora_A.weight`` ``[r, in]`` and ``<linear>.lora_B.weight`` ``[out, r]``,
the names PEFT gives them (without its adapter name). ``B`` starts at zero, so a fresh adapter
computes the base model exactly.

:func:`select_lora_targets` picks the linears and :func:`wrap_linears` swaps them of a model (on any device, the meta device
included) for :class:`LoRALinear`; the LoRA parameters then belong to whatever block holds the
linear, so FSDP units, activation checkpointing and compile take them with it. Fusion
parameters are never targeted: they train in full. Imports torch only (the wrappers' name
prefixes through :mod:`fusiontrain.torch_private`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusiontrain.modules.blocks import block_stacks
from fusiontrain.modules.fusion import get_fusion_params
from fusiontrain.torch_private import without_wrapper_prefixes

LORA_A, LORA_B = "lora_A", "lora_B"
SIDES = ("decoder", "encoder")


def side_of(side: str) -> str | None:
    """The side a LoRA side name adapts (``decoder``, ``encoder``, or ``encoder.<modality>``: one
    encoder of a model with an encoder per modality), or None for a name that is none of them."""
    base, _, modality = side.partition(".")
    if base in SIDES and (not modality or (base == "encoder" and "." not in modality)):
        return base
    return None


class LoRALinear(nn.Linear):
    """A linear layer with a LoRA update (see the module docstring).

    Args:
        base: the linear to extend; its ``weight`` and ``bias`` parameters are taken over as they
            are (same objects: same device, dtype and ``requires_grad``).
        rank: ``r``.
        alpha: the scale numerator; ``scaling = alpha / rank``.
        dropout: dropout probability on the LoRA branch's input (training only).
    """

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        nn.Module.__init__(self)  # not nn.Linear.__init__: the parameters are the base's own
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., in]`` -> ``[..., out]``."""
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling * B @ A`` computed in fp32 (``weight`` ``[out, in]``, ``lora_a`` ``[r, in]``,
    ``lora_b`` ``[out, r]``), returned in fp32; the caller casts."""
    return weight.float() + scaling * (lora_b.float() @ lora_a.float())


def is_lora_parameter(name: str) -> bool:
    """Whether parameter ``name`` is a LoRA matrix (``...lora_A.weight`` / ``...lora_B.weight``)."""
    return name.endswith((f".{LORA_A}.weight", f".{LORA_B}.weight"))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` of ``model`` by (canonical) module name, in module order."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            found[without_wrapper_prefixes(name)] = module
    return found


ALL_LINEAR = "all-linear"  # the default target: every linear LoRA may adapt on the chosen sides


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")


def lora_candidates(model: nn.Module, sides: Sequence[str]) -> list[str]:
    """Names of the linears of ``model``'s ``sides`` (``decoder`` / ``encoder``, or
    ``encoder.<modality>`` for one encoder of several) that LoRA may target: every ``nn.Linear``
    inside a block stack (:func:`~fusiontrain.modules.blocks.block_stacks`: the attention and MLP
    projections of the transformer blocks) whose weight is not a fusion parameter.

    Linears outside the blocks are left out: the decoder's output projection (the chunked loss
    reads its weight directly, so an adapter there would never be applied), a tower's pooling
    head (a fusion encoder reads hidden states, so the head never runs) and a patch embedding.
    """
    unknown = [side for side in sides if side_of(side) is None]
    if unknown:
        raise ValueError(f"unknown LoRA side(s) {unknown}; choose from {list(SIDES)} or encoder.<modality>")
    fusion = set(get_fusion_params(model))
    return [
        f"{stack_name}.{inner}"
        for stack_name, stack in block_stacks(model)
        if any(stack_name.startswith(f"{side}.") for side in sides)
        for inner, module in stack.named_modules()
        if isinstance(module, nn.Linear)
        and not isinstance(module, LoRALinear)
        and f"{stack_name}.{inner}.weight" not in fusion
    ]


def select_lora_targets(model: nn.Module, *, sides: Sequence[str], targets: Iterable[str]) -> list[str]:
    """The linears of ``model`` that LoRA targets, among :func:`lora_candidates` of ``sides``:
    all of them for ``["all-linear"]`` (:data:`ALL_LINEAR`, the default, as PEFT names it), else
    those whose name equals a target or ends with ``.<target>`` (PEFT's rule for a list of targets).

    A target may match linears on some chosen sides and not on others (``w3`` is in the decoder's
    MLP, not in the Mllama ViT's; ``out_proj`` in a HF tower, not in our decoder).

    Raises:
        ValueError: a target matches no linear on any chosen side, a chosen side gets no linear at
            all, or ``all-linear`` is mixed with other targets (each message lists what there is).
    """
    targets = list(targets)
    candidates = lora_candidates(model, sides)
    if ALL_LINEAR in targets:
        if targets != [ALL_LINEAR]:
            raise ValueError(f"LoRA target {ALL_LINEAR!r} takes every linear already; list it alone, not with {targets}")
        chosen = candidates
    else:
        chosen = [name for name in candidates if any(_matches(name, target) for target in targets)]
        unused = [target for target in targets if not any(_matches(name, target) for name in candidates)]
        if unused:
            raise ValueError(
                f"LoRA targets {unused} match no linear of the {'/'.join(sides)} (fusion layers excluded); "
                f"{_suffixes(candidates, sides)}"
            )
    empty = [side for side in sides if not any(name.startswith(f"{side}.") for name in chosen)]
    if empty:
        raise ValueError(
            f"LoRA targets {targets} adapt no linear of the {'/'.join(empty)}, a chosen side; "
            f"{_suffixes(candidates, empty)}"
        )
    return chosen


def _suffixes(candidates: Sequence[str], sides: Sequence[str]) -> str:
    parts = []
    for side in sides:
        names = sorted({name.rsplit(".", 1)[-1] for name in candidates if name.startswith(f"{side}.")})
        parts.append(f"the {side}'s linear names end in {names}")
    return "; ".join(parts)


def wrap_linears(model: nn.Module, names: Iterable[str], *, rank: int, alpha: float, dropout: float) -> None:
    """Replace the linears ``names`` of ``model`` by :class:`LoRALinear`, in place (on any device,
    the meta device included). The new LoRA parameters train; nothing else changes.

    Raises:
        ValueError: a name is not an ``nn.Linear`` of the model.
    """
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child, None)
        if type(linear) is not nn.Linear:
            raise ValueError(f"LoRA module {name!r} is not an nn.Linear of the model (found {type(linear).__name__})")
        wrapped = LoRALinear(linear, rank=rank, alpha=alpha, dropout=dropout)
        wrapped.lora_A.weight.requires_grad_(True)
        wrapped.lora_B.weight.requires_grad_(True)
        setattr(parent, child, wrapped)


def initial_lora_value(name: str, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's default start for LoRA parameter ``name`` (fp32, full shape): ``lora_A`` Kaiming-
    uniform with ``a = sqrt(5)`` (as ``nn.Linear``), ``lora_B`` zero."""
    if name.endswith(f".{LORA_B}.weight"):
        return torch.zeros(tuple(shape))
    fan_in = shape[1]
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))  # kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + a^2))
    return torch.empty(tuple(shape)).uniform_(-bound, bound, generator=generator)
