"""Equivalence with torchtune 0.6.1's fusion modules, built from the same weights.

Every comparison is on CPU in fp32. The torchtune reference is assembled from
``torchtune.modules`` pieces (see ``benchmarks/torchtune_ref.py``); its weights are random
(norm scales included) and copied into ours through the state-dict key map plus the RoPE row
permutation. Every TanhGate is set non-zero (0.7 / -0.4 / ...) before comparing, and each test
checks that the encoder input really changes the output, so no comparison is vacuous.

torchtune is a test-only extra (``pip install -e .[reference]``; ``make test`` installs it). It is
imported plainly, not with ``pytest.importorskip``: where it is missing or fails to import, this
module fails to collect and the suite fails, instead of skipping these tests silently.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import torchtune  # noqa: F401  (the test-only reference; an import failure is an error)

from fusiontrain.families.llama import (  # noqa: E402
    FusedSlot,
    llama_cross_attention_layer,
    llama_self_attention_layer,
)
from fusiontrain.modules import (  # noqa: E402
    DeepFusionModel,
    FusionEmbedding,
    FusionLayer,
    RotaryPositionalEmbeddings,
    get_fusion_params,
    register_fusion_module,
)
from benchmarks import torchtune_ref as ref  # noqa: E402

# fp32 throughout. The two sides differ only in rounding (RoPE rows are permuted, so q.k sums run
# in another order; GQA through SDPA's enable_gqa vs expanded heads): max |diff| observed ~1.8e-6
# on logits of magnitude ~3-5, i.e. a few ulps. So: atol 1e-6 per unit of the tensor's scale.
ATOL = 1e-6
RTOL = 1e-5


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert not torch.isnan(ours).any() and not torch.isnan(theirs).any()
    scale = max(1.0, theirs.abs().max().item())
    torch.testing.assert_close(ours, theirs, atol=ATOL * scale, rtol=RTOL)


def gate_values(model: nn.Module) -> list[float]:
    return [m.scale.item() for m in model.modules() if type(m).__name__ == "TanhGate"]


def assert_gates_open(*models: nn.Module) -> None:
    for model in models:
        values = gate_values(model)
        assert values and all(abs(v) > 0.1 for v in values), values
    assert gate_values(models[0]) == gate_values(models[-1])


ARGS = ref.tiny_args(max_seq_len=32)
D = ARGS.hidden_size
D_ENC = 24
FUSION_VOCAB = 3
# 4 layers; fusion layers at 1 (cross-attention first) and 3 (cross-attention after).
SLOTS = [FusedSlot(0), FusedSlot(1, 10, True), FusedSlot(2), FusedSlot(3, 11, False)]


# -- 1. TransformerCrossAttentionLayer -------------------------------------------------------------


def _cross_pair(seed: int = 1):
    theirs = ref.tt_cross_attention_layer(ARGS)
    ours = llama_cross_attention_layer(ARGS)
    ref.randomize_(theirs, seed)
    ref.set_gates_(theirs, (0.7, -0.4))
    ours.load_state_dict(theirs.state_dict(), strict=True)  # identical keys, no RoPE
    return theirs.eval(), ours.eval()


@torch.no_grad()
def test_cross_attention_layer_matches_torchtune() -> None:
    theirs, ours = _cross_pair()
    assert_gates_open(theirs, ours)
    assert ours.attn.q_norm is not None and ours.attn.num_kv_heads == 2 and ours.attn.num_heads == 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, D, generator=gen)
    enc = torch.randn(2, 7, D, generator=gen)
    mask = torch.rand(2, 9, 7, generator=gen) > 0.4
    mask[0, :3] = False  # text before the image: rows that see nothing
    mask[1, 5] = False
    mask[0, 4] = True
    blind = ~mask.any(-1)
    assert blind.sum() == 4

    out_t = theirs(x, encoder_input=enc, encoder_mask=mask)
    out_o = ours(x, encoder_input=enc, encoder_mask=mask)
    assert_same(out_o, out_t)
    # Rows that see no embedding come out exactly equal to the input, in both.
    assert torch.equal(out_t[blind], x[blind])
    assert torch.equal(out_o[blind], x[blind])
    # Every other row is changed, and the encoder input matters.
    assert (out_o[~blind] - x[~blind]).abs().amax(-1).min() > 1e-3
    out_other = ours(x, encoder_input=torch.randn(2, 7, D, generator=gen), encoder_mask=mask)
    assert (out_other[~blind] - out_o[~blind]).abs().max() > 1e-2

    # No mask: every token sees every embedding.
    assert_same(ours(x, encoder_input=enc), theirs(x, encoder_input=enc))
    # No encoder input and no cache: both skip the layer.
    assert torch.equal(ours(x), x) and torch.equal(theirs(x), x)


# -- 2. FusionLayer (self-attention with RoPE + cross-attention) -----------------------------------


@torch.no_grad()
def test_rope_row_permutation_maps_torchtune_rope_to_ours() -> None:
    """RoPE on permuted rows equals permuted torchtune RoPE, for scaled Llama 3 frequencies and
    per-row (packed) positions; this is what lets q_proj/k_proj be copied across."""
    theirs = ref.tt_rope(ARGS)
    ours = RotaryPositionalEmbeddings(ARGS.head_dim, ARGS.rope_theta, ARGS.rope_scaling)
    n_h, h_d = 4, ARGS.head_dim
    perm = ref.interleaved_to_half_rows(torch.eye(n_h * h_d), n_h, h_d)  # P, a permutation matrix
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 11, n_h, h_d, generator=gen)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])

    def permute(t: torch.Tensor) -> torch.Tensor:
        return (t.reshape(2, 11, n_h * h_d) @ perm.T).reshape(2, 11, n_h, h_d)

    for input_pos in (None, pos):
        assert_same(ours(permute(q), input_pos=input_pos), permute(theirs(q, input_pos=input_pos)))
    # Without the permutation the layouts disagree: the permutation is needed.
    assert (ours(q, input_pos=pos) - theirs(q, input_pos=pos)).abs().max() > 1e-2


def _self_pair(seed: int = 2):
    theirs = ref.tt_self_attention_layer(ARGS)
    ours = llama_self_attention_layer(ARGS)
    ref.randomize_(theirs, seed)
    ref.copy_tt_into_ours(theirs, ours)
    return theirs.eval(), ours.eval()


@torch.no_grad()
def test_self_attention_layer_matches_torchtune_with_permuted_rows() -> None:
    theirs, ours = _self_pair()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, D, generator=gen)
    assert_same(ours.attn(x, x), theirs.attn(x, x))
    assert_same(ours(x), theirs(x))
    # Packed: block-causal mask, positions restarting at 0.
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5]).expand(2, -1)
    mask = torch.block_diag(torch.ones(4, 4), torch.ones(6, 6)).bool() & torch.tril(torch.ones(10, 10)).bool()
    mask = mask.expand(2, -1, -1)
    assert_same(ours(x, mask=mask, input_pos=pos), theirs(x, mask=mask, input_pos=pos))

    # Negative control: copying q_proj/k_proj without the permutation gives another model.
    unpermuted = llama_self_attention_layer(ARGS).eval()
    unpermuted.load_state_dict(theirs.state_dict(), strict=True)
    assert (unpermuted.attn(x, x) - theirs.attn(x, x)).abs().max() > 1e-2


@pytest.mark.parametrize("fusion_first", [True, False])
@torch.no_grad()
def test_fusion_layer_matches_torchtune(fusion_first: bool) -> None:
    theirs = ref.tt_fusion.FusionLayer(
        ref.tt_self_attention_layer(ARGS), ref.tt_cross_attention_layer(ARGS), fusion_first=fusion_first
    ).eval()
    ours = FusionLayer(
        llama_self_attention_layer(ARGS), llama_cross_attention_layer(ARGS), fusion_first=fusion_first
    ).eval()
    ref.randomize_(theirs, 4)
    ref.set_gates_(theirs, (0.7, -0.4))

    # State-dict keys: torchtune drops the "layer." infix of the pretrained half; ours keeps it.
    tt_keys = set(theirs.state_dict())
    assert "attn.q_proj.weight" in tt_keys and "fusion_layer.attn.q_proj.weight" in tt_keys
    assert set(ours.state_dict()) == {k if k.startswith("fusion_layer.") else f"layer.{k}" for k in tt_keys}
    ref.copy_tt_into_ours(theirs, ours)
    assert_gates_open(theirs, ours)

    # fusion_params correspond, and name the same values.
    assert ours.fusion_params() == theirs.fusion_params()
    assert len(ours.fusion_params()) == len(list(ours.fusion_layer.parameters()))
    ours_params, tt_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name in ours.fusion_params():
        assert torch.equal(ours_params[name], tt_params[name])
    assert set(get_fusion_params(ours)) == set(ref.tt_fusion.get_fusion_params(theirs))

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 10, D, generator=gen)
    enc = torch.randn(2, 6, D, generator=gen)
    enc_mask = torch.rand(2, 10, 6, generator=gen) > 0.3
    enc_mask[0, :3] = False
    kwargs = dict(encoder_input=enc, encoder_mask=enc_mask)
    out_o, out_t = ours(x, **kwargs), theirs(x, **kwargs)
    assert_same(out_o, out_t)
    other_enc = torch.randn(2, 6, D, generator=gen)
    assert (ours(x, encoder_input=other_enc, encoder_mask=enc_mask) - out_o).abs().max() > 1e-2

    pos = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5, 6]).expand(2, -1)
    block = torch.block_diag(torch.ones(3, 3), torch.ones(7, 7)).bool()
    mask = (block & torch.tril(torch.ones(10, 10)).bool()).expand(2, -1, -1)
    assert_same(ours(x, mask=mask, input_pos=pos, **kwargs), theirs(x, mask=mask, input_pos=pos, **kwargs))
    # Text only: the fusion layer is skipped in both.
    assert_same(ours(x), theirs(x))


# -- 3. FusionEmbedding ---------------------------------------------------------------------------


@torch.no_grad()
def test_fusion_embedding_matches_torchtune() -> None:
    vocab, new, dim = 20, 4, 8
    theirs = ref.tt_fusion.FusionEmbedding(vocab, new, dim)
    ours = FusionEmbedding(vocab, new, dim)
    ref.randomize_(theirs, 6)
    # Same state-dict keys as torchtune's hooks produce.
    assert list(ours.state_dict()) == ["weight", "fusion_embedding.weight"]
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.fusion_params() == theirs.fusion_params()
    assert set(get_fusion_params(ours)) == set(ref.tt_fusion.get_fusion_params(theirs))
    assert set(get_fusion_params(ours)) == {"fusion_embedding.weight"}

    ids = torch.tensor([[0, 19, 20, 5, 23, 21], [22, 22, 1, 20, 19, 0]])  # base and new rows, both edges
    out_o, out_t = ours(ids), theirs(ids)
    assert torch.equal(out_o, out_t)
    assert torch.equal(out_o[0, 2], theirs.fusion_embedding.weight[0])
    assert torch.equal(out_o[0, 1], theirs.embedding.weight[19])

    # And back: torchtune loads our state dict.
    back = ref.tt_fusion.FusionEmbedding(vocab, new, dim)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(back(ids), out_o)


# -- 4. DeepFusionModel ---------------------------------------------------------------------------


class TinyEncoder(nn.Module):
    """A frozen "pretrained" backbone and a projection to the decoder width (the fusion module)."""

    def __init__(self, register) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(D_ENC, D_ENC), nn.GELU(), nn.Linear(D_ENC, D_ENC))
        self.proj = nn.Linear(D_ENC, D)
        register(self.proj)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(images))


def _model_pair(seed: int = 7, **flags: bool):
    theirs = ref.tt_fusion.DeepFusionModel(
        ref.tt_fused_decoder(ARGS, SLOTS, fusion_vocab_size=FUSION_VOCAB),
        TinyEncoder(ref.tt_fusion.register_fusion_module),
        **flags,
    )
    ours = DeepFusionModel(
        ref.ours_fused_decoder(ARGS, SLOTS, fusion_vocab_size=FUSION_VOCAB),
        TinyEncoder(register_fusion_module),
        **flags,
    )
    ref.randomize_(theirs, seed)
    ref.set_gates_(theirs, (0.7, -0.4))
    ref.copy_tt_into_ours(theirs, ours)
    assert_gates_open(theirs, ours)
    return theirs.eval(), ours.eval()


def _tokens(b: int, s: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS.vocab_size, (b, s), generator=gen)
    tokens[:, 1] = ARGS.vocab_size  # an image token (new embedding row)
    tokens[0, -1] = ARGS.vocab_size + 2
    return tokens


@torch.no_grad()
def test_deep_fusion_model_logits_match_torchtune() -> None:
    theirs, ours = _model_pair()
    b, s, s_e = 2, 12, 6
    gen = torch.Generator().manual_seed(8)
    tokens = _tokens(b, s, 9)
    images = {"images": torch.randn(b, s_e, D_ENC, generator=gen)}
    enc_mask = torch.ones(b, s, s_e, dtype=torch.bool)
    enc_mask[0, :1] = False  # text before the image sees nothing
    enc_mask[1, :, 4:] = False  # sample 1 sees only its first 4 embeddings

    # Causal default mask.
    kwargs = dict(encoder_input=images, encoder_mask=enc_mask)
    logits_o, logits_t = ours(tokens, **kwargs), theirs(tokens, **kwargs)
    assert logits_o.shape == (b, s, ARGS.vocab_size)
    assert_same(logits_o, logits_t)
    other_images = {"images": torch.randn(b, s_e, D_ENC, generator=gen)}
    other = ours(tokens, encoder_input=other_images, encoder_mask=enc_mask)
    assert (other - logits_o).abs().max() > 1e-2, "encoder input must change the logits"
    assert_same(ours(tokens), theirs(tokens))  # text only

    # Two packed samples per row: block-causal mask, input_pos restarting at 0 for the second.
    split = 5
    block = torch.block_diag(torch.ones(split, split), torch.ones(s - split, s - split)).bool()
    mask = (block & torch.tril(torch.ones(s, s)).bool()).expand(b, -1, -1)
    pos = torch.cat([torch.arange(split), torch.arange(s - split)]).expand(b, -1)
    packed_mask = enc_mask.clone()
    packed_mask[:, split:, :3] = False  # the second sample's tokens see only the second image
    packed_mask[:, :split, 3:] = False
    kwargs = dict(mask=mask, input_pos=pos, encoder_input=images, encoder_mask=packed_mask)
    packed_o, packed_t = ours(tokens, **kwargs), theirs(tokens, **kwargs)
    assert_same(packed_o, packed_t)
    # The second sample doesn't see the first (changing its tokens leaves it alone).
    changed = tokens.clone()
    changed[:, 2:split] = (changed[:, 2:split] + 1) % ARGS.vocab_size
    assert torch.equal(ours(changed, **kwargs)[:, split:], packed_o[:, split:])
    assert (ours(changed, **kwargs)[:, :split] - packed_o[:, :split]).abs().max() > 1e-3


def test_deep_fusion_model_fusion_params_and_trainable_flags_match_torchtune() -> None:
    theirs, ours = _model_pair()
    tt_fusion_params = ref.tt_fusion.get_fusion_params(theirs)
    ours_fusion_params = get_fusion_params(ours)
    assert set(ours_fusion_params) == set(tt_fusion_params)
    # They're: both fusion layers, the new embedding rows and the registered projection.
    names = set(ours_fusion_params)
    assert "decoder.tok_embeddings.fusion_embedding.weight" in names
    assert {"encoder.proj.weight", "encoder.proj.bias"} <= names
    assert any(n.startswith("decoder.layers.1.fusion_layer.") for n in names)
    assert any(n.startswith("decoder.layers.3.fusion_layer.") for n in names)
    assert not any(".layer." in n or "backbone" in n for n in names)
    # After the key map, each fusion parameter's torchtune state-dict key holds the same values
    # as ours (fusion keys are never under the "layer." infix, so they map to themselves).
    ours_state, tt_state = ours.state_dict(), theirs.state_dict()
    for name in names:
        assert torch.equal(ours_state[name], tt_state[name])

    for decoder_trainable, encoder_trainable, fusion_trainable in itertools.product([False, True], repeat=3):
        flags = dict(
            decoder_trainable=decoder_trainable,
            encoder_trainable=encoder_trainable,
            fusion_trainable=fusion_trainable,
        )
        tt_model = ref.tt_fusion.DeepFusionModel(theirs.decoder, theirs.encoder, **flags)
        our_model = DeepFusionModel(ours.decoder, ours.encoder, **flags)
        tt_trainable = {
            ref.tt_param_name_to_ours(n) for n, p in tt_model.named_parameters() if p.requires_grad
        }
        our_trainable = {n for n, p in our_model.named_parameters() if p.requires_grad}
        assert our_trainable == tt_trainable, flags
        assert (names <= our_trainable) == fusion_trainable
        assert ("decoder.layers.0.attn.q_proj.weight" in our_trainable) == decoder_trainable
        assert ("encoder.backbone.0.weight" in our_trainable) == encoder_trainable


# -- 5. KV-cached decoding and output chunks --------------------------------------------------------

B, PROMPT, STEPS, S_E, ENC_MAX, DEC_MAX = 2, 6, 5, 6, 8, 16


def _prefill_encoder_mask(width: int) -> torch.Tensor:
    mask = torch.zeros(B, PROMPT, width, dtype=torch.bool)
    mask[:, :, :S_E] = True
    mask[0, :2] = False  # the first two tokens of sample 0 precede its image
    mask[1, :, 4:S_E] = False  # sample 1 sees only its first image (4 embeddings)
    return mask


def _step_encoder_mask(width: int) -> torch.Tensor:
    mask = torch.zeros(B, 1, width, dtype=torch.bool)
    mask[:, :, :S_E] = True
    mask[1, :, :4] = False  # later tokens of sample 1 see only its second image
    return mask


def _decode(model, tokens, images, *, torchtune_style: bool, feed=None):
    """Prefill with the encoder input, then STEPS single-token steps.

    ``torchtune_style``: explicit self-attention masks ``[b, s, DEC_MAX]`` and encoder masks
    padded to ``[b, s, ENC_MAX]``, ``input_pos`` ``[b, s]`` (what torchtune requires). Otherwise
    (ours only): ``mask=None`` (causal by input_pos), encoder masks of the real width ``S_E``,
    1-D ``input_pos``. ``feed`` gives the tokens to feed at each step (default: greedy).
    """
    causal = torch.tril(torch.ones(DEC_MAX, DEC_MAX, dtype=torch.bool))
    enc_width = ENC_MAX if torchtune_style else S_E

    def pos_of(p: torch.Tensor) -> torch.Tensor:
        return p[None].expand(B, -1) if torchtune_style else p

    positions = torch.arange(PROMPT)
    logits = model(
        tokens,
        mask=causal[None, :PROMPT].expand(B, -1, -1) if torchtune_style else None,
        encoder_input=images,
        encoder_mask=_prefill_encoder_mask(enc_width),
        input_pos=pos_of(positions),
    )
    all_logits, fed = [logits], []
    for step in range(STEPS):
        position = PROMPT + step
        token = feed[step] if feed is not None else logits[:, -1:].argmax(-1)
        fed.append(token)
        logits = model(
            token,
            mask=causal[None, position : position + 1].expand(B, -1, -1) if torchtune_style else None,
            encoder_mask=_step_encoder_mask(enc_width),
            input_pos=pos_of(torch.tensor([position])),
        )
        all_logits.append(logits)
    return all_logits, fed


@torch.no_grad()
def test_kv_cached_decoding_matches_torchtune() -> None:
    theirs, ours = _model_pair(seed=11)
    gen = torch.Generator().manual_seed(12)
    tokens = _tokens(B, PROMPT, 13)
    images = {"images": torch.randn(B, S_E, D_ENC, generator=gen)}
    for model in (theirs, ours):
        model.setup_caches(B, torch.float32, encoder_max_seq_len=ENC_MAX, decoder_max_seq_len=DEC_MAX)
        assert model.caches_are_setup() and model.caches_are_enabled()

    tt_logits, fed = _decode(theirs, tokens, images, torchtune_style=True)
    assert theirs.decoder.layers[1].fusion_layer.attn.kv_cache.size == S_E  # encoder keys cached
    ours_explicit, _ = _decode(ours, tokens, images, torchtune_style=True, feed=fed)
    ours.reset_caches()
    ours_default, _ = _decode(ours, tokens, images, torchtune_style=False, feed=fed)
    assert len(tt_logits) == STEPS + 1
    for t, a, c in zip(tt_logits, ours_explicit, ours_default):
        assert_same(a, t)
        assert_same(c, t)

    # Cached steps equal one uncached forward over the whole sequence (a fresh uncached pair).
    fresh_t, fresh_o = _model_pair(seed=11)
    sequence = torch.cat([tokens, *fed[:-1]], dim=1)
    enc_mask = torch.cat([_prefill_encoder_mask(S_E), _step_encoder_mask(S_E).expand(B, STEPS - 1, S_E)], 1)
    full_t = fresh_t(sequence, encoder_input=images, encoder_mask=enc_mask)
    full_o = fresh_o(sequence, encoder_input=images, encoder_mask=enc_mask)
    assert_same(full_o, full_t)
    cached = torch.cat([tt_logits[0], *tt_logits[1:-1]], dim=1)
    torch.testing.assert_close(cached, full_t, atol=1e-5, rtol=1e-5)

    # The encoder input mattered, and both reset their caches for a new prompt.
    ours.reset_caches()
    theirs.reset_caches()
    other_images = {"images": torch.randn(B, S_E, D_ENC, generator=gen)}
    tt_other, _ = _decode(theirs, tokens, other_images, torchtune_style=True, feed=fed)
    assert (tt_other[-1] - tt_logits[-1]).abs().max() > 1e-2
    ours_other, _ = _decode(ours, tokens, other_images, torchtune_style=True, feed=fed)
    for a, t in zip(ours_other, tt_other):
        assert_same(a, t)


@torch.no_grad()
def test_kv_cached_left_padded_batch_matches_torchtune() -> None:
    """torchtune's generation convention for prompts of different lengths: left-pad, positions
    ``cumsum(padding_mask) - 1`` per row, masks that hide the pad slots. Row 0 is the padded one."""
    theirs, ours = _model_pair(seed=11)
    for model in (theirs, ours):
        model.setup_caches(B, torch.float32, encoder_max_seq_len=S_E, decoder_max_seq_len=DEC_MAX)
    not_pad = torch.ones(B, DEC_MAX, dtype=torch.bool)
    not_pad[0, :2] = False
    pos = (not_pad[:, :PROMPT].long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.tril(torch.ones(DEC_MAX, DEC_MAX, dtype=torch.bool))
    mask = (causal[None, :PROMPT] & not_pad[:, None, :]) | torch.eye(DEC_MAX, dtype=torch.bool)[None, :PROMPT]
    tokens = _tokens(B, PROMPT, 13)
    images = {"images": torch.randn(B, S_E, D_ENC, generator=torch.Generator().manual_seed(3))}
    enc_mask = torch.ones(B, PROMPT, S_E, dtype=torch.bool)
    kwargs = dict(mask=mask, encoder_input=images, encoder_mask=enc_mask, input_pos=pos)
    assert_same(ours(tokens, **kwargs), theirs(tokens, **kwargs))
    step = dict(
        mask=causal[None, PROMPT : PROMPT + 1] & not_pad[:, None, :],
        encoder_mask=enc_mask[:, :1],
        input_pos=pos[:, -1:] + 1,
    )
    token = tokens[:, :1]
    assert_same(ours(token, **step), theirs(token, **step))


@torch.no_grad()
def test_output_chunks_match_torchtune() -> None:
    theirs, ours = _model_pair(seed=14)
    tokens = _tokens(2, 12, 15)
    images = {"images": torch.randn(2, S_E, D_ENC, generator=torch.Generator().manual_seed(16))}
    kwargs = dict(encoder_input=images, encoder_mask=torch.ones(2, 12, S_E, dtype=torch.bool))
    full = ours(tokens, **kwargs)
    for chunks in (3, 5):  # 12 tokens in 5 chunks: torch.chunk gives 4 of 3
        theirs.set_num_output_chunks(chunks)
        ours.set_num_output_chunks(chunks)
        out_t, out_o = theirs(tokens, **kwargs), ours(tokens, **kwargs)
        assert isinstance(out_o, list) and len(out_o) == len(out_t) == len(full.chunk(chunks, dim=1))
        for a, t in zip(out_o, out_t):
            assert_same(a, t)
        assert_same(torch.cat(out_o, dim=1), full)
