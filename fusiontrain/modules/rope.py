"""Rotary position embeddings (RoPE), with the Llama 3 frequency scaling.

The rotation uses the Hugging Face "rotate half" layout: a head's first half of features pairs
with its second half. Weights read from Hugging Face checkpoints therefore need no permutation.

Nothing is cached in buffers, so the module builds on the meta device and needs no
re-initialisation after its parameters are materialised: the inverse frequencies, a handful of
numbers, are computed once on the host at construction (a plain attribute, outside the state dict)
and the angles from ``input_pos`` at each call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1 long-context scaling of the RoPE frequencies.

    Attributes:
        factor: how much the low frequencies are slowed down (8 for Llama 3.1 / 3.2).
        low_freq_factor: wavelengths above ``original_max_seq_len / low_freq_factor`` are scaled fully.
        high_freq_factor: wavelengths below ``original_max_seq_len / high_freq_factor`` are untouched.
        original_max_seq_len: context length the model was pretrained with (8192 for Llama 3).
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


def rope_inverse_frequencies(
    head_dim: int, base: float, scaling: Llama3RopeScaling | None = None
) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` in fp32 on the host, optionally with Llama 3 scaling.

    Computed in the same order of operations as ``transformers`` so that both agree bitwise.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryPositionalEmbeddings(nn.Module):
    """Applies RoPE to queries or keys laid out as ``[b, s, n_heads, head_dim]``.

    Args:
        head_dim: per-head feature size (even).
        base: the RoPE base ("theta"), 500000 for Llama 3.
        scaling: Llama 3 frequency scaling, or None for plain RoPE.
    """

    def __init__(
        self, head_dim: int, base: float = 500_000.0, scaling: Llama3RopeScaling | None = None
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        self.scaling = scaling
        # On the host even under a meta-device context; per call only the copy to x's device
        # (recomputing them was about 20 small ops per call: 2 s of a traced 11B step's 35).
        self.inverse_frequencies = rope_inverse_frequencies(head_dim, base, scaling)

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``x`` ``[b, s, n_h, h_d]`` by the angles of positions ``input_pos``.

        Args:
            x: queries or keys, ``[b, s, n_h, h_d]``.
            input_pos: positions ``[b, s]`` or ``[s]``; ``arange(s)`` when None.
        """
        seq_len = x.shape[1]
        if input_pos is None:
            input_pos = torch.arange(seq_len, device=x.device)
        inv_freq = self.inverse_frequencies.to(x.device)
        angles = input_pos[..., None].float() * inv_freq  # [b, s, h_d/2] or [s, h_d/2]
        angles = torch.cat((angles, angles), dim=-1)
        cos = angles.cos().to(x.dtype).unsqueeze(-2)  # broadcast over heads
        sin = angles.sin().to(x.dtype).unsqueeze(-2)
        return x * cos + _rotate_half(x) * sin

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, scaling={self.scaling}"
