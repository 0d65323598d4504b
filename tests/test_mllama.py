"""Our Mllama DeepFusionModel against Hugging Face's MllamaForConditionalGeneration.

Every test loads the same saved HF folder into both and compares outputs. The fixture opens all
the gates that HF initialises to zero, so an image changes the logits and the parity tests can
fail (see test_images_change_the_logits).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fusiontrain.models import build_mllama, encoder_mask_from_cross_attention_mask, load_hf_mllama
from fusiontrain.families.mllama.model import mllama_args_from_config
from fusiontrain import tiny
from tests.helpers.tiny_models import mllama_batch_where_every_row_sees_an_image

TOKENS_PER_TILE = 5  # (28 // 14) ** 2 + 1


@pytest.fixture(scope="module")
def hf_model(tiny_mllama_dir: Path):
    from transformers import MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(tiny_mllama_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def our_model(tiny_mllama_dir: Path):
    return load_hf_mllama(tiny_mllama_dir).eval()


def _hf_logits(hf_model, tokens, pixels=None, cross=None) -> torch.Tensor:
    with torch.no_grad():
        if pixels is None:
            return hf_model(input_ids=tokens).logits
        return hf_model(input_ids=tokens, **pixels, cross_attention_mask=cross).logits


def _our_logits(model, tokens, pixels=None, cross=None) -> torch.Tensor:
    with torch.no_grad():
        if pixels is None:
            return model(tokens)
        mask = encoder_mask_from_cross_attention_mask(cross, TOKENS_PER_TILE)
        return model(tokens, encoder_input=pixels, encoder_mask=mask)


def test_logits_match_transformers(hf_model, our_model) -> None:
    tokens, pixels, cross = mllama_batch_where_every_row_sees_an_image()
    want = _hf_logits(hf_model, tokens, pixels, cross)
    got = _our_logits(our_model, tokens, pixels, cross)
    assert got.shape == want.shape == (2, 12, tiny.TEXT_VOCAB_SIZE)
    difference = (got - want).abs().max().item()
    print(f"max |ours - transformers| logits, with images: {difference:.3e}")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_text_only_logits_match_transformers(hf_model, our_model) -> None:
    tokens = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    want, got = _hf_logits(hf_model, tokens), _our_logits(our_model, tokens)
    print(f"max |ours - transformers| logits, text only: {(got - want).abs().max().item():.3e}")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_images_change_the_logits(hf_model, our_model) -> None:
    """The parity tests above could fail: each image, and its aspect ratio, moves the logits."""
    tokens, pixels, cross = mllama_batch_where_every_row_sees_an_image()
    base = _our_logits(our_model, tokens, pixels, cross)
    other_pixels = dict(pixels, pixel_values=pixels["pixel_values"].flip(-1))
    assert (_our_logits(our_model, tokens, other_pixels, cross) - base).abs().max() > 1e-3
    assert (_hf_logits(hf_model, tokens, other_pixels, cross) - _hf_logits(hf_model, tokens, pixels, cross)).abs().max() > 1e-3
    assert (_our_logits(our_model, tokens) - base).abs().max() > 1e-3


def test_padding_image_slots_are_not_encoded(our_model) -> None:
    """Row 0 holds one image in two slots, and ``image_slots`` lists the 3 real ones: the ViT sees
    those only, each one's embeddings equal it encoded alone, and the padding slot's columns are
    zero. (The logits test above runs the same batch against transformers, which encodes the
    padding slot.) The skip reads no index value: it runs on the meta device."""
    _, pixels, _ = mllama_batch_where_every_row_sees_an_image()
    assert pixels["aspect_ratio_ids"][0, 1] == 0 and (pixels["aspect_ratio_ids"].flatten() > 0).sum() == 3
    image_slots = torch.tensor([0, 2, 3])
    seen: list[torch.Size] = []
    hook = our_model.encoder.vision.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[:2]))
    try:
        with torch.no_grad():
            got = our_model.encoder(**pixels, image_slots=image_slots)
            every_slot = our_model.encoder(**pixels)
            alone = {
                (row, slot): our_model.encoder(**{key: value[row, slot][None, None] for key, value in pixels.items()})[0]
                for row, slot in [(0, 0), (1, 0), (1, 1)]
            }
    finally:
        hook.remove()
    assert seen[:2] == [(1, 3), (2, 2)]  # the batch's real images, in one batch of 3; then all 4 slots
    per_slot, every = got.view(2, 2, -1, got.shape[-1]), every_slot.view(2, 2, -1, got.shape[-1])
    for (row, slot), embeddings in alone.items():
        torch.testing.assert_close(per_slot[row, slot], embeddings, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(every[row, slot], embeddings, atol=1e-5, rtol=1e-5)
    assert per_slot[0, 1].eq(0).all() and all(e.abs().max() > 0 for e in alone.values())
    on_meta = copy.deepcopy(our_model.encoder).to("meta")
    out = on_meta(**{key: value.to("meta") for key, value in pixels.items()}, image_slots=image_slots.to("meta"))
    assert out.device.type == "meta" and out.shape == got.shape


def test_padding_image_slots_skipped_keep_the_projection_gradient(our_model) -> None:
    """The projection head trains: its gradient through the batch with a padding slot skipped
    equals the sum of its gradients through each real image alone."""
    _, pixels, _ = mllama_batch_where_every_row_sees_an_image()
    head = list(our_model.encoder.projection.parameters())
    assert head and all(p.requires_grad for p in head)
    columns = 2 * TOKENS_PER_TILE  # per image: 2 tiles
    width = our_model.encoder.projection.output.out_features
    weights = torch.randn(2, 2, columns, width, generator=torch.Generator().manual_seed(3))

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, head))

    batch = our_model.encoder(**pixels, image_slots=torch.tensor([0, 2, 3])).view(2, 2, columns, -1)
    got = grads((batch * weights).sum())
    want = [torch.zeros_like(p) for p in head]
    for row, slot in [(0, 0), (1, 0), (1, 1)]:
        one = our_model.encoder(**{key: value[row, slot][None, None] for key, value in pixels.items()})[0]
        want = [w + g for w, g in zip(want, grads((one * weights[row, slot]).sum()))]
    for g, w in zip(got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_loads_the_same(tmp_path: Path, our_model) -> None:
    path, _ = tiny.save_tiny_mllama(tmp_path / "sharded", sharded=True, save_tokenizer=False)
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    sharded = load_hf_mllama(path)
    for (name, a), (_, b) in zip(our_model.named_parameters(), sharded.named_parameters()):
        assert torch.equal(a, b), name


_NEW_TO_LEGACY = {  # the two layouts transformers has used for Mllama tensor names
    "model.language_model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
    "model.vision_model.": "vision_model.",
    "model.multi_modal_projector.": "multi_modal_projector.",
}


def _rename(key: str, mapping: dict[str, str]) -> str:
    return next((new + key[len(old):] for old, new in mapping.items() if key.startswith(old)), key)


@pytest.mark.parametrize("layout", ["legacy", "current"])
def test_both_key_layouts_load_the_same(layout: str, tmp_path: Path, tiny_mllama_dir: Path, our_model) -> None:
    """transformers 5.23 saves Mllama in the legacy layout (``language_model.model.*``, as on the
    Hub); its in-memory names are the current one (``model.language_model.*``). Both load."""
    mapping = _NEW_TO_LEGACY if layout == "legacy" else {v: k for k, v in _NEW_TO_LEGACY.items()}
    folder = tmp_path / layout
    folder.mkdir()
    shutil.copy(tiny_mllama_dir / "config.json", folder / "config.json")
    tensors = {_rename(k, mapping): v for k, v in load_file(tiny_mllama_dir / "model.safetensors").items()}
    prefix = "language_model.model." if layout == "legacy" else "model.language_model."
    assert f"{prefix}embed_tokens.weight" in tensors
    save_file(tensors, folder / "model.safetensors")
    loaded = load_hf_mllama(folder)
    for (name, a), (_, b) in zip(our_model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name


def test_text_before_the_first_image_gets_no_image_signal(our_model) -> None:
    """Tokens 0-4 precede sample 0's image: their logits equal a forward with no image at all."""
    tokens, pixels, cross = mllama_batch_where_every_row_sees_an_image()
    tokens[0, 0], tokens[0, 5] = 7, tiny.IMAGE_TOKEN_ID
    cross[0, :5] = 0
    with_image = _our_logits(our_model, tokens, pixels, cross)
    text_only = _our_logits(our_model, tokens)
    assert not torch.isnan(with_image).any()
    torch.testing.assert_close(with_image[0, :5], text_only[0, :5], atol=1e-6, rtol=0)
    assert (with_image[0, 5:] - text_only[0, 5:]).abs().max() > 1e-3


