"""One audio reference -> a mono float32 waveform at the encoder's sample rate.

A clip is decoded with ``soundfile`` (libsndfile: WAV, FLAC, OGG, MP3, AIFF, ...), mixed down to
mono (the mean of its channels) and resampled with ``soxr`` (its default ``"HQ"`` quality) to the
rate the encoder's feature extractor takes. Nothing is resampled or decoded by hand.

A reference is what a record holds for a clip: a path (relative to the records' folder, or
absolute), raw encoded bytes, or the dict a Hugging Face ``datasets`` column of
``Audio(decode=False)`` gives, ``{"bytes": ..., "path": ...}`` (the bytes are decoded when set,
else the file at ``path``).

A clip that cannot be used raises :class:`~fusiontrain.data.errors.BadSample` naming the file:
``missing_audio`` (no such file), ``corrupt_audio`` (not decodable), ``empty_audio`` (no samples),
``bad_sample_rate`` (a rate that is not a positive number, or one soxr cannot resample).

``soundfile`` and ``soxr`` are the ``[audio]`` extra; they are imported on first use, so this
module imports without them.

Shapes: n samples.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fusiontrain.data.errors import BadSample

# What a record may hold for one clip (see the module docstring).
AudioRef = str | Path | bytes | bytearray | memoryview | Mapping[str, Any]

# The highest rate a file can state (libsndfile's sample rate is a C int). soxr never returns on an
# infinite or NaN rate, nor on finite ones from about 1e15 Hz, so no other rate reaches it.
MAX_SAMPLE_RATE = 2**31 - 1
# The lowest rate taken: below any audio codec's (telephony's 8 kHz, the lowest in use, has half
# again as many). A file that states a rate of a few Hz would otherwise be resampled into an array
# thousands of times its size (1 Hz to 16 kHz: 16,000x) before its length could be refused.
MIN_SAMPLE_RATE = 1_000


def load_audio(ref: AudioRef, sampling_rate: int, *, base_dir: Path | None = None) -> np.ndarray:
    """The clip ``ref`` refers to, decoded, mixed down to mono and resampled to ``sampling_rate``.

    Args:
        ref: a path, encoded bytes, or an HF ``Audio(decode=False)`` dict ``{"bytes", "path"}``
            (bytes win when both are set).
        sampling_rate: the rate the encoder takes, in Hz (e.g. a Whisper feature extractor's
            16000).
        base_dir: the folder relative paths are relative to.

    Returns:
        float32 ``[n]``.

    Raises:
        BadSample: ``missing_audio``, ``corrupt_audio``, ``empty_audio`` or ``bad_sample_rate``
            (the message names the file), or ``bad_record`` (``ref`` is of no kind above).
        ValueError: ``sampling_rate`` is not a positive integer (a program error, not a bad
            record).
    """
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int) or sampling_rate <= 0:
        raise ValueError(f"the target sampling_rate must be a positive integer (Hz), got {sampling_rate!r}")
    data, what = _encoded(ref, base_dir)
    waveform, rate = decode_audio(data, what)
    return resample(waveform, rate, sampling_rate, what)


def _encoded(ref: AudioRef, base_dir: Path | None) -> tuple[bytes, str]:
    """The encoded bytes of ``ref`` and words naming it (its file, where it has one)."""
    if isinstance(ref, Mapping):
        data, path = ref.get("bytes"), ref.get("path")
        if data is not None:
            return bytes(data), f"audio bytes ({path})" if path else "audio bytes"
        if path is not None:
            return _read_file(path, base_dir)
        raise BadSample("bad_record", f"audio reference {dict(ref)!r} has neither bytes nor path")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref), "audio bytes"
    if isinstance(ref, (str, Path)):
        return _read_file(ref, base_dir)
    raise BadSample("bad_record", f"unsupported audio reference of type {type(ref).__name__}")


def _read_file(path: str | Path, base_dir: Path | None) -> tuple[bytes, str]:
    file = Path(path)
    if not file.is_absolute():
        if base_dir is None:
            raise BadSample("missing_audio", f"relative audio path {str(path)!r} but the records have no base directory")
        file = base_dir / file
    try:
        return file.read_bytes(), f"audio file {file}"
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise BadSample("missing_audio", f"audio file {file} does not exist") from None
    except OSError as error:
        raise BadSample("corrupt_audio", f"cannot read audio file {file}: {error}") from error


def decode_audio(data: bytes, what: str) -> tuple[np.ndarray, int]:
    """Decode an encoded clip to mono at its own rate.

    Args:
        data: the encoded clip (any container libsndfile reads).
        what: words naming the clip in errors (its file).

    Returns:
        ``(waveform, rate)``: float32 ``[n]``, the mean of the clip's channels, and its rate in Hz.

    Raises:
        BadSample: ``corrupt_audio`` (libsndfile cannot decode it), ``empty_audio`` (no samples).
    """
    soundfile = _audio_module("soundfile")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [n, channels]
    except (soundfile.SoundFileError, RuntimeError, EOFError) as error:  # LibsndfileError is both
        raise BadSample("corrupt_audio", f"{what} is not readable audio: {error}") from error
    if samples.shape[0] == 0:
        raise BadSample("empty_audio", f"{what} has no samples")
    return samples.mean(axis=1, dtype=np.float32), rate


def resample(waveform: np.ndarray, rate: Any, target_rate: int, what: str) -> np.ndarray:
    """``waveform`` at ``target_rate`` Hz, by ``soxr.resample``; unchanged when the rates are equal.

    Args:
        waveform: float32 ``[n]``, mono.
        rate: its rate in Hz (as a file or a record says it: checked here).
        target_rate: the rate wanted, in Hz.
        what: words naming the clip in errors (its file).

    Returns:
        float32 ``[n']``, ``n' ~ n * target_rate / rate``.

    Raises:
        BadSample: ``bad_sample_rate`` (``rate`` is not a positive number, is below
            :data:`MIN_SAMPLE_RATE` or above :data:`MAX_SAMPLE_RATE`, or soxr fails on it), ``empty_audio`` (no sample is left at
            ``target_rate``).
    """
    real = isinstance(rate, (int, float, np.integer, np.floating)) and not isinstance(rate, bool)
    if not real or not math.isfinite(rate) or rate <= 0:
        raise BadSample("bad_sample_rate", f"{what} has sample rate {rate!r}, not a positive number of Hz")
    if rate < MIN_SAMPLE_RATE:
        raise BadSample(
            "bad_sample_rate", f"{what} has sample rate {rate!r} Hz, below the {MIN_SAMPLE_RATE} Hz of any audio format"
        )
    if rate > MAX_SAMPLE_RATE:
        raise BadSample(
            "bad_sample_rate", f"{what} has sample rate {rate!r} Hz, above the {MAX_SAMPLE_RATE} Hz a file can state"
        )
    if rate == target_rate:
        return waveform
    soxr = _audio_module("soxr")
    try:
        resampled = soxr.resample(waveform, rate, target_rate)
    except (ValueError, RuntimeError, MemoryError) as error:  # MemoryError: an absurd ratio (1e-3 Hz)
        raise BadSample(
            "bad_sample_rate", f"soxr cannot resample {what} from {rate} Hz to {target_rate} Hz: {error}"
        ) from error
    if resampled.shape[0] == 0:
        raise BadSample(
            "empty_audio", f"{what} has no sample left at {target_rate} Hz ({waveform.shape[0]} samples at {rate} Hz)"
        )
    return resampled.astype(np.float32, copy=False)


def _audio_module(name: str) -> Any:
    """``soundfile`` or ``soxr``, which the ``[audio]`` extra installs."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"reading audio needs {name}: pip install 'fusiontrain[audio]'") from error
