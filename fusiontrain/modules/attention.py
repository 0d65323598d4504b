"""Multi-head attention with grouped-query heads, optional RoPE, q/k norms and a KV cache.

All attention math goes through :func:`attend`, the single seam between the model and the
kernels. It dispatches on the mask's type:

- a boolean mask (or none) runs ``F.scaled_dot_product_attention`` over the whole rows;
- a :class:`~fusiontrain.modules.packed.PackedLayout` runs SDPA per packed segment, grouped by
  length (the CPU path for packed rows: it costs the sum of the segments' ``s_i^2``, not ``s^2``);
- a flex_attention ``BlockMask`` runs ``flex_attention`` (the GPU path for packed rows: it skips
  the blocks with no attended pair).

Mask convention everywhere: boolean, ``True`` means "may attend".
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from fusiontrain.modules.kv_cache import KVCache
from fusiontrain.modules.packed import PackedLayout
from fusiontrain.modules.packed_attention import attend_packed

try:  # flex_attention is optional: present on recent torch, used only with a BlockMask.
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # pragma: no cover - older torch
    BlockMask = None  # type: ignore[assignment,misc]

AttentionMask = Union[torch.Tensor, PackedLayout, Any]  # a bool tensor, a packed layout or a BlockMask


def is_block_mask(mask: object) -> bool:
    """True when ``mask`` is a flex_attention ``BlockMask``."""
    return BlockMask is not None and isinstance(mask, BlockMask)


@functools.cache
def _flex_attention(compiled: bool) -> Any:
    """flex_attention, compiled into a fused kernel for CUDA (uncompiled, it materialises the full
    score matrix); plain on CPU, where it serves inference and tests only."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: AttentionMask | None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention over heads.

    Args:
        q: queries ``[b, n_h, s, h_d]``.
        k: keys ``[b, n_kv, s_k, h_d]``; ``n_h`` must be a multiple of ``n_kv`` (GQA).
        v: values ``[b, n_kv, s_k, h_d]``.
        mask: ``[b, s, s_k]`` bool (True = attend), a ``PackedLayout``, a flex_attention
            ``BlockMask``, or None.
        is_causal: with ``mask=None``, apply a causal mask (requires ``s == s_k``).
        dropout_p: attention dropout probability.

    Returns:
        ``[b, n_h, s, h_d]``.
    """
    grouped = q.shape[1] != k.shape[1]
    if isinstance(mask, PackedLayout):
        return attend_packed(q, k, v, mask, dropout_p=dropout_p)
    if is_block_mask(mask):
        return _flex_attention(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=grouped)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"attention masks are boolean (True = attend); got {mask.dtype}")
        mask = mask[:, None, :, :]
        is_causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, enable_gqa=grouped
    )


class MultiHeadAttention(nn.Module):
    """Multi-head attention with grouped-query key/value heads.

    Self-attention passes the same tensor as ``x`` and ``y``; cross-attention passes the encoder
    embeddings as ``y`` (or None on decoding steps that read the cached encoder keys/values).

    Args:
        embed_dim: model width ``d``.
        num_heads: query heads ``n_h``.
        num_kv_heads: key/value heads ``n_kv`` (``n_h`` must be a multiple).
        head_dim: features per head ``h_d``.
        q_proj, k_proj, v_proj, output_proj: the four projections.
        pos_embeddings: RoPE applied to q and k (self-attention), or None (cross-attention).
        q_norm, k_norm: per-head norms over ``h_d`` applied to q and k BEFORE RoPE, or None.
            This follows Hugging Face (Qwen3 normalises each head, then rotates); torchtune 0.6.1
            applies them after RoPE. Cross-attention has no RoPE, so there the order is moot.
        is_causal: whether the default (mask=None) pattern is causal.
        attn_dropout: attention dropout probability, used in training only.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        output_proj: nn.Module,
        pos_embeddings: nn.Module | None = None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        is_causal: bool = True,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.is_causal = is_causal
        self.attn_dropout = attn_dropout
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.output_proj = output_proj
        self.pos_embeddings = pos_embeddings
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.kv_cache: KVCache | None = None
        self.cache_enabled = False

    # -- KV cache -------------------------------------------------------------------------------

    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: int) -> None:
        """Allocate a KV cache of ``max_seq_len`` slots and enable it."""
        device = self.q_proj.weight.device if hasattr(self.q_proj, "weight") else None
        self.kv_cache = KVCache(batch_size, max_seq_len, self.num_kv_heads, self.head_dim, dtype, device)
        self.cache_enabled = True

    def reset_cache(self) -> None:
        """Zero the KV cache and mark it empty."""
        if self.kv_cache is None:
            raise RuntimeError("KV cache is not set up; call setup_caches first")
        self.kv_cache.reset()

    def remove_cache(self) -> None:
        """Free the KV cache and return to training behaviour."""
        self.kv_cache = None
        self.cache_enabled = False

    @property
    def cache_is_empty(self) -> bool:
        return self.kv_cache is None or self.kv_cache.size == 0

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        mask: AttentionMask | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` to ``y``.

        Args:
            x: queries' input ``[b, s, d]``.
            y: keys'/values' input ``[b, s_y, d]``; None reads the cached keys/values
                (cross-attention decoding).
            mask: ``[b, s, s_y]`` bool (True = attend), a ``PackedLayout`` or a ``BlockMask``
                (neither with an enabled cache: they serve training and evaluation). With an enabled
                self-attention cache, keys are the cache slots, so the mask is ``[b, s, m_s]``
                (wider masks are cut to the filled slots); None there means causal over the
                slots (pass a mask for left-padded rows).
            input_pos: positions ``[b, s]`` (or ``[s]``) of the tokens in ``x``, for RoPE. The
                cache appends tokens to its next free slots.

        Returns:
            ``[b, s, d]``.
        """
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        if self.q_norm is not None:  # per head, before RoPE (as HF Qwen3)
            q = self.q_norm(q)
        if self.pos_embeddings is not None:
            q = self.pos_embeddings(q, input_pos=input_pos)
        q = q.transpose(1, 2)  # [b, n_h, s, h_d]

        use_cache = self.cache_enabled and self.kv_cache is not None
        if use_cache and isinstance(mask, PackedLayout):
            raise ValueError("a packed layout serves training and evaluation; decode with KV caches under bool masks")
        if y is None:
            if not use_cache or self.kv_cache.size == 0:
                raise ValueError("no key/value input and no cached keys/values to attend to")
            k, v = self.kv_cache.filled()
        else:
            k, v = self._project_kv(y, input_pos)
            if use_cache:
                if self.pos_embeddings is None:  # cross-attention: cache the encoder keys/values
                    self.kv_cache.write_prefix(k, v)
                    k, v = self.kv_cache.filled()
                else:  # self-attention: append the new tokens, attend to every filled slot
                    first_slot = self.kv_cache.size
                    self.kv_cache.append(k, v)
                    k, v = self.kv_cache.filled()
                    if mask is None:
                        mask = self._causal_mask_over_cache(first_slot, b, s, k.shape[2], x.device)

        if isinstance(mask, torch.Tensor) and mask.shape[-1] > k.shape[2]:
            mask = mask[..., : k.shape[2]]
        out = attend(
            q,
            k,
            v,
            mask=mask,
            is_causal=self.is_causal and mask is None,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.output_proj(out)

    def _project_kv(
        self, y: torch.Tensor, input_pos: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[b, n_kv, s_y, h_d]`` from ``y`` ``[b, s_y, d]``: project, k-norm
        per head, then RoPE at ``input_pos`` (self-attention only)."""
        b, s_y, _ = y.shape
        k = self.k_proj(y).view(b, s_y, self.num_kv_heads, self.head_dim)
        v = self.v_proj(y).view(b, s_y, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:  # per head, before RoPE (as HF Qwen3)
            k = self.k_norm(k)
        if self.pos_embeddings is not None:
            k = self.pos_embeddings(k, input_pos=input_pos)
        return k.transpose(1, 2), v.transpose(1, 2)  # [b, n_kv, s_y, h_d]

    @staticmethod
    def _causal_mask_over_cache(first_slot: int, b: int, s: int, num_slots: int, device: torch.device) -> torch.Tensor:
        """``[b, s, num_slots]``: token i (in slot ``first_slot + i``) sees slots up to its own."""
        query_slots = torch.arange(first_slot, first_slot + s, device=device)
        mask = torch.arange(num_slots, device=device)[None, :] <= query_slots[:, None]
        return mask.expand(b, s, num_slots)


@contextmanager
def disable_kv_cache(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, attention modules ignore their KV caches (which stay allocated and
    untouched), so ``caches_are_enabled()`` is False while ``caches_are_setup()`` stays True."""
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if not any(m.kv_cache is not None for m in attentions):
        raise RuntimeError("KV caches are not set up; call setup_caches first")
    previous = [m.cache_enabled for m in attentions]
    for module in attentions:
        module.cache_enabled = False
    try:
        yield model
    finally:
        for module, enabled in zip(attentions, previous):
            module.cache_enabled = enabled


def delete_kv_caches(model: nn.Module) -> None:
    """Free every KV cache in ``model`` and return its attention to training behaviour."""
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.remove_cache()
