"""Variants (a) HF transformers and (b), (c) fusiontrain of ``benchmarks/vs_hf.py``, each as a
model that stays alive with a ``step()`` that trains one step, so that the script can interleave
their timed steps; and :class:`Setup`, the device and precision they share.

A variant is built inside a memory window (:func:`memory_baseline` before it builds its model;
its constructor resets the peak once the model is loaded) and then trains its warm-up steps, over
which the script reads its peak (:func:`peak_above`). ``step()`` returns the host batch it trained
on and its mean per-target-token loss; the script times it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.vs_hf_data import BETAS, EPS, IGNORE, LR, MAX_GRAD_NORM, hf_inputs, trainer_stream
from fusiontrain.config import TrainConfig
from fusiontrain.data import Batch, ImageFormat
from fusiontrain.train.loss import count_targets
from fusiontrain.train.metrics import host_rss_bytes, peak_memory_bytes, reset_peak_memory
from fusiontrain.train.step import loss_sum
from fusiontrain.train.trainer import Trainer

AGREEMENT_RTOL = 1e-4
BF16_AGREEMENT_RTOL = 2e-2  # bf16 has 8 mantissa bits: a loss over ~400 tokens moves by ~1e-3 relative


@dataclass(frozen=True)
class Setup:
    """Where and how every variant trains: ``device`` (cpu, or cuda:0) and ``precision`` (fp32,
    or bf16 on CUDA)."""

    device: torch.device
    precision: str

    def synchronize(self) -> None:
        """Wait for the GPU's queued work (no-op on the CPU), so host clocks time the step."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for HF's forward under ``--precision bf16``; a no-op context for fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def agreement_rtol(self) -> float:
        return BF16_AGREEMENT_RTOL if self.precision == "bf16" else AGREEMENT_RTOL

    def to_device(self, inputs: dict) -> dict:
        """Tensors of ``inputs`` (one level of nested dicts) on the device."""
        moved = {}
        for key, value in inputs.items():
            if isinstance(value, dict):
                value = self.to_device(value)
            elif isinstance(value, torch.Tensor):
                value = value.to(self.device)
            moved[key] = value
        return moved


def malloc_as_usual() -> None:
    """glibc's usual large-block thresholds again, for the timed rounds.

    ``vs_hf.py`` runs under ``MALLOC_MMAP_THRESHOLD_=65536`` so that a freed tensor leaves the RSS
    and each warm-up's peak reads true. That costs a page fault per first touch of every
    allocation above 64 KiB, in every step: it slowed every variant of the first interleaved runs
    by 30 to 80% (in system time), the fastest steps most. Timing under it would measure the page
    faults. The values set here are where glibc's dynamic thresholds settle in a long run (mmap
    threshold 32 MiB, its maximum; trim threshold twice that), so steps reuse freed heap memory
    as in a normal training process. Not on other C libraries (no effect there)."""
    if sys.platform != "linux" or os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        return
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if not (libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 64 << 20)):
        raise RuntimeError("mallopt refused glibc's usual thresholds")


def memory_baseline(setup: Setup) -> int:
    """Free what earlier steps left and return what the next variant's peak is measured above:
    the RSS on a CPU, the allocated CUDA memory on a GPU (the other variants' models included)."""
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(setup.device)
    return host_rss_bytes()


def peak_above(setup: Setup, baseline: int) -> int:
    """Peak since the last :func:`~fusiontrain.train.metrics.reset_peak_memory`, above ``baseline``."""
    if setup.device.type == "cuda":
        return peak_memory_bytes(setup.device) - baseline
    return peak_memory_bytes(setup.device, baseline)


class Variant:
    """What every variant reports besides its steps."""

    key: str
    name: str
    params_total: int = 0
    params_trainable: int = 0  # parameters the optimizer updates
    params_requires_grad: int = 0  # parameters with requires_grad (HF's whole embedding matrix)
    step0_loss: float = float("nan")
    steps_done: int = 0

    def step(self) -> tuple[Batch, float]:
        """Train one step; the host batch it read and its mean loss per target token."""
        raise NotImplementedError


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
def hf_loss_without_39379(model: torch.nn.Module, batch: Batch, spec: ImageFormat, setup: Setup) -> float:
    """HF's mean loss on ``batch`` with the logits of text-only samples taken from an image-free
    forward (see vs_hf.py's docstring): the loss fusiontrain, torchtune and Meta's reference compute."""
    inputs = setup.to_device(hf_inputs(batch, spec, check=True))
    del inputs["labels"]  # the loss below is taken from our (already shifted) labels
    with setup.autocast():
        logits = model(**inputs).logits.float()
    if batch.encoder_mask is not None:
        sees = batch.encoder_mask.any(-1)
        blind_rows = [r for r in range(len(sees)) if not sees[r][batch.is_real[r]].any()]
        partly = [r for r in range(len(sees)) if r not in blind_rows and not sees[r][batch.is_real[r]].all()]
        if partly:
            raise AssertionError(f"rows {partly} have text before their first image (SyntheticImageText opens samples with it)")
        if blind_rows:
            rows = torch.tensor(blind_rows)
            with setup.autocast():
                text_only = model(
                    input_ids=batch.tokens[rows].to(setup.device),
                    attention_mask=batch.is_real[rows].long().to(setup.device),
                    use_cache=False,
                ).logits
            logits[rows.to(setup.device)] = text_only.float()
    labels = batch.labels.flatten().to(setup.device)
    loss_total = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=IGNORE, reduction="sum")
    return (loss_total / count_targets(batch.labels, IGNORE)).item()


