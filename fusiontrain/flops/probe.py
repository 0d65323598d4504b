"""Generic FLOP count of an encoder: run it once per input shape on fake tensors under
``torch.utils.flop_counter.FlopCounterMode``.

:mod:`fusiontrain.flops.count` counts the encoders it knows (Mllama's tiled ViT, HF CLIP / SigLIP towers)
analytically. Any other encoder (a SigLIP2 NaFlex or DINOv2 tower, a user's own module) is counted
here by :func:`measure_encoder_flops`: the encoder's forward, then (when its output requires grad)
its backward, run on fake tensors (``FakeTensorMode``: shapes only, nothing allocated or
computed), with FlopCounterMode reading the FLOPs of every matmul, convolution and attention op.
The result is cached per (encoder, input shapes / dtypes / requires-grad, parameter requires-grad
pattern, train mode), so a training loop pays for it once per distinct shape.

How the encoder is run. A *shadow* of the encoder is built: the same module classes and
attributes, every parameter, buffer and tensor attribute replaced by a fresh fake CPU tensor of
its full shape (``param.shape``, the global shape for FSDP2's ``DTensor`` shards) and dtype, with
the parameter's ``requires_grad``. So the encoder's parameters may be real (CPU or GPU), meta, fake
(from another ``FakeTensorMode``) or FSDP2 shards alike: nothing of theirs is read but shape, dtype
and ``requires_grad``. The shadow drops what would make the count wrong or unsafe:

- FSDP2 (``fully_shard``): the shadow's modules have the plain module classes and none of the
  hooks registered from ``torch.distributed`` (FSDP's all-gathers and reduce-scatters would be
  collectives that other ranks never join);
- activation-checkpoint and ``torch.compile`` wrappers are replaced by the modules they wrap, and
  HF ``gradient_checkpointing`` is turned off on the shadow: recompute is not model FLOPs.

Other hooks (e.g. transformers' output-capturing hooks) are kept.

The inputs: floating-point tensors become fresh fake tensors of their shapes, dtypes and
``requires_grad``. Integer and bool tensors that are real (not meta, fake or DTensor) stay real,
copied to the CPU, and an op whose tensor arguments are all real runs for real: so an encoder may
read their values (SigLIP2 NaFlex resizes its position embeddings to ``spatial_shapes``; HF code
checks ``if mask.all():``). Non-tensor inputs are passed as they are. The cache key holds the
shapes, not these values: the count assumes the FLOPs depend on the input shapes only (true of
SigLIP2, whose sequence is always ``max_num_patches`` long).

Conventions, compared with :mod:`fusiontrain.flops.count`' analytic count:

- SDPA runs with the math backend (``SDPBackend.MATH``), which decomposes attention into the
  ``bmm`` ops autograd differentiates one operand at a time: backward is 2x forward when every
  operand needs a gradient, as in the analytic count. (FlopCounterMode counts a fused SDPA kernel's
  backward, flash / efficient / cuDNN, as 2.5x its forward: the recompute of the scores inside
  flash-attention backward; and the CPU flash kernel has no formula at all, it would count 0.) An
  encoder that calls a fused attention op directly is counted with FlopCounterMode's 2.5x.
- Attention is counted over the full ``s x s`` square of every call, whatever the mask, as
  FlopCounterMode does; the analytic encoder counts are dense too.
- Forward and backward are counted separately (FlopCounterMode's total after the forward, then
  after the backward). Backward runs only when the output requires grad, w.r.t. every leaf that
  requires grad (the trainable parameters, and inputs that require grad); a frozen tower run under
  ``no_grad`` costs nothing in backward, as in training.
- Non-matmul ops (norms, softmax, interpolation, elementwise) are not counted, and neither are ops
  without a FlopCounterMode formula (custom kernels).

What fails: an encoder whose forward depends on the *values* of a floating-point input, of a
parameter, or of an input that is itself fake or meta (``.item()``, ``.tolist()``,
``if x.any():``, data-dependent output shapes) cannot run on fake tensors and raises (e.g.
``DataDependentOutputException``). The failure is cached too (and re-raised on the next call with
the same key) so a failing encoder costs one trace, not one per step;
:func:`fusiontrain.flops.count.micro_batch_flops_or_none` turns it into "MFU unavailable".
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fusiontrain.dispatch_args import op_tensors
from fusiontrain.flops.rules import unwrap
from fusiontrain.torch_private import (
    MODULE_HOOK_DICTS,
    FakeTensor,
    FakeTensorMode,
    ModuleRegistries,
    pytree,
    read_module_registries,
    write_module_registries,
)

__all__ = ["EncoderCost", "EncoderCountError", "clear_encoder_cache", "measure_encoder_flops"]


@dataclass(frozen=True)
class EncoderCost:
    """FLOPs of one encoder forward (+ backward) on inputs of one shape, as FlopCounterMode sees them.

    Attributes:
        forward: forward FLOPs of the whole encoder.
        backward: backward FLOPs of the whole encoder (0 when its output needs no gradient).
        output_shape: shape of the encoder's output, ``[b, s_e, d]`` for a fusion encoder.
        output_requires_grad: whether the output requires grad (trainable encoder or projection
            head), i.e. whether the decoder's cross-attention sends a gradient back into it.
    """

    forward: int
    backward: int
    output_shape: tuple[int, ...]
    output_requires_grad: bool


class EncoderCountError(RuntimeError):
    """Raised again, for an encoder and input key whose fake trace failed before (the first call
    raised the original error)."""


# encoder -> {cache key -> EncoderCost or the error the trace raised}. Weak keys: a deleted
# encoder's entries go with it (an id() key could be reused by a new module).
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], EncoderCost | EncoderCountError]] = (
    weakref.WeakKeyDictionary()
)


def clear_encoder_cache() -> None:
    """Forget every cached encoder count (and cached failure)."""
    _CACHE.clear()


def measure_encoder_flops(encoder: nn.Module, encoder_input: Mapping[str, Any]) -> EncoderCost:
    """FLOPs of ``encoder(**encoder_input)`` and of its backward, counted on fake tensors.

    Cached per (encoder, shapes / dtypes / requires-grad of the inputs' tensors and the values of
    their other leaves, ``requires_grad`` of every encoder parameter, ``encoder.training``): the
    trace runs once per distinct key. See the module docstring for how the encoder is run and the
    counting conventions.

    Args:
        encoder: the encoder module (wrappers seen through); its parameters may be real, meta, fake
            or FSDP2 ``DTensor`` shards.
        encoder_input: its keyword arguments, any shapes (e.g. ``pixel_values`` ``[b, i, 3, H, W]``,
            or SigLIP2's ``pixel_values`` ``[b, n, 3 p p]`` + ``pixel_attention_mask`` ``[b, n]`` +
            ``spatial_shapes`` ``[b, 2]``); tensors may be real, meta or fake, on any device.

    Returns:
        The forward and backward FLOPs (projection head included), the output shape and whether
        the output requires grad.

    Raises:
        Whatever the fake run raises (e.g. ``DataDependentOutputException`` for ``.item()``), and
        TypeError when the encoder's output is not a tensor; later calls with the same key raise
        :class:`EncoderCountError` with that error's message.
    """
    encoder = unwrap(encoder)
    key = _cache_key(encoder, encoder_input)
    per_encoder = _CACHE.setdefault(encoder, {})
    if key not in per_encoder:
        try:
            per_encoder[key] = _trace_encoder(encoder, encoder_input)
        except Exception as error:
            # Cached, so a failing encoder is traced once per key, not once per step. The cache keeps
            # only the message: the error's traceback references the encoder (the weak key).
            per_encoder[key] = EncoderCountError(
                f"counting {type(encoder).__name__} on fake tensors failed before for these input shapes: "
                f"{type(error).__name__}: {error}"
            )
            raise
    cached = per_encoder[key]
    if isinstance(cached, EncoderCountError):
        raise EncoderCountError(*cached.args)
    return cached


# -- the key --------------------------------------------------------------------------------------


def _leaf_key(leaf: Any) -> Any:
    """A hashable description of one input leaf: a tensor's shape, dtype and requires_grad; any
    other value itself (its type and repr when it is not hashable)."""
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.requires_grad)
    try:
        hash(leaf)
    except TypeError:
        return ("value", type(leaf).__qualname__, repr(leaf))
    return ("value", type(leaf).__qualname__, leaf)


def _cache_key(encoder: nn.Module, encoder_input: Mapping[str, Any]) -> tuple[Any, ...]:
    leaves, spec = pytree.tree_flatten(dict(encoder_input))
    return (
        spec,
        tuple(_leaf_key(leaf) for leaf in leaves),
        tuple(p.requires_grad for p in encoder.parameters()),
        encoder.training,
    )


# -- the shadow encoder ---------------------------------------------------------------------------


def _fsdp_module_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def _plain_class(cls: type) -> type:
    """``cls`` without FSDP2's dynamic ``FSDP<Name>`` subclass (the module's own class)."""
    fsdp = _fsdp_module_class()
    if fsdp is None or not issubclass(cls, fsdp):
        return cls
    for candidate in cls.__mro__:
        if issubclass(candidate, nn.Module) and not issubclass(candidate, fsdp):
            return candidate
    raise TypeError(f"no plain module class under {cls.__name__}")


def _is_distributed_hook(hook: Any) -> bool:
    """Whether ``hook`` comes from ``torch.distributed`` (FSDP's unshard / reshard hooks, the
    composable checkpoint's): those must not run on the shadow."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    owner = getattr(hook, "__self__", None)
    origin = type(owner).__module__ if owner is not None else getattr(hook, "__module__", None)
    return isinstance(origin, str) and origin.startswith("torch.distributed")


class _FakeFactory:
    """Fresh fake CPU tensors of the shapes, dtypes and ``requires_grad`` of real / meta / fake /
    DTensor ones, one per source tensor (shared tensors stay shared)."""

    def __init__(self) -> None:
        self._made: dict[int, torch.Tensor] = {}
        self._sources: list[torch.Tensor] = []  # keeps ids valid while the factory lives

    def tensor(self, source: torch.Tensor, *, parameter: bool = False) -> torch.Tensor:
        """Must be called inside the FakeTensorMode. ``param.shape`` is the global shape of a
        DTensor; a plain tensor keeps its strides."""
        made = self._made.get(id(source))
        if made is not None:
            return made
        plain = type(source) in (torch.Tensor, nn.Parameter) and source.layout == torch.strided
        if plain:
            fake = torch.empty_strided(tuple(source.shape), tuple(source.stride()), dtype=source.dtype, device="cpu")
        else:  # DTensor, other subclasses: the logical (global) shape, contiguous
            fake = torch.empty(tuple(source.shape), dtype=source.dtype, device="cpu")
        if parameter:
            fake = nn.Parameter(fake, requires_grad=source.requires_grad)
        elif source.requires_grad and (source.is_floating_point() or source.is_complex()):
            fake.requires_grad_(True)
        self._made[id(source)] = fake
        self._sources.append(source)
        return fake


def _shadow(module: nn.Module, fakes: _FakeFactory, memo: dict[int, nn.Module]) -> nn.Module:
    """A copy of ``module``'s tree with fake tensors, plain classes and no distributed hooks
    (see the module docstring). Shared submodules stay shared."""
    module = unwrap(module)
    done = memo.get(id(module))
    if done is not None:
        return done
    cls = _plain_class(type(module))
    shadow = object.__new__(cls)
    memo[id(module)] = shadow
    state = dict(module.__dict__)
    for name in MODULE_HOOK_DICTS:
        hooks = state.get(name)
        if hooks:
            state[name] = type(hooks)((k, h) for k, h in hooks.items() if not _is_distributed_hook(h))
    own = read_module_registries(module)
    shadowed = ModuleRegistries(
        parameters={name: None if p is None else fakes.tensor(p, parameter=True) for name, p in own.parameters.items()},
        buffers={name: None if b is None else fakes.tensor(b) for name, b in own.buffers.items()},
        submodules={
            name: None if child is None else _shadow(child, fakes, memo) for name, child in own.submodules.items()
        },
    )
    write_module_registries(state, shadowed)
    for name, value in list(state.items()):
        if isinstance(value, torch.Tensor):  # tensors kept as plain attributes
            state[name] = fakes.tensor(value)
    if isinstance(state.get("gradient_checkpointing"), bool):  # HF layers: no recompute
        state["gradient_checkpointing"] = False
    shadow.__dict__.update(state)
    return shadow


class ValueKeepingFakeMode(FakeTensorMode):
    """A ``FakeTensorMode`` that runs an op for real when its tensor arguments are all real
    (non-fake) tensors: the integer inputs kept real (:func:`_keeps_value`) and what is computed
    from them alone. Ops that mix real and fake tensors see the real ones as fakes (values lost),
    as with ``allow_non_fake_inputs=True``; ops without tensor arguments (factories) make fakes."""

    def dispatch(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = op_tensors(args, kwargs)
        if tensors and not any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors):
            return func(*args, **kwargs)  # this mode is not active while it dispatches: a real kernel
        return super().dispatch(func, types, args, kwargs)


def _keeps_value(tensor: torch.Tensor) -> bool:
    """Whether an input tensor stays real (copied to the CPU): a plain real tensor of integers or
    bools (ids, masks, SigLIP2's ``spatial_shapes``), so that the encoder may read its values."""
    return (
        type(tensor) is torch.Tensor
        and tensor.device.type != "meta"
        and not (tensor.is_floating_point() or tensor.is_complex())
    )


def _fake_input(value: Any, kept: Mapping[int, torch.Tensor], fakes: _FakeFactory) -> Any:
    """``value`` with every tensor leaf replaced: by its real CPU copy in ``kept``, or a fake."""

    def leaf(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        return kept[id(x)] if id(x) in kept else fakes.tensor(x)

    return pytree.tree_map(leaf, value)


def _trace_encoder(encoder: nn.Module, encoder_input: Mapping[str, Any]) -> EncoderCost:
    """One fake forward (+ backward) of ``encoder``, counted. Not cached: see
    :func:`measure_encoder_flops`."""
    fakes = _FakeFactory()
    kept = {
        id(leaf): leaf.detach().to("cpu", copy=True)
        for leaf in pytree.tree_leaves(dict(encoder_input))
        if isinstance(leaf, torch.Tensor) and _keeps_value(leaf)
    }
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        ValueKeepingFakeMode(allow_non_fake_inputs=True),
        sdpa_kernel(SDPBackend.MATH),
    ):
        shadow = _shadow(encoder, fakes, {})
        inputs = {name: _fake_input(value, kept, fakes) for name, value in encoder_input.items()}
        with FlopCounterMode(display=False) as counter:
            output = shadow(**inputs)
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"a fusion encoder must return its embeddings as one tensor [b, s_e, d]; "
                    f"{type(encoder).__name__} returned {type(output).__name__}"
                )
            forward = counter.get_total_flops()
            if output.requires_grad:
                torch.autograd.backward(output, grad_tensors=torch.ones_like(output))
            backward = counter.get_total_flops() - forward
    return EncoderCost(
        forward=forward,
        backward=backward,
        output_shape=tuple(output.shape),
        output_requires_grad=output.requires_grad,
    )
