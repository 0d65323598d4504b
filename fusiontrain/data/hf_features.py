"""Hugging Face ``datasets`` media columns read without decoding.

An ``Image`` or ``Audio`` feature (at the top of a row, or nested in structs and lists) set to
``decode=False`` gives its stored ``{"bytes", "path"}`` instead of a PIL image or a decoded
waveform. fusiontrain decodes those references itself, in the dataloader workers
(:func:`~fusiontrain.data.sources.open_image`, :func:`~fusiontrain.data.audio.load_audio`), so
that a corrupt item is one counted bad record rather than an error inside ``datasets``, and so that
audio needs no ``torchcodec`` (which ``datasets`` 5 decodes ``Audio`` columns with: without it,
reading a decoding ``Audio`` column raises ``ImportError``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any


def undecoded(feature: Any) -> Any:
    """``feature`` with every ``Image`` and ``Audio`` feature in it set to ``decode=False`` (their
    other settings kept); other features as they are."""
    from datasets import Audio, Image, LargeList, List

    if isinstance(feature, (Image, Audio)):
        return replace(feature, decode=False)
    if isinstance(feature, dict):
        return {key: undecoded(value) for key, value in feature.items()}
    if isinstance(feature, LargeList):
        return LargeList(undecoded(feature.feature))
    if isinstance(feature, List):
        return List(undecoded(feature.feature), length=feature.length)
    if isinstance(feature, list):
        return [undecoded(value) for value in feature]
    return feature


def without_decoding(dataset: Any) -> Any:
    """``dataset`` (a ``datasets.Dataset`` or ``IterableDataset``) with its media columns cast to
    :func:`undecoded` features; a streamed dataset that does not know its features is returned
    as it is (its rows come as the files hold them)."""
    for column, feature in (dataset.features or {}).items():
        plain = undecoded(feature)
        if plain != feature:
            dataset = dataset.cast_column(column, plain)
    return dataset
