"""fusiontrain against Hugging Face transformers, same weights, same data: ``python benchmarks/vs_hf.py``.

One process, on the CPU (or one GPU with ``--device cuda``), trains the benchmark Mllama
(``fusiontrain.tiny.bench_mllama_config``, written once to ``benchmarks/out/bench_mllama``)
fusion-only, in fp32 (or bf16 mixed precision with ``--precision bf16``), three ways:

(a) **HF transformers** as TRL / accelerate users run it: ``MllamaForConditionalGeneration
    .from_pretrained`` (fp32, ``attn_implementation="sdpa"``, which trains on the CPU), every
    parameter frozen by hand except the ones fusiontrain trains (see ``hf_trainable``), a padding
    collator (each batch padded to its longest sample, labels -100 on padding and on positions
    without a target), and a plain loop: forward with labels (full ``[b, s, v]`` logits, HF's own
    loss), backward, grad-norm clipping at 1.0 (as fusiontrain and HF's Trainer do by default),
    ``AdamW(foreach=True)`` step (``fused=True`` on a GPU), ``zero_grad``.
(b) **fusiontrain, padded**: ``fusiontrain.trainer.Trainer`` (FSDP2 over a world of one, gloo)
    with ``data.packing=false``: one sample per row, padded to the batch's longest sample.
(c) **fusiontrain, packed**: the same Trainer with ``data.packing=true``: rows of 1024 tokens,
    bounded first-fit packing with 8 open rows and up to 16 images per row.

(b) and (c) use fusiontrain's default chunked loss (8 chunks of the output projection; the
projection is frozen, so each chunk's gradient is taken in forward and nothing is recomputed).

Data: ``SyntheticImageText(lengths="long_tail", max_text=1024)``: 0, 1 or 2 images per sample
(each image's token opens the text that sees it), text lengths from a Pareto law (alpha 1.1,
scale 24 tokens, capped at 1024; mean about 100). All three read the same sample sequence: the
Trainer's own ``SampleStream`` order (seed 0). (a) iterates an identical stream built here, and
the script asserts that every padded batch (a) trained on is bit-identical to the one (b) trained
on. (a)/(b) take 4 samples per step; (c) takes 4 packed rows of 1024 tokens per step, which hold
many more samples (that is the point).

Per variant it reports real tokens/s (non-padding tokens of the timed steps over their summed step
time; the first step is warm-up and not timed), the share of token slots holding real tokens, the
median step time, the CPU utilisation of the timed steps (process CPU time over wall time x
threads: well under 100% means something else shared the cores and the times are not clean), and
the peak RSS while training above the RSS before the variant built its model (weights, gradients,
optimizer state and activations; the RSS high-water mark is reset after each model is loaded, as
the Trainer does, and the previous variant's model is freed first). The script re-executes itself
with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the RSS.

Step-0 agreement: on the identical first padded batch, HF's loss (a), the Trainer's first-step
loss (b), and model (c)'s chunked loss on that batch unpacked must agree to 1e-4 relative. HF
differs on one kind of row (transformers#39379): a text row that sees no image still attends to
all image tokens (only the MLP half of the cross-attention layer is zeroed), while Meta's
reference, torchtune and fusiontrain zero the whole layer. Rows before a sample's first image do
not occur here (SyntheticImageText opens every sample that has images with its image token), but
text-only samples batched next to samples with images are such rows. So the agreement is checked
on HF's loss with those text-only samples' logits taken from an image-free forward (where HF skips
the cross-attention layers, which is the reference behaviour); HF's own loss on the mixed batch is
printed next to it, and the difference is the #39379 leak.

On a GPU (``--device cuda``) the same three variants run on ``cuda:0``: the Trainer over a
world of one on nccl (packed rows attend through a compiled flex_attention ``BlockMask``), HF
with SDPA. The memory column is then the CUDA allocator's peak (weights included), and step
times are taken after a device synchronisation. ``--precision bf16`` trains HF under
``torch.autocast(bfloat16)`` with fp32 weights (what HF's Trainer does with ``bf16=True``) and
fusiontrain with ``parallel.mixed_precision=bf16`` (bf16 compute, fp32 weights and gradient
reduction); the step-0 agreement is then checked to ``BF16_AGREEMENT_RTOL``. fp32 on a GPU runs
with TF32 off (PyTorch's default for matmuls).

Flags: ``--steps`` (default 8), ``--threads`` (torch threads, default ``os.cpu_count()``),
``--device`` (cpu or cuda), ``--precision`` (fp32 or bf16; bf16 needs cuda), ``--json PATH``
(the numbers, for a results writer), ``--profile`` (torch.profiler over 2 more steps of (c), top
10 ops by self time).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MMAP_THRESHOLD = "65536"
if __name__ == "__main__" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
    # glibc keeps freed heap memory resident unless large blocks come from mmap; re-exec so the
    # setting applies from the first allocation on.
    script = str(Path(__file__).resolve())
    os.execve(sys.executable, [sys.executable, script, *sys.argv[1:]], {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.memory import mib, model_folder, table  # noqa: E402
from fusiontrain import distributed  # noqa: E402
from fusiontrain.builders import build_dataset, build_meta_model, build_stream_config, configured_family  # noqa: E402
from fusiontrain.config import TrainConfig, load_config  # noqa: E402
from fusiontrain.data import Batch, ImageFormat  # noqa: E402
from fusiontrain.data.loader import SampleStream, build_loader  # noqa: E402
from fusiontrain.loss import count_targets  # noqa: E402
from fusiontrain.metrics import host_rss_bytes, peak_memory_bytes, reset_peak_memory  # noqa: E402
from fusiontrain.models import encoder_mask_from_cross_attention_mask  # noqa: E402
from fusiontrain.trainer import Trainer  # noqa: E402

CPU = torch.device("cpu")
DEVICE = CPU  # set by main(): cpu, or cuda:0 with --device cuda
PRECISION = "fp32"  # set by main(): fp32, or bf16 with --precision bf16
SEQ_LEN = 1024
ROWS = 4  # samples per step for (a) and (b); packed rows per step for (c)
OPEN_ROWS = 8
MAX_IMAGES_PER_ROW = 16
NUM_SAMPLES = 4096  # far more than 8 steps of (c) read: no epoch wraps around
LOSS_CHUNKS = 8
LR, BETAS, EPS, MAX_GRAD_NORM = 1e-4, (0.9, 0.95), 1e-8, 1.0
AGREEMENT_RTOL = 1e-4
BF16_AGREEMENT_RTOL = 2e-2  # bf16 has 8 mantissa bits: a loss over ~400 tokens moves by ~1e-3 relative
IGNORE = -100

VARIANTS = {
    "a": "(a) HF transformers, padded",
    "b": "(b) fusiontrain, padded",
    "c": "(c) fusiontrain, packed",
}


# -- configuration and data -----------------------------------------------------------------------


def train_config(folder: Path, output_dir: Path, *, packing: bool, steps: int) -> TrainConfig:
    """The Trainer's config for (b) (``packing=False``) and (c) (``packing=True``)."""
    overrides = [
        f"output_dir={output_dir}",
        f"max_steps={steps}",
        f"model.hf_mllama={folder}",
        "model.dtype=float32",
        "data.format=synthetic",
        "data.synthetic_lengths=long_tail",
        f"data.synthetic_max_text={SEQ_LEN}",
        f"data.synthetic_samples={NUM_SAMPLES}",
        f"data.packing={'true' if packing else 'false'}",
        f"data.packing_open_rows={OPEN_ROWS}",
        f"data.max_images_per_row={MAX_IMAGES_PER_ROW}",
        "data.num_workers=0",  # samples are built in the training loop, as HF's loop does below
        f"batch.seq_len={SEQ_LEN}",
        f"batch.micro_batch_size={ROWS}",
        f"batch.global_batch_size={ROWS}",
        f"optim.lr={LR}",
        f"optim.betas=[{BETAS[0]}, {BETAS[1]}]",
        f"optim.eps={EPS}",
        "optim.weight_decay=0.0",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        f"optim.max_grad_norm={MAX_GRAD_NORM}",
        f"parallel.mixed_precision={PRECISION}",
        "parallel.activation_checkpointing=none",
        f"loss.num_output_chunks={LOSS_CHUNKS}",
        "eval.every_n_steps=0",
        "checkpoint.every_n_steps=0",
        "logging.every_n_steps=0",
        "logging.wandb.mode=disabled",
    ]
    return load_config(None, overrides)


