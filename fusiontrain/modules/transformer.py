"""Decoder layers and the decoder stack.

- :class:`TransformerSelfAttentionLayer`: pre-norm self-attention + MLP (a Llama block).
- :class:`TransformerCrossAttentionLayer`: pre-norm cross-attention to encoder embeddings + MLP,
  each branch behind a tanh gate that starts shut.
- :class:`TransformerDecoder`: embeddings, a stack of layers, final norm and output projection.

Shapes: b batch, s tokens, s_e encoder tokens, d width, v vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fusiontrain.modules.attention import AttentionMask, MultiHeadAttention
from fusiontrain.modules.masks import EncoderBlockMask
from fusiontrain.modules.packed import CrossAttentionLayout


class _AttentionBlock(nn.Module):
    """Cache queries shared by the self- and cross-attention layers (``self.attn`` holds the cache)."""

    attn: MultiHeadAttention

    def caches_are_setup(self) -> bool:
        return self.attn.kv_cache is not None

    def caches_are_enabled(self) -> bool:
        return self.attn.cache_enabled

    def reset_cache(self) -> None:
        self.attn.reset_cache()


class TransformerSelfAttentionLayer(_AttentionBlock):
    """``x + sa_scale(attn(sa_norm(x)))``, then ``h + mlp_scale(mlp(mlp_norm(h)))``.

    Args:
        attn: self-attention.
        mlp: feed-forward.
        sa_norm, mlp_norm: pre-norms (identity when None).
        sa_scale, mlp_scale: scales on each branch (identity when None).
    """

    def __init__(
        self,
        attn: MultiHeadAttention,
        mlp: nn.Module,
        *,
        sa_norm: nn.Module | None = None,
        mlp_norm: nn.Module | None = None,
        sa_scale: nn.Module | None = None,
        mlp_scale: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.sa_norm = sa_norm or nn.Identity()
        self.mlp_norm = mlp_norm or nn.Identity()
        self.sa_scale = sa_scale or nn.Identity()
        self.mlp_scale = mlp_scale or nn.Identity()

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | None,
        decoder_max_seq_len: int,
    ) -> None:
        self.attn.setup_cache(batch_size, dtype, decoder_max_seq_len)

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: AttentionMask | None = None,
        input_pos: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``x`` ``[b, s, d]`` -> ``[b, s, d]``; encoder arguments in ``kwargs`` are ignored."""
        normed = self.sa_norm(x)
        h = x + self.sa_scale(self.attn(normed, normed, mask=mask, input_pos=input_pos))
        return h + self.mlp_scale(self.mlp(self.mlp_norm(h)))


