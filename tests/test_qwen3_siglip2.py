"""A composed Qwen3 + SigLIP2-NaFlex model, end to end.

- Trained by the real Trainer on synthetic data with padded batches, 2 gloo ranks compute what one
  process does (per-step losses and final trainable weights).
- A packed row whose images have different NaFlex token counts (real images of different aspect
  ratios, through the tower's own Siglip2 processor) gives every sample the loss it has alone.
- ``python -m fusiontrain train`` on caption files (packed, 2 ranks), then ``export`` and
  ``generate`` from the export and from the checkpoint: the export's logits equal the
  checkpoint's, and the CLI prints the continuation the model computes.

The decoder is ``fusiontrain.tiny.save_tiny_qwen3`` (head_dim 32 != 64 / 4, perturbed q/k norms,
tied LM head); the tower ``save_tiny_siglip2_naflex`` (4 px patches, at most 16 per image).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from fusiontrain.cli import main as cli_main
from fusiontrain.data.batch import Sample, collate_padded
from fusiontrain.data.formats import SampleBuilder
from fusiontrain.data.packing import FirstFitPacker, collate_rows
from fusiontrain.data.sources import Record
from fusiontrain.families import model_family
from fusiontrain.families.siglip2_image import NaflexImage
from fusiontrain.inference.generation import generate
from fusiontrain.inference.load import build_prompt_inputs, load_for_inference
from fusiontrain.models import compose_from_hf
from tests.helpers.launch import REPO_ROOT, run_commands, run_world
from tests.helpers.tiny_models import open_gates

HARNESS = str(REPO_ROOT / "tests" / "helpers" / "train_harness.py")
TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
FUSION_INTERVAL = 2
PROMPT = "What is it?"


def _draw(path: Path | None, size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    """A white ``size`` (width, height) picture with a coloured ellipse and bar; saved when ``path``."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((1, 1, max(2, size[0] // 2), size[1] - 2), fill=color)
    draw.rectangle((size[0] // 2, 1, size[0] - 2, max(2, size[1] // 2)), fill=(color[2], color[0], color[1]))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return image


@pytest.fixture(scope="module")
def composed_args(tiny_qwen3_dir: Path, tiny_siglip2_naflex_dir: Path) -> list[str]:
    return [
        "model.hf_mllama=null",
        f"model.compose.decoder={tiny_qwen3_dir}",
        f"model.compose.encoder={tiny_siglip2_naflex_dir}",
        f"model.compose.fusion_interval={FUSION_INTERVAL}",
    ]


# -- (a) 1 vs 2 gloo ranks, padded ---------------------------------------------------------------------


def _train(out: Path, nproc: int, model_args: list[str]) -> tuple[dict, dict]:
    args = [
        HARNESS, str(out), "--config", TINY_CONFIG, *model_args, f"output_dir={out}/run", "data.packing=false",
        "max_steps=3", "batch.micro_batch_size=2", "batch.global_batch_size=4", "logging.every_n_steps=0",
        "eval.every_n_steps=0", "data.num_workers=0",
    ]
    run_world(args, nproc=nproc, timeout=240)
    return json.loads((out / "report.json").read_text()), load_file(out / "trainable.safetensors")


def test_padded_training_is_the_same_on_one_and_two_ranks(tmp_path: Path, composed_args: list[str]) -> None:
    one_report, one_weights = _train(tmp_path / "one", 1, composed_args)
    two_report, two_weights = _train(tmp_path / "two", 2, composed_args)
    for report in (one_report, two_report):
        assert report["frozen_unchanged"] and report["num_frozen"] > 50
        assert not report["unmoved_trainable"], "every fusion parameter must move"
    # The Qwen3 cross-attention layers are trained (with their q/k norms), and so is the NaFlex head.
    assert any(".fusion_layer.attn.q_norm." in name for name in one_weights)
    assert any(name.startswith("encoder.projection.") for name in one_weights)
    losses = torch.tensor(one_report["losses"])
    diff = (torch.tensor(two_report["losses"]) - losses).abs().max().item()
    print(f"qwen3+siglip2 padded: losses {losses.tolist()}, max |2 ranks - 1| = {diff:.2e}")
    torch.testing.assert_close(torch.tensor(two_report["losses"]), losses, atol=2e-6, rtol=0)
    assert one_weights.keys() == two_weights.keys()
    worst = max((two_weights[n] - one_weights[n]).abs().max().item() for n in one_weights)
    print(f"qwen3+siglip2 padded: max |weights 2 ranks - 1| = {worst:.2e}")
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], atol=2e-5, rtol=0, msg=name)