def padded_stream(config: TrainConfig) -> tuple[Iterator[Batch], ImageFormat]:
    """The padded batches the Trainer of ``config`` reads, built the way the Trainer builds them
    (same dataset, seed, shuffle and collation); the script checks the equality batch by batch."""
    meta = build_meta_model(config.model)
    family, folders = configured_family(config.model)
    spec = family.image_format(meta)
    dataset = build_dataset(config, spec, family.input_folders(folders, meta), meta, split="train")
    stream_config = build_stream_config(config.data, config.batch, spec, ignore_index=config.loss.ignore_index)
    stream = SampleStream(len(dataset), dataset.__getitem__, spec, stream_config, rank=0, world=1, seed=config.seed)
    return iter(build_loader(stream, num_workers=0)), spec


def hf_inputs(batch: Batch, spec: ImageFormat, *, check: bool = False) -> dict[str, torch.Tensor]:
    """Our padded batch as ``MllamaForConditionalGeneration`` keyword arguments.

    HF shifts labels itself (position j is scored against ``labels[j + 1]``); ours are already
    shifted, so HF's ``labels[:, 1:]`` are our ``labels[:, :-1]``. Our ``encoder_mask``
    ``[b, s, images * tiles * tokens_per_tile]`` marks whole tiles, so it folds exactly into HF's
    ``cross_attention_mask`` ``[b, s, images, tiles]``; ``check`` verifies both (outside the
    timed steps).
    """
    b, s = batch.tokens.shape
    if check and not (batch.labels[:, -1] == IGNORE).all():
        raise AssertionError("the last position of a padded row must have no target (HF's shift drops it)")
    labels = torch.full_like(batch.labels, IGNORE)
    labels[:, 1:] = batch.labels[:, :-1]
    inputs: dict[str, Any] = {"input_ids": batch.tokens, "attention_mask": batch.is_real.long(), "labels": labels, "use_cache": False}
    if batch.encoder_input is not None:
        tiles = spec.max_num_tiles
        per_tile = spec.tokens_per_tile
        images = batch.encoder_input["aspect_ratio_ids"].shape[1]
        cross = batch.encoder_mask.view(b, s, images, tiles, per_tile).any(-1).long()
        if check and not torch.equal(encoder_mask_from_cross_attention_mask(cross, per_tile), batch.encoder_mask):
            raise AssertionError("encoder_mask does not fold into a per-tile cross_attention_mask")
        inputs.update(batch.encoder_input, cross_attention_mask=cross)
    return inputs


