"""What measuring sample sizes costs (``python -m fusiontrain prepare``, or a train run's start-up
without a cache): ``python benchmarks/sizes.py [--samples N]``.

One process, the tiny test tokenizers (``fusiontrain.tiny``: real tokenizers are larger, and a
long chat template costs more), on files written here:

- ``caption`` records on the tiny Mllama (fixed-size tiles: sizes from the tokens alone, no image
  is opened);
- ``chat`` records (a user turn with an image, an assistant reply) on the tiny Mllama: the chat
  template renders each conversation several times (the prefix checks of the assistant span);
- ``caption`` records on Qwen3 + SigLIP2 NaFlex: each image's token count follows its aspect
  ratio, so every image is decoded and processed.

Prints samples/s for each, and the time reading the cache back takes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusiontrain import tiny  # noqa: E402
from fusiontrain.config import load_config  # noqa: E402
from fusiontrain.data.sizes import cache_dirs  # noqa: E402
from fusiontrain.train.data import prepare_from_config  # noqa: E402


def write_data(folder: Path, samples: int, data_format: str) -> Path:
    """``samples`` records of ``data_format`` (caption or chat) over 16 PNGs of different shapes."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(16):
        Image.new("RGB", (64 + 24 * (i % 4), 48 + 16 * (i % 3)), (15 * i, 120, 200)).save(folder / "images" / f"{i}.png")
    lines = []
    for i in range(samples):
        text = "a picture of " + " ".join(f"word{(i * 7 + k) % 50}" for k in range(5 + i % 20))
        image = f"images/{i % 16}.png"
        if data_format == "caption":
            lines.append(json.dumps({"image": image, "text": text}))
        else:
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": text},
            ]
            lines.append(json.dumps({"images": [image], "messages": messages}))
    path = folder / f"{data_format}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mllama, _ = tiny.save_tiny_mllama(root / "mllama")
        qwen3, _ = tiny.save_tiny_qwen3(root / "qwen3")
        naflex, _ = tiny.save_tiny_siglip2_naflex(root / "naflex")
        cases = {
            "caption, Mllama tiles (tokens only)": ("caption", [f"model.hf_mllama={mllama}"]),
            "chat, Mllama tiles (tokens only)": ("chat", [f"model.hf_mllama={mllama}"]),
            "caption, SigLIP2 NaFlex (images decoded)": (
                "caption",
                ["model.hf_mllama=null", f"model.compose.decoder={qwen3}", f"model.compose.encoder={naflex}"],
            ),
        }
        for name, (data_format, model) in cases.items():
            data = write_data(root / name.split(",")[0] / name[-20:].replace(" ", "_"), args.samples, data_format)
            overrides = [*model, f"data.format={data_format}", f"data.train.path={data}", "batch.seq_len=256", f"output_dir={root / 'run'}"]
            config = load_config(str(REPO / "configs" / "tiny.yaml"), overrides)
            report = prepare_from_config(config)
            started = time.perf_counter()
            table_file = next(cache_dirs(str(data), root / "run")[0].glob("sizes-*.npy"))
            table = np.load(table_file, allow_pickle=False)
            read = time.perf_counter() - started
            print(f"{name}: {report.splitlines()[0]}; reading the {table.shape} cache back: {read * 1000:.1f} ms")


if __name__ == "__main__":
    main()
