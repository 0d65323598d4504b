"""Small building blocks: RMSNorm, the SwiGLU feed-forward, and the tanh gate."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in fp32 and cast back.

    Args:
        dim: size of the normalised (last) dim.
        eps: added to the mean square for stability.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., dim]`` -> same shape and dtype."""
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.scale

    def extra_repr(self) -> str:
        return f"{tuple(self.scale.shape)}, eps={self.eps}"


class FeedForward(nn.Module):
    """Gated MLP: ``w2(activation(w1(x)) * w3(x))``, SwiGLU with the default activation.

    Args:
        gate_proj: ``w1``, d -> hidden.
        down_proj: ``w2``, hidden -> d.
        up_proj: ``w3``, d -> hidden; None gives a plain (ungated) MLP.
        activation: applied to the gate projection.
    """

    def __init__(
        self,
        *,
        gate_proj: nn.Module,
        down_proj: nn.Module,
        up_proj: nn.Module | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    ) -> None:
        super().__init__()
        self.w1 = gate_proj
        self.w2 = down_proj
        self.w3 = up_proj
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., d]`` -> ``[..., d]``."""
        hidden = self.activation(self.w1(x))
        if self.w3 is not None:
            hidden = hidden * self.w3(x)
        return self.w2(hidden)


class TanhGate(nn.Module):
    """Scales its input by ``tanh(scale)``; ``scale`` starts at zero, so the gate starts shut.

    ``scale`` has shape ``[1]`` rather than ``[]``: FSDP2 cannot shard 0-dim parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.tanh()
