"""Deep fusion: joining a pretrained encoder to a pretrained decoder.

- :class:`FusionLayer` pairs a pretrained decoder layer with a new fusion layer
  (normally a :class:`~fusiontrain.modules.transformer.TransformerCrossAttentionLayer`).
- :class:`FusionEmbedding` extends a pretrained token embedding with a few new rows
  (image tokens) kept as their own small parameter.
- :func:`register_fusion_module` marks any module (e.g. a projection head) as new fusion weights
  by giving it a ``fusion_params()`` method; any module of a user's own that defines
  ``fusion_params()`` (returning local parameter names) is honoured the same way.
- :func:`get_fusion_params` and :func:`set_trainable_params` select what trains.
- :class:`DeepFusionModel` runs the encoder and hands its embeddings to the decoder.

Several encoders (a fusiontrain extension; torchtune's model takes one): a
:class:`DeepFusionModel` given a mapping from modality to encoder (``{"image": ..., "audio":
...}``) takes ``encoder_input`` and ``encoder_mask`` as mappings with those keys, any of which may
be absent from a batch. Each modality has fusion layers of its own: a :class:`FusionLayer` given
a mapping from modality to fusion layer runs each on its modality's embeddings and mask only. With
one encoder and one fusion layer per :class:`FusionLayer`, everything is as in torchtune.

State-dict keys are always the parameter names (no key-renaming hooks): a fused layer's
pretrained half lives under ``layer.`` and its new half under ``fusion_layer.`` (one encoder) or
``fusion_layer.<modality>.`` (several); the encoders under ``encoder.`` or
``encoder.<modality>.``. Keeping the two identical is what FSDP2,
``torch.distributed.checkpoint`` and optimizer state rely on; weight maps translate checkpoints of
other layouts.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from fusiontrain.modules.attention import AttentionMask
from fusiontrain.modules.transformer import TransformerDecoder

_FUSION_PARAMS_METHOD = "fusion_params"


def _all_parameter_names(module: nn.Module) -> list[str]:
    """Local names of all of ``module``'s parameters: the ``fusion_params`` of a registered module.

    A module-level function (bound with :func:`functools.partial`) rather than a closure, so a
    registered module still pickles, deep-copies and survives FSDP2's class swap: the binding is a
    plain instance attribute whose only reference is to the module itself.
    """
    return [name for name, _ in module.named_parameters()]


def register_fusion_module(module: nn.Module) -> nn.Module:
    """Give ``module`` a ``fusion_params()`` method listing all its parameters; returns ``module``.

    Use it for new modules that join encoder and decoder, such as a projection head. As in
    torchtune, the method is an instance attribute, so it takes precedence over a
    ``fusion_params`` the module's class may define.
    """
    setattr(module, _FUSION_PARAMS_METHOD, functools.partial(_all_parameter_names, module))
    return module


def _declared_fusion_names(module: nn.Module) -> set[str] | None:
    """The local names ``module.fusion_params()`` returns, or None when it has no such method."""
    method = getattr(module, _FUSION_PARAMS_METHOD, None)
    if method is None or not callable(method):
        return None
    names = method()
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(
            f"{type(module).__name__}.fusion_params() must return parameter names, got {names!r}"
        )
    return set(names)


def get_fusion_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """All fusion parameters of ``model``, by fully qualified name (torchtune's contract).

    Every submodule (``model`` included) with a callable ``fusion_params()`` contributes the
    parameters it names, given as names local to that submodule: the ``fusion_layer`` of a
    :class:`FusionLayer`, the new rows of a :class:`FusionEmbedding`, everything in a module passed
    to :func:`register_fusion_module`, and whatever a user's own module declares. Order follows
    ``named_modules()`` and, within a module, ``named_parameters()``.

    Each parameter is listed once, under the name ``model.named_parameters()`` gives it, however
    many modules declare it: a registered module inside a fusion layer, or a block wrapped for
    activation checkpointing, whose wrapper forwards ``fusion_params()`` to the block and reports
    the block's parameters without the wrapper's prefix. So the names and the set do not depend on
    how the model's modules are wrapped, only the names' wrapper prefixes do.

    Raises:
        ValueError: a ``fusion_params()`` names something that is not a parameter of its module.
    """
    qualified = {id(param): name for name, param in model.named_parameters()}
    found: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        declared = _declared_fusion_names(module)
        if not declared:
            continue
        for local, param in module.named_parameters():
            if local in declared:
                found.setdefault(qualified[id(param)], param)
                declared.discard(local)
        if declared:
            where = repr(module_name) if module_name else "the root module"
            raise ValueError(
                f"fusion_params() of {where} ({type(module).__name__}) names "
                f"{sorted(declared)}, which are not parameters of that module"
            )
    return found


def set_trainable_params(model: nn.Module, trainable: dict[str, Any] | set[str]) -> None:
    """Set ``requires_grad`` on exactly the parameters named in ``trainable``, clear it on the rest."""
    names = set(trainable)
    unknown = names - {name for name, _ in model.named_parameters()}
    if unknown:
        raise KeyError(f"no such parameters: {sorted(unknown)[:5]}")
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


_Value = TypeVar("_Value")


def by_modality(value: Mapping[str, _Value] | _Value | None, modality: str, what: str) -> _Value | None:
    """``value``'s entry for ``modality`` (None when the mapping lacks it, or ``value`` is None).

    Raises:
        TypeError: ``value`` is not a mapping: a model with several encoders takes ``what`` (e.g.
            ``encoder_input``) as a mapping from modality to value.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"this model has an encoder per modality: pass {what} as a mapping from modality to value "
            f"(e.g. {{{modality!r}: ...}}), not a {type(value).__name__}"
        )
    return value.get(modality)


