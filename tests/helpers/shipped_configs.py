"""Run a shipped config (``configs/*.yaml``) on this machine: every setting of its own kept, only
what cannot run here swapped.

What is swapped, and nothing else:

- **model folders**: a tiny model of the same family for each folder the config names, picked by
  the ``model_type`` of the folder's ``config.json`` (:data:`TINY_FOLDER_FIXTURES`; a family
  without a tiny stand-in fails with a message saying to add one);
- **data**: tiny files of the config's own format (``caption`` or ``chat``, with images drawn by
  :func:`write_caption_data` / :func:`write_chat_data`); synthetic data stays; streaming, where
  set, streams the tiny file;
- **sizes**: ``batch.seq_len`` capped at :data:`SEQ_LEN`, and the global batch made
  ``world x micro_batch_size x 2`` (gradient accumulation stays on, two micro-batches a step);
- **steps**: ``max_steps`` and ``checkpoint.every_n_steps``;
- **the world size**: 2 ranks; a mesh the config fixes keeps its shape (HSDP stays HSDP:
  ``dp_replicate=2, dp_shard=1``; FSDP over a fixed group: ``dp_shard=2``);
- **wandb**: ``online`` (no network here) becomes ``offline``.

Checkpointing, offloading, precision, storage dtypes, sharding policy, loss chunks, LoRA, packing
limits, image limits and worker counts are the config's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw

from fusiontrain.families import MODEL_FAMILIES

REPO_ROOT = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
SEQ_LEN = 192  # tokens per row: several tiny samples with their images fit, as real ones fit 4096

# config.json model_type -> the conftest fixture (tests/conftest.py, TINY_FOLDERS) holding a tiny model of that family
TINY_FOLDER_FIXTURES = {
    "mllama": "tiny_mllama_dir",
    "llama": "tiny_llama_dir",
    "qwen3": "tiny_qwen3_dir",
    "clip_vision_model": "tiny_clip_dir",
    "clip": "tiny_clip_dir",
    "siglip_vision_model": "tiny_siglip_dir",
    "siglip": "tiny_siglip_dir",
    "siglip2_vision_model": "tiny_siglip2_naflex_dir",
    "siglip2": "tiny_siglip2_naflex_dir",
}
# the config keys that name model folders, and the family each belongs to (the families declare them)
FOLDER_KEY_FAMILIES = {key: family.name for family in MODEL_FAMILIES.values() for key in family.config_keys.values()}
FOLDER_KEYS = tuple(FOLDER_KEY_FAMILIES)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SHAPES = ("circle", "square", "bar")
SIZES = [(40, 40), (64, 24), (24, 56), (32, 32), (48, 30), (28, 44)]


def shipped_configs() -> list[Path]:
    """Every config in ``configs/``: a new one is picked up by the tests that use this."""
    return sorted((REPO_ROOT / "configs").glob("*.yaml"))


def _lookup(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def model_type_of(folder: str) -> str | None:
    """The ``model_type`` of a config's model folder, or None when the folder is not in the
    repository (tiny.yaml names one that ``make-tiny`` writes)."""
    path = REPO_ROOT / folder / "config.json"
    return json.loads(path.read_text()).get("model_type") if path.is_file() else None


def folder_fixtures(raw: dict[str, Any]) -> dict[str, str]:
    """``{config key: fixture name}`` of the tiny stand-in for each model folder the config names.

    Raises:
        AssertionError: a folder's family has no tiny stand-in.
    """
    found = {}
    for key in FOLDER_KEYS:
        folder = _lookup(raw, key)
        if folder is None:
            continue
        # A folder not in the repository (tiny.yaml's) is read as its family's own name.
        model_type = model_type_of(folder) or FOLDER_KEY_FAMILIES[key]
        fixture = TINY_FOLDER_FIXTURES.get(model_type)
        assert fixture is not None, (
            f"config key {key}={folder} (model_type {model_type!r}) has no tiny stand-in: add one to "
            "TINY_FOLDER_FIXTURES in tests/helpers/shipped_configs.py"
        )
        found[key] = fixture
    assert found, f"the config names no model folder among {FOLDER_KEYS}"
    return found


def missing_folder_fixtures(raw: dict[str, Any]) -> dict[str, str]:
    """:func:`folder_fixtures` for the model folders the config names that are not in the
    repository (tiny.yaml names those ``make-tiny`` writes)."""
    return {key: fixture for key, fixture in folder_fixtures(raw).items() if model_type_of(_lookup(raw, key)) is None}


def stand_in_overrides(
    raw: dict[str, Any], *, folders: dict[str, Path], data: dict[str, Path], output_dir: Path, max_steps: int
) -> list[str]:
    """The ``key=value`` overrides that make the config ``raw`` (its YAML) run here (see the
    module docstring). ``folders``: tiny model folder per folder key; ``data``: tiny data file per
    format."""
    overrides = [f"{key}={folder}" for key, folder in folders.items()]
    data_format = _lookup(raw, "data.format") or "synthetic"
    if data_format != "synthetic":
        overrides.append(f"data.train.path={data[data_format]}")
        if _lookup(raw, "data.eval.path") is not None:
            overrides.append(f"data.eval.path={data[data_format]}")
    seq_len = min(int(_lookup(raw, "batch.seq_len") or SEQ_LEN), SEQ_LEN)
    micro = int(_lookup(raw, "batch.micro_batch_size") or 1)
    overrides += [
        f"batch.seq_len={seq_len}",
        f"batch.global_batch_size={WORLD_SIZE * micro * 2}",
        f"max_steps={max_steps}",
        "checkpoint.every_n_steps=2",
        f"output_dir={output_dir}",
    ]
    replicate, shard = _lookup(raw, "parallel.dp_replicate"), _lookup(raw, "parallel.dp_shard")
    if shard not in (None, -1):
        overrides += (
            ["parallel.dp_replicate=2", "parallel.dp_shard=1"]
            if (replicate or 1) > 1
            else ["parallel.dp_replicate=1", f"parallel.dp_shard={WORLD_SIZE}"]
        )
        if _lookup(raw, "plan.gpus") is not None:
            overrides.append("plan.gpus=null")
    if _lookup(raw, "logging.wandb.mode") == "online":
        overrides.append("logging.wandb.mode=offline")
    return overrides


def load_raw(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


# -- tiny data ------------------------------------------------------------------------------------


def _draw(path: Path, index: int) -> tuple[str, str]:
    """A small picture of a coloured shape, its size varying with ``index``; returns (colour, shape)."""
    colour, shape = list(COLOURS)[index % 3], SHAPES[(index // 3) % 3]
    width, height = SIZES[index % len(SIZES)]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    box = (2, 2, width - 3, height - 3)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.rectangle((2, height // 3, width - 3, 2 * height // 3), fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return colour, shape


def write_caption_data(folder: Path, count: int = 36) -> Path:
    """``folder/train.jsonl`` of caption records (``{"image", "text"}``) with their images."""
    lines = []
    for index in range(count):
        colour, shape = _draw(folder / "images" / f"{index}.png", index)
        lines.append(json.dumps({"image": f"images/{index}.png", "text": f"a {colour} {shape}"}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_chat_data(folder: Path, count: int = 36) -> Path:
    """``folder/train.jsonl`` of chat records (``{"images", "messages"}``): one or two images, or
    none (text only), a question and an answer."""
    lines = []
    for index in range(count):
        images = [] if index % 6 == 5 else [f"images/{index}.png"] + ([f"images/{index}b.png"] if index % 4 == 1 else [])
        answers = []
        for name in images:
            colour, shape = _draw(folder / name, index + len(answers))
            answers.append(f"a {colour} {shape}")
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What is shown?" if images else "Hi?"}]
        messages = [
            {"role": "user", "content": content},
            {"role": "assistant", "content": " and ".join(answers) or "Hello."},
        ]
        lines.append(json.dumps({"images": images, "messages": messages}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
