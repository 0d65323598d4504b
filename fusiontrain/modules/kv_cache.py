"""Key/value cache for inference, one per attention module."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Pre-allocated keys and values, ``[b, n_kv, max_seq_len, h_d]`` each.

    Self-attention appends each forward's tokens to the next free slots (``input_pos`` only drives
    RoPE), so unpadded prompts have slot == position, and left-padded rows keep torchtune's
    convention (pads and the first real token share position 0 but not a slot). Cross-attention
    writes the encoder's keys and values once, from slot 0, and reads them back on later steps.

    Args:
        batch_size: rows in the cache.
        max_seq_len: slots per row.
        num_kv_heads: key/value heads.
        head_dim: features per head.
        dtype: storage dtype.
        device: storage device; defaults to the current default device.
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        # Number of leading slots that hold data.
        self.size = 0

    def reset(self) -> None:
        """Zero the storage and mark the cache empty, keeping the allocation."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.size = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[b, n_kv, s, h_d]`` in the next ``s`` free slots."""
        self._check_batch(k)
        length = k.shape[2]
        if self.size + length > self.max_seq_len:
            raise ValueError(
                f"{self.size} cached + {length} new tokens exceed the KV cache's {self.max_seq_len} slots; "
                "pass a larger decoder_max_seq_len to setup_caches"
            )
        self.k_cache[:, :, self.size : self.size + length].copy_(k)
        self.v_cache[:, :, self.size : self.size + length].copy_(v)
        self.size += length

    def write_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Replace the cache contents with ``k``/``v`` ``[b, n_kv, s, h_d]``, from slot 0."""
        self._check_batch(k)
        length = k.shape[2]
        if length > self.max_seq_len:
            raise ValueError(
                f"{length} keys do not fit a KV cache of {self.max_seq_len} slots; "
                "pass a larger encoder_max_seq_len to setup_caches"
            )
        self.k_cache[:, :, :length].copy_(k)
        self.v_cache[:, :, :length].copy_(v)
        self.size = length

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the filled prefix, ``[b, n_kv, size, h_d]`` each."""
        return self.k_cache[:, :, : self.size], self.v_cache[:, :, : self.size]

    def _check_batch(self, k: torch.Tensor) -> None:
        if k.shape[0] != self.batch_size:
            raise ValueError(
                f"batch of {k.shape[0]} does not match the KV cache's batch of {self.batch_size}; "
                "call setup_caches with the batch size you decode with"
            )
