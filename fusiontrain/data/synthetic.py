"""A synthetic image-text dataset: deterministic samples that need no files.

Sample ``i`` is a function of ``(seed, i)`` only: one image (random pixels) whose image token
opens the sample, then random text. The caption is learnable: its first token is a function of the
image's mean pixel value, so a model that reads the image can lower the loss. Used by the trainer
until real datasets are configured, and by tests and benchmarks.
"""

from __future__ import annotations

import torch

from fusiontrain.data.batch import ImageSpec, Sample


class SyntheticImageText:
    """Args:
        num_samples: dataset size.
        vocab_size: text ids are drawn from ``[first_text_id, vocab_size)``.
        image_token_id: id that marks the image.
        spec: the encoder's image format.
        max_text: longest text, in tokens (lengths uniform in ``[4, max_text]``).
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
        spec: ImageSpec,
        max_text: int = 24,
        seed: int = 0,
        ignore_index: int = -100,
        first_text_id: int = 4,
    ) -> None:
        if max_text < 4:
            raise ValueError(f"max_text must be >= 4, got {max_text}")
        self.num_samples = num_samples
        self.vocab_size = vocab_size
        self.image_token_id = image_token_id
        self.spec = spec
        self.max_text = max_text
        self.seed = seed
        self.ignore_index = ignore_index
        self.first_text_id = first_text_id

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = self._image(generator)
        length = int(torch.randint(4, self.max_text + 1, (1,), generator=generator))
        text = torch.randint(self.first_text_id, self.vocab_size, (length,), generator=generator)
        brightness = image["pixel_values"].mean()
        text[0] = self.first_text_id + int((brightness.clamp(-1, 1) + 1) * 4) % (self.vocab_size - self.first_text_id)
        tokens = torch.cat([torch.tensor([self.image_token_id]), text])
        labels = torch.cat([text, torch.tensor([self.ignore_index])])  # the last token predicts nothing
        return Sample(tokens=tokens, labels=labels, images=[image], image_spans=[(0, len(tokens))], origin=f"synthetic:{index}")

    def _image(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        size, shift = self.spec.image_size, torch.rand((), generator=generator) * 2 - 1
        if self.spec.kind == "tower":
            return {"pixel_values": torch.randn(3, size, size, generator=generator) * 0.5 + shift}
        tiles = torch.zeros(self.spec.max_num_tiles, 3, size, size)
        tiles[0] = torch.randn(3, size, size, generator=generator) * 0.5 + shift
        tile_mask = torch.zeros(self.spec.max_num_tiles, dtype=torch.long)
        tile_mask[0] = 1
        return {"pixel_values": tiles, "aspect_ratio_ids": torch.tensor(1), "aspect_ratio_mask": tile_mask}
