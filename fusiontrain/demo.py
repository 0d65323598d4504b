"""The end-to-end demo (``make demo``), on 2 CPU processes in a little over a minute.

1. Writes a tiny HF Llama 3.2 Vision checkpoint (config, safetensors, tokenizer, processor) and
   draws a few hundred images of red / green / blue circles, squares and triangles, each with its
   caption ("a red circle"), plus held-out ones.
2. Trains on 2 gloo ranks under ``torchrun --max-restarts 1`` with packing and checkpoints, and
   kills one rank with SIGKILL mid-run: torchrun restarts the job, which resumes from the latest
   checkpoint by itself.
3. Exports the last checkpoint in the HF layout, reloads it with ``transformers`` and checks its
   logits against fusiontrain's.
4. Captions held-out images, one of each colour and shape, with KV-cached greedy decoding.

The tiny base model is random, so the demo trains it whole (``decoder_trainable``,
``encoder_trainable``): a random LM cannot be steered to spell captions by its fusion layers
alone. Real runs start from pretrained weights and train the fusion parameters only.

Everything the demo needs ships inside the package: its training config is package data
(``fusiontrain/demo.yaml``, read with :mod:`importlib.resources`) and the model is built by
:mod:`fusiontrain.tiny`, so an installed copy runs it from any directory. Its outputs go to
``--output-dir`` (default ``demo_output``), relative to the current working directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from fusiontrain.parallel.processes import descendant_pids, parent_pid

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
SHAPES = ("circle", "square", "triangle")
DEMO_CONFIG = "demo.yaml"  # package data of fusiontrain ([tool.setuptools.package-data] in pyproject.toml)
KILL_AFTER_CHECKPOINT = 300  # of 500 steps, checkpointed every 100 (fusiontrain/demo.yaml)


def demo_config(name: str = DEMO_CONFIG) -> contextlib.AbstractContextManager[Path]:
    """A demo's training config (package data ``name``) as a file path, for the ``with`` block that
    uses it: it is read from the installed package (not from a source checkout), extracted to a
    temporary file only when the package is not on disk (e.g. imported from a zip)."""
    return resources.as_file(resources.files("fusiontrain").joinpath(name))


def torchrun_command(config: Path, overrides: list[str], *, max_restarts: int = 0) -> list[str]:
    """``train`` with ``config`` and ``overrides`` on 2 local ranks under torchrun, which restarts
    the whole job up to ``max_restarts`` times after a rank dies."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", str(max_restarts), "-m", "fusiontrain", "train", "--config", str(config), *overrides,
    ]


def training_env() -> dict[str, str]:
    """The environment of a demo's training job: one thread per rank (2 ranks on 2 cores would
    otherwise fight over them) and no wandb."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def print_losses(run: Path, every: int = 50) -> None:
    """The training loss of every ``every``-th step and of the last in ``run``'s ``metrics.jsonl``,
    and each eval loss."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if row["step"] % every == 0 or "eval_loss" in row or row is rows[-1]:
            extra = f"  eval loss {row['eval_loss']:.3f}" if "eval_loss" in row else ""
            print(f"      step {row['step']:3d}  loss {row['loss']:.3f}{extra}")


def training_overrides(base: Path, out: Path) -> list[str]:
    """The ``key=value`` overrides the demo adds to its config: the paths it generated under ``out``."""
    return [
        f"model.hf_mllama={base}",
        f"output_dir={out / 'run'}",
        f"data.train.path={out / 'train' / 'captions.jsonl'}",
        f"data.eval.path={out / 'held_out' / 'captions.jsonl'}",
    ]


