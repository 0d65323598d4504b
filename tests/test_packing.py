"""Packed rows compute exactly what their samples compute alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusiontrain.data.batch import Sample, collate_padded
from fusiontrain.data.packing import FirstFitPacker, collate_padding_free, collate_rows
from fusiontrain.families.fixed_size_image import FixedSizeImage
from fusiontrain.families.mllama.tiles import MllamaTiles
from fusiontrain.modules.masks import block_causal_mask
from fusiontrain.train.step import loss_sum
from tests.helpers.tiny_models import IMAGE_TOKEN, random_mllama

SPEC = MllamaTiles(image_size=28, tokens_per_tile=5, max_num_tiles=2)
SEQ_LEN = 40


def _image(ratio: int, seed: int) -> dict[str, torch.Tensor]:
    tiles = 1 if ratio == 1 else 2
    pixels = torch.zeros(2, 3, 28, 28)
    pixels[:tiles] = torch.randn(tiles, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    mask = torch.tensor([1, int(tiles == 2)])
    return {"pixel_values": pixels, "aspect_ratio_ids": torch.tensor(ratio), "aspect_ratio_mask": mask}


def _sample(length: int, image_at: list[int], seed: int) -> Sample:
    """``length`` tokens with image tokens at ``image_at``; spans follow the Llama 3.2 rule."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 128, (length,), generator=generator)
    for position in image_at:
        tokens[position] = IMAGE_TOKEN
    labels = torch.cat([tokens[1:], torch.tensor([-100])])
    labels[labels == IMAGE_TOKEN] = -100  # image tokens are inputs, never targets
    ends = image_at[1:] + [length]
    spans = [(start, end) for start, end in zip(image_at, ends)]
    images = [_image(1 + (seed + k) % 3, seed * 10 + k) for k in range(len(image_at))]
    return Sample(tokens, labels, images, spans, origin=f"test:{seed}")


SAMPLES = [
    _sample(9, [0], seed=1),  # image first
    _sample(12, [3, 8], seed=2),  # text, image, text, image, text
    _sample(6, [], seed=3),  # text only
    _sample(10, [4], seed=4),  # text before its image
]


def _alone(model, sample: Sample) -> torch.Tensor:
    """Logits of ``sample`` run by itself: no padding, no other sample."""
    encoder_input = SPEC.collate([sample.images])
    encoder_mask = None
    if sample.images:
        encoder_mask = torch.zeros(1, len(sample), len(sample.images) * SPEC.max_tokens_per_image, dtype=torch.bool)
        for k, ((start, end), image) in enumerate(zip(sample.image_spans, sample.images)):
            for tile in range(2):  # only real tiles are seen (MllamaProcessor's cross_attention_mask)
                if image["aspect_ratio_mask"][tile]:
                    first = k * SPEC.max_tokens_per_image + tile * 5
                    encoder_mask[0, start:end, first : first + 5] = True
    with torch.no_grad():
        return model(sample.tokens[None], encoder_input=encoder_input, encoder_mask=encoder_mask)[0]