# -- (b) packed rows with images of different token counts --------------------------------------------


@pytest.fixture(scope="module")
def composed(tiny_qwen3_dir: Path, tiny_siglip2_naflex_dir: Path):
    """(model with open gates, its NaFlex format, a chat SampleBuilder through the real folders)."""
    model = compose_from_hf(tiny_qwen3_dir, tiny_siglip2_naflex_dir, fusion_interval=FUSION_INTERVAL).eval()
    open_gates(model, seed=1)
    fmt = model_family("composed").image_format(model)
    assert isinstance(fmt, NaflexImage)
    builder = SampleBuilder(
        tiny_qwen3_dir,
        fmt,
        image_dir=tiny_siglip2_naflex_dir,
        format="chat",
        max_len=128,
        image_token_id=model.decoder.tok_embeddings.vocab_size,
    )
    return model, fmt, builder


def _chat(builder: SampleBuilder, images: list[Image.Image], question: str, answer: str, index: int) -> Sample:
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    data = {
        "images": images,
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
    }
    return builder(Record(data=data, origin=f"test:{index}", base_dir=None))


# (width, height) -> NaFlex patch grid of the tiny processor: 2x8 = 16, 5x3 = 15, 7x2 = 14, 6x2 = 12.
SIZES = {"wide": (64, 16), "tall": (20, 44), "thin": (12, 40), "narrow": (10, 30)}


def _samples(builder: SampleBuilder, shift: int = 0) -> list[Sample]:
    def pic(name: str, k: int) -> Image.Image:
        return _draw(None, SIZES[name], ((40 + 70 * (k + shift)) % 256, (200 - 50 * k) % 256, (90 + 30 * (k + shift)) % 256))

    return [
        _chat(builder, [pic("wide", 0)], "What is this?", "A wide bar.", 0),
        _chat(builder, [pic("tall", 1), pic("thin", 2)], "Compare them.", "Both are tall.", 1),
        _chat(builder, [], "Hello?", "Hi there.", 2),  # text only
        _chat(builder, [pic("narrow", 3)], "Colour?", "Blue.", 3),
    ]


def _packed_losses(model, fmt: NaflexImage, samples: list[Sample]) -> tuple[list[torch.Tensor], dict]:
    """Per sample, the token losses of its positions in one packed row (and the batch)."""
    seq_len = sum(len(s) for s in samples) + 5  # a few padding tokens at the end too
    packer = FirstFitPacker(seq_len, max_images=4, max_open_rows=1, image_format=fmt, max_encoder_tokens=64)
    rows = [row for index, sample in enumerate(samples) for row in packer.add(index, sample)] + packer.flush()
    assert len(rows) == 1 and len(rows[0].samples) == len(samples), "the samples are meant to share one row"
    batch = collate_rows(rows, seq_len, fmt)
    with torch.no_grad():
        logits = model(batch.tokens, **batch.model_inputs())[0]
    token_losses = F.cross_entropy(logits, batch.labels[0], ignore_index=-100, reduction="none")
    per_sample, offset = [], 0
    for sample in samples:
        per_sample.append(token_losses[offset : offset + len(sample)])
        assert batch.labels[0, offset + len(sample) - 1] == -100, "no label crosses a sample boundary"
        offset += len(sample)
    return per_sample, {"batch": batch, "row": rows[0]}


