"""The one error a bad record raises on its way to a sample: :class:`BadSample`.

It lives in its own module because both the record readers (:mod:`fusiontrain.data.sources`:
malformed JSON lines, unreadable images; :mod:`fusiontrain.data.audio`: unreadable audio) and the
sample builder (:mod:`fusiontrain.data.formats`: too long, image-token count mismatch, ...) raise
it. :mod:`fusiontrain.data.formats` re-exports it.
"""

from __future__ import annotations


class BadSample(Exception):
    """A record that cannot become a training sample; the loader skips it and counts ``reason``.

    Attributes:
        reason: a short machine key, one of :data:`REASONS`.
        detail: what is wrong, for people (names the image or audio file where one is involved).
        origin: where the record came from (``file:line`` for JSON Lines, ``file[index]`` for
            other sources); empty until the record is known (see :meth:`at`).
    """

    def __init__(self, reason: str, detail: str, *, origin: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown BadSample reason {reason!r}; known: {sorted(REASONS)}")
        self.reason = reason
        self.detail = detail
        self.origin = origin
        super().__init__(f"{origin}: {detail} [{reason}]" if origin else f"{detail} [{reason}]")

    def at(self, origin: str) -> BadSample:
        """The same error, naming ``origin``."""
        return BadSample(self.reason, self.detail, origin=origin)

    def __reduce__(self) -> tuple:
        # Pickle by fields (dataloader workers send exceptions to the main process).
        return (_rebuild, (self.reason, self.detail, self.origin))


def _rebuild(reason: str, detail: str, origin: str) -> BadSample:
    return BadSample(reason, detail, origin=origin)


REASONS: frozenset[str] = frozenset(
    {
        "empty_line",  # a blank line in a JSON Lines file
        "malformed_json",  # a JSON Lines line that is not a JSON object
        "bad_record",  # the record does not have the format's fields and types
        "missing_image",  # an image file that does not exist
        "unreadable_image",  # an image file that exists but cannot be read (permissions, ...)
        "corrupt_image",  # image data that is not a complete image (garbage, truncated)
        "missing_audio",  # an audio file that does not exist
        "corrupt_audio",  # audio data that cannot be read or decoded (not an audio format soundfile reads, garbage)
        "empty_audio",  # an audio clip with no samples (at its own rate, or left after resampling)
        "bad_sample_rate",  # an audio clip whose sample rate is not a positive number, or that soxr cannot resample
        "empty_text",  # no text to train on (blank caption, blank assistant turn, no messages)
        "unknown_role",  # a message role other than system / user / assistant
        "image_count_mismatch",  # number of image tokens != number of images
        "item_count_mismatch",  # number of placeholders of another modality (audio) != its items
        "template_unstable",  # the chat template renders a prefix of the conversation differently
        "no_target",  # no position would be trained on
        "too_long",  # more tokens than max_len (too_long="skip"), or nothing trainable left after truncation
        "too_many_images",  # more images than a packed row holds (raised by the loader)
        "too_many_items",  # more items (or their encoder tokens) of another modality (audio) than a row holds
    }
)