def digest(batch: Batch) -> str:
    """A fingerprint of everything a batch feeds the model (tokens, targets, images, masks)."""
    h = hashlib.sha1()
    tensors = [batch.tokens, batch.labels, batch.is_real, batch.encoder_mask]
    tensors += list((batch.encoder_input or {}).values())
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def samples_in(batch: Batch) -> int:
    """Samples a batch holds: one per non-empty row when padded, the segments when packed."""
    if batch.segment_ids is None:
        return int(batch.is_real.any(-1).sum())
    return sum(int(ids[real].max()) + 1 for ids, real in zip(batch.segment_ids, batch.is_real) if real.any())


def images_in(batch: Batch) -> int:
    if batch.encoder_input is None:
        return 0
    return int((batch.encoder_input["aspect_ratio_ids"] > 0).sum())


# -- measurement ----------------------------------------------------------------------------------


@dataclass
class Run:
    """What one variant measured."""

    name: str
    step_times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU time (all threads) per step
    real_tokens: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    peak_rss: int = 0
    rss_before: int = 0
    params_total: int = 0
    params_trainable: int = 0
    params_requires_grad: int = 0
    step0_loss: float = math.nan

    def record(self, batch: Batch, seconds: float, cpu_seconds: float, loss: float) -> None:
        self.step_times.append(seconds)
        self.cpu_times.append(cpu_seconds)
        self.real_tokens.append(int(batch.is_real.sum()))
        self.slots.append(batch.is_real.numel())
        self.samples.append(samples_in(batch))
        self.images.append(images_in(batch))
        self.losses.append(loss)
        self.digests.append(digest(batch))

    def summary(self) -> dict[str, Any]:
        """Numbers over the timed steps (all but the first)."""
        times, tokens, slots = self.step_times[1:], self.real_tokens[1:], self.slots[1:]
        return {
            "name": self.name,
            "timed_steps": len(times),
            "real_tokens_per_s": sum(tokens) / sum(times),
            "real_token_share": sum(tokens) / sum(slots),
            "median_step_s": statistics.median(times),
            "cpu_utilisation": sum(self.cpu_times[1:]) / sum(times) / torch.get_num_threads(),
            "samples_per_step": statistics.mean(self.samples[1:]),
            "real_tokens_per_step": statistics.mean(tokens),
            "peak_rss_bytes": self.peak_rss,
            "rss_before_bytes": self.rss_before,
            "step0_loss": self.step0_loss,
            "losses": self.losses,
            "params_total": self.params_total,
            "params_trainable": self.params_trainable,
            "params_requires_grad": self.params_requires_grad,
        }


