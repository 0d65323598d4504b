"""The Llama 3.2 Vision ("Mllama") image encoder: a tiled ViT plus a gated projection head.

An image is cut into up to ``t`` tiles (its aspect ratio picks how); each tile becomes
``p = (image_size // patch_size)**2 + 1`` tokens (patches plus a class token). The encoder has two
parts, split the way deep fusion trains them:

- :class:`TiledVisionTransformer` (pretrained, frozen by default): patch embedding, gated tile
  and token position embeddings, the local transformer, and the outputs of a few of its layers.
- :class:`MllamaProjectionHead` (a fusion module, trained by default): the gated "global"
  transformer layers and the linear projector to the decoder's width ``d``.

The computation reproduces Meta's reference and Hugging Face's ``MllamaVisionModel`` exactly,
including its attention pattern: each tile's token list is padded to a multiple of 8, and a key
is hidden from a query only when both are padding (padded tokens or padded tiles).

Shapes: b batch, i images per sample, t tiles per image, p tokens per tile, d_v vision width,
d decoder width, s_e = i * t * p encoder tokens per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fusiontrain.flops.rules import Tally, any_trainable, conv_flops, count_linear, count_self_attention_layer, unwrap
from fusiontrain.modules.attention import MultiHeadAttention
from fusiontrain.modules.fusion import register_fusion_module
from fusiontrain.modules.image_slots import check_image_slots, place_slots, select_slots
from fusiontrain.modules.layers import FeedForward, TanhGate
from fusiontrain.modules.transformer import TransformerSelfAttentionLayer

_PAD_MULTIPLE = 8


@dataclass(frozen=True)
class MllamaVisionArgs:
    """Sizes of the Mllama vision encoder (the fields of HF's ``MllamaVisionConfig``)."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_layers: int
    num_global_layers: int
    intermediate_layers_indices: tuple[int, ...]
    image_size: int
    patch_size: int
    max_num_tiles: int
    num_aspect_ratios: int  # len(supported_aspect_ratios); ids run 1..n, 0 is padding
    norm_eps: float = 1e-5
    num_channels: int = 3

    @property
    def tokens_per_tile(self) -> int:
        """``p``: patches per tile plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def output_dim(self) -> int:
        """Width of the features entering the projector: final plus intermediate layers."""
        return self.hidden_size * (1 + len(self.intermediate_layers_indices))


def vision_layer(args: MllamaVisionArgs, *, gated: bool) -> TransformerSelfAttentionLayer:
    """One pre-LayerNorm ViT block (bias-free attention, GELU MLP); gated blocks scale each
    branch by ``tanh(gate)``."""
    d, heads = args.hidden_size, args.num_heads
    attn = MultiHeadAttention(
        embed_dim=d,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        q_proj=nn.Linear(d, d, bias=False),
        k_proj=nn.Linear(d, d, bias=False),
        v_proj=nn.Linear(d, d, bias=False),
        output_proj=nn.Linear(d, d, bias=False),
        is_causal=False,
    )
    mlp = FeedForward(
        gate_proj=nn.Linear(d, args.intermediate_size),
        down_proj=nn.Linear(args.intermediate_size, d),
        activation=F.gelu,
    )
    return TransformerSelfAttentionLayer(
        attn,
        mlp,
        sa_norm=nn.LayerNorm(d, eps=args.norm_eps),
        mlp_norm=nn.LayerNorm(d, eps=args.norm_eps),
        sa_scale=TanhGate() if gated else None,
        mlp_scale=TanhGate() if gated else None,
    )


class TileEmbedding(nn.Module):
    """A learned embedding per (aspect ratio, tile), added to every token of the tile, gated."""

    def __init__(self, num_aspect_ratios: int, max_num_tiles: int, dim: int) -> None:
        super().__init__()
        self.max_num_tiles = max_num_tiles
        self.dim = dim
        self.embedding = nn.Embedding(num_aspect_ratios + 1, max_num_tiles * dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """``x`` ``[b*i, t, n, d_v]``, ``aspect_ratio_ids`` ``[b*i]`` -> same shape as ``x``."""
        per_tile = self.embedding(aspect_ratio_ids).reshape(-1, self.max_num_tiles, 1, self.dim)
        return x + per_tile * self.gate.tanh()


class TiledTokenPositionalEmbedding(nn.Module):
    """Per-token position embedding, blended by a gate with a per-(aspect ratio, tile, token) one.

    ``x + (1 - tanh(gate)) * local + tanh(gate) * tile_embedding[aspect_ratio]``.
    """

    def __init__(self, num_aspect_ratios: int, max_num_tiles: int, tokens_per_tile: int, dim: int) -> None:
        super().__init__()
        self.max_num_tiles = max_num_tiles
        self.tokens_per_tile = tokens_per_tile
        self.dim = dim
        self.local_embedding = nn.Parameter(torch.randn(tokens_per_tile, dim) * dim**-0.5)
        self.tile_embedding = nn.Embedding(num_aspect_ratios + 1, max_num_tiles * tokens_per_tile * dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """``x`` ``[b*i, t, p, d_v]``, ``aspect_ratio_ids`` ``[b*i]`` -> same shape as ``x``."""
        gate = self.gate.tanh()
        x = x + ((1 - gate) * self.local_embedding).view(1, 1, self.tokens_per_tile, self.dim)
        tiles = self.tile_embedding(aspect_ratio_ids).reshape(
            x.shape[0], self.max_num_tiles, self.tokens_per_tile, self.dim
        )
        return x + gate * tiles


@dataclass
class TiledFeatures:
    """What the tiled ViT hands to the projection head.

    Attributes:
        hidden: final features ``[b*i, t * p_pad, d_v]`` (tile tokens padded to ``p_pad``).
        intermediate: chosen layers' outputs, interleaved per feature,
            ``[b*i, t * p_pad, d_v * n_layers]``.
        attention_mask: ``[b*i, t * p_pad, t * p_pad]`` bool, True = may attend.
        batch_size: ``b``.
        num_images: ``i``.
        num_tiles: ``t``.
        tokens_per_tile: ``p`` (before padding).
        padded_tokens_per_tile: ``p_pad``, ``p`` rounded up to a multiple of 8.
    """

    hidden: torch.Tensor
    intermediate: torch.Tensor
    attention_mask: torch.Tensor
    batch_size: int
    num_images: int
    num_tiles: int
    tokens_per_tile: int
    padded_tokens_per_tile: int


class TiledVisionTransformer(nn.Module):
    """The pretrained part of the Mllama vision encoder (see the module docstring)."""

    def __init__(self, args: MllamaVisionArgs) -> None:
        super().__init__()
        self.args = args
        d = args.hidden_size
        self.conv = nn.Conv2d(
            args.num_channels, d, kernel_size=args.patch_size, stride=args.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.pre_tile_pos_embed = TileEmbedding(args.num_aspect_ratios, args.max_num_tiles, d)
        self.token_pos_embed = TiledTokenPositionalEmbedding(
            args.num_aspect_ratios, args.max_num_tiles, args.tokens_per_tile, d
        )
        self.ln_pre = nn.LayerNorm(d)
        self.layers = nn.ModuleList(vision_layer(args, gated=False) for _ in range(args.num_layers))
        self.ln_post = nn.LayerNorm(d)
        self.post_tile_pos_embed = TileEmbedding(args.num_aspect_ratios, args.max_num_tiles, d)

    def forward(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor,
        aspect_ratio_mask: torch.Tensor,
    ) -> TiledFeatures:
        """Args:
            pixel_values: ``[b, i, t, c, h, w]`` normalised tiles (HF processor layout).
            aspect_ratio_ids: ``[b, i]``, 1-based into the supported ratios, 0 for padding images.
            aspect_ratio_mask: ``[b, i, t]``, 1 for real tiles.
        """
        b, i, t, c, height, width = pixel_values.shape
        if t != self.args.max_num_tiles:
            raise ValueError(
                f"pixel_values has {t} tiles per image; this encoder expects max_num_tiles="
                f"{self.args.max_num_tiles} (pad with zero tiles, as the HF processor does)"
            )
        images = b * i
        d = self.args.hidden_size
        ratio_ids = aspect_ratio_ids.reshape(images)

        patches = self.conv(pixel_values.reshape(images * t, c, height, width).to(self.conv.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [b*i*t, p-1, d_v]
        x = self.pre_tile_pos_embed(patches.reshape(images, t, -1, d), ratio_ids)
        x = torch.cat([self.class_embedding.expand(images * t, 1, d).to(x.dtype), x.reshape(images * t, -1, d)], dim=1)
        p = x.shape[1]
        x = self.token_pos_embed(x.reshape(images, t, p, d), ratio_ids)
        x = self.ln_pre(x)

        num_pad = (_PAD_MULTIPLE - p % _PAD_MULTIPLE) % _PAD_MULTIPLE
        x = F.pad(x, (0, 0, 0, num_pad))  # [b*i, t, p_pad, d_v]
        p_pad = p + num_pad
        mask = self._attention_mask(aspect_ratio_mask.reshape(images, t), p, p_pad)

        x = x.reshape(images, t * p_pad, d)
        layer_outputs = []
        for layer in self.layers:
            x = layer(x, mask=mask)
            layer_outputs.append(x)
        x = self.ln_post(x)
        x = self.post_tile_pos_embed(x.reshape(images, t, p_pad, d), ratio_ids).reshape(images, t * p_pad, d)
        chosen = [layer_outputs[index] for index in self.args.intermediate_layers_indices]
        intermediate = torch.stack(chosen, dim=-1).reshape(images, t * p_pad, -1)
        return TiledFeatures(x, intermediate, mask, b, i, t, p, p_pad)

    @staticmethod
    def _attention_mask(tile_mask: torch.Tensor, p: int, p_pad: int) -> torch.Tensor:
        """``[b*i, t*p_pad, t*p_pad]``: hide key j from query i only when both are padding."""
        images, t = tile_mask.shape
        real = tile_mask.bool()[:, :, None].expand(images, t, p_pad).clone()
        real[:, :, p:] = False  # padded token slots
        is_pad = ~real.reshape(images, t * p_pad)
        return ~(is_pad[:, :, None] & is_pad[:, None, :])


class MllamaProjectionHead(nn.Module):
    """Gated global transformer layers, then the projector from ``d_v * (1 + n_layers)`` to ``d``.

    Registered as a fusion module by :class:`MllamaVisionEncoder`.
    """

    def __init__(self, args: MllamaVisionArgs, decoder_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(vision_layer(args, gated=True) for _ in range(args.num_global_layers))
        self.output = nn.Linear(args.output_dim, decoder_dim)

    def forward(self, features: TiledFeatures) -> torch.Tensor:
        """``features`` -> encoder embeddings ``[b * s_e, d]``, flat, in (row, image, tile, token)
        order. Flat because the head is an FSDP unit of its own: FSDP2 hooks a unit's output for
        its backward, and warns (on every run) when that output is a view, which is what
        ``nn.Linear`` returns for a 3-D input; the encoder views it as ``[b, s_e, d]``."""
        x = features.hidden
        for layer in self.layers:
            x = layer(x, mask=features.attention_mask)
        images, t, p = x.shape[0], features.num_tiles, features.tokens_per_tile
        x = torch.cat([x, features.intermediate], dim=-1)
        x = x.reshape(images, t, features.padded_tokens_per_tile, -1)[:, :, :p]  # drop padded slots
        return self.output(x.reshape(images * t * p, -1))


class MllamaVisionEncoder(nn.Module):
    """Tiled ViT + projection head. Takes the HF image processor's outputs as keyword arguments.

    When no parameter of the ViT trains and the pixels need no gradient, the ViT runs under
    ``torch.no_grad()``, so none of its activations are kept for backward.

    Padding image slots (rows with fewer images than the batch's widest, in padded or packed rows)
    are not encoded when ``image_slots`` lists the real ones (the collator does): each image is
    encoded on its own, and no token sees a padding slot, so the encoder runs on the real images
    only and returns zeros in the padding slots' columns (:mod:`fusiontrain.modules.image_slots`:
    the count is the index's shape, so the skip costs no device sync).
    """

    #: One image's ``pixel_values`` is ``[t, c, h, w]`` (its tiles), for the FLOP count's slots.
    item_input_dims = 4

    def __init__(self, args: MllamaVisionArgs, decoder_dim: int) -> None:
        super().__init__()
        self.vision = TiledVisionTransformer(args)
        self.projection = register_fusion_module(MllamaProjectionHead(args, decoder_dim))

    def forward(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor,
        aspect_ratio_mask: torch.Tensor,
        image_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            pixel_values: ``[b, i, t, c, h, w]``.
            aspect_ratio_ids: ``[b, i]``.
            aspect_ratio_mask: ``[b, i, t]``.
            image_slots: ``[n]`` flat indices of the slots that hold an image, or None for all.

        Returns:
            ``[b, s_e, d]`` with ``s_e = i * t * p``.
        """
        if image_slots is None:
            return self._encode(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        b, i = aspect_ratio_ids.shape
        check_image_slots(image_slots, b, i)
        real = [select_slots(x, image_slots)[None] for x in (pixel_values, aspect_ratio_ids, aspect_ratio_mask)]
        embeddings = self._encode(*real)  # [1, n * t * p, d]
        per_image = embeddings.reshape(len(image_slots), -1, embeddings.shape[-1])  # [n, t * p, d]
        return place_slots(per_image, image_slots, b, i).reshape(b, i * per_image.shape[1], -1)

    def count_flops(self, tally: Tally, images: int, columns: int | None = None) -> tuple[int, bool]:
        """This encoder's model FLOPs (the analytic count :mod:`fusiontrain.flops.count` asks an
        encoder for): tiled ViT + projection head over the ``images`` image slots it encodes,
        added to ``tally`` (``columns``, the encoder columns of the batch, is not needed: every
        slot's tokens are computed). Returns (tokens per image slot, whether the embeddings
        require grad)."""
        vision, head = self.vision, self.projection
        args = vision.args
        tiles = images * args.max_num_tiles
        p = args.tokens_per_tile
        p_pad = -(-p // _PAD_MULTIPLE) * _PAD_MULTIPLE
        seq = args.max_num_tiles * p_pad  # an image's tiles attend to each other
        tokens, pairs = images * seq, images * seq * seq

        # Pixels never require grad: the patch convolution only ever computes a weight gradient.
        patch_flops = conv_flops(vision.conv, tiles, args.image_size)
        tally.add("encoder.vision", patch_flops, int(vision.conv.weight.requires_grad))
        x = any_trainable(
            vision.conv, vision.class_embedding, vision.pre_tile_pos_embed, vision.token_pos_embed, vision.ln_pre
        )
        outputs = []
        for layer in vision.layers:
            x = count_self_attention_layer(
                tally, ("encoder.vision", "encoder.vision"), unwrap(layer), tokens=tokens, pairs=pairs, x_grad=x
            )
            outputs.append(x)
        intermediate = any(outputs[i] for i in args.intermediate_layers_indices)
        x = x or any_trainable(vision.ln_post, vision.post_tile_pos_embed)

        for layer in head.layers:
            x = count_self_attention_layer(
                tally, ("encoder.projection", "encoder.projection"), unwrap(layer), tokens=tokens, pairs=pairs, x_grad=x
            )
        # The projector sees the real (unpadded) tile tokens only.
        embeddings = count_linear(tally, "encoder.projection", head.output, images * args.max_num_tiles * p, x or intermediate)
        return args.max_num_tiles * p, embeddings

    def _encode(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> torch.Tensor:
        """Every slot of ``[b, i, ...]`` inputs -> ``[b, s_e, d]``."""
        needs_grad = pixel_values.requires_grad or any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            features = self.vision(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        embeddings = self.projection(features)  # [b * s_e, d]
        return embeddings.view(features.batch_size, -1, embeddings.shape[-1])
