"""Writes the example data files beside this script: the one conversation, and a few others, in
each format fusiontrain reads (README: Data formats; tests/test_conversation_formats.py reads them).

Run from anywhere: ``python examples/data/make_examples.py``. Deterministic: the same bytes each run
(images drawn from fixed shapes; the parquet file written by ``datasets``, as the_cauldron's are).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent

# One conversation about two images, in every format: the tests check that each gives the same
# tokens, labels and images.
QUESTION, ANSWER = "Compare the two pictures.", "Same ring, two sizes."
FOLLOW_UP, REPLY = "Which one is wider?", "The second."
IMAGES = ["images/ring.png", "images/wide_ring.png"]


def draw_images() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    for name, (width, height) in zip(IMAGES, [(32, 32), (64, 24)]):
        image = Image.new("RGB", (width, height), (250, 245, 230))
        ImageDraw.Draw(image).ellipse((2, 2, width - 3, height - 3), outline=(200, 30, 30), width=3)
        image.save(HERE / name, "PNG", optimize=True)
    Image.new("RGB", (20, 20), (30, 90, 200)).save(HERE / "images" / "blue.png", "PNG")


def write_jsonl(name: str, records: list[dict | str]) -> None:
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    (HERE / name).write_text("".join(line + "\n" for line in lines))


def llava() -> None:
    write_jsonl(
        "llava.jsonl",
        [
            {
                "id": "two-rings",
                "image": IMAGES,
                "conversations": [
                    {"from": "human", "value": f"<image><image>{QUESTION}"},
                    {"from": "gpt", "value": ANSWER},
                    {"from": "human", "value": FOLLOW_UP},
                    {"from": "gpt", "value": REPLY},
                ],
            },
            {  # LLaVA's own layout: one image, "<image>\n" before the question
                "id": "blue",
                "image": "images/blue.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is this?"},
                    {"from": "gpt", "value": "Blue."},
                ],
            },
            {  # text-only records are part of the LLaVA mix
                "id": "text-only",
                "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello."}],
            },
            # bad records, each counted under its reason:
            {  # image_count_mismatch: two placeholders, one image
                "id": "placeholders",
                "image": "images/blue.png",
                "conversations": [{"from": "human", "value": "<image><image>Two?"}, {"from": "gpt", "value": "One."}],
            },
            {  # missing_image
                "id": "missing",
                "image": "images/absent.png",
                "conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "Nothing."}],
            },
            {  # unknown_role
                "id": "tool",
                "conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": "{}"}],
            },
            '{"id": "broken", "image": "images/blue.png", "conversations": [',  # malformed_json
        ],
    )


def sharegpt() -> None:
    # LLaMA-Factory's mllm_demo shape: OpenAI-style messages, an images list
    write_jsonl(
        "sharegpt.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"<image><image>{QUESTION}"},
                    {"role": "assistant", "content": ANSWER},
                    {"role": "user", "content": FOLLOW_UP},
                    {"role": "assistant", "content": REPLY},
                ],
                "images": IMAGES,
            },
            {  # ShareGPT's own shape: conversations of from/value, a system column
                "conversations": [
                    {"from": "human", "value": "<image>Colour?"},
                    {"from": "gpt", "value": "Blue."},
                ],
                "system": "Answer in one word.",
                "images": ["images/blue.png"],
            },
            {  # image_count_mismatch: one placeholder, two images
                "messages": [{"role": "user", "content": "<image>Both?"}, {"role": "assistant", "content": "One."}],
                "images": ["images/blue.png", "images/ring.png"],
            },
            {  # unknown_role
                "messages": [{"role": "user", "content": "Hi"}, {"role": "observation", "content": "..."}],
            },
            "not json at all",  # malformed_json
        ],
    )


def cauldron() -> None:
    """the_cauldron's parquet layout: images embedded as HF Image features, texts as exchanges."""
    import datasets

    def image_bytes(name: str) -> dict:
        return {"bytes": (HERE / name).read_bytes(), "path": None}

    rows = {
        "images": [
            [image_bytes(name) for name in IMAGES],
            [image_bytes("images/blue.png")],
            [],
            [{"bytes": b"not an image", "path": None}],  # corrupt_image
        ],
        "texts": [
            [
                {"user": QUESTION, "assistant": ANSWER, "source": "example"},
                {"user": FOLLOW_UP, "assistant": REPLY, "source": "example"},
            ],
            [{"user": "What colour is this?", "assistant": "Blue.", "source": "example"}],
            [{"user": "Say hello.", "assistant": "Hello.", "source": "example"}],
            [{"user": "What is it?", "assistant": "Noise.", "source": "example"}],
        ],
    }
    text = {"user": datasets.Value("string"), "assistant": datasets.Value("string"), "source": datasets.Value("string")}
    features = datasets.Features({"images": datasets.List(datasets.Image()), "texts": datasets.List(text)})
    # Built from the storage (bytes + path structs) and cast to the Image features: encoding
    # through the Image feature would decode the deliberately corrupt bytes and fail.
    dataset = datasets.Dataset.from_dict(rows, features=_storage_features(features)).cast(features)
    dataset.to_parquet(str(HERE / "cauldron.parquet"))


def _storage_features(features):
    import datasets

    storage = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    return datasets.Features({"images": datasets.List(storage), "texts": features["texts"]})


def chat() -> None:
    image, text = {"type": "image"}, lambda t: {"type": "text", "text": t}
    write_jsonl(
        "chat.jsonl",
        [
            {
                "images": IMAGES,
                "messages": [
                    {"role": "user", "content": [image, image, text(QUESTION)]},
                    {"role": "assistant", "content": [text(ANSWER)]},
                    {"role": "user", "content": [text(FOLLOW_UP)]},
                    {"role": "assistant", "content": [text(REPLY)]},
                ],
            }
        ],
    )


if __name__ == "__main__":
    draw_images()
    llava()
    sharegpt()
    cauldron()
    chat()