def _alone_losses(model, fmt: NaflexImage, sample: Sample) -> torch.Tensor:
    batch = collate_padded([sample], 128, fmt)
    with torch.no_grad():
        logits = model(batch.tokens, **batch.model_inputs())[0]
    return F.cross_entropy(logits, batch.labels[0], ignore_index=-100, reduction="none")[: len(sample)]


def test_packed_loss_equals_per_sample_losses_with_different_token_counts(composed) -> None:
    model, fmt, builder = composed
    samples = _samples(builder)
    counts = [fmt.num_tokens(image) for sample in samples for image in sample.images]
    assert counts == [16, 15, 14, 12], counts  # every image its own count, below the budget too
    packed, info = _packed_losses(model, fmt, samples)
    batch, row = info["batch"], info["row"]
    assert row.encoder_tokens == sum(counts)
    # packed encoder layout: the row's columns are exactly its images' valid tokens, back to back
    assert batch.encoder_input["token_index"].shape == (1, sum(counts))
    assert batch.encoder_mask.shape == (1, batch.tokens.shape[1], sum(counts))

    diffs = []
    for index, sample in enumerate(samples):
        alone = _alone_losses(model, fmt, sample)
        assert int((sample.labels != -100).sum()) > 3
        torch.testing.assert_close(packed[index], alone, atol=1e-5, rtol=0, msg=f"sample {index} token losses")
        diffs.append((packed[index].sum() - alone.sum()).abs().item())
        torch.testing.assert_close(packed[index].sum(), alone.sum(), atol=1e-5, rtol=0, msg=f"sample {index} loss")
    print(f"qwen3+siglip2 packed vs alone: max |per-sample loss diff| = {max(diffs):.2e}")

    # The images matter, and only to their own sample: other pictures for sample 1 change its loss
    # and leave the others' bitwise alone.
    other = _samples(builder, shift=2)
    assert [fmt.num_tokens(i) for s in other for i in s.images] == counts
    changed, _ = _packed_losses(model, fmt, [samples[0], other[1], samples[2], samples[3]])
    assert (changed[1] - packed[1]).abs().sum().item() > 1e-3
    for index in (0, 2, 3):
        assert torch.equal(changed[index], packed[index]), index


