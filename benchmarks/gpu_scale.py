"""A real-size training step on one GPU, beside HF transformers: ``python benchmarks/gpu_scale.py``.

For each model shape (``--shapes``, default ``11b,1b``):

- **the model**: Llama 3.2 11B Vision's shapes (``configs/models/llama-3.2-11b-vision``, the model
  of ``configs/llama32_11b_vision.yaml``), or a 1B-shaped one for the launch-bound regime (Llama
  3.2 1B's text sizes: d=2048, 16 self-attention layers plus 4 cross-attention layers, 32 / 8
  heads, MLP 8192; the 11B's vision tower), built on the meta device from ``config.json`` alone and
  materialised on the GPU with random weights (nothing is downloaded or read);
- **fusiontrain**: the trainer's own pieces (``build_parallel_model``: FSDP2 over a world of one;
  ``TrainStep``; fused AdamW), fusion-only, frozen weights stored in bf16, bf16 compute, packed
  rows of ``--seq-len`` (4096) tokens of ``benchmarks/vs_hf.py``'s long-tailed synthetic mix, flex
  attention, and the least activation checkpointing that ``plan`` says fits the GPU's memory;
- **HF transformers**: ``MllamaForConditionalGeneration`` with the same random-init recipe, sdpa,
  frozen weights in bf16 and the trained ones (the same fusion split, frozen by hand as in
  ``vs_hf.py``) in fp32 under bf16 autocast, fused AdamW, on the same sample stream padded as a
  collator pads it (``--hf-samples`` samples per step); gradient checkpointing only if it does not
  fit without.

Reported per shape and side: real (non-padding) tokens per second over the timed steps, model
FLOPs per second as MFU against the GPU's dense bf16 peak (``fusiontrain.flops.peak``), the peak
of ``torch.cuda.max_memory_allocated`` against ``plan``'s prediction for the same run (ours), and
a per-phase split of our step (host work, forward, loss, backward, optimizer: each phase timed
between ``torch.cuda.synchronize`` calls, in separate steps from the timed ones). ``--json`` writes
everything.

``--precision fp32`` (default bf16 on CUDA) and ``--profile`` (one more step of ours under
``torch.profiler``, its top operators printed and kept) answer the bf16 question: ``scripts/gpu_check.py``
runs the 1B shape both ways.

``--device cpu --tiny`` runs the same code on the CPU with the tiny Mllama (seconds; the test suite
runs it): fp32, the packed layouts instead of flex attention, and a measured matmul peak.

Budget: both shapes, both sides, under 8 minutes on one H100 (most of it model init and the
planner's traces).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.vs_hf_data import SampleFlops, hf_inputs, sample_sizes, trainer_stream  # noqa: E402
from benchmarks.vs_hf_variants import hf_trainable  # noqa: E402
from fusiontrain.config import TrainConfig, load_config  # noqa: E402
from fusiontrain.data import Batch  # noqa: E402
from fusiontrain.data.loader import SKIP_REASONS  # noqa: E402
from fusiontrain.flops.peak import device_peak_flops  # noqa: E402
from fusiontrain.parallel import distributed  # noqa: E402
from fusiontrain.plan.planner import cpu_hardware, hardware_for, machine_gpu_kind, plan_run  # noqa: E402
from fusiontrain.source.model_source import ModelSource  # noqa: E402
from fusiontrain.train.model import build_meta_model  # noqa: E402
from fusiontrain.train.nonfinite import NonFiniteGuard  # noqa: E402
from fusiontrain.train.optim import build_lr_scheduler, build_optimizer  # noqa: E402
from fusiontrain.train.setup import build_parallel_model, step_settings  # noqa: E402
from fusiontrain.train.step import TrainStep  # noqa: E402

ELEVEN_B = REPO / "configs" / "models" / "llama-3.2-11b-vision"
CHECKPOINTING_CHOICES = ("none", "2", "full")  # least recompute first
IMAGES_PER_ROW = 4
INIT_STD = 0.02


# -- the shapes -------------------------------------------------------------------------------------


def one_b_config(eleven_b: dict) -> dict:
    """The 11B's ``config.json`` with Llama 3.2 1B's text sizes (cross-attention every 5th layer,
    as in the 11B)."""
    text = dict(eleven_b["text_config"])
    text.update(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=20, num_attention_heads=32,
        num_key_value_heads=8, cross_attention_layers=[3, 8, 13, 18],
    )  # fmt: skip
    return {**eleven_b, "text_config": text}


def shape_folder(shape: str, out: Path) -> Path:
    """A folder holding the ``config.json`` (and processor config) of ``shape``."""
    if shape == "11b":
        return ELEVEN_B
    folder = out / f"shape_{shape}"
    folder.mkdir(parents=True, exist_ok=True)
    if shape == "1b":
        for extra in ELEVEN_B.glob("*.json"):
            (folder / extra.name).write_text(extra.read_text())
        (folder / "config.json").write_text(json.dumps(one_b_config(json.loads((ELEVEN_B / "config.json").read_text()))))
        return folder
    if shape == "tiny":
        from fusiontrain import tiny

        path, _ = tiny.save_tiny_mllama(folder, save_tokenizer=False)
        return path
    raise ValueError(f"unknown shape {shape!r}: 11b, 1b or tiny")


def run_config(
    folder: Path, out: Path, *, seq_len: int, packing: bool, rows: int, precision: str, checkpointing: str, samples: int
) -> TrainConfig:
    """The run's config: fusion-only, ``samples`` synthetic long-tailed samples (the row plan
    measures them all first), one micro-batch per step."""
    overrides = [
        f"output_dir={out}",
        f"model.hf_mllama={folder}",
        "model.dtype=float32",
        f"model.frozen_dtype={'bfloat16' if precision == 'bf16' else 'float32'}",
        "data.format=synthetic",
        "data.synthetic_lengths=long_tail",
        f"data.synthetic_max_text={seq_len}",
        f"data.synthetic_samples={samples}",
        f"data.packing={str(packing).lower()}",
        "data.padding_free=false",
        f"data.max_images_per_row={IMAGES_PER_ROW}",
        "data.num_workers=0",
        f"batch.seq_len={seq_len}",
        f"batch.micro_batch_size={rows}",
        f"batch.global_batch_size={rows}",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "optim.weight_decay=0.0",
        "optim.max_grad_norm=1.0",
        f"parallel.mixed_precision={precision}",
        f"parallel.activation_checkpointing={checkpointing}",
        "loss.num_output_chunks=16",
        "eval.every_n_steps=0",
        "checkpoint.every_n_steps=0",
        "logging.every_n_steps=0",
        "logging.wandb.mode=disabled",
    ]
    return load_config(None, overrides)


# -- timing -----------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """``TrainStep``'s ``phase`` hook: each phase timed between device synchronisations (which
    themselves cost time, so these steps are not the timed ones)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = False
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        synchronize(self.device)
        started = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@torch.no_grad()