def _packed(model, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    packer = FirstFitPacker(SEQ_LEN, max_images=4, max_open_rows=1)
    rows = []
    for index, sample in enumerate(samples):
        rows += packer.add(index, sample)
    rows += packer.flush()
    assert len(rows) == 1, "the samples are meant to share one row"
    batch = collate_rows(rows, SEQ_LEN, SPEC)
    with torch.no_grad():
        logits = model(
            batch.tokens,
            mask=batch.self_attention_mask(),
            encoder_input=batch.encoder_input,
            encoder_mask=batch.encoder_mask,
            input_pos=batch.input_pos,
        )[0]
    offsets = [0]
    for sample in rows[0].samples:
        offsets.append(offsets[-1] + len(sample))
    return logits, batch.labels[0], offsets


def test_packed_per_token_losses_equal_each_sample_alone() -> None:
    model = random_mllama(seed=5)
    logits, labels, offsets = _packed(model, SAMPLES)
    packed_losses = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    for index, sample in enumerate(SAMPLES):
        alone = F.cross_entropy(_alone(model, sample), sample.labels, ignore_index=-100, reduction="none")
        span = slice(offsets[index], offsets[index + 1])
        torch.testing.assert_close(packed_losses[span], alone, atol=1e-5, rtol=1e-5, msg=f"sample {index}")
        assert labels[offsets[index + 1] - 1] == -100, "a sample's last token must not predict the next sample"


def test_another_samples_image_leaves_logits_bitwise_unchanged() -> None:
    model = random_mllama(seed=6)
    before, _, offsets = _packed(model, SAMPLES)
    changed = [*SAMPLES]
    first = SAMPLES[0]
    changed[0] = Sample(first.tokens, first.labels, [_image(3, 999)], first.image_spans)
    after, _, _ = _packed(model, changed)
    assert (after[offsets[0] : offsets[1]] - before[offsets[0] : offsets[1]]).abs().max() > 1e-3
    assert torch.equal(after[offsets[1] :], before[offsets[1] :])


def test_text_before_an_image_in_a_pack_gets_no_image_signal() -> None:
    model = random_mllama(seed=7)
    logits, _, offsets = _packed(model, SAMPLES)
    sample = SAMPLES[3]  # its image token is at 4
    without_images = Sample(sample.tokens, sample.labels)
    text_only = _alone(model, without_images)
    first = offsets[3]
    torch.testing.assert_close(logits[first : first + 4], text_only[:4], atol=1e-5, rtol=1e-5)
    assert (logits[first + 4 : offsets[4]] - text_only[4:]).abs().max() > 1e-3


def test_packed_row_layout() -> None:
    packer = FirstFitPacker(SEQ_LEN, max_images=4, max_open_rows=1)
    rows = [row for i, s in enumerate(SAMPLES) for row in packer.add(i, s)] + packer.flush()
    batch = collate_rows(rows, SEQ_LEN, SPEC)
    assert batch.input_pos[0, :9].tolist() == list(range(9))
    assert batch.input_pos[0, 9:21].tolist() == list(range(12))
    assert batch.segment_ids[0, :9].unique().tolist() == [0]
    assert batch.segment_ids[0, 37:].unique().tolist() == [4]  # padding
    assert not batch.encoder_mask[0, 37:].any() and (batch.labels[0, 37:] == -100).all()
    mask = block_causal_mask(batch.segment_ids)
    assert not mask[0, 9, :9].any() and mask[0, 9, 9] and not mask[0, 9, 10]
    # sample 1's tokens see only its own image slots (slots 1 and 2), from their image tokens on
    columns = batch.encoder_mask[0, 9:21].nonzero()[:, 1].unique()
    assert columns.min() >= 10 and columns.max() < 30
    assert not batch.encoder_mask[0, 9:12].any()
    assert batch.encoder_input["pixel_values"].shape == (1, 4, 2, 3, 28, 28)


def test_padding_free_row_layout() -> None:
    batch = collate_padding_free(SAMPLES, SEQ_LEN, SPEC)
    padded = collate_padded(SAMPLES, SEQ_LEN, SPEC)
    assert padded.tokens.shape == (4, 16) and batch.tokens.shape == (1, 40)  # 37 real tokens, rounded up to 8
    assert torch.equal(batch.tokens[batch.is_real], padded.tokens[padded.is_real])
    assert torch.equal(batch.labels[batch.is_real], padded.labels[padded.is_real])
    assert batch.input_pos[0, 9:21].tolist() == list(range(12)) and batch.segment_ids[0, 37:].unique().tolist() == [4]
    assert batch.encoder_input["pixel_values"].shape == (1, 4, 2, 3, 28, 28)  # 4 images; padded: 4 rows x 2 slots
    with pytest.raises(ValueError, match="does not fit batch.seq_len=10"):
        collate_padding_free(SAMPLES, 10, SPEC)


def test_padding_free_rows_train_as_the_padded_rows_do() -> None:
    """The same samples in one padding-free row or in one padded row each: the same summed loss
    and the same gradient of every parameter (encoder, fusion layers, decoder), on the CPU path the
    trainer takes (packed layouts, target positions only, chunked loss)."""
    model = random_mllama(seed=8)
    model.set_skip_output_projection(True)
    model.requires_grad_(True)  # every weight, the frozen ones of a fusion-only run included
    results = []
    for collate in (collate_padded, collate_padding_free):
        batch = collate(SAMPLES, SEQ_LEN, SPEC).with_target_index(-100)
        model.zero_grad()
        loss = loss_sum(model, batch, num_output_chunks=3, ignore_index=-100, flex_attention=False)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (padded_loss, padded_grads), (free_loss, free_grads) = results
    assert padded_grads.keys() == free_grads.keys() and len(padded_grads) == len(list(model.parameters()))
    torch.testing.assert_close(free_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for name, grad in padded_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(free_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_first_fit_fills_earlier_rows_and_respects_caps() -> None:
    def text(n: int, images: int = 0) -> Sample:
        return _sample(n, list(range(images)), seed=n)

    packer = FirstFitPacker(seq_len=10, max_images=2, max_open_rows=2)
    closed = []
    closed += packer.add("a", text(7))
    closed += packer.add("b", text(6))  # does not fit row 1 -> row 2
    closed += packer.add("c", text(3))  # first fit: row 1 (7 + 3 = 10, closes full)
    assert [row.keys for row in closed] == [["a", "c"]]
    closed = packer.add("d", text(5, images=2))  # row 2 has 6 tokens; opens a new row
    closed += packer.add("e", text(2, images=1))  # fits row 2 by tokens (8); images 1 <= 2
    closed += packer.add("f", text(1, images=1))  # row 2 has 8 tokens; row 3 full of images -> row 2
    assert packer.state() == [["b", "e", "f"], ["d"]]
    closed += packer.add("g", text(6))  # no room anywhere, 2 rows open -> close the fullest
    assert [row.keys for row in closed] == [["b", "e", "f"]]
    for row in closed + packer.flush():
        assert row.num_tokens <= 10 and row.num_images <= 2


def test_placeholder_image_changes_no_output() -> None:
    """A text-only batch given a blank, unseen image slot (so every FSDP rank runs the encoder)
    computes bitwise the same logits as without it."""
    from fusiontrain.data.batch import collate_padded, with_placeholder_image

    model = random_mllama(seed=8)
    batch = collate_padded([SAMPLES[2], _sample(5, [], seed=9)], 16, SPEC)
    assert batch.encoder_input is None
    with torch.no_grad():
        plain = model(batch.tokens)
        batch = with_placeholder_image(batch, SPEC)
        assert batch.encoder_input["aspect_ratio_mask"][:, 0, 0].tolist() == [1, 1]
        padded = model(batch.tokens, encoder_input=batch.encoder_input, encoder_mask=batch.encoder_mask)
    assert torch.equal(plain, padded)


def test_block_mask_for_flex_attention_matches_the_dense_mask() -> None:
    """The GPU path's BlockMask encodes the same pattern: flex_attention with it equals SDPA with
    the dense mask (forward only: flex_attention has no CPU backward in torch 2.13)."""
    from torch.nn.attention.flex_attention import flex_attention

    from fusiontrain.modules.masks import block_causal_block_mask
    from fusiontrain.modules.attention import attend

    packer = FirstFitPacker(SEQ_LEN, max_images=4, max_open_rows=1)
    rows = [row for i, s in enumerate(SAMPLES) for row in packer.add(i, s)] + packer.flush()
    segments = collate_rows(rows, SEQ_LEN, SPEC).segment_ids
    q, k, v = torch.randn(3, 1, 4, SEQ_LEN, 16).unbind(0)
    dense = attend(q, k, v, mask=block_causal_mask(segments))
    with torch.no_grad():
        flex = flex_attention(q, k, v, block_mask=block_causal_block_mask(segments))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    assert torch.equal(attend(q, k, v, mask=block_causal_block_mask(segments)), flex)


def test_padding_tiles_are_never_seen() -> None:
    """A 1-tile image in a 2-tile encoder: text sees its 5 real-tile tokens, not the padding tile's
    (what MllamaProcessor's cross_attention_mask and encoder_mask_from_cross_attention_mask give)."""
    from fusiontrain.data.batch import collate_padded
    from fusiontrain.models import encoder_mask_from_cross_attention_mask

    sample = _sample(6, [0], seed=3)  # ratio 1 + (3 % 3) = 1: one tile
    assert sample.images[0]["aspect_ratio_mask"].tolist() == [1, 0]
    hf_cross = torch.zeros(1, 6, 1, 2, dtype=torch.long)
    hf_cross[0, :, 0, 0] = 1
    want = encoder_mask_from_cross_attention_mask(hf_cross, tokens_per_tile=5)
    assert torch.equal(collate_padded([sample], 8, SPEC).encoder_mask[:, :6], want)
    packer = FirstFitPacker(SEQ_LEN, max_images=4, max_open_rows=1)
    rows = packer.add(0, sample) + packer.flush()
    assert torch.equal(collate_rows(rows, SEQ_LEN, SPEC).encoder_mask[:, :6], want)


# -- images with their own token counts (variable-resolution encoders) -----------------------------


class _VariableTokens(FixedSizeImage):
    """A format whose images yield ``image["n"]`` encoder tokens each, packed back to back in a
    row (the layout of SigLIP2 NaFlex), to test packing and masks apart from any encoder."""

    def num_tokens(self, image: dict[str, torch.Tensor]) -> int:
        return int(image["n"])

    def layout(self, per_row: list[list[dict[str, torch.Tensor]]]) -> tuple[list[list[int]], int]:
        offsets = [[sum(self.num_tokens(i) for i in images[:k]) for k in range(len(images))] for images in per_row]
        width = max((sum(self.num_tokens(i) for i in images) for images in per_row), default=0)
        return offsets, width

    def collate(self, per_row: list[list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor] | None:
        counts = [[int(image["n"]) for image in images] for images in per_row]
        return {"counts": torch.tensor([sum(row) for row in counts])} if any(counts) else None


def _counted(n: int, length: int, seed: int) -> Sample:
    tokens = torch.randint(4, 128, (length,), generator=torch.Generator().manual_seed(seed))
    tokens[0] = IMAGE_TOKEN
    return Sample(tokens, tokens.clone(), [{"n": torch.tensor(n)}], [(0, length)], origin=f"n{n}")


def test_rows_are_bounded_by_encoder_tokens_when_images_differ() -> None:
    """Packing counts encoder tokens, not image slots: 3 + 6 tokens fit a 10-token row, 6 + 6 do
    not, though both are two images and the row has room for four."""
    image_format = _VariableTokens(image_size=4, tokens_per_image=6)
    packer = FirstFitPacker(SEQ_LEN, max_images=4, max_open_rows=4, image_format=image_format, max_encoder_tokens=10)
    rows = []
    for index, sample in enumerate([_counted(3, 5, 1), _counted(6, 5, 2), _counted(6, 5, 3), _counted(1, 5, 4)]):
        rows += packer.add(index, sample)
    rows += packer.flush()
    assert [row.keys for row in rows] == [[0, 1, 3], [2]]
    assert [row.encoder_tokens for row in rows] == [10, 6]

    batch = collate_rows(rows, SEQ_LEN, image_format)
    assert batch.encoder_mask.shape == (2, SEQ_LEN, 10)  # s_e: the fullest row's tokens, not 4 x 6
    # Row 0: sample 0 sees columns 0-2, sample 1 columns 3-8, sample 3 column 9; nothing else.
    want = torch.zeros(SEQ_LEN, 10, dtype=torch.bool)
    want[0:5, 0:3], want[5:10, 3:9], want[10:15, 9:10] = True, True, True
    assert torch.equal(batch.encoder_mask[0], want)
    assert batch.encoder_mask[1, :5, :6].all() and not batch.encoder_mask[1, 5:].any()

    with pytest.raises(ValueError, match="12 encoder tokens"):
        packer.add(9, Sample(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), [{"n": torch.tensor(12)}], [(0, 4)]))