# -- (c) the CLI: train, export, generate ----------------------------------------------------------------


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("captions")
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    sizes = [(64, 16), (20, 44), (12, 40), (10, 30), (30, 30), (48, 20)]
    lines = []
    for i, size in enumerate(sizes * 2):
        name = list(colours)[i % 3]
        _draw(folder / "images" / f"{i}.png", size, colours[name])
        lines.append(json.dumps({"image": f"images/{i}.png", "text": f"a {name} picture"}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cli(*commands: list[str]) -> list[str]:
    """Run ``python -m fusiontrain ARGS`` for each of ``commands`` at once (forked from the
    zygote, as ``python`` would start them); fails the test on a non-zero exit. Returns their
    outputs (stdout and stderr together)."""
    results = run_commands([[sys.executable, "-m", "fusiontrain", *args] for args in commands], timeout=180, fork=True)
    return [result.stdout for result in results]


def test_cli_trains_exports_and_generates(
    tmp_path: Path, composed_args: list[str], caption_data: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    run_world(
        ["-m", "fusiontrain", "train", "--config", TINY_CONFIG, *composed_args, f"output_dir={out}", "data.format=caption",
         f"data.train.path={caption_data}", "data.packing=true", "data.num_workers=0", "batch.seq_len=48",
         "batch.micro_batch_size=1", "batch.global_batch_size=2", "max_steps=3", "optim.lr=2e-2", "optim.warmup_steps=0",
         "checkpoint.every_n_steps=3", "eval.every_n_steps=0", "logging.every_n_steps=0"],
        nproc=2,
        timeout=240,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rows)
    checkpoint = out / "checkpoints" / "step_3"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["base"]["family"] == "composed"

    export = tmp_path / "export"
    _cli(["export", "--checkpoint", str(checkpoint), "--out", str(export), "--dtype", "fp32"])
    assert (export / "fusiontrain_config.json").is_file()

    image = caption_data.parent / "images" / "0.png"
    kinds = {"export": export, "checkpoint": checkpoint}
    outputs = _cli(
        *(["generate", "--model", str(folder), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "8"]
          for folder in kinds.values())
    )
    printed = dict(zip(kinds, outputs))
    assert printed["export"] == printed["checkpoint"]

    from_export, from_checkpoint = load_for_inference(export), load_for_inference(checkpoint)
    assert (from_export.kind, from_export.family, from_checkpoint.kind) == ("export", "composed", "checkpoint")
    assert isinstance(from_export.image_format, NaflexImage)
    for (name, a), (other, b) in zip(
        from_export.model.named_parameters(), from_checkpoint.model.named_parameters(), strict=True
    ):
        assert name == other and torch.equal(a, b), name
    tokens, encoder_input, encoder_mask = build_prompt_inputs(from_export, [image], PROMPT)
    again = build_prompt_inputs(from_checkpoint, [image], PROMPT)
    assert torch.equal(tokens, again[0]) and torch.equal(encoder_mask, again[2])
    assert all(torch.equal(encoder_input[key], again[1][key]) for key in encoder_input)
    assert encoder_mask.shape[-1] == 16  # the 64x16 image: 2x8 patches
    with torch.no_grad():
        logits = from_export.model(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask)
        want = from_checkpoint.model(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask)
    assert torch.equal(logits, want)

    # The trained model sees the image: another picture changes the logits after the image token.
    other_input = build_prompt_inputs(from_export, [caption_data.parent / "images" / "4.png"], PROMPT)
    with torch.no_grad():
        other = from_export.model(other_input[0], encoder_input=other_input[1], encoder_mask=other_input[2])
    assert torch.equal(other_input[0], tokens)
    first = tokens[0].tolist().index(from_export.image_token_id)
    assert torch.equal(other[:, :first], logits[:, :first])
    image_effect = (other[:, first:] - logits[:, first:]).abs().max().item()
    print(f"qwen3+siglip2 CLI: logit change from another image = {image_effect:.2e}")
    assert image_effect > 1e-4

    # What the CLI printed is the model's own greedy continuation.
    output = generate(
        from_export.model, tokens, max_new_tokens=8, encoder_input=encoder_input, encoder_mask=encoder_mask,
        stop_token_ids=from_export.stop_token_ids(),
    )
    text = from_export.tokenizer.decode(output[0, tokens.shape[1] :].tolist(), skip_special_tokens=True)
    assert printed["export"].endswith(text + "\n")
    new_tokens = output[0, tokens.shape[1] :].tolist()
    assert len(new_tokens) == 8, "no stop token expected from this model"
    # Greedy, the random tiny LM repeats one reserved special token, which decodes to nothing; sampled
    # (same entry point, in this process), it writes characters, and exactly the seeded continuation.
    capsys.readouterr()
    code = cli_main(["generate", "--model", str(checkpoint), "--image", str(image), "--prompt", PROMPT,
                     "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "3"])
    sampled_printed = capsys.readouterr().out
    assert code == 0
    sampled = generate(
        from_checkpoint.model, tokens, max_new_tokens=8, encoder_input=encoder_input, encoder_mask=encoder_mask,
        stop_token_ids=from_checkpoint.stop_token_ids(), temperature=1.0, top_p=1.0,
        generator=torch.Generator().manual_seed(3),
    )
    sampled_text = from_checkpoint.tokenizer.decode(sampled[0, tokens.shape[1] :].tolist(), skip_special_tokens=True)
    print(f"qwen3+siglip2 CLI: greedy {new_tokens} -> {text!r}; sampled {sampled_text!r}")
    assert sampled_printed == sampled_text + "\n"
    assert sampled_text.strip(), "sampling must produce some text"
