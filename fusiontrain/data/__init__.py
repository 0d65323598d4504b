"""Data: records (caption, chat, and LLaVA / ShareGPT / the_cauldron layouts read as chat) -> sizes -> a
global row plan, of one source or a weighted mixture -> each rank's packed or padded batches, resumable at
any world size.

Layer: above ``weights``; may import weights, flops, parallel, modules, batch_layout and
torch_private.
"""

from fusiontrain.data.batch import Batch, collate_padded
from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.synthetic import SyntheticImageText

__all__ = ["Batch", "ImageFormat", "SyntheticImageText", "collate_padded"]
