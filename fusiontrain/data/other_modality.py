"""A modality beside images that records may hold (audio), for a composed model with an encoder per
modality: :class:`OtherModality`, what the sample builder (:mod:`fusiontrain.data.formats`) needs
to know of it, and how one of its items becomes the encoder's inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusiontrain.data.audio_format import AudioFormat


@dataclass(frozen=True)
class OtherModality:
    """A modality beside images that records may hold, for a model with an encoder per modality.

    Attributes:
        name: the modality (``audio``): its record keys, content item type and placeholder
            ``<|name|>`` (see the module docstring).
        input_format: its encoder's format (an :class:`~fusiontrain.data.audio_format.AudioFormat`).
        folder: the folder of its encoder's feature extractor.
        token_id: the id its placeholder becomes (its new embedding row).
    """

    name: str
    input_format: AudioFormat
    folder: Path
    token_id: int

    @property
    def placeholder(self) -> str:
        return f"<|{self.name}|>"

    def process(self, feature_extractor: Any, ref: Any, base_dir: Path | None) -> dict[str, torch.Tensor]:
        """The encoder's inputs for the item ``ref`` refers to (a path, relative to ``base_dir``,
        bytes, or an HF ``Audio(decode=False)`` dict): decoded, resampled to the format's rate and
        processed by ``feature_extractor``.

        Raises:
            BadSample: the item's own reasons (``missing_audio``, ``corrupt_audio``, ...).
        """
        from fusiontrain.data.audio import load_audio

        waveform = load_audio(ref, self.input_format.sampling_rate, base_dir=base_dir)
        return self.input_format.process(feature_extractor, waveform, self.input_format.sampling_rate)
