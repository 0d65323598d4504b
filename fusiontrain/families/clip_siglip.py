"""CLIP and SigLIP vision towers (``CLIPVisionModel``, ``SiglipVisionModel``, or the vision half
of a full ``CLIPModel`` / ``SiglipModel``) as encoders: the encoder module (the unmodified HF tower
plus a projection head), its analytic FLOP count, and the two families. Each image gives the
tower's ``last_hidden_state``; the tower helpers other families share are in
:mod:`fusiontrain.families.hf_tower`."""

from __future__ import annotations


import torch
from torch import nn

from fusiontrain.data.image_format import ImageFormat
from fusiontrain.families.encoder import EncoderFamily
from fusiontrain.families.fixed_size_image import FixedSizeImage
from fusiontrain.families.hf_tower import (
    MLPProjectionHead,
    build_vision_tower,
    canonical_vision_tower_key,
    project_tokens,
    vision_tower_config_from_dict,
    vision_tower_tensor_names,
)
from fusiontrain.flops.rules import Tally, any_trainable, conv_flops, count_attention_core, count_linear, unwrap
from fusiontrain.modules import register_fusion_module
from fusiontrain.modules.image_slots import check_image_slots, place_slots, select_slots
from fusiontrain.torch_private import non_persistent_buffer_names


