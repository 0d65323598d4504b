"""Whisper's audio encoder (the encoder half of a ``WhisperModel`` or
``WhisperForConditionalGeneration`` checkpoint, any size) as a composed model's audio encoder.

The tower is transformers' ``WhisperEncoder``, run as transformers runs it: on the fixed window of
``F = 2 * max_source_positions`` log-mel frames (3000, 30 s, for the released checkpoints), silence
padding included, giving ``T = F / 2`` outputs (conv2 has stride 2). A clip shorter than the window
keeps only the outputs of its real frames, ``ceil(frames / 2)``
(:class:`~fusiontrain.families.whisper_audio.WhisperClips`), so packing, masks and the planner see
its true length: a row's clips' tokens are packed, and ``collate`` adds ``token_index`` so
:class:`WhisperTowerEncoder` gathers them from the tower's padded outputs (as SigLIP2 NaFlex
does, :mod:`fusiontrain.families.siglip2`).

Stored tensors: ``WhisperModel`` keeps the encoder under ``encoder.``,
``WhisperForConditionalGeneration`` under ``model.encoder.``; both are read, and the decoder's
tensors (another part of the model) are left alone.

Shapes: b rows, i clips per row, n_mels mel bins, F frames per window, T = F / 2 tower outputs per
window, s_e packed encoder tokens per row, d_e tower width (``d_model``), d decoder width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fusiontrain.data.audio_format import AudioFormat
from fusiontrain.data.image_format import ImageFormat
from fusiontrain.families.encoder import EncoderFamily
from fusiontrain.families.hf_tower import MLPProjectionHead, project_tokens
from fusiontrain.families.whisper_audio import WhisperClips
from fusiontrain.flops.rules import Tally, any_trainable, count_attention_core, count_linear, unwrap
from fusiontrain.modules import register_fusion_module
from fusiontrain.modules.image_slots import check_image_slots, place_slots, select_slots
from fusiontrain.weights.hf_checkpoint import TensorRoute

# The canonical stored names are WhisperModel's; WhisperForConditionalGeneration's add "model.".
_FULL_MODEL_PREFIX = "model."
_ENCODER_PREFIX = "encoder."


def whisper_config_from_dict(config: dict) -> Any:
    """The ``WhisperConfig`` of a ``whisper`` ``config.json`` dict.

    Raises:
        ValueError: another model_type.
    """
    from transformers import WhisperConfig

    if config.get("model_type") != "whisper":
        raise ValueError(f"expected a Whisper config (model_type whisper), got {config.get('model_type')!r}")
    return WhisperConfig.from_dict(config)


class WhisperTowerEncoder(nn.Module):
    """A HF ``WhisperEncoder`` followed by a projection head; a row's clips' valid tokens are
    gathered, packed, into ``[b, s_e, d]``.

    When no tower parameter requires grad and the features need none, the tower runs under
    ``torch.no_grad()``.

    Args:
        tower: a transformers ``WhisperEncoder``.
        decoder_dim: decoder width ``d``.
    """

    def __init__(self, tower: nn.Module, decoder_dim: int) -> None:
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        if not isinstance(tower, WhisperEncoder):
            raise TypeError(f"WhisperTowerEncoder takes a transformers WhisperEncoder, got {type(tower).__name__}")
        self.tower = tower
        self.projection = register_fusion_module(MLPProjectionHead(tower.config.d_model, decoder_dim))
        self.decoder_dim = decoder_dim

    @property
    def num_mel_bins(self) -> int:
        return self.tower.config.num_mel_bins

    @property
    def num_frames(self) -> int:
        """``F``: the frames of the window the tower takes."""
        return 2 * self.tower.config.max_source_positions

    def frozen_params(self) -> list[str]:
        """The sinusoidal position table, which transformers' ``WhisperEncoder`` keeps frozen:
        ``encoder_trainable`` leaves it so (:class:`~fusiontrain.modules.DeepFusionModel`)."""
        return ["tower.embed_positions.weight"]

    def block_lists(self) -> list[nn.ModuleList]:
        """The tower's transformer blocks (``layers``)."""
        return [self.tower.layers]

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Whisper encoders have no buffers (the sinusoidal positions are a stored, frozen
        parameter); any buffer (a transformers change) raises."""
        names = [name for name, _ in self.tower.named_buffers()]
        if names:
            raise RuntimeError(f"don't know how to rebuild the Whisper tower's buffers {names} after a meta-device build")

    def features(
        self,
        input_features: torch.Tensor,
        token_index: torch.Tensor,
        clip_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The packed tower output before the projection.

        Args:
            input_features: ``[b, i, n_mels, F]``.
            token_index: ``[b, s_e]`` long, indices into each row's ``[i * T]`` tower outputs.
            clip_slots: ``[n]`` flat indices of the slots that hold a clip, or None for all: only
                those run through the tower, the others' outputs are zeros (no column points at
                them; :mod:`fusiontrain.modules.image_slots`).

        Returns:
            ``[b, s_e, d_e]``.
        """
        if input_features.dim() != 4 or tuple(input_features.shape[2:]) != (self.num_mel_bins, self.num_frames):
            raise ValueError(
                f"expected input_features [b, i, {self.num_mel_bins}, {self.num_frames}] (n_mels, the window's frames), "
                f"got {list(input_features.shape)}"
            )
        b, i = input_features.shape[:2]
        if clip_slots is None:
            clips = input_features.flatten(0, 1)  # [b*i, n_mels, F]
        else:
            check_image_slots(clip_slots, b, i)
            clips = select_slots(input_features, clip_slots)  # [n, n_mels, F]
        needs_grad = input_features.requires_grad or any(q.requires_grad for q in self.tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            hidden = self.tower(input_features=clips).last_hidden_state  # [b*i or n, T, d_e]
        if clip_slots is not None:
            hidden = place_slots(hidden, clip_slots, b, i)
        hidden = hidden.reshape(b, i * hidden.shape[-2], hidden.shape[-1])
        return torch.gather(hidden, 1, token_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    #: The encoder input a FLOP count reads the item slots from (``[b, i, n_mels, F]``: one item's
    #: is 2-dim), and the key of the real ones (:mod:`fusiontrain.flops.count`).
    item_input_key, item_input_dims, item_slots_key = "input_features", 2, "clip_slots"

    def count_flops(self, tally: Tally, clips: int, columns: int | None = None) -> tuple[int, bool]:
        """This encoder's model FLOPs over ``clips`` clips (the analytic count
        :mod:`fusiontrain.flops.count` asks an encoder for), added to ``tally``: every clip runs the
        whole window, ``F`` frames through ``conv1`` and ``T = F / 2`` positions through ``conv2``,
        and the transformer layers, whatever its real length; the projection head runs on the
        packed columns that keep the clips' real tokens (``columns``, all of the batch's rows'
        ``s_e``; when None, every position: an upper bound). Returns (``T``, the most tokens a
        clip yields; whether the embeddings require grad)."""
        tower = self.tower
        frames, positions = self.num_frames, self.num_frames // 2
        x = False
        for conv, length in ((tower.conv1, frames), (tower.conv2, positions)):
            flops = 2 * clips * length * conv.out_channels * conv.in_channels * conv.kernel_size[0] // conv.groups
            weight_grad = conv.weight.requires_grad
            tally.add("encoder.audio", flops, int(x) + int(weight_grad))
            x = x or weight_grad or (conv.bias is not None and conv.bias.requires_grad)
        x = x or any_trainable(tower.embed_positions)
        tokens, pairs = clips * positions, clips * positions * positions
        for layer in tower.layers:
            layer = unwrap(layer)
            attn = layer.self_attn
            normed = x or any_trainable(layer.self_attn_layer_norm)
            q = count_linear(tally, "encoder.audio", attn.q_proj, tokens, normed)
            k = count_linear(tally, "encoder.audio", attn.k_proj, tokens, normed)
            v = count_linear(tally, "encoder.audio", attn.v_proj, tokens, normed)
            out = count_attention_core(tally, "encoder.audio", unwrap(attn.q_proj).out_features, pairs, q, k, v)
            h = count_linear(tally, "encoder.audio", attn.out_proj, tokens, out) or x
            hidden = count_linear(tally, "encoder.audio", layer.fc1, tokens, h or any_trainable(layer.final_layer_norm))
            mlp = count_linear(tally, "encoder.audio", layer.fc2, tokens, hidden)
            x = h or mlp
        x = x or any_trainable(tower.layer_norm)
        projection = self.projection
        projected = tokens if columns is None else columns
        hidden = count_linear(tally, "encoder.projection", projection.linear_1, projected, x)
        return positions, count_linear(tally, "encoder.projection", projection.linear_2, projected, hidden)

    def forward(
        self,
        input_features: torch.Tensor,
        token_index: torch.Tensor,
        clip_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See :meth:`features`; returns ``[b, s_e, d]``."""
        return project_tokens(self.projection, self.features(input_features, token_index, clip_slots))


class WhisperAudioEncoder(EncoderFamily):
    """Whisper: the encoder's outputs of each clip's real frames (after its final layer norm),
    packed per row."""

    name = "whisper"
    model_types = ("whisper",)
    modality = "audio"

    def build(self, config: dict, decoder_dim: int) -> nn.Module:
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperTowerEncoder(WhisperEncoder(whisper_config_from_dict(config)), decoder_dim)

    def image_format(self, encoder: nn.Module) -> ImageFormat:
        raise TypeError("Whisper encodes audio, not images: its input format is input_format()'s AudioFormat")

    def input_format(self, encoder: nn.Module) -> AudioFormat:
        return WhisperClips(encoder.num_mel_bins, encoder.num_frames)

    def owns(self, encoder: nn.Module) -> bool:
        return isinstance(encoder, WhisperTowerEncoder)

    def key_renamer(self, key: str) -> str:
        """``WhisperForConditionalGeneration``'s ``model.encoder.*`` (and ``model.decoder.*``) as
        ``WhisperModel`` stores them, ``encoder.*``."""
        return key.removeprefix(_FULL_MODEL_PREFIX)

    def weight_map(self, encoder: nn.Module, prefix: str) -> list[TensorRoute]:
        return [
            TensorRoute(f"{_ENCODER_PREFIX}{name}", f"{prefix}tower.{name}") for name, _ in encoder.tower.named_parameters()
        ]

    def expected_tensors(self, checkpoint_keys: list[str]) -> set[str]:
        """The encoder's tensors; the decoder's (and a tied ``proj_out``) are another part."""
        return {key for key in checkpoint_keys if key.startswith(_ENCODER_PREFIX)}
