"""fusiontrain.inference.generation: cached decoding equals decoding by full forwards."""

from __future__ import annotations

import torch

from fusiontrain.inference.generation import generate, sample_next_token
from tests.helpers.tiny_models import IMAGE_TOKEN, random_mllama, random_pixels


def _greedy_without_cache(model, prompt, encoder_input, encoder_mask, steps: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(steps):
        mask = torch.cat([encoder_mask, encoder_mask[:, -1:].expand(-1, tokens.shape[1] - prompt.shape[1], -1)], 1)
        with torch.no_grad():
            logits = model(tokens, encoder_input=encoder_input, encoder_mask=mask)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def test_generate_equals_uncached_greedy_decode() -> None:
    model = random_mllama(seed=3)
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    prompt[:, 1] = IMAGE_TOKEN
    encoder_mask = torch.ones(2, 5, 20, dtype=torch.bool)
    encoder_mask[:, 0] = False  # the first token precedes the image
    encoder_input = random_pixels([[2, 1], [3]])
    got = generate(model, prompt, max_new_tokens=8, encoder_input=encoder_input, encoder_mask=encoder_mask)
    want = _greedy_without_cache(model, prompt, encoder_input, encoder_mask, steps=8)
    assert torch.equal(got, want)
    assert not model.caches_are_setup()


def test_generate_stops_rows_at_a_stop_token() -> None:
    model = random_mllama(seed=3)
    prompt = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(0))
    free = generate(model, prompt, max_new_tokens=6)
    stop = int(free[0, 5])  # the second generated token
    stopped = generate(model, prompt, max_new_tokens=6, stop_token_ids=(stop,))
    assert torch.equal(stopped, free[:, : stopped.shape[1]])
    assert stopped.shape[1] <= 6 and int(stopped[0, -1]) == stop


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, temperature=1.0, top_p=0.7, generator=generator)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample_next_token(logits)) == 0
