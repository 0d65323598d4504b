"""SampleBuilder: tokens, labels, images and spans against HF's processor and chat template; every
bad input gives its BadSample reason and names its file and line."""

from __future__ import annotations

import io
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fusiontrain import tiny
from fusiontrain.families.mllama.tiles import MllamaTiles
from fusiontrain.families.fixed_size_image import FixedSizeImage
from fusiontrain.data.formats import IMAGE_PLACEHOLDER, BadSample, SampleBuilder, image_spans
from fusiontrain.data.sources import Record, load_records

IGNORE = -100
IMG = tiny.IMAGE_TOKEN_ID
MLLAMA_SPEC = MllamaTiles(image_size=tiny.IMAGE_SIZE, tokens_per_tile=5, max_num_tiles=2)
TOWER_SPEC = FixedSizeImage(image_size=tiny.IMAGE_SIZE, tokens_per_image=5)


# -- helpers -----------------------------------------------------------------------------------------


def draw(path: Path, width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))
    ImageDraw.Draw(image).ellipse((2, 2, width - 3, height - 3), outline=(255, 0, 0), width=2)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def user(*items: str) -> dict:
    """A user message; "<img>" items are image items, the rest text."""
    return {"role": "user", "content": [{"type": "image"} if i == "<img>" else {"type": "text", "text": i} for i in items]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def with_paths(messages: list[dict], paths: list[Path]) -> list[dict]:
    """The conversation with each image item carrying its file, as processor.apply_chat_template loads them."""
    files = iter(paths)
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{**item, "path": str(next(files))} if item["type"] == "image" else item for item in content]
        out.append({**message, "content": content})
    return out


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def expected_labels(ids: list[int], trained: list[int], image_token_id: int) -> list[int]:
    """Independent shifted labels: position j predicts ids[j + 1] where that token is trained and
    is no image token."""
    labels = [t if m and t != image_token_id else IGNORE for t, m in zip(ids[1:], trained[1:])]
    return labels + [IGNORE]


def hf_assistant_mask(tokenizer, messages: list[dict]) -> list[int]:
    """HF's own assistant mask, from the tiny template's {% generation %} markers."""
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["assistant_masks"])


@pytest.fixture(scope="module")
def mllama_builder(tiny_mllama_dir: Path) -> SampleBuilder:
    return SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, format="chat", max_len=200)


@pytest.fixture(scope="module")
def processor(tiny_mllama_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_mllama_dir)


# -- image spans -------------------------------------------------------------------------------------


def test_image_spans_match_transformers_on_random_patterns() -> None:
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    rng = random.Random(0)
    patterns = [[], [IMG], [IMG, IMG], [5, IMG], [IMG, 5], [IMG, IMG, 5, IMG, IMG]]
    for _ in range(600):
        n = rng.randint(1, 24)
        density = rng.choice([0.1, 0.3, 0.6, 0.9])
        patterns.append([IMG if rng.random() < density else rng.randint(4, 60) for _ in range(n)])
    for tokens in patterns:
        hf = [(start, len(tokens) if end == -1 else end) for start, end in get_cross_attention_token_mask(tokens, IMG)]
        assert image_spans(tokens, IMG) == hf, tokens


# -- Mllama chat: equal to MllamaProcessor and the chat template -------------------------------------

