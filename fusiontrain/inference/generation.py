"""KV-cached decoding for a :class:`~fusiontrain.modules.DeepFusionModel` (or a bare decoder).

One prefill over the prompt (which also caches the encoder's keys/values in every
cross-attention layer), then one token per step. A new token sees the same images as the last
prompt token, the Llama 3.2 rule for text after the last image.

Shapes: b batch, s prompt length, s_e encoder tokens, v vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fusiontrain.modules import delete_kv_caches


def sample_next_token(
    logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick the next token from ``logits`` ``[b, v]``: greedy when ``temperature == 0``, else
    nucleus (top-p) sampling. Returns ``[b, 1]``."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside_nucleus = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keeps at least the top token
    sorted_probs = sorted_probs.masked_fill(outside_nucleus, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice)


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    *,
    max_new_tokens: int,
    encoder_input: dict[str, Any] | None = None,
    encoder_mask: torch.Tensor | dict[str, torch.Tensor] | None = None,
    stop_token_ids: tuple[int, ...] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` ``[b, s]`` by up to ``max_new_tokens`` tokens with KV caches.

    Args:
        model: a DeepFusionModel (caches are set up here and deleted afterwards).
        prompt: prompt token ids; all rows have the same length (no padding).
        max_new_tokens: tokens to add.
        encoder_input: encoder keyword arguments (e.g. the image processor's outputs), or None;
            by modality for a model with an encoder per modality.
        encoder_mask: ``[b, s, s_e]`` bool for the prompt; new tokens reuse its last row. By
            modality with ``encoder_input`` (each modality's fusion layers then cache that
            modality's ``s_e`` keys and values).
        stop_token_ids: a row stops once it emits one of these (later positions repeat it).
        temperature, top_p, generator: sampling; ``temperature=0`` is greedy.

    Returns:
        ``[b, s + n]`` prompt plus generated tokens, ``n <= max_new_tokens``.
    """
    b, s = prompt.shape
    device = prompt.device
    dtype = next(model.parameters()).dtype
    if isinstance(encoder_mask, dict):
        encoder_length: Any = {modality: mask.shape[-1] for modality, mask in encoder_mask.items()}
        for modality in getattr(model, "modalities", None) or ():  # a modality absent from the prompt: no cache of it
            encoder_length.setdefault(modality, 1)
        step_encoder_mask: Any = {modality: mask[:, -1:] for modality, mask in encoder_mask.items()}
    else:
        encoder_length = None if encoder_mask is None else encoder_mask.shape[-1]
        step_encoder_mask = None if encoder_mask is None else encoder_mask[:, -1:]
    model.setup_caches(b, dtype, encoder_max_seq_len=encoder_length, decoder_max_seq_len=s + max_new_tokens)
    try:
        logits = model(
            prompt,
            encoder_input=encoder_input,
            encoder_mask=encoder_mask,
            input_pos=torch.arange(s, device=device).expand(b, s),
        )
        tokens = [prompt]
        finished = torch.zeros(b, 1, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            next_token = sample_next_token(logits[:, -1], temperature=temperature, top_p=top_p, generator=generator)
            next_token = torch.where(finished, tokens[-1][:, -1:], next_token)
            tokens.append(next_token)
            finished |= torch.isin(next_token, torch.tensor(stop_token_ids, device=device))
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            logits = model(
                next_token,
                encoder_mask=step_encoder_mask,
                input_pos=torch.full((b, 1), s + step, device=device),
            )
        return torch.cat(tokens, dim=1)
    finally:
        delete_kv_caches(model)
