"""KV-cached decoding equals full forwards, and the cache API follows the torchtune contract."""

from __future__ import annotations

import pytest
import torch

from fusiontrain.modules import delete_kv_caches, disable_kv_cache
from tests.helpers.tiny_models import IMAGE_TOKEN, random_mllama, random_pixels

PROMPT, NEW_TOKENS = 7, 6


def _prompt_and_images() -> tuple[torch.Tensor, dict, int]:
    """Sample 0: text, then an image token; sample 1: image first. Both prompts have 7 tokens."""
    torch.manual_seed(1)
    tokens = torch.randint(3, 128, (2, PROMPT))
    tokens[0, 2] = IMAGE_TOKEN
    tokens[1, 0] = IMAGE_TOKEN
    encoder_input = random_pixels([[2], [1]])
    s_e = 1 * 2 * 5  # images x tiles x tokens per tile
    return tokens, encoder_input, s_e


def _encoder_mask(length: int, s_e: int) -> torch.Tensor:
    """Sample 0's first two tokens precede its image and see nothing; everything else sees it."""
    mask = torch.ones(2, length, s_e, dtype=torch.bool)
    mask[0, :2] = False
    return mask


def _greedy_full_forward(model, tokens, encoder_input, s_e) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decode with no cache: a whole forward over the growing sequence at every step."""
    logits_per_step = []
    for _ in range(NEW_TOKENS):
        logits = model(tokens, encoder_input=encoder_input, encoder_mask=_encoder_mask(tokens.shape[1], s_e))
        logits_per_step.append(logits[:, -1])
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens, logits_per_step


def _greedy_cached(model, tokens, encoder_input, s_e, *, explicit_masks: bool):
    """Prefill once, then one token per step, reading cached keys/values."""
    max_len = PROMPT + NEW_TOKENS
    causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))
    positions = torch.arange(PROMPT)
    mask = causal[None, :PROMPT].expand(2, -1, -1) if explicit_masks else None
    logits = model(
        tokens,
        mask=mask,
        encoder_input=encoder_input,
        encoder_mask=_encoder_mask(PROMPT, s_e),
        input_pos=positions[None].expand(2, -1),
    )
    logits_per_step = [logits[:, -1]]
    for step in range(1, NEW_TOKENS):
        next_token = logits_per_step[-1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
        position = PROMPT + step - 1
        mask = causal[None, position : position + 1].expand(2, -1, -1) if explicit_masks else None
        logits = model(
            next_token,
            mask=mask,
            encoder_mask=torch.ones(2, 1, s_e, dtype=torch.bool) if explicit_masks else None,
            input_pos=torch.full((2, 1), position),
        )
        logits_per_step.append(logits[:, -1])
    tokens = torch.cat([tokens, logits_per_step[-1].argmax(-1, keepdim=True)], dim=1)
    return tokens, logits_per_step


@pytest.mark.parametrize("explicit_masks", [True, False])
def test_cached_decode_equals_full_forward_at_every_step(explicit_masks: bool) -> None:
    model = random_mllama()
    tokens, encoder_input, s_e = _prompt_and_images()
    with torch.no_grad():
        want_tokens, want_logits = _greedy_full_forward(model, tokens, encoder_input, s_e)
        model.setup_caches(2, torch.float32, encoder_max_seq_len=s_e, decoder_max_seq_len=PROMPT + NEW_TOKENS)
        got_tokens, got_logits = _greedy_cached(model, tokens, encoder_input, s_e, explicit_masks=explicit_masks)
    for step, (want, got) in enumerate(zip(want_logits, got_logits)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    assert torch.equal(got_tokens, want_tokens)


def test_image_changes_the_decode() -> None:
    """Guards the test above against a vacuous pass: the image matters."""
    model = random_mllama()
    tokens, encoder_input, s_e = _prompt_and_images()
    with torch.no_grad():
        with_image = model(tokens, encoder_input=encoder_input, encoder_mask=_encoder_mask(PROMPT, s_e))
        other = dict(encoder_input, pixel_values=encoder_input["pixel_values"] + 1.0)
        with_other = model(tokens, encoder_input=other, encoder_mask=_encoder_mask(PROMPT, s_e))
    assert (with_image[:, 2:] - with_other[:, 2:]).abs().max() > 1e-3


def test_reset_caches_gives_the_same_decode() -> None:
    model = random_mllama()
    tokens, encoder_input, s_e = _prompt_and_images()
    with torch.no_grad():
        model.setup_caches(2, torch.float32, encoder_max_seq_len=s_e, decoder_max_seq_len=PROMPT + NEW_TOKENS)
        first, _ = _greedy_cached(model, tokens, encoder_input, s_e, explicit_masks=False)
        model.reset_caches()
        for module in model.modules():
            if hasattr(module, "k_cache"):
                assert module.size == 0 and not module.k_cache.any()
        second, _ = _greedy_cached(model, tokens, encoder_input, s_e, explicit_masks=False)
    assert torch.equal(first, second)


def test_cache_state_follows_the_contract() -> None:
    model = random_mllama()
    tokens, encoder_input, s_e = _prompt_and_images()
    assert not model.caches_are_setup() and not model.caches_are_enabled()
    with pytest.raises(RuntimeError, match="setup_caches"):
        model.reset_caches()
    with torch.no_grad():
        reference = model(tokens, encoder_input=encoder_input, encoder_mask=_encoder_mask(PROMPT, s_e))
        model.setup_caches(2, torch.float32, encoder_max_seq_len=s_e, decoder_max_seq_len=16)
        assert model.caches_are_setup() and model.caches_are_enabled()
        with pytest.raises(ValueError, match="input_pos"):
            model(tokens)
        with disable_kv_cache(model):
            assert model.caches_are_setup() and not model.caches_are_enabled()
            # caches are ignored: a plain full forward works and matches the cache-free model
            again = model(tokens, encoder_input=encoder_input, encoder_mask=_encoder_mask(PROMPT, s_e))
        assert model.caches_are_enabled()
        caches = [m for m in model.modules() if hasattr(m, "k_cache")]
        assert all(c.size == 0 for c in caches), "a disabled cache must not be written"
        delete_kv_caches(model)
    torch.testing.assert_close(again, reference, atol=0, rtol=0)
    assert not model.caches_are_setup() and not model.caches_are_enabled()


def test_cross_attention_is_skipped_without_encoder_input_or_cache() -> None:
    """Text-only input leaves every cross-attention layer out (outputs equal to a decoder whose
    fusion layers are removed)."""
    model = random_mllama()
    tokens = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        text_only = model(tokens)
        for layer in model.decoder.layers:
            if hasattr(layer, "fusion_layer"):
                layer.fusion_layer.ca_scale.scale.fill_(5.0)  # would change outputs if it ran
        assert torch.equal(model(tokens), text_only)