# (conversation, image sizes): 0, 1 and 2 images; several aspect ratios; consecutive images; an
# image in a later turn; a system prompt; string contents; multi-turn.
CONVERSATIONS = [
    ([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}], []),
    ([user("<img>", "What is this?"), assistant("A red ring.")], [(56, 28)]),
    (
        [{"role": "system", "content": "Be brief."}, user("<img>", "Left?"), assistant("Round."), user("And?"), assistant("Noise.")],
        [(30, 90)],
    ),
    ([user("<img>", "<img>", "Compare."), assistant("Same shape, two sizes.")], [(28, 28), (100, 40)]),
    ([user("<img>", "One."), assistant("Ok."), user("Two:", "<img>"), assistant("Wide one.")], [(20, 70), (90, 25)]),
    ([user("Look", "<img>", "here", "<img>"), assistant("Two views.")], [(41, 41), (13, 120)]),
]


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_chat_sample_equals_processor(tmp_path: Path, mllama_builder: SampleBuilder, processor, case: int) -> None:
    messages, sizes = CONVERSATIONS[case]
    paths = [tmp_path / "imgs" / f"{k}.png" for k in range(len(sizes))]
    for k, (path, (w, h)) in enumerate(zip(paths, sizes)):
        draw(path, w, h, seed=10 * case + k)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"images": [f"imgs/{p.name}" for p in paths], "messages": messages}])
    sample = mllama_builder(load_records(data)[0])

    ref = processor.apply_chat_template(with_paths(messages, paths), tokenize=True, return_dict=True, return_tensors="pt")
    ids = ref["input_ids"][0].tolist()
    assert sample.tokens.tolist() == ids
    assert sample.origin == f"{data}:1"

    mask = hf_assistant_mask(processor.tokenizer, messages)
    assert sample.labels.tolist() == expected_labels(ids, mask, IMG)
    assert (sample.labels != IGNORE).any()

    assert len(sample.images) == len(sizes) == len(sample.image_spans)
    if not sizes:
        assert "pixel_values" not in ref and sample.image_spans == []
        return
    stacked = MLLAMA_SPEC.collate([sample.images])
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(stacked[key], ref[key]), key
    cross = ref["cross_attention_mask"][0]  # [s, images, tiles]
    for k, (start, end) in enumerate(sample.image_spans):
        seen = torch.zeros(len(ids), dtype=torch.long)
        seen[start:end] = 1
        assert torch.equal(cross[:, k, 0], seen), k


def test_train_on_all(tiny_mllama_dir: Path, tmp_path: Path) -> None:
    builder = SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, format="chat", train_on="all", max_len=200)
    draw(tmp_path / "a.png", 30, 30, seed=1)
    messages, _ = CONVERSATIONS[2]
    sample = builder(Record({"images": ["a.png"], "messages": messages}, "mem:1", tmp_path))
    ids = sample.tokens.tolist()
    assert sample.labels.tolist() == expected_labels(ids, [1] * len(ids), IMG)
    assert IMG in ids and IMG not in sample.labels.tolist()


def test_json_and_parquet_records_match_jsonl(tmp_path: Path, mllama_builder: SampleBuilder) -> None:
    """The samples of the same records stored as a JSON array and as Parquet equal those from
    JSON Lines; Parquet's structs fill absent keys with None ("text": None on image items)."""
    import datasets

    draw(tmp_path / "a.png", 50, 30, seed=2)
    draw(tmp_path / "b.png", 30, 50, seed=3)
    records = [
        {"images": ["a.png"], "messages": CONVERSATIONS[1][0]},
        {"images": ["a.png", "b.png"], "messages": CONVERSATIONS[3][0]},
    ]
    reference = [mllama_builder(r) for r in load_records(write_jsonl(tmp_path / "d.jsonl", records))]
    (tmp_path / "d.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.json", "d.parquet"):
        source = load_records(tmp_path / name)
        if name == "d.parquet":
            assert source[0].data["messages"][0]["content"][0] == {"type": "image", "text": None}
        for k, expected in enumerate(reference):
            sample = mllama_builder(source[k])
            assert sample.origin == f"{tmp_path / name}[{k}]"
            assert torch.equal(sample.tokens, expected.tokens) and torch.equal(sample.labels, expected.labels)
            assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(sample.images, expected.images))


# -- caption -----------------------------------------------------------------------------------------


def test_caption_sample(tiny_mllama_dir: Path, tmp_path: Path, processor) -> None:
    """BOS, image, caption, EOS: MllamaProcessor's ids for "<|image|>" + caption, without the second
    BOS it inserts after the image, plus EOS; the same images; the caption and EOS trained."""
    builder = SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, format="caption", max_len=64)
    draw(tmp_path / "c.jpg", 90, 30, seed=4, fmt="JPEG")
    caption = "A noisy ring, wide."
    data = write_jsonl(tmp_path / "cap.jsonl", [{"image": "c.jpg", "text": caption}])
    sample = builder(load_records(data)[0])

    ref = processor(images=[[Image.open(tmp_path / "c.jpg").convert("RGB")]], text=[IMAGE_PLACEHOLDER + caption], return_tensors="pt")
    ref_ids = ref["input_ids"][0].tolist()
    bos, eos = tiny.BOS_TOKEN_ID, tiny.EOS_TOKEN_ID
    assert ref_ids[:3] == [bos, IMG, bos]  # HF's duplicated BOS
    ids = sample.tokens.tolist()
    assert ids == [bos, IMG] + ref_ids[3:] + [eos]
    assert sample.labels.tolist() == [IGNORE] + ref_ids[3:] + [eos, IGNORE]
    assert sample.image_spans == [(1, len(ids))]
    stacked = MLLAMA_SPEC.collate([sample.images])
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(stacked[key], ref[key]), key