class TransformerCrossAttentionLayer(_AttentionBlock):
    """Gated cross-attention from tokens to encoder embeddings, then a gated MLP.

    A token whose ``encoder_mask`` row is all False (it sees no image, e.g. text before the first
    image) gets exactly zero from both branches, and no NaN: its attention row is opened to keep
    the softmax finite, and both branch outputs are then zeroed for that row.

    ``encoder_mask`` may also come as a :class:`~fusiontrain.modules.packed.CrossAttentionLayout`
    (the CPU training path, from ``Batch.model_inputs``): then only the tokens that see an image
    are gathered and computed, each attending only to its own images' encoder tokens, and the
    others pass through unchanged (the same exact zero from both branches, for no work). As an
    :class:`~fusiontrain.modules.masks.EncoderBlockMask` (the CUDA path), attention runs through
    its flex_attention ``BlockMask``, which skips the blocks no token attends.

    The layer is skipped (returns ``x``) when there is no encoder input and no cached encoder
    keys/values.

    Args:
        attn: cross-attention (no positional embedding; ``is_causal=False``).
        mlp: feed-forward.
        ca_norm, mlp_norm: pre-norms.
        ca_scale, mlp_scale: gates, normally :class:`~fusiontrain.modules.layers.TanhGate`.
    """

    def __init__(
        self,
        attn: MultiHeadAttention,
        mlp: nn.Module,
        *,
        ca_norm: nn.Module | None = None,
        mlp_norm: nn.Module | None = None,
        ca_scale: nn.Module | None = None,
        mlp_scale: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if attn.pos_embeddings is not None:
            raise ValueError("cross-attention takes no positional embeddings")
        self.attn = attn
        self.mlp = mlp
        self.ca_norm = ca_norm or nn.Identity()
        self.mlp_norm = mlp_norm or nn.Identity()
        self.ca_scale = ca_scale or nn.Identity()
        self.mlp_scale = mlp_scale or nn.Identity()

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int,
        decoder_max_seq_len: int | None,
    ) -> None:
        self.attn.setup_cache(batch_size, dtype, encoder_max_seq_len)

    def forward(
        self,
        x: torch.Tensor,
        *,
        encoder_input: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | CrossAttentionLayout | EncoderBlockMask | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Args:
            x: tokens ``[b, s, d]``.
            encoder_input: encoder embeddings ``[b, s_e, d]``, or None to use the cache.
            encoder_mask: ``[b, s, s_e]`` bool, True where token i may attend embedding j; or its
                ``CrossAttentionLayout`` or ``EncoderBlockMask`` (see the class docstring).

        Returns:
            ``[b, s, d]``.
        """
        cached = self.attn.cache_enabled and not self.attn.cache_is_empty
        if encoder_input is None and not cached:
            return x
        if isinstance(encoder_mask, CrossAttentionLayout):
            return self._forward_gathered(x, encoder_input, encoder_mask)

        sees_nothing = None  # [b, s, 1], True for rows that see no encoder embedding
        attention_mask: AttentionMask | None = encoder_mask
        if isinstance(encoder_mask, EncoderBlockMask):  # flex_attention gives fully masked rows 0
            sees_nothing = ~encoder_mask.dense.any(dim=-1, keepdim=True)
            attention_mask = encoder_mask.block_mask
        elif encoder_mask is not None:
            sees_nothing = ~encoder_mask.any(dim=-1, keepdim=True)
            attention_mask = encoder_mask | sees_nothing

        attn_out = self.attn(self.ca_norm(x), encoder_input, mask=attention_mask)
        if sees_nothing is not None:
            attn_out = attn_out.masked_fill(sees_nothing, 0.0)
        h = x + self.ca_scale(attn_out)

        mlp_out = self.mlp(self.mlp_norm(h))
        if sees_nothing is not None:
            mlp_out = mlp_out.masked_fill(sees_nothing, 0.0)
        return h + self.mlp_scale(mlp_out)

    def _forward_gathered(
        self, x: torch.Tensor, encoder_input: torch.Tensor | None, layout: CrossAttentionLayout
    ) -> torch.Tensor:
        """Both branches on the ``n`` tokens that see an image only: gather them (``[1, n, d]``),
        compute, and write them back into ``x`` ``[b, s, d]``; the rest of ``x`` is returned as
        is. With no such token the branches still run on an empty selection, so that every
        parameter gets its (zero) gradient on every rank."""
        if encoder_input is None:
            raise ValueError("a CrossAttentionLayout needs the encoder embeddings (it does not read KV caches)")
        b, s, d = x.shape
        picked = x.reshape(b * s, d).index_select(0, layout.token_index).unsqueeze(0)
        attn_out = self.attn(self.ca_norm(picked), encoder_input, mask=layout.attention)
        h = picked + self.ca_scale(attn_out)
        out = h + self.mlp_scale(self.mlp(self.mlp_norm(h)))
        # A new [b, s, d] tensor, not a view (FSDP2 warns about views returned by a unit).
        where = (layout.token_index // s, layout.token_index % s)
        return x.index_put(where, out.squeeze(0))


class TransformerDecoder(nn.Module):
    """Token embeddings, a stack of layers, a final norm and the output projection.

    Args:
        tok_embeddings: token ids ``[b, s]`` -> ``[b, s, d]``.
        layers: the layers, in order (self-attention, cross-attention or fusion layers).
        max_seq_len: longest sequence accepted, and the default cache length.
        num_heads: query heads (informational, as in torchtune).
        head_dim: per-head width (informational, as in torchtune).
        norm: final norm.
        output: projection ``d -> v``.
        output_hidden_states: indices of layers whose *inputs* are also returned.
    """

    def __init__(
        self,
        *,
        tok_embeddings: nn.Module,
        layers: list[nn.Module] | nn.ModuleList,
        max_seq_len: int,
        num_heads: int,
        head_dim: int,
        norm: nn.Module,
        output: nn.Module,
        output_hidden_states: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.tok_embeddings = tok_embeddings
        self.layers = layers if isinstance(layers, nn.ModuleList) else nn.ModuleList(layers)
        self.norm = norm
        self.output = output
        self.max_seq_len = max_seq_len
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.output_hidden_states = list(output_hidden_states or [])
        self.num_output_chunks = 0
        self.skip_output_projection = False
        self.encoder_max_cache_seq_len: int | None = None
        self.decoder_max_cache_seq_len: int | None = None

    # -- output chunking and caches --------------------------------------------------------------

    def set_num_output_chunks(self, num_output_chunks: int) -> None:
        """Return the logits as ``num_output_chunks`` chunks along s (0 = one tensor)."""
        if num_output_chunks < 0:
            raise ValueError(f"num_output_chunks must be >= 0, got {num_output_chunks}")
        self.num_output_chunks = num_output_chunks

    def set_skip_output_projection(self, skip: bool) -> None:
        """Return the final-normed hidden states ``[b, s, d]`` instead of logits (a fusiontrain
        extension): a loss that applies ``self.output`` chunk by chunk, recomputing each chunk in
        backward (``fusiontrain.train.loss``), then never holds more than one chunk of logits."""
        self.skip_output_projection = skip

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | None = None,
        decoder_max_seq_len: int | None = None,
    ) -> None:
        """Allocate KV caches: self-attention layers get ``decoder_max_seq_len`` slots,
        cross-attention layers ``encoder_max_seq_len``, fusion layers both. Either defaults to
        ``max_seq_len``."""
        self.encoder_max_cache_seq_len = encoder_max_seq_len or self.max_seq_len
        self.decoder_max_cache_seq_len = decoder_max_seq_len or self.max_seq_len
        for layer in self.layers:
            layer.setup_caches(
                batch_size,
                dtype,
                encoder_max_seq_len=self.encoder_max_cache_seq_len,
                decoder_max_seq_len=self.decoder_max_cache_seq_len,
            )

    def caches_are_setup(self) -> bool:
        """True once :meth:`setup_caches` has created the caches."""
        return self.layers[0].caches_are_setup()

    def caches_are_enabled(self) -> bool:
        """True while forward passes read and update the caches."""
        return self.layers[0].caches_are_enabled()

    def reset_caches(self) -> None:
        """Zero every cache and its position without reallocating."""
        if not self.caches_are_setup():
            raise RuntimeError("KV caches are not set up; call setup_caches first")
        for layer in self.layers:
            layer.reset_cache()

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: AttentionMask | None = None,
        encoder_input: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | CrossAttentionLayout | EncoderBlockMask | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Args:
            tokens: ``[b, s]`` token ids.
            mask: ``[b, s, s]`` bool self-attention mask (True = attend; ``[b, s, m_s]`` over the
                cache slots when caches are enabled), a ``PackedLayout`` or a flex_attention
                ``BlockMask``; None means causal.
            encoder_input: encoder embeddings ``[b, s_e, d]`` for cross-attention layers.
            encoder_mask: ``[b, s, s_e]`` bool, True where token i may attend embedding j; or a
                ``CrossAttentionLayout`` / ``EncoderBlockMask`` standing for it.
            input_pos: ``[b, s]`` positions; restart at 0 per packed sample. Required with
                caches.

        Returns:
            fp32 logits ``[b, s, v]``; a list of chunks along s after
            ``set_num_output_chunks(k)``; with ``output_hidden_states``, a list of the requested
            layer inputs followed by that output.
        """
        seq_len = tokens.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence of {seq_len} tokens exceeds max_seq_len={self.max_seq_len}")
        if self.caches_are_enabled() and input_pos is None:
            raise ValueError("KV caches are enabled: pass input_pos with the positions of the tokens")

        h = self.tok_embeddings(tokens)
        hidden: list[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            if index in self.output_hidden_states:
                hidden.append(h)
            h = layer(
                h,
                mask=mask,
                encoder_input=encoder_input,
                encoder_mask=encoder_mask,
                input_pos=input_pos,
            )
        output = self.unembed(h)
        return [*hidden, output] if hidden else output

    def unembed(self, h: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Final norm and output projection of ``h`` ``[b, s, d]``: fp32 ``[b, s, v]``, or
        chunks of it along s when output chunking is on (left in the model dtype: the loss
        upcasts one chunk at a time), or only the normed ``h`` when the projection is skipped."""
        h = self.norm(h)
        if self.skip_output_projection:
            return h
        if self.num_output_chunks > 0:
            return [self.output(chunk) for chunk in h.chunk(self.num_output_chunks, dim=1)]
        return self.output(h).float()
