"""The encoder seam: what a HF encoder-model family must say to become a composed model's encoder.

An :class:`EncoderFamily` builds our encoder module (the pretrained tower plus a projection head
registered as a fusion module) from the family's ``config.json``, routes its stored tensors, and
gives its input format (:meth:`EncoderFamily.input_format`): an
:class:`~fusiontrain.data.image_format.ImageFormat` for a vision tower, an
:class:`~fusiontrain.data.audio_format.AudioFormat` for an audio one (its
:attr:`~EncoderFamily.modality` says which). The encoder module itself lists its block stacks
(``block_stacks()``) for activation checkpointing, FSDP units and compile.

:class:`~fusiontrain.families.fixed_size_image.FixedSizeImage` is the format of every tower that
takes one ``[3, H, W]`` image and yields a fixed number of tokens (CLIP, SigLIP, SigLIP2
fixed-resolution, DINOv2).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import nn

from fusiontrain.data.image_format import ImageFormat
from fusiontrain.data.input_format import EncoderInputFormat
from fusiontrain.weights.hf_checkpoint import TensorRoute


class EncoderFamily(ABC):
    """A HF encoder-model family usable as a composed model's encoder.

    Attributes:
        name: the registry key.
        model_types: the ``config.json`` ``model_type`` values this family reads (a vision-only
            config, or a full image-text model's whose ``vision_config`` is used; an audio model's
            whose encoder is used).
        modality: what the encoder takes: ``"image"`` (the default; :meth:`image_format` says how)
            or ``"audio"`` (:meth:`input_format` gives an
            :class:`~fusiontrain.data.audio_format.AudioFormat`).
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    modality: ClassVar[str] = "image"

    @abstractmethod
    def build(self, config: dict, decoder_dim: int) -> nn.Module:
        """Our encoder for ``config`` (a ``config.json`` dict) on the current default device: the
        tower plus a projection head to ``decoder_dim``, taking ``encoder_input`` as the batch
        collated by :meth:`input_format` holds it, and returning ``[b, s_e, d]``."""

    @abstractmethod
    def image_format(self, encoder: nn.Module) -> ImageFormat:
        """How ``encoder`` (built by :meth:`build`) takes images."""

    def input_format(self, encoder: nn.Module) -> EncoderInputFormat:
        """How ``encoder`` (built by :meth:`build`) takes its items, whatever its
        :attr:`modality`: by default its :meth:`image_format`."""
        return self.image_format(encoder)

    @abstractmethod
    def owns(self, encoder: nn.Module) -> bool:
        """Whether ``encoder`` was built by this family."""

    def key_renamer(self, key: str) -> str:
        """A stored tensor name in the layout :meth:`weight_map` expects (default: unchanged)."""
        return key

    def weight_map(self, encoder: nn.Module, prefix: str) -> list[TensorRoute]:
        """Routes from the canonical stored names to our parameters under ``prefix`` (e.g.
        ``"encoder."``). The default routes every parameter of ``encoder.tower`` by its own name."""
        return [TensorRoute(name, f"{prefix}tower.{name}") for name, _ in encoder.tower.named_parameters()]

    def expected_tensors(self, checkpoint_keys: list[str]) -> set[str]:
        """The stored tensors that must all fill the tower (others are another part of a full
        model, or buffers we recompute)."""
        return set(checkpoint_keys)

    def init_buffers(self, encoder: nn.Module) -> None:
        """Rebuild non-persistent buffers after a meta-device build is allocated."""
        encoder.init_buffers()