def draw_shape(shape: str, color: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """One ``color`` ``shape`` on white, nearly filling the image, a little off-centre: the tiny
    encoder sees 2 x 2 patches per tile, so the shapes differ in what fills each patch's corners."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    radius = min(width, height) // 2 - rng.randint(2, 5)
    cx, cy = width // 2 + rng.randint(-2, 2), height // 2 + rng.randint(-2, 2)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=COLORS[color])
    return image


def write_dataset(folder: Path, count: int | None, seed: int) -> list[tuple[Path, str]]:
    """``count`` drawn images of random colours and shapes (None: one of each combination) and a
    caption JSON Lines file; returns (image, caption) pairs."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    if count is None:
        drawings = [(shape, color) for color in COLORS for shape in SHAPES]
    else:
        drawings = [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(count)]
    pairs, lines = [], []
    for index, (shape, color) in enumerate(drawings):
        size = rng.choice([(48, 48), (64, 40), (40, 64)])
        path = folder / "images" / f"{index}.png"
        draw_shape(shape, color, size, rng).save(path)
        caption = f"a {color} {shape}"
        pairs.append((path, caption))
        lines.append(json.dumps({"image": f"images/{index}.png", "text": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return pairs


def _rank_one(pid: int, agent: int) -> bool:
    """Whether ``pid`` is torchrun's rank 1: a child of the torchrun ``agent`` (the rank's own
    dataloader workers share its command line and environment)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"LOCAL_RANK=1" in environ and b"fusiontrain" in cmdline and parent_pid(pid) == agent


def train_with_a_kill(command: list[str], run: Path, log: Path) -> None:
    """Run ``command`` (torchrun with --max-restarts 1) and SIGKILL rank 1 once the checkpoint
    of step KILL_AFTER_CHECKPOINT exists; torchrun restarts and the run resumes by itself."""
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=training_env(), stdout=sink, stderr=subprocess.STDOUT)
        marker = run / "checkpoints" / f"step_{KILL_AFTER_CHECKPOINT}" / "manifest.json"
        while not marker.is_file() and process.poll() is None:
            time.sleep(0.05)
        victims = [pid for pid in descendant_pids(process.pid) if _rank_one(pid, process.pid)]
        if victims:
            os.kill(victims[0], signal.SIGKILL)
            print(f"      killed rank 1 (pid {victims[0]}) with SIGKILL after the step-{KILL_AFTER_CHECKPOINT} checkpoint")
        if process.wait() != 0:
            raise RuntimeError(f"training failed; see {log}")


def caption(model, transform, tokenizer, image: Image.Image, image_format) -> str:
    """Greedy caption of ``image``: the caption layout trained on (BOS, image token, text)."""
    from fusiontrain.data.image_format import encoder_mask_rows
    from fusiontrain.inference.generation import generate

    pixels = transform(image)
    image_token = model.decoder.tok_embeddings.vocab_size
    prompt = torch.tensor([[tokenizer.bos_token_id, image_token]])
    encoder_mask, encoder_input = encoder_mask_rows([[pixels]], [[(0, 2)]], image_format, 2)
    tokens = generate(
        model,
        prompt,
        max_new_tokens=16,
        encoder_input=encoder_input,
        encoder_mask=encoder_mask,
        stop_token_ids=(tokenizer.eos_token_id,),
    )
    return tokenizer.decode(tokens[0, 2:], skip_special_tokens=True).strip()


def main(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from fusiontrain import tiny

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    out = Path(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    print(f"[1/4] a tiny HF Llama 3.2 Vision checkpoint and {300} drawn images with captions, in {out}")
    # 56 px tiles: 4 x 4 patches, so the corners of a drawing fall in patches of their own.
    config = tiny.tiny_mllama_config(vision_config={"image_size": 56})
    base, _ = tiny.save_tiny_mllama(out / "tiny_mllama", seed=0, nonzero_gates=False, config=config)
    write_dataset(out / "train", 300, seed=1)
    held_out = write_dataset(out / "held_out", None, seed=2)

    print("[2/4] training on 2 ranks (gloo) with packing and checkpoints; one rank gets killed")
    run = out / "run"
    with demo_config() as config_path:
        command = torchrun_command(config_path, training_overrides(base, out), max_restarts=1)
        train_with_a_kill(command, run, out / "train.log")
    print_losses(run)
    resumed = "resumed from" in (out / "train.log").read_text()
    print(f"      the restarted job resumed from its checkpoint: {resumed}")

    print("[3/4] export the last checkpoint in the HF layout and reload it with transformers")
    from transformers import MllamaForConditionalGeneration

    from fusiontrain.checkpoint.export import export_checkpoint
    from fusiontrain.checkpoint.layout import latest_complete
    from fusiontrain.data.images import ImageTransform
    from fusiontrain.inference.load import load_for_inference
    from fusiontrain.models import encoder_mask_from_cross_attention_mask

    step, checkpoint = latest_complete(run)
    exported = export_checkpoint(checkpoint, out / "exported", format="hf", dtype="fp32")
    hf_model = MllamaForConditionalGeneration.from_pretrained(exported, attn_implementation="eager").eval()
    loaded = load_for_inference(checkpoint)
    transform = ImageTransform.from_pretrained(base, loaded.image_format)
    image = Image.open(held_out[0][0]).convert("RGB")
    pixels = transform(image)
    encoder_input = loaded.image_format.collate([[pixels]])
    tokens = torch.tensor([[loaded.tokenizer.bos_token_id, loaded.image_token_id, 40, 41]])
    cross = torch.zeros(1, 4, 1, loaded.image_format.max_num_tiles, dtype=torch.long)
    cross[0, 1:, 0] = pixels["aspect_ratio_mask"]
    cross[0, 0, 0] = pixels["aspect_ratio_mask"]  # every row sees the image (see transformers#39379)
    tokens_per_tile = loaded.image_format.tokens_per_tile
    with torch.no_grad():
        ours = loaded.model(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask_from_cross_attention_mask(cross, tokens_per_tile))
        theirs = hf_model(input_ids=tokens, **encoder_input, cross_attention_mask=cross).logits
    print(f"      checkpoint step {step} -> {exported}: max |fusiontrain - transformers| logits = {(ours - theirs).abs().max():.2e}")

    print("[4/4] captions of held-out images (KV-cached greedy decoding)")
    shapes = colors = 0
    for path, truth in held_out:
        text = caption(loaded.model, transform, loaded.tokenizer, Image.open(path).convert("RGB"), loaded.image_format)
        _, color, shape = truth.split()
        shapes, colors = shapes + (shape in text.split()), colors + (color in text.split())
        print(f"      {path.name}: {text!r}  (drawn: {truth!r})")
    print(f"      right shape in {shapes} of {len(held_out)} captions, right colour in {colors}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0