class HFVisionTowerEncoder(nn.Module):
    """A HF CLIP / SigLIP vision tower followed by a projection head to the decoder's width.

    Every image becomes the tower's ``last_hidden_state`` (``n_tok`` tokens of width ``d_e``;
    CLIP: patches + class token, SigLIP: patches, after its final LayerNorm), projected to ``d``.
    A sample's images are concatenated along the token axis in order.

    When no tower parameter requires grad and the pixels need none, the tower runs under
    ``torch.no_grad()``, so a frozen tower keeps no activations for backward.

    The tower's pooling parts (CLIP's ``post_layernorm``, SigLIP's attention-pooling ``head``) are
    kept so the tower stays a faithful, re-exportable HF module, but they do not feed
    ``last_hidden_state``: they are declared never trained (:meth:`frozen_params`), so that
    ``encoder_trainable`` leaves them frozen rather than in the optimizer with no gradient (and
    no AdamW state, which a resume then found missing).

    Args:
        tower: a ``CLIPVisionModel`` or ``SiglipVisionModel``.
        decoder_dim: decoder width ``d``.
        pooling_part: the tower's submodule that pools (its family's :attr:`_HFTowerFamily.pooling_part`).
    """

    def __init__(self, tower: nn.Module, decoder_dim: int, *, pooling_part: str) -> None:
        super().__init__()
        from transformers import CLIPVisionModel, SiglipVisionModel

        if not isinstance(tower, (CLIPVisionModel, SiglipVisionModel)):
            raise TypeError(
                f"HFVisionTowerEncoder takes a CLIPVisionModel or SiglipVisionModel, got {type(tower).__name__}"
            )
        self.tower = tower
        self.projection = register_fusion_module(MLPProjectionHead(tower.config.hidden_size, decoder_dim))
        self.decoder_dim = decoder_dim
        self.pooling_part = pooling_part

    def frozen_params(self) -> list[str]:
        """The pooling part's parameters (see the class doc)."""
        return [f"tower.{name}" for name, _ in self.tower.named_parameters() if self.pooling_part in name.split(".")]

    @property
    def image_size(self) -> int:
        """Height and width, in pixels, of the images the tower takes."""
        return self.tower.config.image_size

    @property
    def tokens_per_image(self) -> int:
        """``n_tok``: length of the tower's ``last_hidden_state``, i.e. its position embeddings
        (CLIP: ``(image_size // patch_size)**2 + 1``; SigLIP: ``(image_size // patch_size)**2``)."""
        return self.tower.embeddings.num_positions

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Re-create the tower's non-persistent buffers from its config.

        ``Module.to_empty`` (used after building on the meta device) leaves every buffer
        uninitialised, and non-persistent buffers are in no checkpoint. CLIP and SigLIP towers have
        one: ``embeddings.position_ids`` = ``arange(num_positions)[None]``. Any other buffer raises,
        rather than being left as garbage.
        """
        for name, buffer in self.tower.named_buffers():
            owner_name, _, local = name.rpartition(".")
            owner = self.tower.get_submodule(owner_name)
            if local not in non_persistent_buffer_names(owner):
                raise RuntimeError(
                    f"tower buffer {name!r} is persistent; HFVisionTowerEncoder only knows how to rebuild the "
                    "non-persistent position_ids of CLIP / SigLIP towers"
                )
            if local == "position_ids" and hasattr(owner, "num_positions"):
                positions = torch.arange(owner.num_positions, device=buffer.device, dtype=buffer.dtype)
                buffer.copy_(positions.expand(buffer.shape))
            else:
                raise RuntimeError(
                    f"don't know how to rebuild the tower's non-persistent buffer {name!r} after a meta-device "
                    "build; extend HFVisionTowerEncoder.init_buffers"
                )

    def count_flops(self, tally: Tally, images: int, columns: int | None = None) -> tuple[int, bool]:
        """This encoder's model FLOPs (the analytic count :mod:`fusiontrain.flops.count` asks an
        encoder for) over the ``images`` images it encodes, added to ``tally`` (``columns`` is not
        needed: every image yields all its tokens). Returns (tokens per image, whether the
        embeddings require grad)."""
        return _count_tower_encoder(tally, self, images)

    def forward(self, pixel_values: torch.Tensor, image_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            pixel_values: ``[b, i, 3, H, W]`` (``i`` images per sample) or ``[b, 3, H, W]`` (one
                image per sample), normalised by the tower's own HF image processor, with
                ``H == W == image_size``.
            image_slots: ``[n]`` flat indices of the slots that hold an image, or None for all:
                only those run, the others' columns are zeros
                (:mod:`fusiontrain.modules.image_slots`).

        Returns:
            ``[b, i * n_tok, d]`` (``i = 1`` for 4-dim input).
        """
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(1)
        channels = self.tower.config.num_channels
        size = self.image_size
        if pixel_values.dim() != 5 or tuple(pixel_values.shape[2:]) != (channels, size, size):
            raise ValueError(
                f"pixel_values must be [b, i, {channels}, {size}, {size}] or [b, {channels}, {size}, {size}], got "
                f"{list(pixel_values.shape)}: pass the output of this tower's own HF image processor "
                "(stack a sample's images along dim 1)"
            )
        b, i = pixel_values.shape[:2]
        if image_slots is None:
            images = pixel_values.reshape(b * i, channels, size, size)
        else:
            check_image_slots(image_slots, b, i)
            images = select_slots(pixel_values, image_slots)  # [n, 3, H, W]
        needs_grad = pixel_values.requires_grad or any(p.requires_grad for p in self.tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            features = self.tower(pixel_values=images).last_hidden_state  # [b*i or n, n_tok, d_e]
        embeddings = project_tokens(self.projection, features)
        if image_slots is not None:
            embeddings = place_slots(embeddings, image_slots, b, i)
        return embeddings.reshape(b, i * features.shape[1], self.decoder_dim)


def _count_tower_layer(tally: Tally, layer: nn.Module, *, tokens: int, pairs: int, x_grad: bool) -> bool:
    """A CLIP / SigLIP encoder layer: pre-norm attention and MLP, both residual."""
    attn = layer.self_attn
    normed = x_grad or any_trainable(layer.layer_norm1)
    q = count_linear(tally, "encoder.vision", attn.q_proj, tokens, normed)
    k = count_linear(tally, "encoder.vision", attn.k_proj, tokens, normed)
    v = count_linear(tally, "encoder.vision", attn.v_proj, tokens, normed)
    out = count_attention_core(tally, "encoder.vision", unwrap(attn.q_proj).out_features, pairs, q, k, v)
    h = count_linear(tally, "encoder.vision", attn.out_proj, tokens, out) or x_grad
    mlp = _count_tower_mlp(tally, layer.mlp, tokens, h or any_trainable(layer.layer_norm2))
    return h or mlp


def _count_tower_mlp(tally: Tally, mlp: nn.Module, tokens: int, x_grad: bool) -> bool:
    """A CLIP / SigLIP MLP: ``fc1``, the activation, ``fc2``."""
    hidden = count_linear(tally, "encoder.vision", mlp.fc1, tokens, x_grad)
    return count_linear(tally, "encoder.vision", mlp.fc2, tokens, hidden)


def _count_siglip_pooling_head(tally: Tally, head: nn.Module, images: int, n_tok: int) -> None:
    """SigLIP's attention-pooling head: one probe query per image attends to the image's tokens.
    It runs in forward, but its output (``pooler_output``) is not used: no backward."""
    attention = head.attention
    e = attention.embed_dim
    kv_dim = e if attention.kdim is None else attention.kdim
    if attention.kdim != attention.vdim:
        raise TypeError("SigLIP pooling head with different key and value widths is not supported")
    q_flops = 2 * images * e * e
    kv_flops = 2 * images * n_tok * kv_dim * 2 * e
    core = 2 * 2 * e * images * n_tok  # 1 query per image and head
    out_flops = 2 * images * e * attention.out_proj.out_features
    tally.add("encoder.vision", q_flops + kv_flops + core + out_flops, 0)
    mlp = head.mlp
    tally.add("encoder.vision", sum(2 * images * m.in_features * m.out_features for m in (mlp.fc1, mlp.fc2)), 0)


def _count_tower_encoder(tally: Tally, encoder: HFVisionTowerEncoder, images: int) -> tuple[int, bool]:
    """HF CLIP / SigLIP tower + MLP projection head over ``images`` images."""
    tower = encoder.tower
    body = getattr(tower, "vision_model", tower)  # transformers < 5 nests the tower one level deeper
    embeddings = body.embeddings
    n_tok = encoder.tokens_per_image
    tokens, pairs = images * n_tok, images * n_tok * n_tok

    conv = embeddings.patch_embedding
    tally.add("encoder.vision", conv_flops(conv, images, encoder.image_size), int(conv.weight.requires_grad))
    x = any_trainable(embeddings, getattr(body, "pre_layrnorm", None))
    for layer in body.encoder.layers:
        x = _count_tower_layer(tally, unwrap(layer), tokens=tokens, pairs=pairs, x_grad=x)
    head = getattr(body, "head", None)
    if head is not None and getattr(body, "use_head", True):
        _count_siglip_pooling_head(tally, head, images, n_tok)
    # CLIP's post_layernorm only touches the pooled token; SigLIP's normalises last_hidden_state.
    x = x or any_trainable(getattr(body, "post_layernorm", None))

    projection = encoder.projection
    hidden = count_linear(tally, "encoder.projection", projection.linear_1, tokens, x)
    return n_tok, count_linear(tally, "encoder.projection", projection.linear_2, tokens, hidden)


class _HFTowerFamily(EncoderFamily):
    """What CLIP and SigLIP share: the unmodified HF tower and a LLaVA-style projection head."""

    tower_class: str
    pooling_part: str  # the tower's submodule that pools and does not feed ``last_hidden_state``

    def build(self, config: dict, decoder_dim: int) -> nn.Module:
        tower = build_vision_tower(vision_tower_config_from_dict(config))
        return HFVisionTowerEncoder(tower, decoder_dim=decoder_dim, pooling_part=self.pooling_part)

    def image_format(self, encoder: nn.Module) -> ImageFormat:
        return FixedSizeImage(encoder.image_size, encoder.tokens_per_image)

    def owns(self, encoder: nn.Module) -> bool:
        return isinstance(encoder, HFVisionTowerEncoder) and type(encoder.tower).__name__ == self.tower_class

    def key_renamer(self, key: str) -> str:
        return canonical_vision_tower_key(key)

    def expected_tensors(self, checkpoint_keys: list[str]) -> set[str]:
        return vision_tower_tensor_names(checkpoint_keys)


class ClipEncoder(_HFTowerFamily):
    """CLIP: patches plus the class token, before ``post_layernorm``."""

    name = "clip"
    model_types = ("clip_vision_model", "clip")
    tower_class = "CLIPVisionModel"
    pooling_part = "post_layernorm"


class SiglipEncoder(_HFTowerFamily):
    """SigLIP: patches only, after its final LayerNorm."""

    name = "siglip"
    model_types = ("siglip_vision_model", "siglip")
    tower_class = "SiglipVisionModel"
    pooling_part = "head"