def test_transformers_leaks_image_signal_into_text_before_the_image(hf_model, our_model) -> None:
    """Records transformers#39379: HF 5.23 zeroes only the MLP branch of a row that sees no image;
    its attention still spreads over every image token. Meta's reference, torchtune and we zero
    both, so on such rows HF differs from us (and from its own text-only forward)."""
    tokens, pixels, cross = mllama_batch_where_every_row_sees_an_image()
    tokens[0, 0], tokens[0, 5] = 7, tiny.IMAGE_TOKEN_ID
    cross[0, :5] = 0
    hf_with_image = _hf_logits(hf_model, tokens, pixels, cross)
    hf_text_only = _hf_logits(hf_model, tokens)
    ours = _our_logits(our_model, tokens, pixels, cross)
    leak = (hf_with_image[0, :5] - hf_text_only[0, :5]).abs().max().item()
    print(f"transformers#39379 leak on text rows before the image: {leak:.3e}")
    assert leak > 1e-3
    assert (hf_with_image[0, :5] - ours[0, :5]).abs().max() > 1e-3
    # the sample whose rows all see an image still agrees
    torch.testing.assert_close(ours[1], hf_with_image[1], atol=1e-5, rtol=0)


def test_processor_output_passes_straight_in(tiny_mllama_dir: Path, hf_model, our_model) -> None:
    """MllamaProcessor's keys go to the encoder unchanged; its cross_attention_mask converts to ours."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_mllama_dir)
    wide = Image.new("RGB", (60, 20), (200, 30, 30))
    tall = Image.new("RGB", (20, 50), (30, 200, 30))
    square = Image.new("RGB", (30, 30), (30, 30, 200))
    batch = processor(
        images=[[wide], [square, tall]],
        text=["<|image|>a red box", "<|image|>one<|image|>two"],
        padding=True,
        add_special_tokens=False,  # no BOS: every row then sees an image (see the #39379 test)
        return_tensors="pt",
    )
    encoder_input = {k: batch[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    assert batch["aspect_ratio_ids"].tolist() == [[2, 0], [1, 3]]  # 1x2, padding; 1x1, 2x1
    tokens = batch["input_ids"]
    encoder_mask = encoder_mask_from_cross_attention_mask(batch["cross_attention_mask"], TOKENS_PER_TILE)
    rows_that_see = encoder_mask.any(-1) & batch["attention_mask"].bool()
    assert rows_that_see.sum() == batch["attention_mask"].sum()
    with torch.no_grad():
        want = hf_model(**batch).logits
        got = our_model(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


def test_bf16_load_tracks_fp32(tiny_mllama_dir: Path, our_model) -> None:
    model = load_hf_mllama(tiny_mllama_dir, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens, pixels, cross = mllama_batch_where_every_row_sees_an_image()
    got = _our_logits(model, tokens, pixels, cross)
    want = _our_logits(our_model, tokens, pixels, cross)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_meta_build_allocates_no_weights(tiny_mllama_dir: Path) -> None:
    args = mllama_args_from_config(json.loads((tiny_mllama_dir / "config.json").read_text()))
    with torch.device("meta"):
        model = build_mllama(args)
    assert all(p.is_meta for p in model.parameters())
    assert not list(model.buffers())  # nothing to re-initialise after materialising


def test_encoder_mask_expands_each_tile_to_its_tokens() -> None:
    cross = torch.tensor([[[[1, 0], [0, 0]], [[1, 1], [0, 1]]]])  # [b=1, s=2, n_img=2, n_tiles=2]
    mask = encoder_mask_from_cross_attention_mask(cross, tokens_per_tile=3)
    expected = torch.tensor(
        [[[1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1]]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)
    padded = encoder_mask_from_cross_attention_mask(cross[..., :1], tokens_per_tile=1, num_tiles=2)
    assert padded.tolist() == [[[True, False, False, False], [True, False, False, False]]]


def test_load_errors_name_the_problem(tmp_path: Path, tiny_mllama_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_mllama(tmp_path / "nowhere")
    pickled_only = tmp_path / "pickled"
    pickled_only.mkdir()
    shutil.copy(tiny_mllama_dir / "config.json", pickled_only / "config.json")
    (pickled_only / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_hf_mllama(pickled_only)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    shutil.copy(tiny_mllama_dir / "config.json", incomplete / "config.json")
    tensors = load_file(tiny_mllama_dir / "model.safetensors")
    tensors.pop("language_model.lm_head.weight")
    save_file(tensors, incomplete / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['lm_head.weight'\]"):
        load_hf_mllama(incomplete)
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_mllama_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit"):
        load_hf_mllama(wrong)
