"""Data: records -> samples -> packed or padded batches, streamed per rank and resumable."""

from fusiontrain.data.batch import Batch, collate_padded
from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.synthetic import SyntheticImageText

__all__ = ["Batch", "ImageFormat", "SyntheticImageText", "collate_padded"]
