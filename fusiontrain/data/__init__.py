"""Data: samples -> batches the model takes, and which samples each rank sees at each step."""

from fusiontrain.data.batch import Batch, ImageSpec, collate_padded
from fusiontrain.data.sampler import GlobalBatchPlan
from fusiontrain.data.synthetic import SyntheticImageText

__all__ = ["Batch", "GlobalBatchPlan", "ImageSpec", "SyntheticImageText", "collate_padded"]
