"""The tensors among an ATen op's arguments or results, for dispatch modes that look at every op.

The planner's dispatch modes (the memory tracker, the value-keeping fake mode) ask this of every op
they see, hundreds of thousands of times for a large model. ``torch.utils._pytree`` answers it for
any nesting but pays for its generality in every call; an ATen op's arguments and results are only
tensors, scalars, ``None``, dtypes, devices and memory formats, possibly in lists or tuples, and
its keyword arguments come in a dict. This walks exactly those containers.
"""

from __future__ import annotations

from typing import Any

import torch


def op_tensors(*values: Any) -> list[torch.Tensor]:
    """Every tensor in ``values``, looking inside lists, tuples and dicts (a dict's values: an op's
    keyword arguments), depth first, in order."""
    found: list[torch.Tensor] = []
    _collect(values, found)
    return found


def _collect(values: Any, found: list[torch.Tensor]) -> None:
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            _collect(value, found)
        elif isinstance(value, dict):
            _collect(value.values(), found)
