"""Data: records -> sizes -> a global row plan -> each rank's packed or padded batches, resumable at any world size.

Layer: above ``weights``; may import weights, flops, parallel, modules, batch_layout and
torch_private.
"""

from fusiontrain.data.batch import Batch, collate_padded
from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.synthetic import SyntheticImageText

__all__ = ["Batch", "ImageFormat", "SyntheticImageText", "collate_padded"]