# -- composed models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def composed_image_token_id(tiny_llama_dir: Path, tiny_clip_dir: Path) -> int:
    from fusiontrain.families.composed.compose import image_token_layout
    from fusiontrain.models import compose_from_hf

    return image_token_layout(compose_from_hf(tiny_llama_dir, tiny_clip_dir)).image_token_id


@pytest.mark.parametrize("case", [1, 3, 4, 5])
@pytest.mark.parametrize("which_id", ["layout", "other"])
def test_composed_chat_inserts_the_image_id_where_the_template_puts_images(
    tmp_path: Path, tiny_llama_dir: Path, tiny_clip_dir: Path, processor, composed_image_token_id: int, case: int, which_id: str
) -> None:
    """The image id goes where the chat template renders image items: the token ids equal the
    template's own rendering of the (unflattened) conversation, image tokens replaced by the id.
    The images equal the CLIP processor's."""
    from transformers import AutoImageProcessor, AutoTokenizer

    image_id = composed_image_token_id if which_id == "layout" else composed_image_token_id + 5
    builder = SampleBuilder(tiny_llama_dir, TOWER_SPEC, image_dir=tiny_clip_dir, format="chat", max_len=200, image_token_id=image_id)
    messages, sizes = CONVERSATIONS[case]
    paths = [tmp_path / f"{k}.png" for k in range(len(sizes))]
    for k, (path, (w, h)) in enumerate(zip(paths, sizes)):
        draw(path, w, h, seed=case + k)
    sample = builder(Record({"images": [p.name for p in paths], "messages": messages}, "mem:1", tmp_path))

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    native = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    expected = [image_id if t == tokenizer.convert_tokens_to_ids("<|image|>") else t for t in native["input_ids"]]
    assert sample.tokens.tolist() == expected
    assert sample.tokens.tolist().count(image_id) == len(sizes)
    assert sample.labels.tolist() == expected_labels(expected, list(native["assistant_masks"]), image_id)
    assert sample.image_spans == image_spans(expected, image_id)

    clip = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    ref = clip([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    assert torch.equal(TOWER_SPEC.collate([sample.images])["pixel_values"][0], ref)


def test_composed_caption(tmp_path: Path, tiny_llama_dir: Path, tiny_siglip_dir: Path) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer

    builder = SampleBuilder(tiny_llama_dir, TOWER_SPEC, image_dir=tiny_siglip_dir, format="caption", max_len=64, image_token_id=130)
    draw(tmp_path / "s.png", 20, 60, seed=5)
    sample = builder(Record({"image": "s.png", "text": "tall"}, "mem:1", tmp_path))
    text_ids = AutoTokenizer.from_pretrained(tiny_llama_dir)("tall", add_special_tokens=False)["input_ids"]
    assert sample.tokens.tolist() == [tiny.BOS_TOKEN_ID, 130, *text_ids, tiny.EOS_TOKEN_ID]
    ref = AutoImageProcessor.from_pretrained(tiny_siglip_dir)(Image.open(tmp_path / "s.png").convert("RGB"), return_tensors="pt")
    assert torch.equal(sample.images[0]["pixel_values"], ref["pixel_values"][0])


def test_composed_needs_its_arguments(tiny_llama_dir: Path, tiny_clip_dir: Path, tiny_mllama_dir: Path) -> None:
    with pytest.raises(ValueError, match="image_token_id"):
        SampleBuilder(tiny_llama_dir, TOWER_SPEC, image_dir=tiny_clip_dir, max_len=10)
    with pytest.raises(ValueError, match="image_dir"):
        SampleBuilder(tiny_llama_dir, TOWER_SPEC, max_len=10, image_token_id=128)
    with pytest.raises(ValueError, match="has its own image processor"):
        SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, image_dir=tiny_clip_dir, max_len=10)


# -- length policy -----------------------------------------------------------------------------------


def test_truncate_keeps_the_images_whose_token_survives(tiny_mllama_dir: Path, tmp_path: Path) -> None:
    draw(tmp_path / "a.png", 28, 56, seed=6)
    draw(tmp_path / "b.png", 56, 28, seed=7)
    messages, _ = CONVERSATIONS[4]  # image 1 in the first turn, image 2 in the second user turn
    record = Record({"images": ["a.png", "b.png"], "messages": messages}, "mem:3", tmp_path)
    full = SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, max_len=500)(record)
    ids = full.tokens.tolist()
    second_image = [i for i, t in enumerate(ids) if t == IMG][1]
    max_len = second_image  # cuts just before the second image token
    with pytest.raises(BadSample) as caught:
        SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, max_len=max_len)(record)
    assert caught.value.reason == "too_long" and "mem:3" in str(caught.value)

    cut = SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, max_len=max_len, too_long="truncate")(record)
    assert cut.tokens.tolist() == ids[:max_len]
    assert cut.labels.tolist() == full.labels.tolist()[: max_len - 1] + [IGNORE]
    assert len(cut.images) == 1 and torch.equal(cut.images[0]["pixel_values"], full.images[0]["pixel_values"])
    assert cut.image_spans == [(full.image_spans[0][0], max_len)]

    # Cut before the first reply: nothing left to train on.
    first_reply = full.labels.tolist().index(next(t for t in full.labels.tolist() if t != IGNORE))
    with pytest.raises(BadSample) as caught:
        SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, max_len=first_reply + 1, too_long="truncate")(record)
    assert caught.value.reason == "too_long" and "nothing to train on" in str(caught.value)