def start_memory_window() -> int:
    """Free what the previous variant left, and return the RSS to measure the next one above (on
    a GPU the allocator's peak counts every live tensor, so the baseline is only reported)."""
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return host_rss_bytes()


def synchronize() -> None:
    """Wait for the GPU's queued work (no-op on the CPU), so host clocks time the step."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def autocast() -> contextlib.AbstractContextManager:
    """bf16 autocast for HF's forward under ``--precision bf16``; a no-op context for fp32."""
    if PRECISION == "bf16":
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Recording:
    """Wraps the Trainer's batch iterator and keeps the last batch it handed out (for the
    per-step bookkeeping done after the timed step)."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self.batches = batches
        self.last: Batch | None = None

    def __iter__(self) -> Recording:
        return self

    def __next__(self) -> Batch:
        self.last = next(self.batches)
        return self.last


# -- (a) HF transformers --------------------------------------------------------------------------


def hf_trainable(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], int]:
    """Freeze all of HF's model but the parameters fusiontrain trains (torchtune's fusion split),
    by hand, as a TRL user does. Returns the trainable parameters and their effective size.

    - the cross-attention decoder layers ``model.language_model.layers.{i}``, i in
      ``text_config.cross_attention_layers``;
    - the projection head: ``model.multi_modal_projector`` *and* the vision tower's global
      layers ``model.vision_model.global_transformer`` (fusiontrain's ``encoder.projection``
      holds both, as torchtune's projection head does; leaving them frozen here would make HF
      train 1.6M parameters fewer, and skip their backward);
    - the 8 extra token rows (the image token is the first). HF has one ``[32000 + 8, d]``
      embedding matrix, so the whole matrix requires grad and a hook zeroes the gradient of the
      32000 original rows: with weight decay 0 AdamW leaves those rows exactly unchanged, which is
      what fusiontrain trains; HF still pays for a dense embedding gradient and an AdamW update
      over the whole matrix, which is the price of its single matrix.
    """
    text = model.config.text_config
    prefixes = [f"model.language_model.layers.{i}." for i in text.cross_attention_layers]
    prefixes += ["model.multi_modal_projector.", "model.vision_model.global_transformer.", "model.language_model.embed_tokens."]
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(tuple(prefixes)))
        if param.requires_grad:
            trainable.append(param)
    embedding = model.get_input_embeddings().weight
    frozen_rows = torch.arange(embedding.shape[0], device=embedding.device).unsqueeze(-1) < text.vocab_size
    embedding.register_hook(lambda grad: grad.masked_fill(frozen_rows, 0.0))
    effective = sum(p.numel() for p in trainable) - text.vocab_size * embedding.shape[1]
    return trainable, effective


@torch.no_grad()
def hf_loss_without_39379(model: torch.nn.Module, batch: Batch, spec: ImageFormat) -> float:
    """HF's mean loss on ``batch`` with the logits of text-only samples taken from an image-free
    forward (see the module docstring): the loss fusiontrain and Meta's reference compute."""
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in hf_inputs(batch, spec, check=True).items()}
    labels = inputs.pop("labels")
    del labels  # the loss below is taken from our (already shifted) labels
    with autocast():
        logits = model(**inputs).logits.float()
    if batch.encoder_mask is not None:
        sees = batch.encoder_mask.any(-1)
        blind_rows = [r for r in range(len(sees)) if not sees[r][batch.is_real[r]].any()]
        partly = [r for r in range(len(sees)) if r not in blind_rows and not sees[r][batch.is_real[r]].all()]
        if partly:
            raise AssertionError(f"rows {partly} have text before their first image (SyntheticImageText opens samples with it)")
        if blind_rows:
            rows = torch.tensor(blind_rows)
            with autocast():
                text_only = model(
                    input_ids=batch.tokens[rows].to(DEVICE), attention_mask=batch.is_real[rows].long().to(DEVICE), use_cache=False
                ).logits
            logits[rows.to(DEVICE)] = text_only.float()
    loss_sum = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten().to(DEVICE), ignore_index=IGNORE, reduction="sum")
    return (loss_sum / count_targets(batch.labels, IGNORE)).item()