class HFVariant(Variant):
    """(a): ``MllamaForConditionalGeneration.from_pretrained`` (sdpa attention), frozen by hand
    (:func:`hf_trainable`), a plain loop over the padded batches of ``config``: forward with
    labels (full ``[b, s, v]`` logits, HF's own loss), backward, grad-norm clipping, AdamW step,
    ``zero_grad``. Also computes the #39379-free step-0 loss on ``first``
    (:attr:`reference_loss`)."""

    key, name = "a", "(a) HF transformers, padded"

    def __init__(self, folder: Path, config: TrainConfig, first: Batch, setup: Setup) -> None:
        from transformers import MllamaForConditionalGeneration

        self.setup = setup
        model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        if model.config._attn_implementation != "sdpa":
            raise AssertionError(f"HF picked {model.config._attn_implementation!r} attention, not sdpa")
        self.model = model.to(setup.device).train()
        self.params, self.params_trainable = hf_trainable(self.model)
        self.params_total = sum(p.numel() for p in self.model.parameters())
        self.params_requires_grad = sum(p.numel() for p in self.params)
        # fused: HF's Trainer default (adamw_torch_fused since torch 2.8, on every device)
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, fused=True)
        self.batches, self.spec = trainer_stream(config)
        self.reference_loss = hf_loss_without_39379(self.model, first, self.spec, setup)
        gc.collect()
        reset_peak_memory(setup.device)

    def step(self) -> tuple[Batch, float]:
        batch = next(self.batches)  # sample generation and collation happen in the loop, as in (b)
        with self.setup.autocast():
            loss = self.model(**self.setup.to_device(hf_inputs(batch, self.spec))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if self.steps_done == 0:
            self.step0_loss = loss_value
        self.steps_done += 1
        return batch, loss_value


# -- (b), (c) fusiontrain -------------------------------------------------------------------------


class FusiontrainVariant(Variant):
    """(b) or (c): ``fusiontrain.train.trainer.Trainer`` (FSDP2 over a world of one), driven step by
    step: :meth:`Trainer.next_host_batches` then :meth:`Trainer.train_step`, both timed, as its
    own loop runs them. The step-0 loss is the chunked loss of the freshly loaded model on
    ``first`` (the first padded batch; for (c) unpacked)."""

    def __init__(self, key: str, name: str, config: TrainConfig, first: Batch, setup: Setup) -> None:
        self.key, self.name, self.setup = key, name, setup
        self.trainer = Trainer(config)  # builds, shards and loads the model, then resets the peak
        self.trainer.metrics.close()  # steps are driven here; nothing is logged
        params = list(self.trainer.model.parameters())
        self.params_total = sum(p.numel() for p in params)
        self.params_trainable = self.params_requires_grad = sum(p.numel() for p in params if p.requires_grad)
        settings = self.trainer.step.settings
        with torch.no_grad():
            total = loss_sum(
                self.trainer.model,
                first.to(self.trainer.device),
                num_output_chunks=settings.num_output_chunks,
                ignore_index=settings.ignore_index,
                flex_attention=settings.flex_attention,
            )
        self.step0_loss = (total / count_targets(first.labels, IGNORE)).item()
        gc.collect()
        reset_peak_memory(setup.device)

    def step(self) -> tuple[Batch, float]:
        (batch,) = self.trainer.next_host_batches()  # one micro-batch per step (global = micro batch)
        metrics = self.trainer.train_step(self.steps_done, [batch])
        self.steps_done += 1
        if metrics["real_tokens"] != int(batch.is_real.sum()):
            raise AssertionError("the Trainer counted other real tokens than the batch holds")
        return batch, metrics["loss"]

    def profile(self, num_steps: int = 2) -> str:
        """torch.profiler over ``num_steps`` more steps: the top 10 ops by self time (CUDA time on
        a GPU, CPU time on a CPU)."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.setup.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(num_steps):
                self.step()
            self.setup.synchronize()
        return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=10)

