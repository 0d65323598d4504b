"""A synthetic image-text dataset: deterministic samples that need no files.

Sample ``i`` is a function of ``(seed, i)`` only. Three length mixes:

- ``uniform``: one image whose token opens the sample, then 4 to ``max_text`` text tokens;
- ``fixed``: one image, then exactly ``max_text`` text tokens (every batch the same shape: what
  ``python -m fusiontrain plan`` assumes, for checking its prediction);
- ``long_tail``: 0, 1 or 2 images, each followed by text, and a text length drawn from a Pareto
  law (alpha 1.1, scale 24 tokens, capped at ``max_text``; mean about 100 for a cap of 1024):
  the mix of chat and caption data that makes padded batches waste most of their slots.

The text is learnable: the token after an image is a function of that image's mean pixel value,
so a model that reads the image can lower the loss. Used by the trainer when ``data.format`` is
``synthetic``, and by tests and benchmarks.
"""

from __future__ import annotations

from typing import Literal

import torch

from fusiontrain.data.batch import Sample
from fusiontrain.data.image_format import ImageFormat

PARETO_ALPHA = 1.1
PARETO_SCALE = 24


class SyntheticImageText:
    """Args:
        num_samples: dataset size.
        vocab_size: text ids are drawn from ``[first_text_id, vocab_size)``.
        image_token_id: id that marks an image.
        image_format: the encoder's image format.
        max_text: longest text, in tokens.
        lengths: ``uniform``, ``fixed`` or ``long_tail`` (see the module docstring).
        seed: dataset seed.
        ignore_index: label for untrained positions.
        first_text_id: smallest text id (ids below are special tokens).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        vocab_size: int,
        image_token_id: int,
        image_format: ImageFormat,
        max_text: int = 24,
        lengths: Literal["uniform", "fixed", "long_tail"] = "uniform",
        seed: int = 0,
        ignore_index: int = -100,
        first_text_id: int = 4,
    ) -> None:
        if max_text < 4:
            raise ValueError(f"max_text must be >= 4, got {max_text}")
        self.num_samples = num_samples
        self.vocab_size = vocab_size
        self.image_token_id = image_token_id
        self.image_format = image_format
        self.max_text = max_text
        self.lengths = lengths
        self.seed = seed
        self.ignore_index = ignore_index
        self.first_text_id = first_text_id

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.lengths == "uniform":
            num_images = 1
            length = int(torch.randint(4, self.max_text + 1, (1,), generator=generator))
        elif self.lengths == "fixed":
            num_images, length = 1, self.max_text
        else:
            num_images = int(torch.randint(0, 3, (1,), generator=generator))
            pareto = PARETO_SCALE * (1 - torch.rand((), generator=generator)) ** (-1 / PARETO_ALPHA)
            length = int(min(self.max_text - num_images, max(num_images + 1, round(float(pareto)))))
        text = torch.randint(self.first_text_id, self.vocab_size, (length,), generator=generator)
        images = [self._image(generator) for _ in range(num_images)]

        # Image k's token goes before text chunk k; chunks split the text evenly.
        pieces, spans, cursor = [], [], 0
        bounds = [round(k * length / max(1, num_images)) for k in range(num_images + 1)] if num_images else [0, length]
        for k, image in enumerate(images):
            chunk = text[bounds[k] : bounds[k + 1]].clone()
            chunk[0] = self._image_word(image)
            start = cursor
            pieces += [torch.tensor([self.image_token_id]), chunk]
            cursor += 1 + len(chunk)
            spans.append((start, cursor))
        if not images:
            pieces.append(text)
        tokens = torch.cat(pieces)
        spans = [(start, end if k < len(spans) - 1 else len(tokens)) for k, (start, end) in enumerate(spans)]
        labels = torch.cat([tokens[1:], torch.tensor([self.ignore_index])])
        labels[labels == self.image_token_id] = self.ignore_index  # image tokens are inputs only
        return Sample(tokens=tokens, labels=labels, images=images, image_spans=spans, origin=f"synthetic:{index}")

    def size(self, index: int) -> tuple[int, int, int]:
        """Sample ``index``'s text tokens, images and encoder tokens (it is built: synthetic
        samples are cheap)."""
        sample = self[index]
        return len(sample), len(sample.images), sum(self.image_format.num_tokens(image) for image in sample.images)

    def _image_word(self, image: dict[str, torch.Tensor]) -> int:
        """The text token an image predicts: a function of its brightness."""
        brightness = image["pixel_values"].mean().clamp(-1, 1)
        return self.first_text_id + int((brightness + 1) * 4) % (self.vocab_size - self.first_text_id)

    def _image(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        shift = float(torch.rand((), generator=generator) * 2 - 1)
        return self.image_format.synthetic(generator, shift)