def run_hf(folder: Path, config: TrainConfig, steps: int, first: Batch) -> tuple[Run, float]:
    """Variant (a). Returns the run and the #39379-free step-0 loss on ``first``."""
    from transformers import MllamaForConditionalGeneration

    run = Run(VARIANTS["a"])
    baseline = run.rss_before = start_memory_window()
    model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    if model.config._attn_implementation != "sdpa":
        raise AssertionError(f"HF picked {model.config._attn_implementation!r} attention, not sdpa")
    model.to(DEVICE).train()
    params, run.params_trainable = hf_trainable(model)
    run.params_total = sum(p.numel() for p in model.parameters())
    run.params_requires_grad = sum(p.numel() for p in params)
    # fused on a GPU, as HF's Trainer defaults to (adamw_torch_fused) and fusiontrain does
    fast = {"fused": True} if DEVICE.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, **fast)

    batches, spec = padded_stream(config)
    reference_loss = hf_loss_without_39379(model, first, spec)
    gc.collect()
    reset_peak_memory(DEVICE)

    def step() -> tuple[Batch, float]:
        batch = next(batches)  # sample generation and collation happen in the loop, as in (b)
        inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in hf_inputs(batch, spec).items()}
        with autocast():
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch, loss.item()

    for _ in range(steps):
        synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        batch, loss = step()
        synchronize()
        run.record(batch, time.perf_counter() - started, time.process_time() - cpu_started, loss)
        if not (batch.labels[:, -1] == IGNORE).all():  # else HF's label shift would drop a target
            raise AssertionError("the last position of a padded row has a target")
    run.peak_rss = peak_memory_bytes(DEVICE, baseline)
    run.step0_loss = run.losses[0]
    return run, reference_loss  # the model and optimizer go with this frame


# -- (b), (c) fusiontrain -------------------------------------------------------------------------


def run_fusiontrain(
    name: str, config: TrainConfig, steps: int, first: Batch, profile: bool = False
) -> tuple[Run, str | None]:
    """Variant (b) or (c) through ``Trainer.train_step``. The step-0 loss is the chunked loss of
    the freshly loaded model on ``first`` (the first padded batch, unpacked)."""
    run = Run(name)
    baseline = run.rss_before = start_memory_window()
    trainer = Trainer(config)  # builds, shards and loads the model, then resets the RSS peak
    trainer.metrics.close()  # steps are driven here; nothing is logged
    params = list(trainer.model.parameters())
    run.params_total = sum(p.numel() for p in params)
    run.params_trainable = run.params_requires_grad = sum(p.numel() for p in params if p.requires_grad)

    with torch.no_grad():
        loss_sum = trainer._loss_sum(trainer._on_device(first))
    run.step0_loss = (loss_sum / count_targets(first.labels, IGNORE)).item()
    gc.collect()
    reset_peak_memory(DEVICE)

    recording = Recording(trainer._train_batches)
    trainer._train_batches = recording
    for index in range(steps):
        synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        metrics = trainer.train_step(index)
        synchronize()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        run.record(recording.last, seconds, cpu_seconds, metrics["loss"])
        if metrics["real_tokens"] != run.real_tokens[-1]:
            raise AssertionError("the Trainer counted other real tokens than the batch holds")
        recording.last = None
    run.peak_rss = peak_memory_bytes(DEVICE, baseline)

    profile_table = profile_steps(trainer, steps) if profile else None
    return run, profile_table  # the Trainer goes with this frame


