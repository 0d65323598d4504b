"""fusiontrain.inference.load (``python -m fusiontrain generate``): loading every kind of model folder,
prompt inputs equal to MllamaProcessor's, cached decoding equal to full forwards, the CLI's output
and errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from fusiontrain import tiny
from fusiontrain.checkpoint import layout
from fusiontrain.checkpoint.export import export_checkpoint
from fusiontrain.data.image_format import encoder_mask_rows
from fusiontrain.data.formats import image_spans
from fusiontrain.inference.generation import generate
from fusiontrain.inference.command import main
from fusiontrain.inference.load import InferenceError, build_prompt_inputs, load_for_inference
from fusiontrain.models import compose_from_hf, encoder_mask_from_cross_attention_mask, load_hf_mllama
from fusiontrain.modules import get_fusion_params
from tests.helpers.checkpoints import STEP, perturb, write_checkpoint

TOKENS_PER_TILE = 5  # (28 // 14) ** 2 + 1
MAX_TILES = 2
PROMPT = "What is it?"


# -- helpers ----------------------------------------------------------------------------------------


def _draw(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> Path:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((2, 2, size[0] // 2, size[1] - 3), fill=color)
    draw.rectangle((size[0] // 2, 3, size[0] - 3, size[1] // 2), fill=(color[2], color[0], color[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A square picture (1 tile of 2) and a wide one (2 tiles)."""
    folder = tmp_path_factory.mktemp("images")
    return {
        "square": _draw(folder / "square.png", (30, 30), (20, 180, 40)),
        "wide": _draw(folder / "wide.png", (64, 25), (200, 30, 30)),
    }


@pytest.fixture(scope="module")
def loaded(tiny_mllama_dir: Path):
    return load_for_inference(tiny_mllama_dir)


@pytest.fixture(scope="module")
def processor(tiny_mllama_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_mllama_dir)


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _decode(loaded, output: torch.Tensor, prompt_length: int) -> str:
    return loaded.tokenizer.decode(output[0, prompt_length:].tolist(), skip_special_tokens=True)


