"""Encoding only the image slots that hold an image.

A batch stacks its rows' images into ``[b, i, ...]`` slots, ``i`` the most images of any row; a
row with fewer images has padding slots, which no token attends to. The collator lists the real
slots in ``encoder_input["image_slots"]``, ``[n]`` int64 flat indices ``row * i + k`` (absent when
every slot is real; :meth:`fusiontrain.data.image_format.ImageFormat.collate`). Every encoder
family runs its tower on those ``n`` images only and returns zeros in the padding slots' columns.

The count ``n`` is the index's shape, known on the host wherever the index lives: the skip needs
no device sync (a ``nonzero`` on the device would wait for it), and it traces on fake tensors.
"""

from __future__ import annotations

import torch


def check_image_slots(image_slots: torch.Tensor, b: int, i: int) -> None:
    """Raise ``ValueError`` unless ``image_slots`` is a 1-D integer index of at most ``b * i``
    slots (its values are not read: that would sync the device)."""
    if image_slots.dim() != 1 or image_slots.dtype not in (torch.int64, torch.int32) or len(image_slots) > b * i:
        raise ValueError(
            f"the item slots (image_slots, clip_slots) must be the [n] int64 flat indices (row * i + k) of the real "
            f"ones among the b * i = {b * i} slots, got {image_slots.dtype} {list(image_slots.shape)}: take "
            "encoder_input from the input format's collate"
        )


def select_slots(x: torch.Tensor, image_slots: torch.Tensor) -> torch.Tensor:
    """``x`` ``[b, i, ...]`` -> ``[n, ...]``, the real slots in index order."""
    return x.flatten(0, 1).index_select(0, image_slots)


def place_slots(per_image: torch.Tensor, image_slots: torch.Tensor, b: int, i: int) -> torch.Tensor:
    """``per_image`` ``[n, ...]`` (one entry per real slot, in index order) -> ``[b, i, ...]`` with
    zeros in the padding slots. Differentiable: the gradient flows back to ``per_image``."""
    slots = per_image.new_zeros(b * i, *per_image.shape[1:]).index_copy(0, image_slots, per_image)
    return slots.reshape(b, i, *per_image.shape[1:])