def random_init(model: torch.nn.Module) -> None:
    """Normal(0, 0.02) weights, unit norm scales, zero biases; the local shards of a sharded
    model. The one-element parameters (the tanh gates: ours and HF's, decoder and vision) at 0.5,
    so that the gated layers' work reaches the loss."""
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if param.numel() == 1:
            local.fill_(0.5)
        elif "norm" in name and param.dim() == 1:
            local.fill_(1.0)
        elif name.endswith(".bias"):
            local.zero_()
        else:
            local.normal_(0.0, INIT_STD)


def summarise(step_seconds: list[float], real_tokens: list[int], flops: list[float], peak: float) -> dict[str, Any]:
    seconds = sum(step_seconds)
    return {
        "steps": len(step_seconds),
        "median_step_s": statistics.median(step_seconds),
        "real_tokens_per_s": sum(real_tokens) / seconds,
        "model_flops_per_s": sum(flops) / seconds,
        "mfu": sum(flops) / seconds / peak,
    }


# -- fusiontrain ------------------------------------------------------------------------------------


def advised_checkpointing(make_config: Any, device: torch.device) -> tuple[str, dict[str, Any]]:
    """The least activation checkpointing (:data:`CHECKPOINTING_CHOICES`) whose plan fits the
    device (on a GPU: 95% of the memory the driver reports, which is less than the nominal size
    the planner's hardware table gives), and that plan's numbers."""
    if device.type == "cuda":
        kind = machine_gpu_kind()
        if kind is None:
            raise ValueError(f"the planner knows no GPU like {torch.cuda.get_device_name(device)!r}; add it to fusiontrain.plan.planner.GPUS")
        hardware, limit = hardware_for(kind), int(0.95 * torch.cuda.get_device_properties(device).total_memory)
    else:
        hardware = cpu_hardware()
        limit = hardware.memory_bytes
    for choice in CHECKPOINTING_CHOICES:
        plan = plan_run(make_config(choice), gpus=1, hardware=hardware)
        if plan.peak_bytes <= limit or choice == CHECKPOINTING_CHOICES[-1]:
            return choice, {"checkpointing": choice, "peak_bytes": plan.peak_bytes, "fits": plan.peak_bytes <= limit,
                            "memory_limit_bytes": limit, "hardware": hardware.name}
    raise AssertionError("unreachable")


