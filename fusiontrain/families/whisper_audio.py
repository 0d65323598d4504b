"""Whisper's audio format: clips as log-mel windows, of which the clip's real frames are kept.

Apart from the family (:mod:`fusiontrain.families.whisper`), because dataloader workers unpickle
it: importing this module imports no model code.

Shapes: b rows, i clips per row, n_mels mel bins, F = nb_max_frames feature frames per window
(3000 for the released checkpoints: 30 s), T = F / 2 tower outputs per window, s_e packed encoder
tokens per row, n samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fusiontrain.data.audio import resample
from fusiontrain.data.audio_format import AudioFormat, ClipInput, TooLong
from fusiontrain.data.errors import BadSample
from fusiontrain.data.input_format import packed_layout, packed_token_index

# Whisper's front end: every released checkpoint's WhisperFeatureExtractor takes 16 kHz audio in
# 10 ms hops (check_feature_extractor refuses one that does not).
WHISPER_SAMPLING_RATE = 16_000
WHISPER_HOP_LENGTH = 160


def fit_to_window(waveform: np.ndarray, window: int, too_long: TooLong, sampling_rate: int) -> np.ndarray:
    """A clip as the encoder's fixed window takes it (``data.too_long`` decides for a long one).

    A clip of at most ``window`` samples is returned as it is (the feature extractor pads it with
    silence). A longer one:

    - ``"truncate"``: its first ``window`` samples (what ``WhisperFeatureExtractor``'s own
      truncation keeps), so it yields the window's tokens;
    - ``"skip"``: ``BadSample("too_long")``, naming the clip's length and the window's.

    Args:
        waveform: float32 ``[n]``.
        window: the most samples the encoder takes (``nb_max_frames * hop_length``).
        too_long: ``"skip"`` or ``"truncate"``.
        sampling_rate: ``waveform``'s rate in Hz (for the message).
    """
    if waveform.shape[0] <= window:
        return waveform
    if too_long == "truncate":
        return waveform[:window]
    if too_long == "skip":
        raise BadSample(
            "too_long",
            f"an audio clip of {waveform.shape[0] / sampling_rate:g} s ({waveform.shape[0]} samples at {sampling_rate} Hz) "
            f"is longer than the encoder's {window / sampling_rate:g} s window ({window} samples)",
        )
    raise ValueError(f"too_long must be 'skip' or 'truncate', got {too_long!r}")


class WhisperClips(AudioFormat):
    """One clip = Whisper's log-mel window, padded with silence to F frames as the
    ``WhisperFeatureExtractor`` pads it; of the tower's T outputs, the clip's first
    ``ceil(frames / 2)`` are its tokens (``frames`` its real feature frames: conv2 has stride 2). A
    row's clips are packed: clip k starts at the sum of the previous clips' token counts.

    A clip longer than the window follows :attr:`too_long` (``data.too_long``, through
    :func:`fit_to_window`): ``"truncate"`` keeps its first window (T tokens), ``"skip"`` raises
    ``BadSample("too_long")``.

    Per clip: ``input_features`` ``[n_mels, F]`` float, ``num_frames`` 0-dim long (its real
    frames). :meth:`collate` turns the frame counts into ``token_index``.

    Args:
        num_mel_bins: ``n_mels``.
        num_frames: ``F`` (the model's ``2 * max_source_positions``).
        sampling_rate: the feature extractor's rate in Hz.
        hop_length: samples per feature frame.
        too_long: see :attr:`~fusiontrain.data.audio_format.AudioFormat.too_long`.
    """

    tokens_vary = True  # a short clip yields fewer tokens than the window

    def __init__(
        self,
        num_mel_bins: int,
        num_frames: int,
        *,
        sampling_rate: int = WHISPER_SAMPLING_RATE,
        hop_length: int = WHISPER_HOP_LENGTH,
        too_long: TooLong = "skip",
    ) -> None:
        if num_frames < 2 or num_frames % 2:
            raise ValueError(f"a Whisper window has an even number of frames (2 * max_source_positions), got {num_frames}")
        self.num_mel_bins = num_mel_bins
        self.num_frames = num_frames
        self.sampling_rate = sampling_rate
        self.hop_length = hop_length
        self.max_tokens_per_clip = num_frames // 2
        self.too_long = too_long

    @property
    def window_samples(self) -> int:
        """The most samples one clip may have: ``F * hop_length``."""
        return self.num_frames * self.hop_length

    # -- one clip -----------------------------------------------------------------------------------

    def check_feature_extractor(self, feature_extractor: Any, folder: Any) -> None:
        got = {
            "feature_size": getattr(feature_extractor, "feature_size", None),
            "sampling_rate": getattr(feature_extractor, "sampling_rate", None),
            "hop_length": getattr(feature_extractor, "hop_length", None),
            "nb_max_frames": getattr(feature_extractor, "nb_max_frames", None),
        }
        want = {
            "feature_size": self.num_mel_bins,
            "sampling_rate": self.sampling_rate,
            "hop_length": self.hop_length,
            "nb_max_frames": self.num_frames,
        }
        if got != want:
            raise ValueError(
                f"the feature extractor in {folder} ({type(feature_extractor).__name__}) makes {got}, but the Whisper "
                f"encoder takes {want}: use the WhisperFeatureExtractor saved with the model"
            )

    def process(self, feature_extractor: Any, waveform: np.ndarray, sampling_rate: int) -> ClipInput:
        if waveform.ndim != 1:
            raise ValueError(f"expected a mono waveform [n], got shape {list(waveform.shape)}")
        if waveform.shape[0] == 0:
            raise BadSample("empty_audio", "the audio clip has no samples")
        waveform = resample(np.asarray(waveform, dtype=np.float32), sampling_rate, self.sampling_rate, "the audio clip")
        waveform = fit_to_window(waveform, self.window_samples, self.too_long, self.sampling_rate)
        out = feature_extractor(
            waveform, sampling_rate=self.sampling_rate, return_attention_mask=True, return_tensors="pt"
        )
        features = out["input_features"][0].float()
        if tuple(features.shape) != (self.num_mel_bins, self.num_frames):
            raise ValueError(
                f"the feature extractor made input_features {list(features.shape)}, expected "
                f"[{self.num_mel_bins}, {self.num_frames}]: use the WhisperFeatureExtractor saved with the model"
            )
        frame_mask = out["attention_mask"][0]
        frames = int(frame_mask.sum())
        if frames < 1 or not bool(frame_mask[:frames].all()):
            raise ValueError(f"the feature extractor's frame mask is not a non-empty prefix ({frames} frames)")
        return {"input_features": features, "num_frames": torch.tensor(frames)}

    def num_tokens(self, clip: ClipInput) -> int:
        """``ceil(frames / 2)``: the tower's outputs that see the clip's real frames."""
        return (int(clip["num_frames"]) + 1) // 2

    def _clip(self, frames: int, values: torch.Tensor | None = None) -> ClipInput:
        features = torch.zeros(self.num_mel_bins, self.num_frames)
        if values is not None:
            features[:, :frames] = values
        return {"input_features": features, "num_frames": torch.tensor(frames)}

    def blank(self) -> ClipInput:
        """Two frames of zeros (one token)."""
        return self._clip(2)

    def synthetic(self, generator: torch.Generator, shift: float) -> ClipInput:
        """A random number of real frames (1 to F) of normal values times 0.5 plus ``shift``;
        zeros after them."""
        frames = int(torch.randint(1, self.num_frames + 1, (), generator=generator))
        return self._clip(frames, torch.randn(self.num_mel_bins, frames, generator=generator) * 0.5 + shift)

    def worst_case(self) -> ClipInput:
        """A clip filling the window (the most columns; the tower's cost is the same for any)."""
        return self._clip(self.num_frames)

    # -- a batch ------------------------------------------------------------------------------------

    def layout(self, per_row: list[list[ClipInput]]) -> tuple[list[list[int]], int]:
        """Packed: clip k of a row starts at the sum of the previous clips' token counts; ``s_e``
        is the longest row's sum."""
        return packed_layout([[self.num_tokens(clip) for clip in clips] for clips in per_row])

    def collate(self, per_row: list[list[ClipInput]]) -> dict[str, torch.Tensor] | None:
        """``input_features`` ``[b, i, n_mels, F]`` (padding slots zero), ``clip_slots`` when some
        slot is padding, and ``token_index`` ``[b, s_e]`` long: for each packed column, its
        token's position in the row's flattened ``[i * T]`` tower outputs (padding columns point
        at 0). The frame counts are spent on ``token_index``: the tower takes no mask (Whisper
        attends over the whole window, silence included, as transformers runs it)."""
        stacked = super().collate(per_row)
        if stacked is None:
            return None
        del stacked["num_frames"]
        counts = [[self.num_tokens(clip) for clip in clips] for clips in per_row]
        stacked["token_index"] = packed_token_index(counts, self.max_tokens_per_clip)
        return stacked

    def describe(self) -> str:
        seconds = self.window_samples / self.sampling_rate
        return f"Whisper, up to {self.max_tokens_per_clip} tokens per {seconds:g} s clip ({self.num_mel_bins} mel bins)"
