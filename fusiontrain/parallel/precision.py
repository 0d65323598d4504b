"""Parameter storage dtypes: what each parameter is stored in between steps (``model.dtype`` for
the trained ones, ``model.frozen_dtype`` for the frozen ones) and which dtype the FSDP units
compute in (``parallel.mixed_precision``).

A fusion-only run trains a few percent of the model; the frozen rest is only ever read. With bf16
compute FSDP2 casts every fp32 shard to bf16 before its all-gather anyway, so storing the frozen
shards in bf16 computes the very same numbers (the same round-to-nearest-even cast, done once at
load instead of at every all-gather) in half their memory, while the trained parameters, their
gradients and AdamW's state stay fp32. With fp32 compute, bf16 frozen shards are cast up to fp32
before the all-gather (:func:`fusiontrain.parallel.fsdp.mixed_precision_policy`): half the stored
bytes, the frozen weights rounded to bf16 once, fp32 arithmetic.

The cast happens on the meta device, before sharding; loading then fills each shard straight in
its dtype (``copy_`` casts), so no rank ever holds an fp32 copy of a bf16-stored weight. Model code
never sees any of this. Imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the config's spelling)."""
    return str(dtype).removeprefix("torch.")


def computes_in_bf16(mixed_precision: str, device_type: str) -> bool:
    """Whether ``parallel.mixed_precision`` gives bf16 compute on a ``device_type`` device: 'bf16',
    or 'auto' on CUDA."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device_type == "cuda")


@dataclass(frozen=True)
class StorageDtypes:
    """Stored dtypes: ``trainable`` for parameters that train (fusion parameters, LoRA adapters,
    a ``*_trainable`` side), ``frozen`` for those that do not (``requires_grad`` False)."""

    trainable: torch.dtype
    frozen: torch.dtype

    def describe(self) -> str:
        """``float32``, or ``float32, frozen bfloat16`` when the two differ."""
        if self.trainable == self.frozen:
            return dtype_name(self.trainable)
        return f"{dtype_name(self.trainable)}, frozen {dtype_name(self.frozen)}"


def storage_dtypes(model_dtype: str, frozen_dtype: str | None, *, mixed_precision: str, device_type: str) -> StorageDtypes:
    """The stored dtypes that ``model.dtype`` / ``model.frozen_dtype`` give on a ``device_type``
    device: ``frozen_dtype`` None follows ``model_dtype``; "auto" is the compute dtype (bf16 under
    bf16 mixed precision, else ``model_dtype``).

    Raises:
        ValueError: frozen weights would be stored wider than the trained ones.
    """
    trainable = DTYPES[model_dtype]
    if frozen_dtype is None:
        frozen = trainable
    elif frozen_dtype == "auto":
        frozen = torch.bfloat16 if computes_in_bf16(mixed_precision, device_type) else trainable
    else:
        frozen = DTYPES[frozen_dtype]
    if frozen.itemsize > trainable.itemsize:
        raise ValueError(
            f"model.frozen_dtype={frozen_dtype} stores frozen weights wider than model.dtype={model_dtype}: drop "
            "model.frozen_dtype (it follows model.dtype), or set model.dtype=float32 for fp32 trained weights"
        )
    return StorageDtypes(trainable=trainable, frozen=frozen)


def store_parameters(model: nn.Module, dtypes: StorageDtypes) -> nn.Module:
    """Cast ``model``'s parameters (on any device, the meta device included) in place: trainable
    ones to ``dtypes.trainable``, frozen ones to ``dtypes.frozen``; returns ``model``. Parameter
    objects are kept (``.data`` is replaced), so tied weights stay tied. Call it after
    trainability is set and LoRA is attached, before sharding."""
    model.to(dtypes.trainable)
    if dtypes.frozen != dtypes.trainable:
        for param in model.parameters():
            if not param.requires_grad and param.is_floating_point():
                param.data = param.data.to(dtypes.frozen)
    return model
