"""Data: records -> samples -> packed or padded batches, streamed per rank and resumable."""

from fusiontrain.data.batch import Batch, ImageSpec, collate_padded
from fusiontrain.data.synthetic import SyntheticImageText

__all__ = ["Batch", "ImageSpec", "SyntheticImageText", "collate_padded"]
