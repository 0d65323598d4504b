"""The tiny Hugging Face fixtures build, save, reload strictly, and run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks.models import mllama_pixel_inputs
from fusiontrain import tiny


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _load_strict(cls, path: Path):
    model, info = cls.from_pretrained(path, output_loading_info=True, attn_implementation="eager")
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[key], (key, info[key])
    return model.eval()


def _mllama_text_batch() -> dict[str, torch.Tensor]:
    """Two samples: one image then text; two images, text after each."""
    input_ids = torch.tensor([[128, 1, 40, 41, 42, 43, 44], [128, 1, 45, 46, 128, 47, 48]])
    cross_attention_mask = torch.zeros(2, 7, 2, 2, dtype=torch.long)
    cross_attention_mask[0, :, 0, :1] = 1
    cross_attention_mask[1, :, 0, :2] = 1
    cross_attention_mask[1, 4:, 1, :2] = 1
    return {"input_ids": input_ids, "cross_attention_mask": cross_attention_mask}


# ------------------------------------------------------------------------------------ Mllama


def test_tiny_mllama_config_values() -> None:
    cfg = tiny.tiny_mllama_config()
    tc, vc = cfg.text_config, cfg.vision_config
    assert (tc.vocab_size, tc.hidden_size, tc.num_hidden_layers) == (128, 64, 6)
    assert tc.cross_attention_layers == [1, 4]
    assert tc.rope_parameters["rope_type"] == "llama3"
    assert vc.vision_output_dim == vc.hidden_size * (1 + len(vc.intermediate_layers_indices))
    assert vc.image_size % vc.patch_size == 0
    assert cfg.image_token_index == tiny.IMAGE_TOKEN_ID
    over = tiny.tiny_mllama_config(text_config={"num_hidden_layers": 3, "cross_attention_layers": [2]})
    assert over.text_config.num_hidden_layers == 3 and over.text_config.hidden_size == 64


@pytest.mark.parametrize("sharded", [False, True])
def test_tiny_mllama_roundtrip(tmp_path: Path, sharded: bool) -> None:
    from transformers import MllamaForConditionalGeneration

    path, model = tiny.save_tiny_mllama(tmp_path / "m", sharded=sharded)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    if sharded:
        assert len(shards) > 1
        assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(shards)
    else:
        assert shards == ["model.safetensors"]
    loaded = _load_strict(MllamaForConditionalGeneration, path)
    _assert_same_state(model, loaded)

    # Every zero-initialised gate is non-zero and distinct; extra embedding rows are non-zero.
    names = ("cross_attn_attn_gate", "cross_attn_mlp_gate", "gated_positional_embedding.gate",
             "pre_tile_positional_embedding.gate", "post_tile_positional_embedding.gate")
    gates = [p.item() for n, p in loaded.named_parameters() if n.endswith(names)]
    assert len(gates) == 2 * 2 + 3
    assert all(g != 0.0 for g in gates) and len(set(gates)) == len(gates)
    emb = loaded.get_input_embeddings().weight
    assert emb.shape == (128 + 8, 64)
    assert (emb[128:].abs().sum(-1) > 0).all()

    batch = _mllama_text_batch()
    pixels = mllama_pixel_inputs(loaded.config, batch_images=[[1], [2, 3]])
    with torch.no_grad():
        a = loaded(**batch, **pixels).logits
        b = model(**batch, **pixels).logits
    assert a.shape == (2, 7, 128) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_tiny_mllama_image_changes_logits(tiny_mllama_dir: Path) -> None:
    from transformers import MllamaForConditionalGeneration

    model = _load_strict(MllamaForConditionalGeneration, tiny_mllama_dir)
    batch = _mllama_text_batch()
    px0 = mllama_pixel_inputs(model.config, batch_images=[[1], [2, 3]], seed=0)
    px1 = mllama_pixel_inputs(model.config, batch_images=[[1], [2, 3]], seed=1)
    with torch.no_grad():
        text_only = model(input_ids=batch["input_ids"]).logits
        with0 = model(**batch, **px0).logits
        with1 = model(**batch, **px1).logits
    # Positions after the first image token see the image; both samples, all of them.
    assert ((with0 - text_only).abs().amax(-1)[:, 1:] > 1e-4).all()
    assert ((with0 - with1).abs().amax(-1)[:, 1:] > 1e-4).all()


def test_zero_gates_make_images_irrelevant(tmp_path: Path) -> None:
    """Sanity check of the fixture's purpose: with HF's zero init an image changes nothing."""
    _, model = tiny.save_tiny_mllama(tmp_path / "z", nonzero_gates=False, save_tokenizer=False)
    batch = _mllama_text_batch()
    px0 = mllama_pixel_inputs(model.config, batch_images=[[1], [2, 3]], seed=0)
    px1 = mllama_pixel_inputs(model.config, batch_images=[[1], [2, 3]], seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, **px0).logits, model(**batch, **px1).logits)


def test_mllama_pixel_inputs_layout() -> None:
    cfg = tiny.tiny_mllama_config()
    px = mllama_pixel_inputs(cfg, batch_images=[[1], [2, 3], []])
    assert px["pixel_values"].shape == (3, 2, 2, 3, 28, 28)
    assert px["aspect_ratio_ids"].tolist() == [[1, 0], [2, 3], [0, 0]]
    # HF processor quirk: the first tile of every image slot, padding included, is marked.
    assert px["aspect_ratio_mask"].tolist() == [[[1, 0], [1, 0]], [[1, 1], [1, 1]], [[1, 0], [1, 0]]]
    real = px["pixel_values"].flatten(3).abs().sum(-1) > 0
    assert real.tolist() == [[[True, False], [False, False]], [[True, True], [True, True]],
                             [[False, False], [False, False]]]
    strict = mllama_pixel_inputs(cfg, batch_images=[[1], [2, 3]], hf_padding_quirk=False)
    assert strict["aspect_ratio_mask"].tolist() == [[[1, 0], [0, 0]], [[1, 1], [1, 1]]]
    with pytest.raises(ValueError):
        mllama_pixel_inputs(cfg, batch_images=[[4]])


def test_tiny_tokenizer_and_processor(tiny_mllama_dir: Path) -> None:
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_mllama_dir)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<|image|>") == 128
    ids = tok("<|image|>Hi, cat!")["input_ids"]
    assert ids[:2] == [1, 128] and len(ids) == 2 + len("Hi, cat!")
    assert tok.decode(ids, skip_special_tokens=True) == "Hi, cat!"

    proc = AutoProcessor.from_pretrained(tiny_mllama_dir)
    assert type(proc).__name__ == "MllamaProcessor"
    # The processor's tiling must agree with the model config's aspect-ratio ids.
    wide = Image.fromarray((np.random.default_rng(0).random((28, 56, 3)) * 255).astype("uint8"))
    out = proc(images=[[wide]], text=["<|image|>a cat"], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 1, 2, 3, 28, 28)
    assert out["cross_attention_mask"].shape[-2:] == (1, 2)
    assert out["aspect_ratio_mask"].tolist() == [[[1, 1]]]


# ------------------------------------------------------------------------------------ Llama


def test_tiny_llama_roundtrip(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    path, model = tiny.save_tiny_llama(tmp_path / "llama")
    loaded = _load_strict(LlamaForCausalLM, path)
    _assert_same_state(model, loaded)
    cfg = loaded.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (128, 64, 4)
    assert not cfg.tie_word_embeddings
    assert cfg.rope_parameters["rope_type"] == "llama3"
    assert not torch.equal(loaded.lm_head.weight, loaded.get_input_embeddings().weight)
    ids = AutoTokenizer.from_pretrained(path)("hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = loaded(ids).logits, model(ids).logits
    assert a.shape == (1, 6, 128)
    torch.testing.assert_close(a, b)


def test_tiny_llama_fixture_dir(tiny_llama_dir: Path) -> None:
    assert (tiny_llama_dir / "model.safetensors").is_file()
    assert (tiny_llama_dir / "tokenizer.json").is_file()


# ------------------------------------------------------------------------------------ vision


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tiny_vision_roundtrip(tmp_path: Path, kind: str) -> None:
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, CLIPVisionModel, SiglipVisionModel

    save, cls, n_tokens = {
        "clip": (tiny.save_tiny_clip_vision, CLIPVisionModel, 5),  # 4 patches + CLS
        "siglip": (tiny.save_tiny_siglip_vision, SiglipVisionModel, 4),  # no CLS
    }[kind]
    path, model = save(tmp_path / kind)
    loaded = _load_strict(cls, path)
    _assert_same_state(model, loaded)
    assert type(AutoModel.from_pretrained(path)) is cls

    processor = AutoImageProcessor.from_pretrained(path)
    assert type(processor).__name__.endswith("ImageProcessorPil")
    image = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8"))
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 28, 28)
    with torch.no_grad():
        a = loaded(pixel_values=pixel_values).last_hidden_state
        b = model(pixel_values=pixel_values).last_hidden_state
    assert a.shape == (1, n_tokens, 32)
    torch.testing.assert_close(a, b)


def test_tiny_vision_fixture_dirs(tiny_clip_dir: Path, tiny_siglip_dir: Path) -> None:
    for path in (tiny_clip_dir, tiny_siglip_dir):
        assert (path / "model.safetensors").is_file()
        assert (path / "preprocessor_config.json").is_file()
