"""The llava, sharegpt and cauldron formats, read from the example files the README shows
(examples/data/): the one conversation written in each gives the chat record's sample exactly;
mappings read other layouts; every bad record is named under its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusiontrain import tiny
from fusiontrain.data.conversations import conversation_layout, images_first_when_unplaced
from fusiontrain.data.errors import BadSample
from fusiontrain.data.formats import SampleBuilder
from fusiontrain.data.sources import Record, load_records
from fusiontrain.families.fixed_size_image import FixedSizeImage
from fusiontrain.families.mllama.tiles import MllamaTiles

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
MLLAMA_SPEC = MllamaTiles(image_size=tiny.IMAGE_SIZE, tokens_per_tile=5, max_num_tiles=2)
TOWER_SPEC = FixedSizeImage(image_size=tiny.IMAGE_SIZE, tokens_per_image=5)
TOWER_IMAGE_ID = 128  # the first row past the tiny Llama's vocabulary
FILES = {"chat": "chat.jsonl", "llava": "llava.jsonl", "sharegpt": "sharegpt.jsonl", "cauldron": "cauldron.parquet"}


@pytest.fixture(scope="module", params=["mllama", "composed"])
def builders(request: pytest.FixtureRequest) -> dict[str, SampleBuilder]:
    """One builder per format, for Mllama (its processor's template and image token) and for a
    composed model (Llama's tokenizer, CLIP's image processor, an image id past the vocabulary)."""
    if request.param == "mllama":
        folder = request.getfixturevalue("tiny_mllama_dir")
        make = lambda fmt: SampleBuilder(folder, MLLAMA_SPEC, format=fmt, max_len=200)  # noqa: E731
    else:
        text, image = request.getfixturevalue("tiny_llama_dir"), request.getfixturevalue("tiny_clip_dir")
        make = lambda fmt: SampleBuilder(  # noqa: E731
            text, TOWER_SPEC, image_dir=image, format=fmt, max_len=200, image_token_id=TOWER_IMAGE_ID
        )
    return {fmt: make(fmt) for fmt in FILES}


def _outcome(builder: SampleBuilder, record: Record) -> str | tuple:
    """The sample's tokens, labels, image pixels and spans, or the bad record's reason."""
    try:
        sample = builder(record)
    except BadSample as error:
        assert error.origin == record.origin, (error.origin, record.origin)
        return error.reason
    pixels = [{key: value.tolist() for key, value in image.items() if torch.is_tensor(value)} for image in sample.images]
    return sample.tokens.tolist(), sample.labels.tolist(), pixels, sample.image_spans


def test_one_conversation_in_every_format_gives_the_same_sample(builders: dict[str, SampleBuilder]) -> None:
    """Two images, two exchanges: the chat record, the LLaVA record (placeholders, image list),
    both ShareGPT shapes' first record, and the_cauldron's (images embedded in parquet, placed at
    the start of the first user turn) give the same tokens, labels, pixels and spans."""
    outcomes = {fmt: _outcome(builders[fmt], load_records(EXAMPLES / name)[0]) for fmt, name in FILES.items()}
    reference = outcomes["chat"]
    assert isinstance(reference, tuple) and len(reference[2]) == 2, reference
    tokens, labels, _, spans = reference
    assert sum(label != -100 for label in labels) >= 6  # both replies are targets
    assert len(spans) == 2
    for fmt, outcome in outcomes.items():
        assert outcome == reference, fmt


def test_example_files_give_their_samples_and_their_bad_records_by_reason(builders: dict[str, SampleBuilder]) -> None:
    """What each example record becomes: the bad ones named by reason and origin, the text-only
    one a sample without images."""
    expected = {
        "llava": [2, 1, 0, "image_count_mismatch", "missing_image", "unknown_role", "malformed_json"],
        "sharegpt": [2, 1, "image_count_mismatch", "unknown_role", "malformed_json"],
        "cauldron": [2, 1, 0, "corrupt_image"],
    }
    for fmt, reasons in expected.items():
        records = load_records(EXAMPLES / FILES[fmt])
        got = []
        for record in records:
            outcome = _outcome(builders[fmt], record)
            got.append(outcome if isinstance(outcome, str) else len(outcome[2]))
        assert got == reasons, fmt


def test_llava_newline_after_the_placeholder_is_kept_and_a_system_column_comes_first(tiny_mllama_dir: Path) -> None:
    """LLaVA's "<image>\\n" keeps its newline after the image; ShareGPT's system column is the
    first turn: both equal the chat records written out by hand."""
    chat = SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, format="chat", max_len=200)
    image, text = {"type": "image"}, lambda t: {"type": "text", "text": t}
    cases = [
        (
            "llava",
            {"image": "images/blue.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Blue."}]},
            [{"role": "user", "content": [image, text("\nWhat?")]}, {"role": "assistant", "content": [text("Blue.")]}],
        ),
        (
            "sharegpt",
            {
                "conversations": [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "Blue."}],
                "system": "Answer in one word.",
                "images": ["images/blue.png"],
            },
            [
                {"role": "system", "content": [text("Answer in one word.")]},
                {"role": "user", "content": [image, text("Colour?")]},
                {"role": "assistant", "content": [text("Blue.")]},
            ],
        ),
    ]
    for fmt, record, messages in cases:
        builder = SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, format=fmt, max_len=200)
        got = _outcome(builder, Record(record, "x", EXAMPLES))
        want = _outcome(chat, Record({"images": ["images/blue.png"], "messages": messages}, "x", EXAMPLES))
        assert isinstance(got, tuple) and got == want, fmt


def test_a_mapping_reads_another_layout(tiny_mllama_dir: Path) -> None:
    """Columns and tags in the manner of LLaMA-Factory's dataset_info: a layout with its own
    column, keys and role names, and its own placeholder, reads like the chat record."""
    layout = conversation_layout(
        "sharegpt",
        columns={"messages": "dialogue", "images": "pictures", "system": None},
        tags={"role_tag": "speaker", "content_tag": "said", "user_tag": "customer", "assistant_tag": "agent"},
        placeholder="[img]",
    )
    mapped = SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, format="sharegpt", layout=layout, max_len=200)
    chat = SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, format="chat", max_len=200)
    record = {
        "pictures": ["images/blue.png"],
        "dialogue": [{"speaker": "customer", "said": "Look: [img] what?"}, {"speaker": "agent", "said": "Blue."}],
    }
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": " what?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
    ]
    got = _outcome(mapped, Record(record, "x", EXAMPLES))
    assert isinstance(got, tuple) and got == _outcome(chat, Record({"images": ["images/blue.png"], "messages": messages}, "x", EXAMPLES))
    # a mapped name replaces the defaults: the default keys no longer read
    default_keys = {"images": ["images/blue.png"], "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Ho"}]}
    assert _outcome(mapped, Record(default_keys, "y", EXAMPLES)) == "bad_record"
    with pytest.raises(ValueError, match="unknown columns field 'turns'"):
        conversation_layout("llava", columns={"turns": "x"})
    with pytest.raises(ValueError, match="unknown conversation format"):
        conversation_layout("alpaca")


@pytest.mark.parametrize(
    "fmt, record, reason, detail",
    [
        ("llava", {"image": ["a.png"], "conversations": [{"from": "human", "value": "<image> <image>?"}, {"from": "gpt", "value": "x"}]},
         "image_count_mismatch", "2 '<image>' placeholders in the turns but 1 images"),
        ("llava", {"image": "a.png", "conversations": [{"from": "human", "value": "<|image|>?"}, {"from": "gpt", "value": "x"}]},
         "image_count_mismatch", "holds the model's image token '<|image|>' as text"),
        ("cauldron", {"images": [], "texts": [{"user": "<|image|>?", "assistant": "x"}]},
         "image_count_mismatch", "images are placed first"),
        ("sharegpt", {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}]},
         "unknown_role", "turn 1 has 'from' or 'role' 'tool'"),
        ("llava", {"image": "a.png"}, "bad_record", "needs a list under 'conversations', got none"),
        ("llava", {"conversations": [{"from": "human"}]}, "bad_record", "turn 0 needs a string under 'value'"),
        ("cauldron", {"images": [], "texts": [{"user": "q"}]}, "bad_record", "exchange 0 needs a string under 'assistant'"),
        ("sharegpt", {"messages": [{"role": "user", "content": "q"}], "images": 3}, "bad_record", "'images' must be an image reference or a list"),
    ],
)
def test_bad_records_name_their_reason(tiny_mllama_dir: Path, fmt: str, record: dict, reason: str, detail: str) -> None:
    builder = SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, format=fmt, max_len=200)
    with pytest.raises(BadSample) as caught:
        builder.tokenize(Record(record, "data.jsonl:7", EXAMPLES))
    assert caught.value.reason == reason and detail in caught.value.detail, caught.value
    assert caught.value.origin == "data.jsonl:7"


def test_chat_records_with_unplaced_images_get_them_first_and_literal_tokens_still_place(tiny_mllama_dir: Path) -> None:
    """A chat record with images and no image item: images at the start of the first user turn
    (it used to be image_count_mismatch). Literal <|image|> text still places an image in chat."""
    builder = SampleBuilder(tiny_mllama_dir, MLLAMA_SPEC, format="chat", max_len=200)
    unplaced = {"images": ["images/blue.png"], "messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Blue."}]}
    placed = {"images": ["images/blue.png"], "messages": [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
              {"role": "assistant", "content": "Blue."}]}
    got = _outcome(builder, Record(unplaced, "x", EXAMPLES))
    assert isinstance(got, tuple) and got == _outcome(builder, Record(placed, "x", EXAMPLES))
    literal = {"images": ["images/blue.png"], "messages": [{"role": "user", "content": "<|image|>Colour?"}, {"role": "assistant", "content": "Blue."}]}
    assert images_first_when_unplaced(literal, image_token_text="<|image|>") is literal
    assert isinstance(_outcome(builder, Record(literal, "x", EXAMPLES)), tuple)


def test_the_readme_shows_each_format_with_its_example_file() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for fmt, name in FILES.items():
        assert f"examples/data/{name}" in readme, name
        assert f"data.format={fmt}" in readme or f"format: {fmt}" in readme, fmt
    first_llava = json.loads((EXAMPLES / "llava.jsonl").read_text().splitlines()[0])
    assert first_llava["conversations"][0]["value"].startswith("<image><image>")
