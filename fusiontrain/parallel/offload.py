"""Activation offloading: what chosen blocks save for backward goes to host memory during the
forward and comes back when the backward unpacks it.

Built on ``torch.autograd.graph.saved_tensors_hooks``: while a block's forward runs (entered and
left by module hooks that :func:`fusiontrain.parallel.fsdp.apply_activation_offloading` registers), each
tensor autograd saves passes through :meth:`ActivationOffloader.pack`, which copies it to host
memory and hands autograd a handle instead, and :meth:`ActivationOffloader.unpack` copies it back
when the backward needs it. What stays on the device:

- parameters and views of parameters (FSDP2's unsharded parameters are saved by every matmul;
  they are resharded or kept by FSDP, never copied here);
- tensors smaller than ``min_bytes`` (copies of small tensors cost more than they free);
- tensors on another device than the offloader's.

A tensor saved several times while it lives (a block input read by the q, k and v projections,
the attention mask every checkpointed block saves) is copied once, as long as it was not modified
in place in between.

On CUDA the device-to-host copies run on a side stream into pinned memory, overlapped with the
forward's compute (the allocator is told, through ``record_stream``, not to reuse a tensor's
memory before its copy is done). The way back is a ``non_blocking`` copy on the compute stream,
ordered after the offload copy's event, issued when autograd unpacks the tensor: correct, but not
prefetched ahead of the backward. On a CPU "host memory" is the same memory: the hooks run and
copy (which the tests rely on), and nothing is saved.

With activation checkpointing (non-reentrant) a checkpointed block saves only its inputs through
the hooks; what its forward saves inside is held by the checkpoint's own hooks and recomputed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from fusiontrain.torch_private import tensor_base, tensor_version

OFFLOAD_MODES = ("none", "checkpointed", "all")
MIN_OFFLOAD_BYTES = 1 << 20  # smaller saved tensors stay on the device


@dataclass
class OffloadStats:
    """Running totals of one offloader.

    Attributes:
        offloaded_tensors: host copies made.
        offloaded_bytes: bytes copied to the host.
        reloaded_bytes: bytes copied back to the device (a tensor saved twice comes back twice).
        kept_bytes: bytes of saved tensors left on the device (parameters, small tensors).
    """

    offloaded_tensors: int = 0
    offloaded_bytes: int = 0
    reloaded_bytes: int = 0
    kept_bytes: int = 0


@dataclass
class _HostCopy:
    """A saved tensor in host memory, with the event its copy completes at (CUDA)."""

    host: torch.Tensor
    device: torch.device
    ready: torch.cuda.Event | None


def _is_parameter(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, nn.Parameter) or isinstance(tensor_base(tensor), nn.Parameter)


class ActivationOffloader:
    """Packs saved activations into host memory and unpacks them back (see the module doc).

    Args:
        device: the device whose tensors are offloaded (the rank's device).
        min_bytes: smaller tensors stay on the device.
        host_allocation: a context entered around each host copy's allocation (the planner
            labels the host bytes with it); none by default.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        min_bytes: int = MIN_OFFLOAD_BYTES,
        host_allocation: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.min_bytes = min_bytes
        self.host_allocation = host_allocation or nullcontext
        self.stats = OffloadStats()
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # tensor -> (its version when copied, the copy): a tensor saved again is not copied again.
        self._copies = WeakIdKeyDictionary()

    def saved_tensors_hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """A context in which autograd saves through :meth:`pack` / :meth:`unpack`."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _HostCopy:
        """``tensor`` itself (kept on the device) or its host copy."""
        size = tensor.untyped_storage().nbytes() if tensor.layout == torch.strided else 0
        if tensor.device != self.device or _is_parameter(tensor) or size < self.min_bytes:
            self.stats.kept_bytes += size
            return tensor
        known = self._copies.get(tensor)
        if known is not None and known[0] == tensor_version(tensor):
            return known[1]
        copy = self._to_host(tensor)
        self._copies[tensor] = (tensor_version(tensor), copy)
        self.stats.offloaded_tensors += 1
        self.stats.offloaded_bytes += copy.host.untyped_storage().nbytes()
        return copy

    def unpack(self, packed: torch.Tensor | _HostCopy) -> torch.Tensor:
        """The saved tensor on its device again."""
        if not isinstance(packed, _HostCopy):
            return packed
        self.stats.reloaded_bytes += packed.host.untyped_storage().nbytes()
        if packed.ready is None:  # CPU: the copy is the tensor
            return packed.host
        torch.cuda.current_stream(packed.device).wait_event(packed.ready)
        return packed.host.to(packed.device, non_blocking=True)

    def _to_host(self, tensor: torch.Tensor) -> _HostCopy:
        detached = tensor.detach()
        if self._stream is None:
            with self.host_allocation():
                return _HostCopy(detached.clone(), tensor.device, None)
        with self.host_allocation():
            host = torch.empty_like(detached, device="cpu", pin_memory=True)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensor is computed
        with torch.cuda.stream(self._stream):
            host.copy_(detached, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        detached.record_stream(self._stream)  # its memory is not reused before the copy is done
        return _HostCopy(host, tensor.device, ready)