# -- bad inputs --------------------------------------------------------------------------------------


def test_every_bad_input_names_its_reason_file_and_line(tmp_path: Path, mllama_builder: SampleBuilder) -> None:
    good = draw(tmp_path / "ok.png", 40, 30, seed=8)
    (tmp_path / "junk.png").write_bytes(b"definitely not a png" * 10)
    (tmp_path / "cut.jpg").write_bytes(draw(tmp_path / "whole.jpg", 60, 60, seed=9, fmt="JPEG")[:600])
    assert good
    one = [user("<img>", "What?"), assistant("A ring.")]
    long_reply = [user("<img>", "Talk."), assistant("blah " * 60)]
    lines = {
        1: ({"images": ["ok.png"], "messages": one}, None),
        2: ({"images": ["missing.png"], "messages": one}, "missing_image"),
        3: ({"images": ["junk.png"], "messages": one}, "corrupt_image"),
        4: ({"images": ["cut.jpg"], "messages": one}, "corrupt_image"),
        5: ('{"images": ["ok.png"], "messages": [}', "malformed_json"),
        6: ({"images": ["ok.png"], "messages": long_reply}, "too_long"),
        7: ({"images": ["ok.png"], "messages": [user("<img>", "Hm?"), assistant("  ")]}, "empty_text"),
        8: ({"images": ["ok.png", "ok.png"], "messages": one}, "image_count_mismatch"),
        9: ({"images": [], "messages": one}, "image_count_mismatch"),
        10: ({"images": ["ok.png"], "messages": [user("<img>", "Say <|image|>"), assistant("No.")]}, "image_count_mismatch"),
        11: ({"images": ["ok.png"], "messages": [*one, {"role": "tool", "content": "42"}]}, "unknown_role"),
        12: ({"images": ["ok.png"], "messages": [user("<img>", "Only a question?")]}, "no_target"),
        13: ("", "empty_line"),
        14: ({"images": ["ok.png"], "messages": []}, "empty_text"),
        15: ({"images": ["ok.png"], "messages": [{"role": "user", "content": 5}]}, "bad_record"),
        16: ({"images": ["ok.png"], "messages": [assistant("First!"), user("<img>")]}, "bad_record"),
        17: ({"images": "ok.png", "messages": one}, "bad_record"),
    }
    data = write_jsonl(tmp_path / "bad.jsonl", [record for record, _ in lines.values()])
    source = load_records(data)
    assert len(source) == len(lines)
    for line, (_, reason) in lines.items():
        if reason is None:
            assert mllama_builder(source[line - 1]).origin == f"{data}:{line}"
            continue
        with pytest.raises(BadSample) as caught:
            mllama_builder(source[line - 1])
        assert caught.value.reason == reason, line
        assert caught.value.origin == f"{data}:{line}" and str(caught.value).startswith(f"{data}:{line}: ")
    message = {}
    for line in (2, 3, 4):
        with pytest.raises(BadSample) as caught:
            mllama_builder(source[line - 1])
        message[line] = str(caught.value)
    assert str(tmp_path / "missing.png") in message[2]
    assert str(tmp_path / "junk.png") in message[3]
    assert str(tmp_path / "cut.jpg") in message[4] and "truncated" in message[4].lower()