def run_ours(
    config: TrainConfig, device: torch.device, steps: int, warmup: int, peak: float, work: Any, profile: bool = False
) -> dict[str, Any]:
    """fusiontrain's step on ``config``'s packed stream: warm-up, per-phase, then timed steps, then
    (``profile``) one step under ``torch.profiler``."""
    context = distributed.init_distributed()
    mesh = distributed.build_mesh(context, 1, 1)
    source = ModelSource.from_config(config.model)
    model = build_parallel_model(config, build_meta_model(config.model, source), mesh, device)
    model.to_empty(device=device)
    random_init(model)
    source.family.init_buffers(model)
    model.set_skip_output_projection(True)  # the chunked loss applies the output projection, as in the trainer
    model.train()
    optimizer = build_optimizer(model, config.optim, device)
    scheduler = build_lr_scheduler(optimizer, config.optim, config.max_steps)
    timer = PhaseTimer(device)
    train_step = TrainStep(
        model, optimizer, scheduler, NonFiniteGuard("stop", 1),
        step_settings(config, flex_attention=device.type == "cuda"),
        device=device, world_size=1, skip_reasons=SKIP_REASONS, phase=timer,
    )  # fmt: skip
    batches, _ = trainer_stream(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step = 0
    reset_peak(device)
    for _ in range(warmup):
        train_step(step, [next(batches)])
        step += 1
    timer.enabled = True
    phase_steps = max(1, steps // 2)
    started = time.perf_counter()
    for _ in range(phase_steps):
        train_step(step, [next(batches)])
        step += 1
    phased = time.perf_counter() - started
    timer.enabled = False
    seconds, tokens, flops = [], [], []
    for _ in range(steps):
        batch = next(batches)
        synchronize(device)
        started = time.perf_counter()
        result = train_step(step, [batch])
        synchronize(device)
        seconds.append(time.perf_counter() - started)
        tokens.append(result.real_tokens)
        flops.append(work(batch))
        step += 1
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        cuda = device.type == "cuda"
        with profiler(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            train_step(step, [next(batches)])
            synchronize(device)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        profiled = prof.key_averages().table(sort_by=sort, row_limit=15)
        print(profiled, flush=True)
    phases = {name: value / phase_steps for name, value in timer.seconds.items()}
    phases["forward (the rest)"] = phased / phase_steps - sum(phases.values())
    summary = summarise(seconds, tokens, flops, peak)
    if profile:
        summary["profile"] = profiled
    summary.update(peak_memory_bytes=peak_bytes(device), trainable_parameters=trainable, phases_s=phases,
                   total_parameters=sum(p.numel() for p in model.parameters()))
    del train_step, optimizer, scheduler, model
    return summary


# -- HF transformers ---------------------------------------------------------------------------------


def build_hf(folder: Path, device: torch.device, precision: str) -> torch.nn.Module:
    """``MllamaForConditionalGeneration`` from ``folder``'s config on ``device``, random weights
    (:func:`random_init`), sdpa; frozen weights in bf16 under ``precision=bf16``, trained in fp32."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    config = MllamaConfig.from_pretrained(folder)
    with torch.device(device):
        model = MllamaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if model.config._attn_implementation != "sdpa":
        raise AssertionError(f"HF picked {model.config._attn_implementation!r} attention, not sdpa")
    random_init(model)
    trainable, _ = hf_trainable(model)
    if precision == "bf16":
        chosen = {id(p) for p in trainable}
        for param in model.parameters():
            if id(param) not in chosen:
                param.data = param.data.to(torch.bfloat16)
    return model.train()


class HFLoop:
    """HF's plain training loop (forward with labels, backward, clipping, fused AdamW) on the padded
    stream of ``config``."""

    def __init__(self, folder: Path, config: TrainConfig, device: torch.device, precision: str, checkpointing: bool) -> None:
        self.device, self.precision = device, precision
        self.model = build_hf(folder, device, precision)
        if checkpointing:
            self.model.gradient_checkpointing_enable()
        self.params, self.trainable = hf_trainable(self.model)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0, fused=True)
        self.batches, self.spec = trainer_stream(config)

    def step(self) -> Batch:
        batch = next(self.batches)
        inputs = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in hf_inputs(batch, self.spec).items()}
        bf16 = self.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = self.model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return batch


def run_hf(folder: Path, config: TrainConfig, device: torch.device, precision: str, steps: int, warmup: int,
           peak: float, work: Any) -> dict[str, Any]:
    """:class:`HFLoop`'s warm-up and timed steps; with gradient checkpointing only when a step runs
    out of memory without it."""
    for checkpointing in (False, True):
        loop = None
        try:
            loop = HFLoop(folder, config, device, precision, checkpointing)
            reset_peak(device)
            for _ in range(warmup):
                loop.step()
            seconds, tokens, flops = [], [], []
            for _ in range(steps):
                synchronize(device)
                started = time.perf_counter()
                batch = loop.step()
                synchronize(device)
                seconds.append(time.perf_counter() - started)
                tokens.append(int(batch.is_real.sum()))
                flops.append(work(batch))
        except torch.OutOfMemoryError:
            loop = None  # frees the model before the retry
            gc.collect()
            torch.cuda.empty_cache()
            continue
        summary = summarise(seconds, tokens, flops, peak)
        summary.update(peak_memory_bytes=peak_bytes(device), gradient_checkpointing=checkpointing,
                       trainable_parameters=loop.trainable, samples_per_step=config.batch.micro_batch_size)
        return summary
    return {"error": "out of memory even with gradient checkpointing"}


# -- main -------------------------------------------------------------------------------------------


def samples_work(config: TrainConfig, folder: Path) -> Any:
    """``work(batch)``: the model FLOPs of a batch's samples alone (``vs_hf``'s
    :class:`~benchmarks.vs_hf_data.SampleFlops` on the meta model: each sample unpadded, with its own
    images), the same count for a packed and a padded batch of the same samples."""
    source = ModelSource.from_config(config.model)
    counter = SampleFlops(build_meta_model(config.model, source), json.loads((folder / "config.json").read_text())["image_token_index"])
    return lambda batch: counter.of_sizes(sample_sizes(batch, counter.image_token_id))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny Mllama instead of --shapes (the suite's CPU mode)")
    parser.add_argument("--shapes", default="11b,1b", help="comma-separated: 11b, 1b")
    parser.add_argument("--seq-len", type=int, default=None, help="packed row length (default 4096; 256 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (default 8; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hf-samples", type=int, default=None, help="HF's samples per step (default 8; 2 with --tiny)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="compute dtype (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--profile", action="store_true", help="also profile one of our steps (top 15 ops by device time)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch; pass --device cpu --tiny for the CPU mode")
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    seq_len = args.seq_len or (256 if args.tiny else 4096)
    steps = args.steps or (2 if args.tiny else 8)
    hf_samples = args.hf_samples or (2 if args.tiny else 8)
    # plenty for every step of both sides (a packed row of 4096 tokens holds about 40 samples of
    # the mix); the row plan measures them all before the first batch
    samples = 32 * (args.warmup + 2 * steps) * max(1, seq_len // 256, hf_samples // 8)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    peak = device_peak_flops(device)
    import transformers

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "precision": precision,
        "seq_len": seq_len, "peak_flops": peak, "shapes": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        for shape in shapes:
            folder = shape_folder(shape, out)

            def make(checkpointing: str, packing: bool = True, rows: int = 1) -> TrainConfig:
                return run_config(folder, out / shape, seq_len=seq_len, packing=packing, rows=rows, precision=precision,
                                  checkpointing=checkpointing, samples=samples)

            started = time.perf_counter()
            checkpointing, plan = advised_checkpointing(make, device)
            entry: dict[str, Any] = {"plan": plan, "plan_s": time.perf_counter() - started}
            started = time.perf_counter()
            work = samples_work(make("none"), folder)
            try:
                entry["fusiontrain"] = run_ours(make(checkpointing), device, steps, args.warmup, peak, work, args.profile)
            except torch.OutOfMemoryError as error:  # the plan said it fits: that is a finding, not the end of the run
                entry["fusiontrain"] = {"error": f"out of memory with checkpointing {checkpointing}: {error}"[:600]}
            entry["fusiontrain_s"] = time.perf_counter() - started
            measured = entry["fusiontrain"].get("peak_memory_bytes")
            if measured:
                entry["plan_error"] = plan["peak_bytes"] / measured - 1
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if not args.skip_hf:
                started = time.perf_counter()
                padded = make("none", packing=False, rows=hf_samples)
                entry["hf"] = run_hf(folder, padded, device, precision, steps, args.warmup, peak, work)
                entry["hf_s"] = time.perf_counter() - started
                if "real_tokens_per_s" in entry["hf"] and "real_tokens_per_s" in entry["fusiontrain"]:
                    entry["speedup"] = entry["fusiontrain"]["real_tokens_per_s"] / entry["hf"]["real_tokens_per_s"]
            results["shapes"][shape] = entry
            if args.json:  # after each shape: a run cut short by the device's time limit keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2, default=str))
            print(format_entry(shape, entry), flush=True)
    distributed.shutdown()


def format_entry(shape: str, entry: dict[str, Any]) -> str:
    ours, hf = entry["fusiontrain"], entry.get("hf", {})
    lines = [f"{shape}: activation checkpointing {entry['plan']['checkpointing']} (plan: {entry['plan']['peak_bytes'] / 2**30:.2f} GiB)"]
    for name, side in (("fusiontrain", ours), ("HF", hf)):
        if "real_tokens_per_s" in side:
            memory = side["peak_memory_bytes"]
            lines.append(f"  {name}: {side['real_tokens_per_s']:,.0f} real tok/s, MFU {side['mfu']:.1%}, median step "
                         f"{side['median_step_s']:.3f} s" + (f", peak {memory / 2**30:.2f} GiB" if memory else ""))
        elif side:
            lines.append(f"  {name}: {side}")
    if "speedup" in entry:
        lines.append(f"  fusiontrain / HF real tokens/s: {entry['speedup']:.2f}x")
    if "plan_error" in entry:
        lines.append(f"  plan vs measured peak: {entry['plan_error']:+.1%}")
    if "phases_s" in ours:
        lines.append("  phases (s/step): " + ", ".join(f"{k} {v:.4f}" for k, v in ours["phases_s"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