def _assert_same_parameters(got: torch.nn.Module, want: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
    for (name, a), (other, b) in zip(got.named_parameters(), want.named_parameters(), strict=True):
        assert name == other and a.dtype == dtype and torch.equal(a, b.to(dtype)), name


@pytest.fixture(scope="module")
def trained_mllama(tiny_mllama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(our Mllama with perturbed fusion parameters, its run folder, its checkpoint folder)."""
    model = load_hf_mllama(tiny_mllama_dir).eval()
    fusion = get_fusion_params(model)
    perturb(fusion, seed=3)
    run = tmp_path_factory.mktemp("run")
    base = {"family": "mllama", "folders": {"hf_mllama": str(tiny_mllama_dir)}}
    return model, run, write_checkpoint(run, {"fusion": fusion}, base)


# -- (1) cached decoding -----------------------------------------------------------------------------


def _greedy_without_cache(model, prompt, encoder_input, encoder_mask, steps: int) -> torch.Tensor:
    """Greedy decoding by a full forward over the growing sequence; new tokens see what the last
    prompt token sees."""
    tokens = prompt
    for _ in range(steps):
        new = tokens.shape[1] - prompt.shape[1]
        mask = torch.cat([encoder_mask, encoder_mask[:, -1:].expand(-1, new, -1)], dim=1)
        with torch.no_grad():
            logits = model(tokens, encoder_input=encoder_input, encoder_mask=mask)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def test_cached_decode_equals_full_forwards_on_the_cli_inputs(loaded, images: dict[str, Path]) -> None:
    tokens, encoder_input, encoder_mask = build_prompt_inputs(loaded, [images["square"], images["wide"]], "Compare.")
    got = generate(loaded.model, tokens, max_new_tokens=12, encoder_input=encoder_input, encoder_mask=encoder_mask)
    want = _greedy_without_cache(loaded.model, tokens, encoder_input, encoder_mask, steps=12)
    assert got.shape == (1, tokens.shape[1] + 12)
    assert torch.equal(got, want)
    assert not loaded.model.caches_are_setup()


# -- (2) inputs equal MllamaProcessor's -------------------------------------------------------------

CASES = {"one wide image": ["wide"], "square then wide": ["square", "wide"], "text only": []}


@pytest.mark.parametrize("case", list(CASES))
def test_inputs_equal_mllama_processor_and_its_chat_template(
    loaded, processor, images: dict[str, Path], case: str
) -> None:
    paths = [images[name] for name in CASES[case]]
    tokens, encoder_input, encoder_mask = build_prompt_inputs(loaded, paths, PROMPT)

    # The processor's chat template, tokenized by apply_chat_template.
    content = [{"type": "image", "path": str(path)} for path in paths] + [{"type": "text", "text": PROMPT}]
    messages = [{"role": "user", "content": content}]
    ref = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(tokens, ref["input_ids"])
    assert tokens[0, -1].item() != tiny.EOS_TOKEN_ID  # ends with the assistant header, open
    assert loaded.tokenizer.decode(tokens[0].tolist()).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")

    # The template rendered to text, then MllamaProcessor(images, text): the tokenizer adds its own BOS
    # in front of the template's (the known duplicated BOS); the rest is equal.
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pictures = [Image.open(path).convert("RGB") for path in paths]
    two_step = processor(images=[pictures] if pictures else None, text=[text], return_tensors="pt")
    ids = two_step["input_ids"][0].tolist()
    assert ids[:2] == [tiny.BOS_TOKEN_ID, tiny.BOS_TOKEN_ID]
    assert tokens[0].tolist() == ids[1:]

    if not paths:
        assert encoder_input is None and encoder_mask is None and "pixel_values" not in ref
        return
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(encoder_input[key], ref[key]), key
        assert torch.equal(encoder_input[key], two_step[key]), key
    want_mask = encoder_mask_from_cross_attention_mask(ref["cross_attention_mask"], TOKENS_PER_TILE, MAX_TILES)
    assert encoder_mask.dtype == torch.bool and torch.equal(encoder_mask, want_mask)


def test_padding_tiles_are_not_seen_and_logits_match_transformers(
    loaded, processor, tiny_mllama_dir: Path, images: dict[str, Path]
) -> None:
    """The square image fills 1 of 2 tiles: its padding tile is masked, as in HF, and our logits
    then equal transformers' (on a prompt where every token sees an image; transformers#39379
    differs on rows that see none). Seeing the padding tile too would change them."""
    from transformers import MllamaForConditionalGeneration

    pictures = [Image.open(images[name]).convert("RGB") for name in ("square", "wide")]
    ref = processor(images=[pictures], text=["<|image|><|image|>Compare."], add_special_tokens=False, return_tensors="pt")
    ids = ref["input_ids"][0].tolist()
    processed = [loaded.builder.transform(picture) for picture in pictures]
    mask, encoder_input = encoder_mask_rows([processed], [image_spans(ids, loaded.image_token_id)], loaded.image_format, len(ids))
    assert torch.equal(mask, encoder_mask_from_cross_attention_mask(ref["cross_attention_mask"], TOKENS_PER_TILE, MAX_TILES))
    assert not mask[0, :, TOKENS_PER_TILE : 2 * TOKENS_PER_TILE].any()  # the square image's padding tile
    hf = MllamaForConditionalGeneration.from_pretrained(tiny_mllama_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(**ref).logits
        got = loaded.model(ref["input_ids"], encoder_input=encoder_input, encoder_mask=mask)
        every_tile = loaded.model(
            ref["input_ids"], encoder_input=encoder_input, encoder_mask=mask | mask.any(-1, keepdim=True)
        )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (every_tile - want).abs().max() > 1e-3


# -- (3) the CLI on a HF folder -----------------------------------------------------------------------


def test_cli_prints_the_decoded_continuation(
    loaded, tiny_mllama_dir: Path, images: dict[str, Path], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(images["wide"].parent)  # a relative image path is relative to the working directory
    argv = ["--model", str(tiny_mllama_dir), "--image", "wide.png", "--prompt", PROMPT, "--max-new-tokens", "20"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err

    tokens, encoder_input, encoder_mask = build_prompt_inputs(loaded, [images["wide"]], PROMPT)
    output = generate(
        loaded.model,
        tokens,
        max_new_tokens=20,
        encoder_input=encoder_input,
        encoder_mask=encoder_mask,
        stop_token_ids=loaded.stop_token_ids(),
    )
    want = _decode(loaded, output, tokens.shape[1])
    assert want.strip()  # something to compare
    assert out == want + "\n"
    assert loaded.stop_token_ids() == (tiny.EOS_TOKEN_ID, loaded.tokenizer.convert_tokens_to_ids(tiny.EOT_TOKEN))


# -- (4) training checkpoints and exports -------------------------------------------------------------


def test_checkpoint_loads_the_trained_weights(trained_mllama, images: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    model, run, checkpoint = trained_mllama
    loaded = load_for_inference(checkpoint)
    assert (loaded.kind, loaded.family, loaded.path) == ("checkpoint", "mllama", checkpoint)
    _assert_same_parameters(loaded.model, model)
    assert not any(p.requires_grad for p in loaded.model.parameters())

    bf16 = load_for_inference(checkpoint, dtype=torch.bfloat16)
    _assert_same_parameters(bf16.model, model, torch.bfloat16)

    # A run folder means its latest complete checkpoint.
    assert load_for_inference(run).path == checkpoint

    # The CLI generates with the trained weights.
    argv = ["--model", str(checkpoint), "--image", str(images["wide"]), "--prompt", PROMPT, "--max-new-tokens", "12"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    tokens, encoder_input, encoder_mask = build_prompt_inputs(loaded, [images["wide"]], PROMPT)
    output = generate(
        model, tokens, max_new_tokens=12, encoder_input=encoder_input, encoder_mask=encoder_mask,
        stop_token_ids=loaded.stop_token_ids(),
    )
    assert out == _decode(loaded, output, tokens.shape[1]) + "\n"


def test_mllama_export_in_fusiontrain_format(trained_mllama, loaded, images: dict[str, Path], tmp_path: Path) -> None:
    model, _, checkpoint = trained_mllama
    out = export_checkpoint(checkpoint, tmp_path / "export", format="fusiontrain", dtype="fp32")
    exported = load_for_inference(out)
    assert (exported.kind, exported.family) == ("export", "mllama")
    _assert_same_parameters(exported.model, model)
    got = build_prompt_inputs(exported, [images["square"]], PROMPT)
    want = build_prompt_inputs(loaded, [images["square"]], PROMPT)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert all(torch.equal(got[1][key], want[1][key]) for key in want[1])


def test_composed_checkpoint_and_export(
    tiny_llama_dir: Path, tiny_clip_dir: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = compose_from_hf(tiny_llama_dir, tiny_clip_dir, fusion_interval=2, fusion_vocab_size=8).eval()
    fusion = get_fusion_params(model)
    perturb(fusion, seed=5)
    base = {
        "family": "composed",
        "folders": {"decoder": str(tiny_llama_dir), "encoder": str(tiny_clip_dir)},
        "fusion_interval": 2,
        "fusion_vocab_size": 8,
    }
    checkpoint = write_checkpoint(tmp_path / "run", {"fusion": fusion}, base)
    loaded = load_for_inference(checkpoint)
    assert (loaded.family, type(loaded.image_format).__name__, loaded.image_token_id) == (
        "composed",
        "FixedSizeImage",
        tiny.TEXT_VOCAB_SIZE,
    )
    _assert_same_parameters(loaded.model, model)

    tokens, encoder_input, encoder_mask = build_prompt_inputs(loaded, [images["square"], images["wide"]], PROMPT)
    assert tokens[0].tolist().count(loaded.image_token_id) == 2
    assert encoder_input["pixel_values"].shape == (1, 2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    first = tokens[0].tolist().index(loaded.image_token_id)
    assert not encoder_mask[0, :first].any() and encoder_mask[0, first + 1 :].all()
    want = generate(model, tokens, max_new_tokens=10, encoder_input=encoder_input, encoder_mask=encoder_mask)
    uncached = _greedy_without_cache(model, tokens, encoder_input, encoder_mask, steps=10)
    assert torch.equal(want, uncached)

    out = export_checkpoint(checkpoint, tmp_path / "export", dtype="fp32")
    exported = load_for_inference(out)
    assert (exported.kind, exported.family) == ("export", "composed")
    _assert_same_parameters(exported.model, model)
    assert torch.equal(build_prompt_inputs(exported, [images["square"], images["wide"]], PROMPT)[0], tokens)

    # A run that started from that export (base folders {"fusiontrain_export": ...}) and trained on.
    perturb(fusion, seed=6)
    again = write_checkpoint(tmp_path / "run2", {"fusion": fusion}, {**base, "folders": {"fusiontrain_export": str(out)}})
    from_export = load_for_inference(again)
    assert (from_export.family, from_export.text_dir, from_export.image_dir) == ("composed", out, out)
    _assert_same_parameters(from_export.model, model)

    code, printed, err = _run(
        ["--model", str(again), "--image", str(images["square"]), "--image", str(images["wide"]), "--prompt", PROMPT,
         "--max-new-tokens", "10"],
        capsys,
    )
    assert code == 0, err
    stopped = generate(
        model, tokens, max_new_tokens=10, encoder_input=encoder_input, encoder_mask=encoder_mask,
        stop_token_ids=exported.stop_token_ids(),
    )
    assert printed == _decode(exported, stopped, tokens.shape[1]) + "\n"


# -- (5) sampling ---------------------------------------------------------------------------------------


def test_top_p_sampling_is_reproducible_with_a_seed(
    loaded, tiny_mllama_dir: Path, images: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    def sample(seed: int) -> str:
        argv = ["--model", str(tiny_mllama_dir), "--image", str(images["square"]), "--prompt", PROMPT,
                "--temperature", "1.0", "--top-p", "0.9", "--seed", str(seed), "--max-new-tokens", "16"]
        code, out, err = _run(argv, capsys)
        assert code == 0, err
        return out

    first, again, other = sample(11), sample(11), sample(12)
    assert first == again
    assert first != other

    tokens, encoder_input, encoder_mask = build_prompt_inputs(loaded, [images["square"]], PROMPT)
    output = generate(
        loaded.model, tokens, max_new_tokens=16, encoder_input=encoder_input, encoder_mask=encoder_mask,
        stop_token_ids=loaded.stop_token_ids(), temperature=1.0, top_p=0.9,
        generator=torch.Generator().manual_seed(11),
    )
    assert first == _decode(loaded, output, tokens.shape[1]) + "\n"


# -- (6) errors -----------------------------------------------------------------------------------------


def test_errors_are_one_line_and_name_the_culprit(
    tiny_mllama_dir: Path, tiny_llama_dir: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(images["wide"].read_bytes()[:60])
    empty = tmp_path / "empty"
    empty.mkdir()
    no_base = layout.checkpoint_dir(tmp_path / "gone", 3)
    no_base.mkdir(parents=True)
    layout.write_manifest(
        no_base, layout.new_manifest(3, ["fusion"], {"family": "mllama", "folders": {"hf_mllama": str(tmp_path / "nope")}})
    )
    model, image = str(tiny_mllama_dir), str(images["wide"])
    cases = [
        (["--model", str(tmp_path / "missing"), "--image", image], [str(tmp_path / "missing"), "does not exist"]),
        (["--model", model, "--image", str(tmp_path / "no.png")], [str(tmp_path / "no.png"), "does not exist"]),
        (["--model", model, "--image", str(corrupt)], [str(corrupt)]),
        (["--model", model, "--image", str(truncated)], [str(truncated)]),
        (["--model", str(empty), "--image", image], [str(empty), "not a model folder"]),
        (["--model", str(tiny_llama_dir), "--image", image], ["'llama'", "not a fusion model"]),
        (["--model", str(no_base), "--image", image], [str(tmp_path / "nope"), "does not exist"]),
        (["--model", model, "--image", image, "--top-p", "0"], ["--top-p"]),
    ]
    for argv, expected in cases:
        code, out, err = _run([*argv, "--prompt", PROMPT], capsys)
        assert code == 2 and out == "", argv
        assert err.startswith("error: ") and err.count("\n") == 1, err
        for text in expected:
            assert text in err, (text, err)

    code, _, err = _run(["--model", model, "--image", image, "--prompt", "what is <|image|>?"], capsys)
    assert code == 2 and "2 image tokens for 1 images" in err
    with pytest.raises(InferenceError, match="empty"):
        build_prompt_inputs(load_for_inference(tiny_mllama_dir), [], "  ")


def test_changed_base_is_refused_unless_allowed(trained_mllama, tiny_mllama_dir: Path, tmp_path: Path) -> None:
    model, _, checkpoint = trained_mllama
    copy = tmp_path / "step_7"
    shutil.copytree(checkpoint, copy)
    manifest = layout.read_manifest(copy)
    manifest["fingerprint"] = {"hf_mllama/model.safetensors": {"size": 12, "sha256": "0" * 64}}
    layout.write_manifest(copy, manifest)
    with pytest.raises(InferenceError, match="changed size"):
        load_for_inference(copy)
    _assert_same_parameters(load_for_inference(copy, allow_base_mismatch=True).model, model)


def test_a_part_that_does_not_fit_the_base_is_an_inference_error(trained_mllama, tmp_path: Path) -> None:
    model, _, checkpoint = trained_mllama
    base = layout.read_manifest(checkpoint)["base"]
    fusion = get_fusion_params(model)
    norm = next(name for name in fusion if name.endswith("ca_norm.scale"))
    wrong_shape = write_checkpoint(tmp_path / "shape", {"fusion": {**fusion, norm: torch.zeros(3)}}, base)
    with pytest.raises(InferenceError, match=rf"fusion/{norm} has shape \(3,\).*trained from this base"):
        load_for_inference(wrong_shape)
    foreign = write_checkpoint(tmp_path / "foreign", {"fusion": {**fusion, "decoder.nope": torch.zeros(2)}}, base)
    with pytest.raises(InferenceError, match=r"unexpected \['decoder.nope'\]"):
        load_for_inference(foreign)
