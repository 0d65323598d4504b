"""A model's block stacks: the repeated transformer blocks that activation checkpointing, FSDP
units, compile and LoRA's default targets work on.

Blocks are what each module says they are: every ``nn.ModuleList`` a module returns from its
``block_lists()`` method (an encoder family's module names its tower's stacks that way, whatever
the tower calls them: ``layers``, ``layer``, ``blocks``), plus every ``nn.ModuleList`` named
``layers`` (our decoder, the Mllama ViT and projection head). An encoder with no block stack is
refused, rather than treated as one block. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def block_stacks(model: nn.Module) -> Iterator[tuple[str, nn.ModuleList]]:
    """``(name, stack)`` for every block stack (see the module docstring), outermost first.

    Raises:
        ValueError: the model has an encoder with parameters and no block stack in it.
    """
    declared: set[int] = set()
    for module in model.modules():
        lists = getattr(module, "block_lists", None)
        if callable(lists):
            declared.update(id(stack) for stack in lists())
    stacks = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and (id(module) in declared or name.rpartition(".")[2] == "layers")
    ]
    for prefix, encoder in encoders_by_prefix(model):
        if not any(True for _ in encoder.parameters()):
            continue
        inside = {id(module) for module in encoder.modules()}
        if not any(id(stack) in inside for _, stack in stacks):
            raise ValueError(
                f"the encoder {prefix} ({type(encoder).__name__}) has no block stack: its family must name its "
                "transformer blocks with a block_lists() method (or keep them in an nn.ModuleList called 'layers'), or "
                "activation checkpointing, compile and FSDP would treat the whole encoder as one block"
            )
    yield from stacks


def encoders_by_modality(model: nn.Module) -> dict[str | None, nn.Module]:
    """``model``'s encoders by modality: ``{None: encoder}`` for one, ``{"image": ..., "audio":
    ...}`` for one per modality (a :class:`~fusiontrain.modules.DeepFusionModel` given a
    mapping), empty for a model without."""
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return {}
    if isinstance(encoder, nn.ModuleDict):
        return dict(encoder.items())
    return {None: encoder}


def encoders_by_prefix(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name prefix, encoder)`` of each of ``model``'s encoders (:func:`encoders_by_modality`):
    ``[("encoder", encoder)]`` for one, ``[("encoder.image", ...), ("encoder.audio", ...)]`` for
    one per modality."""
    return [
        ("encoder" if modality is None else f"encoder.{modality}", module)
        for modality, module in encoders_by_modality(model).items()
    ]