def test_bad_captions(tiny_mllama_dir: Path, tmp_path: Path) -> None:
    builder = SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, format="caption", max_len=12)
    draw(tmp_path / "ok.png", 30, 30, seed=10)
    lines = {
        1: ({"image": "ok.png", "text": " \n "}, "empty_text"),
        2: ({"image": "ok.png", "text": "far too long for twelve"}, "too_long"),
        3: ({"image": "ok.png", "text": "two <|image|>"}, "image_count_mismatch"),
        4: ({"text": "no image"}, "bad_record"),
        5: ({"image": "ok.png", "text": 7}, "bad_record"),
        6: ({"image": "nowhere.png", "text": "hi"}, "missing_image"),
    }
    data = write_jsonl(tmp_path / "cap.jsonl", [record for record, _ in lines.values()])
    source = load_records(data)
    for line, (_, reason) in lines.items():
        with pytest.raises(BadSample) as caught:
            builder(source[line - 1])
        assert (caught.value.reason, caught.value.origin) == (reason, f"{data}:{line}")


UNSTABLE_TEMPLATE = (
    # Like Llama 3.2 Vision's: a system block only when the conversation has no image at all.
    "{%- set ns = namespace(has_images=false) -%}"
    "{%- for m in messages -%}{%- if m['content'] is not string -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{%- set ns.has_images = true -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{{- bos_token -}}{%- if not ns.has_images -%}{{- 'sys<|eot_id|>' -}}{%- endif -%}"
    "{%- for m in messages -%}{{- m['role'] + ': ' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{- '<|image|>' -}}{%- else -%}{{- c['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{- '<|eot_id|>' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}"
)


def test_template_that_renders_prefixes_differently(tiny_mllama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "unstable"
    shutil.copytree(tiny_mllama_dir, folder)
    (folder / "chat_template.jinja").write_text(UNSTABLE_TEMPLATE)
    builder = SampleBuilder(folder, MLLAMA_SPEC, max_len=200)
    assert builder.chat_template == UNSTABLE_TEMPLATE
    draw(tmp_path / "a.png", 30, 30, seed=11)
    image_first = Record({"images": ["a.png"], "messages": CONVERSATIONS[2][0]}, "mem:1", tmp_path)
    sample = builder(image_first)
    reply = [t for t in sample.labels.tolist() if t != IGNORE]
    tokenizer = builder.tokenizer
    assert reply == tokenizer("Round.<|eot_id|>Noise.<|eot_id|>", add_special_tokens=False)["input_ids"]
    image_later = Record({"images": ["a.png"], "messages": [user("Hi"), assistant("Yo."), user("<img>"), assistant("Ok.")]}, "mem:2", tmp_path)
    with pytest.raises(BadSample) as caught:
        builder(image_later)
    assert caught.value.reason == "template_unstable" and "mem:2" in str(caught.value)


def test_builder_pickles(tmp_path: Path, mllama_builder: SampleBuilder) -> None:
    draw(tmp_path / "a.png", 45, 20, seed=12)
    record = Record({"images": ["a.png"], "messages": CONVERSATIONS[1][0]}, "mem:1", tmp_path)
    clone = pickle.loads(pickle.dumps(mllama_builder))
    a, b = mllama_builder(record), clone(record)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.images[0]["pixel_values"], b.images[0]["pixel_values"])
    error = BadSample("too_long", "x", origin="f:1")
    again = pickle.loads(pickle.dumps(error))
    assert (again.reason, again.detail, again.origin, str(again)) == ("too_long", "x", "f:1", str(error))
