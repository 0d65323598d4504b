"""What the data pipeline needs to know about an audio encoder's input: the :class:`AudioFormat`
contract.

Every audio encoder family implements one (``fusiontrain/families/``). A batch of processed clips
is laid out, collated and masked as any encoder's items are
(:class:`~fusiontrain.data.input_format.EncoderInputFormat`); an audio format adds how one clip,
decoded to a mono waveform (:func:`fusiontrain.data.audio.load_audio`), becomes the encoder's
inputs, through the model's own HF feature extractor.

Shapes: b rows, i clips per row, s_e encoder tokens per row, n samples.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from typing import Any, Literal

import numpy as np

from fusiontrain.data.input_format import EncoderInputFormat, ItemInput

ClipInput = ItemInput
TooLong = Literal["skip", "truncate"]


class AudioFormat(EncoderInputFormat):
    """How one encoder takes audio clips.

    Attributes:
        sampling_rate: the rate, in Hz, the encoder's feature extractor takes (clips are resampled
            to it).
        max_tokens_per_clip: the most encoder tokens one clip can yield (the planner's worst case,
            and the default column stride); :attr:`max_tokens_per_item` reads it.
        too_long: what :meth:`process` does with a clip longer than the encoder takes
            (``data.too_long``): ``"skip"`` raises ``BadSample("too_long")``, ``"truncate"``
            keeps its start. Formats whose encoder takes clips of any length never use it.
    """

    sampling_rate: int
    max_tokens_per_clip: int
    too_long: TooLong = "skip"
    slots_key = "clip_slots"

    @property
    def max_tokens_per_item(self) -> int:
        return self.max_tokens_per_clip

    def with_too_long(self, too_long: TooLong) -> AudioFormat:
        """A copy of this format that treats clips longer than the encoder takes as ``too_long``
        says (see :attr:`too_long`)."""
        if too_long not in ("skip", "truncate"):
            raise ValueError(f"too_long must be 'skip' or 'truncate', got {too_long!r}")
        changed = copy.copy(self)
        changed.too_long = too_long
        return changed

    # -- one clip -----------------------------------------------------------------------------------

    @abstractmethod
    def process(self, feature_extractor: Any, waveform: np.ndarray, sampling_rate: int) -> ClipInput:
        """The encoder's inputs for one clip, through the model's own HF feature extractor.

        Args:
            feature_extractor: the encoder's feature extractor.
            waveform: float32 ``[n]``, mono.
            sampling_rate: ``waveform``'s rate in Hz (resampled with soxr when it is not
                :attr:`sampling_rate`).

        Raises:
            BadSample: ``too_long`` (a clip longer than the encoder takes, with ``too_long="skip"``),
                ``bad_sample_rate`` or ``empty_audio`` (resampling).
        """

    def check_feature_extractor(self, feature_extractor: Any, folder: Any) -> None:
        """Raise ``ValueError`` when ``feature_extractor`` (loaded from ``folder``) cannot feed
        this encoder. The default accepts any feature extractor."""

    def describe(self) -> str:
        """A few words for messages and the plan, e.g. ``'up to 1500 tokens per 30 s clip'``."""
        return f"up to {self.max_tokens_per_clip} tokens per clip at {self.sampling_rate} Hz"
