"""A synthetic image-text dataset, optionally with items of other modalities (audio) beside the
images: deterministic samples that need no files.

Sample ``i`` is a function of ``(seed, i)`` only. Three length mixes:

- ``uniform``: one image whose token opens the sample, then 4 to ``max_text`` text tokens;
- ``fixed``: one image, then exactly ``max_text`` text tokens (every batch the same shape: what
  ``python -m fusiontrain plan`` assumes, for checking its prediction);
- ``long_tail``: 0, 1 or 2 images, each followed by text, and a text length drawn from a Pareto
  law (alpha 1.1, scale 24 tokens, capped at ``max_text``; mean about 100 for a cap of 1024):
  the mix of chat and caption data that makes padded batches waste most of their slots.

For a model with an encoder per modality (``others``), every sample also holds items of each other
modality: one of each for ``uniform`` and ``fixed`` (so that a ``fixed`` packed row holds as many
items of every modality as it holds samples), 0, 1 or 2 of each for ``long_tail``. A sample's items
stand in order, images first, then each other modality's; item ``k``'s placeholder goes before
text chunk ``k`` (the chunks split the text evenly), and an item is seen from its placeholder
until the next placeholder of its modality (the Llama 3.2 rule, per modality). Without ``others``
the samples are exactly the image-text ones.

The text is learnable: the token after an item is a function of the mean of the item's input
values (an image's mean pixel value, a clip's mean feature), so a model that reads the item can
lower the loss. Used by the trainer when ``data.format`` is ``synthetic``, and by tests and
benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from fusiontrain.data.batch import IMAGE, Sample
from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.input_format import EncoderInputFormat, ItemInput

PARETO_ALPHA = 1.1
PARETO_SCALE = 24
# The shortest text of the uniform mix.
UNIFORM_MIN_TEXT = 4


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
        others: for a model with an encoder per modality, each modality beside images, in the
            order of the size table's columns: ``name -> (its input format, its placeholder id)``.

    Raises:
        ValueError: ``max_text`` below 4, or too short for a text token after every item a sample
            may hold.
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
        others: Mapping[str, tuple[EncoderInputFormat, int]] | None = None,
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
        self.others = dict(others or {})
        if IMAGE in self.others:
            raise ValueError("images are the image_format's; others holds the modalities beside images")
        most_items = (2 if lengths == "long_tail" else 1) * (1 + len(self.others))
        shortest = {"uniform": UNIFORM_MIN_TEXT, "fixed": max_text, "long_tail": max_text - most_items}[lengths]
        if shortest < most_items:
            raise ValueError(
                f"a {lengths} sample may hold {most_items} items (images and {', '.join(self.others) or 'nothing else'}), "
                f"each followed by text, but its text may be {shortest} tokens: raise max_text ({max_text})"
            )
        self.placeholder_ids = torch.tensor([image_token_id, *(token_id for _, token_id in self.others.values())])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.lengths == "uniform":
            counts = [1] * (1 + len(self.others))
            length = int(torch.randint(UNIFORM_MIN_TEXT, self.max_text + 1, (1,), generator=generator))
        elif self.lengths == "fixed":
            counts, length = [1] * (1 + len(self.others)), self.max_text
        else:
            num_images = int(torch.randint(0, 3, (1,), generator=generator))
            pareto = PARETO_SCALE * (1 - torch.rand((), generator=generator)) ** (-1 / PARETO_ALPHA)
            # Drawn only with other modalities: image-text samples stay what they were.
            counts = [num_images, *(int(torch.randint(0, 3, (1,), generator=generator)) for _ in self.others)]
            num_items = sum(counts)
            length = int(min(self.max_text - num_items, max(num_items + 1, round(float(pareto)))))
        text = torch.randint(self.first_text_id, self.vocab_size, (length,), generator=generator)
        # (modality, placeholder id, item) in the sample's order: images first, then each other modality's.
        formats = {IMAGE: (self.image_format, self.image_token_id), **self.others}
        items = [
            (modality, token_id, self._item(input_format, generator))
            for (modality, (input_format, token_id)), count in zip(formats.items(), counts)
            for _ in range(count)
        ]
        tokens, spans = self._layout(text, items)
        labels = torch.cat([tokens[1:], torch.tensor([self.ignore_index])])
        labels[torch.isin(labels, self.placeholder_ids)] = self.ignore_index  # placeholders are inputs only
        by_modality = {m: [item for modality, _, item in items if modality == m] for m in formats}
        return Sample(
            tokens=tokens,
            labels=labels,
            images=by_modality[IMAGE],
            image_spans=spans[IMAGE],
            origin=f"synthetic:{index}",
            other_items={m: by_modality[m] for m in self.others},
            other_spans={m: spans[m] for m in self.others},
        )

    def _layout(
        self, text: torch.Tensor, items: list[tuple[str, int, ItemInput]]
    ) -> tuple[torch.Tensor, dict[str, list[tuple[int, int]]]]:
        """The sample's tokens ``[n]``: item ``k``'s placeholder, then text chunk ``k`` opening with
        the item's word; and each modality's item spans, from an item's placeholder to the next
        one of its modality (or the end)."""
        spans: dict[str, list[tuple[int, int]]] = {IMAGE: [], **{m: [] for m in self.others}}
        if not items:
            return text, spans
        length = len(text)
        bounds = [round(k * length / len(items)) for k in range(len(items) + 1)]
        pieces, starts = [], []
        cursor = 0
        for k, (modality, token_id, item) in enumerate(items):
            chunk = text[bounds[k] : bounds[k + 1]].clone()
            chunk[0] = self._item_word(item)
            pieces += [torch.tensor([token_id]), chunk]
            starts.append((modality, cursor))
            cursor += 1 + len(chunk)
        for k, (modality, start) in enumerate(starts):
            end = next((later for m, later in starts[k + 1 :] if m == modality), cursor)
            spans[modality].append((start, end))
        return torch.cat(pieces), spans

    def size(self, index: int) -> tuple[int, ...]:
        """Sample ``index``'s text tokens, images and encoder tokens, then, for each other modality
        (in :attr:`others`' order), its items and their encoder tokens (it is built: synthetic
        samples are cheap)."""
        sample = self[index]
        sizes = [len(sample), len(sample.images), sum(self.image_format.num_tokens(image) for image in sample.images)]
        for modality, (input_format, _) in self.others.items():
            items = sample.items(modality)[0]
            sizes += [len(items), sum(input_format.num_tokens(item) for item in items)]
        return tuple(sizes)

    def _item_word(self, item: ItemInput) -> int:
        """The text token an item predicts: a function of the mean of its floating-point inputs
        (an image's brightness)."""
        values = torch.cat([value.reshape(-1) for value in item.values() if value.is_floating_point()])
        mean = values.mean().clamp(-1, 1)
        return self.first_text_id + int((mean + 1) * 4) % (self.vocab_size - self.first_text_id)

    def _item(self, input_format: EncoderInputFormat, generator: torch.Generator) -> ItemInput:
        shift = float(torch.rand((), generator=generator) * 2 - 1)
        return input_format.synthetic(generator, shift)