def profile_steps(trainer: Trainer, first_step: int, num_steps: int = 2) -> str:
    """torch.profiler over ``num_steps`` more training steps: the top 10 ops by self time (CUDA
    time on a GPU, CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for index in range(first_step, first_step + num_steps):
            trainer.train_step(index)
        synchronize()
    sort_by = "self_cuda_time_total" if DEVICE.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=10)


# -- report ---------------------------------------------------------------------------------------


def describe_model(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    t, v = config["text_config"], config["vision_config"]
    tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
    return (
        f"text d={t['hidden_size']}, {t['num_hidden_layers']} layers (cross-attention at "
        f"{', '.join(map(str, t['cross_attention_layers']))}), {t['num_attention_heads']} heads / "
        f"{t['num_key_value_heads']} KV heads, MLP {t['intermediate_size']}, vocab {t['vocab_size']:,} (+8 extra rows); "
        f"vision {v['num_hidden_layers']} + {v['num_global_layers']} global layers, width {v['hidden_size']}, "
        f"{v['max_num_tiles']} tile of {v['image_size']} px, patch {v['patch_size']} ({tokens} tokens per tile)"
    )


def check_step0(runs: dict[str, Run], hf_reference: float) -> tuple[bool, list[str]]:
    """Do (a) (#39379-free), (b) and (c) agree on the first padded batch?"""
    rtol = agreement_rtol()
    base = runs["b"].step0_loss
    checks = {
        "(a) HF, text-only samples without #39379 leak": hf_reference,
        "(c) fusiontrain model, first batch unpacked": runs["c"].step0_loss,
    }
    lines, ok = [], True
    for label, value in checks.items():
        relative = abs(value - base) / abs(base)
        ok &= relative <= rtol
        lines.append(f"  {label}: {value:.6f} (vs (b) {base:.6f}: relative {relative:.1e})")
    leak = abs(runs["a"].step0_loss - hf_reference) / abs(hf_reference)
    lines.append(f"  (a) HF's own loss on the mixed batch: {runs['a'].step0_loss:.6f} (#39379 leak moves it by {leak:.1e} relative)")
    lines.append(f"  agreement within {rtol:.0e} relative: {'OK' if ok else 'FAILED'}")
    return ok, lines


def agreement_rtol() -> float:
    return BF16_AGREEMENT_RTOL if PRECISION == "bf16" else AGREEMENT_RTOL


def results_table(summaries: dict[str, dict[str, Any]]) -> str:
    base = summaries["a"]
    rows = []
    memory = "peak CUDA alloc (MiB)" if DEVICE.type == "cuda" else "peak RSS (MiB)"
    for key, s in summaries.items():
        rows.append([
            s["name"],
            f"{s['real_tokens_per_s']:,.0f}",
            f"{s['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x",
            f"{s['real_token_share']:.1%}",
            f"{s['samples_per_step']:.1f}",
            f"{s['median_step_s']:.2f}",
            f"{s['cpu_utilisation']:.0%}",
            mib(s["peak_rss_bytes"]),
            f"{s['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x",
            f"{s['step0_loss']:.4f}",
        ])
    return table(
        "Training throughput, same weights and samples (timed steps exclude the first)",
        ["variant", "real tok/s", "vs (a)", "real-token share", "samples/step", "median step (s)", "CPU use", memory, "vs (a)",
         "step-0 loss"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per variant; the first is warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads for all variants")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="train on the CPU or on cuda:0")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: mixed precision (needs cuda)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--profile", action="store_true", help="profile 2 more steps of (c)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.precision == "bf16" and args.device != "cuda":
        parser.error("--precision bf16 needs --device cuda (this CPU has no fast bf16; fusiontrain's 'auto' is fp32 here)")
    if args.device == "cpu" and torch.cuda.is_available():
        parser.error("--device cpu with a GPU visible: the Trainer would pick the GPU; run with CUDA_VISIBLE_DEVICES=''")
    global DEVICE, PRECISION
    DEVICE = torch.device("cuda", 0) if args.device == "cuda" else CPU
    PRECISION = args.precision

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata's, once per loader
    from transformers import __version__ as transformers_version
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = model_folder("bench")
    scratch = Path(tempfile.mkdtemp(prefix="fusiontrain-vs-hf-"))
    configs = {
        "b": train_config(folder, scratch / "padded", packing=False, steps=args.steps),
        "c": train_config(folder, scratch / "packed", packing=True, steps=args.steps),
    }
    distributed.init_distributed()  # one world-of-one process group for both Trainers, made before any baseline
    first, _ = padded_stream(configs["b"])
    first = next(first)

    gpu = f", {torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda" else ""
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs{gpu}, torch.set_num_threads({args.threads}); "
          f"torch {torch.__version__}, transformers {transformers_version}; {PRECISION} on {DEVICE}; "
          f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}")
    print(f"model: {folder}: {describe_model(folder)}")
    print(f"data: SyntheticImageText long_tail: 0-2 images per sample, text Pareto(alpha 1.1, scale 24) capped at {SEQ_LEN}; "
          f"{ROWS} samples per step for (a)/(b) (padded to the longest, rounded up to 8), {ROWS} packed rows of {SEQ_LEN} for (c) "
          f"(first-fit, {OPEN_ROWS} open rows, <= {MAX_IMAGES_PER_ROW} images per row)")
    print(f"training: fusion-only, AdamW(lr {LR}, betas {BETAS}, wd 0, {'fused' if DEVICE.type == 'cuda' else 'foreach'}), "
          f"grad-norm clip {MAX_GRAD_NORM}; "
          f"HF: sdpa attention, full logits + HF's loss; fusiontrain: FSDP2 world of 1 ({'nccl' if DEVICE.type == 'cuda' else 'gloo'}), "
          f"chunked loss ({LOSS_CHUNKS} chunks); "
          f"{args.steps} steps each, first is warm-up", flush=True)

    runs: dict[str, Run] = {}
    runs["a"], hf_reference = run_hf(folder, configs["b"], args.steps, first)
    print(f"  {runs['a'].name}: done (RSS before it built its model: {mib(runs['a'].rss_before)} MiB)", flush=True)
    runs["b"], _ = run_fusiontrain(VARIANTS["b"], configs["b"], args.steps, first)
    print(f"  {runs['b'].name}: done (RSS before it built its model: {mib(runs['b'].rss_before)} MiB)", flush=True)
    runs["c"], profile_table = run_fusiontrain(VARIANTS["c"], configs["c"], args.steps, first, profile=args.profile)
    print(f"  {runs['c'].name}: done (RSS before it built its model: {mib(runs['c'].rss_before)} MiB)", flush=True)
    distributed.shutdown()

    if runs["a"].digests != runs["b"].digests:
        raise AssertionError("(a) and (b) did not train on identical padded batches")
    if runs["a"].digests[0] != digest(first):
        raise AssertionError("the step-0 batch is not the first batch both trained on")
    print(f"(a) and (b) trained on identical padded batches: all {args.steps} compared (tokens, labels, images, masks)")

    a, b = runs["a"], runs["b"]
    print(f"parameters: HF {a.params_total:,} total, {a.params_trainable:,} trainable "
          f"({a.params_requires_grad:,} with requires_grad: the whole embedding matrix, original rows' gradient masked); "
          f"fusiontrain {b.params_total:,} total, {b.params_trainable:,} trainable")
    if a.params_trainable != b.params_trainable:
        print("  WARNING: the trainable parameter counts differ")
    samples = sum(a.samples)
    print(f"data seen by (a)/(b): {samples} samples, mean {sum(a.real_tokens) / samples:.1f} tokens and "
          f"{sum(a.images) / samples:.2f} images per sample; (c) read {sum(runs['c'].samples)} samples")

    summaries = {key: run.summary() for key, run in runs.items()}
    print(results_table(summaries))
    ok, lines = check_step0(runs, hf_reference)
    print("\nStep-0 loss on the identical first padded batch (see the module docstring for #39379):")
    print("\n".join(lines))
    print("per-step losses: " + "; ".join(f"{key}: " + ", ".join(f"{x:.3f}" for x in run.losses) for key, run in runs.items()))
    if profile_table is not None:
        print(f"\ntorch.profiler, 2 steps of {runs['c'].name}, top 10 by self {'CUDA' if DEVICE.type == 'cuda' else 'CPU'} time:\n{profile_table}")
    wall = time.perf_counter() - started
    print(f"total wall time {wall:.0f} s")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__, "transformers": transformers_version,
                        "device": str(DEVICE), "precision": PRECISION},
            "model": describe_model(folder),
            "steps": args.steps,
            "variants": summaries,
            "step0": {"hf_without_39379": hf_reference, "agree": ok, "rtol": agreement_rtol()},
            "wall_s": wall,
        }, indent=2))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