class FusionLayer(nn.Module):
    """A pretrained decoder layer joined with a new fusion layer, or one per modality.

    With a mapping (``{"image": ..., "audio": ...}``), the fusion layers run one after the other in
    the mapping's order, each given its own modality's ``encoder_input`` and ``encoder_mask`` (and
    ``encoder_max_seq_len`` when that is a mapping too): a fusion layer attends only to its
    modality's encoder. A modality absent from the batch leaves its fusion layer a no-op (as a
    cross-attention layer is without encoder input).

    Args:
        layer: the pretrained layer (keeps its parameters under ``layer.``).
        fusion_layer: the new layer (parameters under ``fusion_layer.``; all are fusion params),
            or a mapping from modality to new layer (under ``fusion_layer.<modality>.``).
        fusion_first: run the fusion layer(s) before the pretrained layer (Llama 3.2 Vision and
            Flamingo do) or after it.
    """

    def __init__(
        self, layer: nn.Module, fusion_layer: nn.Module | Mapping[str, nn.Module], fusion_first: bool = True
    ) -> None:
        super().__init__()
        self.layer = layer
        per_modality = isinstance(fusion_layer, (Mapping, nn.ModuleDict))
        if per_modality and len(fusion_layer) == 0:
            raise ValueError("FusionLayer needs at least one fusion layer; got an empty mapping")
        self.fusion_layer = nn.ModuleDict(fusion_layer) if per_modality else fusion_layer
        #: The modalities of the fusion layers, in the order they run; None for a single one.
        self.modalities: tuple[str, ...] | None = tuple(self.fusion_layer) if per_modality else None
        self.fusion_first = fusion_first

    def fusion_params(self) -> list[str]:
        """Local names of the fusion layers' parameters."""
        return [f"fusion_layer.{name}" for name, _ in self.fusion_layer.named_parameters()]

    def fusion_parts(self) -> list[tuple[str | None, nn.Module]]:
        """``(modality, fusion layer)`` in the order they run; ``[(None, fusion_layer)]`` for one."""
        if self.modalities is None:
            return [(None, self.fusion_layer)]
        return [(modality, self.fusion_layer[modality]) for modality in self.modalities]

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | Mapping[str, int],
        decoder_max_seq_len: int,
    ) -> None:
        """Caches of both halves. With several fusion layers, ``encoder_max_seq_len`` may be a
        mapping from modality to its encoder's longest output (each fusion layer's cache length)."""
        self.layer.setup_caches(
            batch_size, dtype, encoder_max_seq_len=encoder_max_seq_len, decoder_max_seq_len=decoder_max_seq_len
        )
        for modality, part in self.fusion_parts():
            length = encoder_max_seq_len
            if modality is not None and isinstance(encoder_max_seq_len, Mapping):
                if modality not in encoder_max_seq_len:
                    raise ValueError(
                        f"encoder_max_seq_len names {sorted(encoder_max_seq_len)} but not {modality!r}, "
                        "which this layer fuses; give every modality a length (or one int for all)"
                    )
                length = encoder_max_seq_len[modality]
            part.setup_caches(batch_size, dtype, encoder_max_seq_len=length, decoder_max_seq_len=decoder_max_seq_len)

    def caches_are_setup(self) -> bool:
        return self.layer.caches_are_setup()

    def caches_are_enabled(self) -> bool:
        return self.layer.caches_are_enabled()

    def reset_cache(self) -> None:
        self.layer.reset_cache()
        for _, part in self.fusion_parts():
            part.reset_cache()

    def _fuse(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        if self.modalities is None:
            return self.fusion_layer(x, **kwargs)
        encoder_input, encoder_mask = kwargs.get("encoder_input"), kwargs.get("encoder_mask")
        for modality in self.modalities:
            own = {
                **kwargs,
                "encoder_input": by_modality(encoder_input, modality, "encoder_input"),
                "encoder_mask": by_modality(encoder_mask, modality, "encoder_mask"),
            }
            x = self.fusion_layer[modality](x, **own)
        return x

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``x`` ``[b, s, d]`` -> ``[b, s, d]``; ``kwargs`` go to both halves (each fusion layer
        of several gets its own modality's encoder arguments)."""
        if self.fusion_first:
            return self.layer(self._fuse(x, kwargs), **kwargs)
        return self._fuse(self.layer(x, **kwargs), kwargs)


class FusionEmbedding(nn.Module):
    """Token embedding with ``fusion_vocab_size`` new rows appended after ``vocab_size`` rows.

    ``weight`` ``[vocab_size, d]`` holds the pretrained rows under the same key as a plain
    ``nn.Embedding``; ``fusion_embedding.weight`` ``[fusion_vocab_size, d]`` holds the new rows,
    a separate (small) trainable parameter. Token ``vocab_size + i`` reads new row ``i``.

    Args:
        vocab_size: pretrained rows.
        fusion_vocab_size: new rows.
        embed_dim: width ``d``.
    """

    #: Its parameters are lookup tables: backward reads none of them (a row's gradient is the
    #: output gradient added at the looked-up positions), so sharding need not gather them for it.
    is_lookup_table = True

    def __init__(self, vocab_size: int, fusion_vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.fusion_vocab_size = fusion_vocab_size
        self.embed_dim = embed_dim
        self.weight = nn.Parameter(torch.empty(vocab_size, embed_dim))
        self.fusion_embedding = nn.Embedding(fusion_vocab_size, embed_dim)
        nn.init.normal_(self.weight)

    def fusion_params(self) -> list[str]:
        """Local name of the new rows' parameter."""
        return ["fusion_embedding.weight"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[b, s]`` ids in ``[0, vocab_size + fusion_vocab_size)`` -> ``[b, s, d]``."""
        is_new = tokens >= self.vocab_size
        base = F.embedding(tokens.clamp(max=self.vocab_size - 1), self.weight)
        new = self.fusion_embedding((tokens - self.vocab_size).clamp(min=0))
        return torch.where(is_new.unsqueeze(-1), new, base)

    def extra_repr(self) -> str:
        return f"{self.vocab_size} + {self.fusion_vocab_size}, {self.embed_dim}"


_FROZEN_PARAMS_METHOD = "frozen_params"


def never_trained(module: nn.Module, prefix: str = "") -> set[str]:
    """Names (under ``prefix``) of the parameters that submodules of ``module`` declare fixed by a
    ``frozen_params()`` method returning local names (e.g. an encoder's sinusoidal position table,
    which its reference implementation never trains): ``encoder_trainable`` leaves them frozen."""
    names: set[str] = set()
    for module_name, child in module.named_modules():
        method = getattr(child, _FROZEN_PARAMS_METHOD, None)
        if callable(method):
            local = f"{module_name}." if module_name else ""
            names |= {f"{prefix}{local}{name}" for name in method()}
    return names


class DeepFusionModel(nn.Module):
    """A pretrained encoder, or one per modality, fused into a pretrained decoder.

    The encoder turns ``encoder_input`` (a dict of its keyword arguments, e.g. what an HF image
    processor returns) into embeddings ``[b, s_e, d]``; the decoder's fusion layers attend to
    them. Same methods and forward signature as :class:`TransformerDecoder`.

    With a mapping of encoders (``{"image": ..., "audio": ...}``; a fusiontrain extension),
    ``encoder_input`` maps modality -> that encoder's keyword arguments and ``encoder_mask``
    modality -> its mask, over the same modalities; a modality may be absent from a batch (its
    fusion layers then pass the tokens through). Each modality's embeddings ``[b, s_e(m), d]``
    reach only that modality's fusion layers (:class:`FusionLayer`).

    Args:
        decoder: the decoder, with fusion layers and a fusion embedding as needed.
        encoder: the encoder, ending in a registered fusion module that maps to width ``d``; or a
            mapping from modality to such an encoder (kept as an ``nn.ModuleDict``: parameters
            under ``encoder.<modality>.``).
        decoder_trainable: train the decoder's pretrained parameters.
        encoder_trainable: train the encoders' pretrained parameters, but those a submodule
            declares fixed with a ``frozen_params()`` method (a fusiontrain extension).
        fusion_trainable: train the fusion parameters (wins over the two flags above).
    """

    def __init__(
        self,
        decoder: TransformerDecoder,
        encoder: nn.Module | Mapping[str, nn.Module],
        *,
        decoder_trainable: bool = False,
        encoder_trainable: bool = False,
        fusion_trainable: bool = True,
    ) -> None:
        super().__init__()
        per_modality = isinstance(encoder, (Mapping, nn.ModuleDict))
        if per_modality and len(encoder) == 0:
            raise ValueError("DeepFusionModel needs an encoder; got an empty mapping of encoders")
        self.decoder = decoder
        self.encoder = nn.ModuleDict(encoder) if per_modality else encoder
        #: The modalities of the encoders, in order; None for a single encoder (torchtune's case).
        self.modalities: tuple[str, ...] | None = tuple(self.encoder) if per_modality else None
        trainable: set[str] = set()
        if encoder_trainable:
            trainable |= {f"encoder.{name}" for name, _ in self.encoder.named_parameters()} - never_trained(self.encoder, "encoder.")
        if decoder_trainable:
            trainable |= {f"decoder.{name}" for name, _ in decoder.named_parameters()}
        fusion = set(get_fusion_params(self))
        trainable = trainable | fusion if fusion_trainable else trainable - fusion
        set_trainable_params(self, trainable)

    def set_num_output_chunks(self, num_output_chunks: int) -> None:
        """Return logits as that many chunks along s (for a chunked loss); 0 turns it off."""
        self.decoder.set_num_output_chunks(num_output_chunks)

    def set_skip_output_projection(self, skip: bool) -> None:
        """Return final hidden states instead of logits (see TransformerDecoder)."""
        self.decoder.set_skip_output_projection(skip)

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | Mapping[str, int] | None = None,
        decoder_max_seq_len: int | None = None,
    ) -> None:
        """Allocate the decoder's KV caches (see :meth:`TransformerDecoder.setup_caches`). With an
        encoder per modality, ``encoder_max_seq_len`` may map each modality to its encoder's
        longest output (its fusion layers' cache length); one int serves them all."""
        if isinstance(encoder_max_seq_len, Mapping):
            self._check_modalities(encoder_max_seq_len, "encoder_max_seq_len")
        self.decoder.setup_caches(
            batch_size,
            dtype,
            encoder_max_seq_len=encoder_max_seq_len,
            decoder_max_seq_len=decoder_max_seq_len,
        )

    def caches_are_setup(self) -> bool:
        """True once the KV caches exist."""
        return self.decoder.caches_are_setup()

    def caches_are_enabled(self) -> bool:
        """True while forward passes read and update the KV caches."""
        return self.decoder.caches_are_enabled()

    def reset_caches(self) -> None:
        """Zero the KV caches and their positions, keeping the allocations."""
        self.decoder.reset_caches()

    def _check_modalities(self, value: Mapping[str, Any], what: str) -> None:
        """Raise when ``value`` (a mapping by modality) is given to a one-encoder model, or names a
        modality this model has no encoder for."""
        if self.modalities is None:
            raise TypeError(f"this model has one encoder: pass {what} as it is, not as a mapping by modality")
        unknown = sorted(set(value) - set(self.modalities))
        if unknown:
            raise ValueError(f"{what} names {unknown}, for which this model has no encoder; it has {list(self.modalities)}")

    def encode(self, encoder_input: dict[str, Any] | Mapping[str, dict[str, Any] | None]) -> torch.Tensor | dict[str, torch.Tensor]:
        """The encoder embeddings ``[b, s_e, d]`` of ``encoder_input``; with an encoder per
        modality, a dict of them for the modalities present (a missing or None entry is absent).

        The encoders run in the model's order of modalities, whatever the order of
        ``encoder_input``: under FSDP every rank must issue the same collectives in the same
        order, and two ranks' batches may list their modalities differently (one holds clips and
        gets a blank image slot added after them)."""
        if self.modalities is None:
            return self.encoder(**encoder_input)
        if not isinstance(encoder_input, Mapping):
            by_modality(encoder_input, self.modalities[0], "encoder_input")  # raises, naming the fix
        self._check_modalities(encoder_input, "encoder_input")
        return {
            modality: self.encoder[modality](**encoder_input[modality])
            for modality in self.modalities
            if encoder_input.get(modality) is not None
        }

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: AttentionMask | None = None,
        encoder_input: dict[str, Any] | Mapping[str, dict[str, Any] | None] | None = None,
        encoder_mask: torch.Tensor | Any | Mapping[str, Any] | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Args:
            tokens: ``[b, s]`` token ids.
            mask: ``[b, s, s]`` bool self-attention mask (True = attend), a ``PackedLayout`` or
                a ``BlockMask`` (see ``Batch.model_inputs``); None means causal.
            encoder_input: keyword arguments for the encoder, or None (text only, or decoding
                from cached encoder keys/values). With an encoder per modality, a mapping from
                modality to those (modalities absent from the batch left out, or None).
            encoder_mask: ``[b, s, s_e]`` bool, True where token i may attend embedding j; or a
                ``CrossAttentionLayout`` / ``EncoderBlockMask`` standing for it. With an encoder
                per modality, a mapping from modality to that modality's mask.
            input_pos: ``[b, s]`` positions, restarting per packed sample.

        Returns:
            fp32 logits ``[b, s, v]``, or a list (output chunks / hidden states).
        """
        if self.modalities is not None and encoder_mask is not None:
            if not isinstance(encoder_mask, Mapping):
                by_modality(encoder_mask, self.modalities[0], "encoder_mask")  # raises, naming the fix
            self._check_modalities(encoder_mask, "encoder_mask")
        encoder_embeddings = None if encoder_input is None else self.encode(encoder_input)
        return self.decoder(
            tokens,
            mask=mask,
            encoder_input=encoder_embeddings,
            encoder_mask=encoder_mask,
            input_pos=input_pos,
        )
