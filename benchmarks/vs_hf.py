"""fusiontrain against HF transformers and torchtune, same weights, same data: ``python benchmarks/vs_hf.py``.

One process, on the CPU (or one GPU with ``--device cuda``), trains the benchmark Mllama
(``benchmarks.models.bench_mllama_config``, written once to ``benchmarks/out/bench_mllama``)
fusion-only (the cross-attention layers, the projection head and the 8 extra token rows), in fp32
(or bf16 with ``--precision bf16``), five ways:

(a) **HF transformers** as TRL / accelerate users run it: ``MllamaForConditionalGeneration
    .from_pretrained`` (sdpa attention), every parameter frozen by hand except the ones
    fusiontrain trains, padded batches, a plain loop: forward with labels (full ``[b, s, v]``
    logits, HF's own loss), backward, grad-norm clipping at 1.0, ``AdamW`` step, ``zero_grad``
    (``benchmarks/vs_hf_variants.py``).
(b) **fusiontrain, padding-free**: ``fusiontrain.train.trainer.Trainer`` (FSDP2 over a world of one,
    gloo) with ``data.packing=false`` and its default ``data.padding_free=true``: the same 4
    samples per step as (a), back to back in one row (each with its own positions, attention
    segment and images) instead of one padded row each, so no work goes to padding; its default
    chunked loss (8 chunks; the output projection is frozen, so each chunk's gradient is taken in
    forward and nothing is recomputed).
(r) **fusiontrain, padded rows**: the same with ``data.padding_free=false``: one sample per row,
    padded to the batch's longest sample, exactly (a)'s batches.
(c) **fusiontrain, packed**: the same Trainer with ``data.packing=true``: rows of 1024 tokens,
    first-fit packing with 8 open rows and up to 16 images per row.
(d) **torchtune 0.6.1, padded** (it cannot pack images): torchtune's own modules and its
    ``DeepFusionModel`` built from the same HF checkpoint by its own converter, trained as its
    single-device recipe does, with ``CEWithChunkedOutputLoss`` (8 chunks of full logits)
    (``benchmarks/vs_hf_torchtune.py``).

All use fused AdamW (lr 1e-4, betas (0.9, 0.95), weight decay 0; HF's Trainer default since torch 2.8, on every device)
and grad-norm clipping at 1.0.

Data: ``SyntheticImageText(lengths="long_tail", max_text=1024)``: 0, 1 or 2 images per sample
(each image's token opens the text that sees it), text lengths from a Pareto law (alpha 1.1,
scale 24 tokens, capped at 1024; mean about 100). Every variant reads the Trainer's row plan
(seed 0): (a) and (d) iterate identical streams built here, and the script asserts that every
padded batch (a), (r) and (d) trained on is bit-identical, and that (b) trained on the same
samples (tokens, targets, images) in the same order. (a), (b), (r), (d) take 4 samples per step;
(c) takes 4 packed rows of 1024 tokens per step, which hold many more samples (that is the point).

Timing. The five models live side by side. Each is built and trains ``--warmup`` steps in turn
(its memory window, below); then ``--rounds`` rounds run, each ``--steps-per-round`` timed steps
of every variant, interleaved step by step (a, b, r, c, d, a, b, r, c, d, ...), so that a noisy
neighbour slows all alike. Per variant and round: real tokens/s (non-padding tokens over step
time; a step includes building its batch, as each library's loop does); per variant the median
over rounds and the min-max spread, and the ratio to (a) taken round by round (median and
min-max). Also the share of token slots holding real tokens, the median step time and the CPU
utilisation of the timed steps (process CPU time over wall time x threads: well under 100% means
something else shared the cores).

Model FLOP/s. Each step's model FLOPs are the samples' work, counted per sample by fusiontrain's
counter (``fusiontrain.flops.count.step_flops``: the sample's real tokens, causal, its own images;
``vs_hf_data.SampleFlops``), the same count for every variant on the same samples: padding earns
nothing. Achieved FLOP/s is that over step time (median of rounds), and its share of the matmul
peak measured once per run: ``torch.mm`` of two 2048 x 2048 fp32 matrices (8192 in the
precision's dtype on a GPU), median of several repetitions, with the same threads.

Memory. The peak of each variant is read over its warm-up steps, above what was resident before
it built its model (the others' models included): RSS on a CPU (the high-water mark is reset once
the model is loaded; the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
freed tensors leave the RSS), the CUDA allocator's peak above the memory allocated before on a GPU.
The timed rounds then run with glibc's usual thresholds again (``vs_hf_variants.malloc_as_usual``:
under the low threshold every step pays a page fault per large allocation, which slowed every
variant by 30 to 80%, the fastest steps most).

Step-0 agreement: on the identical first padded batch, HF's loss (a), the Trainer's (r), (b)'s
on the same samples padding-free, model (c)'s chunked loss on that batch unpacked and
torchtune's first-step loss (d) must agree to 1e-4 relative. HF differs on one kind of row (transformers#39379): a text row that sees no image still
attends to all image tokens (only the MLP half of the cross-attention layer is zeroed), while
Meta's reference, torchtune and fusiontrain zero the whole layer. Text-only samples batched next
to samples with images are such rows; so (a) is checked with those samples' logits taken from an
image-free forward, and HF's own loss on the mixed batch is printed next to it.

On a GPU (``--device cuda``) the variants run on ``cuda:0``: the Trainer on nccl (packed rows
through a compiled flex_attention ``BlockMask``), HF and torchtune with SDPA, step times taken
after a device synchronisation. ``--precision bf16``: HF under ``torch.autocast(bfloat16)`` with
fp32 weights (HF's Trainer with ``bf16=True``), fusiontrain with ``parallel.mixed_precision=bf16``
(bf16 compute, fp32 weights), torchtune wholly in bf16 (its recipes' ``dtype: bf16``); the step-0
agreement is then checked to 2e-2. fp32 on a GPU runs with TF32 off.

Flags: ``--warmup`` (default 2), ``--rounds`` (default 4), ``--steps-per-round`` (default 3),
``--threads`` (default ``os.cpu_count()``), ``--device``, ``--precision``, ``--json PATH``,
``--profile`` (torch.profiler over 2 more steps of (c), top 10 ops by self time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
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

from benchmarks.memory import OUT, model_folder  # noqa: E402
from benchmarks.vs_hf_data import (  # noqa: E402
    LOSS_CHUNKS, MAX_IMAGES_PER_ROW, OPEN_ROWS, ROWS, SEQ_LEN, BETAS, LR, MAX_GRAD_NORM,
    SampleFlops, SampleSize, digest, images_in, trainer_stream, sample_sizes, samples_digest, train_config,
)
from benchmarks.vs_hf_report import console_table  # noqa: E402
from benchmarks.vs_hf_torchtune import TorchtuneVariant  # noqa: E402
from benchmarks.vs_hf_variants import (  # noqa: E402
    FusiontrainVariant, HFVariant, Setup, Variant, malloc_as_usual, memory_baseline, peak_above,
)
from fusiontrain.parallel import distributed
from fusiontrain.data import Batch  # noqa: E402

RUN_DIR = OUT / "vs_hf"  # the Trainers' output dirs, and the sample-size cache they share


# -- measurement ----------------------------------------------------------------------------------


@dataclass
class Record:
    """One step of one variant."""

    seconds: float
    cpu_seconds: float  # process CPU time, all threads
    real_tokens: int
    slots: int
    samples: list[SampleSize]
    images: int
    loss: float
    digest: str
    samples_digest: str
    round: int  # -1 for a warm-up step


@dataclass
class Run:
    """A variant and what its steps measured."""

    variant: Variant
    records: list[Record] = field(default_factory=list)
    rss_before: int = 0
    peak_memory: int = 0

    def timed_step(self, setup: Setup, image_token_id: int, round_index: int) -> None:
        setup.synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        batch, loss = self.variant.step()
        setup.synchronize()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        self.records.append(Record(
            seconds, cpu_seconds, int(batch.is_real.sum()), batch.is_real.numel(), sample_sizes(batch, image_token_id),
            images_in(batch), loss, digest(batch), samples_digest(batch), round_index,
        ))

    def in_round(self, index: int) -> list[Record]:
        return [r for r in self.records if r.round == index]


def measure_matmul_peak(setup: Setup, reps: int = 7) -> dict[str, Any]:
    """FLOP/s of ``torch.mm`` on square matrices: median and best of ``reps`` timed repetitions
    after two warm-up ones (fp32 2048 on the CPU; on a GPU 8192 in the precision's dtype, 10
    matmuls per repetition)."""
    cuda = setup.device.type == "cuda"
    size, per_rep = (8192, 10) if cuda else (2048, 1)
    dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32
    a, b = (torch.randn(size, size, device=setup.device, dtype=dtype) for _ in range(2))
    out = torch.empty(size, size, device=setup.device, dtype=dtype)
    rates = []
    for rep in range(reps + 2):
        setup.synchronize()
        started = time.perf_counter()
        for _ in range(per_rep):
            torch.mm(a, b, out=out)
        setup.synchronize()
        if rep >= 2:
            rates.append(2 * size**3 * per_rep / (time.perf_counter() - started))
    return {"dtype": str(dtype).removeprefix("torch."), "size": size, "reps": reps, "median": statistics.median(rates),
            "best": max(rates)}


def summarise(run: Run, base: Run, rounds: int, flops: SampleFlops, peak: float) -> dict[str, Any]:
    """Numbers over the timed rounds (see vs_hf_report's docstring)."""
    timed = [r for r in run.records if r.round >= 0]
    per_round = [run.in_round(i) for i in range(rounds)]
    rate = lambda recs: sum(r.real_tokens for r in recs) / sum(r.seconds for r in recs)  # noqa: E731
    tps = [rate(recs) for recs in per_round]
    flop_rates = [sum(flops.of_sizes(r.samples) for r in recs) / sum(r.seconds for r in recs) for recs in per_round]
    stats = lambda xs: {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "rounds": xs}  # noqa: E731
    v = run.variant
    summary = {
        "name": v.name,
        "timed_steps": len(timed),
        "tokens_per_s": stats(tps),
        "flops_per_s": statistics.median(flop_rates),
        "peak_share": statistics.median(flop_rates) / peak,
        "real_token_share": sum(r.real_tokens for r in timed) / sum(r.slots for r in timed),
        "median_step_s": statistics.median(r.seconds for r in timed),
        "cpu_utilisation": sum(r.cpu_seconds for r in timed) / sum(r.seconds for r in timed) / torch.get_num_threads(),
        "samples_per_step": statistics.mean(len(r.samples) for r in timed),
        "real_tokens_per_step": statistics.mean(r.real_tokens for r in timed),
        "peak_memory_bytes": run.peak_memory,
        "memory_before_bytes": run.rss_before,
        "step0_loss": v.step0_loss,
        "losses": [r.loss for r in run.records],
        "params_total": v.params_total,
        "params_trainable": v.params_trainable,
        "params_requires_grad": v.params_requires_grad,
    }
    if run is not base:
        summary["ratio"] = stats([x / rate(base.in_round(i)) for i, x in enumerate(tps)])
    return summary


# -- checks and the report ------------------------------------------------------------------------


def check_same_batches(runs: dict[str, Run], first: Batch) -> int:
    """(a), (r) and (d) trained on bit-identical padded batches, the first being ``first``, and
    (b) on the same samples padding-free."""
    reference = [r.digest for r in runs["a"].records]
    for key in ("r", "d"):
        if [r.digest for r in runs[key].records] != reference:
            raise AssertionError(f"(a) and ({key}) did not train on identical padded batches")
    if [r.samples_digest for r in runs["b"].records] != [r.samples_digest for r in runs["a"].records]:
        raise AssertionError("(b) did not train on (a)'s samples")
    if reference[0] != digest(first):
        raise AssertionError("the step-0 batch is not the first batch the padded variants trained on")
    return len(reference)


def check_step0(runs: dict[str, Run], hf_reference: float, rtol: float) -> tuple[bool, list[str]]:
    """Do (a) (#39379-free), (r), (b), (c) and (d) agree on the first batch's samples?"""
    base = runs["r"].variant.step0_loss
    checks = {
        "(a) HF, text-only samples without #39379 leak": hf_reference,
        "(b) fusiontrain, the same samples padding-free": runs["b"].variant.step0_loss,
        "(c) fusiontrain model, first batch unpacked": runs["c"].variant.step0_loss,
        "(d) torchtune, first step": runs["d"].variant.step0_loss,
    }
    lines, ok = [], True
    for label, value in checks.items():
        relative = abs(value - base) / abs(base)
        ok &= relative <= rtol
        lines.append(f"  {label}: {value:.6f} (vs (r) {base:.6f}: relative {relative:.1e})")
    hf_own = runs["a"].variant.step0_loss
    lines.append(f"  (a) HF's own loss on the mixed batch: {hf_own:.6f} (#39379 leak moves it by "
                 f"{abs(hf_own - hf_reference) / abs(hf_reference):.1e} relative)")
    lines.append(f"  agreement within {rtol:.0e} relative: {'OK' if ok else 'FAILED'}")
    return ok, lines


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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant, built one after another (memory peak)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timed rounds (>= 3)")
    parser.add_argument("--steps-per-round", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads for all variants")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="train on the CPU or on cuda:0")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: mixed precision (needs cuda)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--profile", action="store_true", help="profile 2 more steps of (c)")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step is the step-0 check and the memory window)")
    if args.rounds < 3 or args.steps_per_round < 1:
        parser.error("--rounds must be >= 3 and --steps-per-round >= 1 (the spread needs rounds)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.precision == "bf16" and args.device != "cuda":
        parser.error("--precision bf16 needs --device cuda (this CPU has no fast bf16; fusiontrain's 'auto' is fp32 here)")
    if args.device == "cpu" and torch.cuda.is_available():
        parser.error("--device cpu with a GPU visible: the Trainer would pick the GPU; run with CUDA_VISIBLE_DEVICES=''")
    return args


def trainer_dirs() -> dict[str, Path]:
    """Output dirs of the Trainers of (r), (b) and (c), by layout; the others' ``sizes`` link to
    (r)'s, so that the sample sizes of the dataset (the same for all) are measured once, on the
    first run, and cached."""
    dirs = {layout: RUN_DIR / layout for layout in ("padded", "padding_free", "packed")}
    (dirs["padded"] / "sizes").mkdir(parents=True, exist_ok=True)
    for layout in ("padding_free", "packed"):
        dirs[layout].mkdir(parents=True, exist_ok=True)
        if not (dirs[layout] / "sizes").exists():
            (dirs[layout] / "sizes").symlink_to(dirs["padded"] / "sizes", target_is_directory=True)
    return dirs


def main() -> None:
    args = parse_args()
    setup = Setup(torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu"), args.precision)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    from transformers import __version__ as transformers_version
    from transformers.utils import logging as hf_logging
    from torchtune import __version__ as torchtune_version

    hf_logging.disable_progress_bar()
    folder = model_folder("bench")
    image_token_id = json.loads((folder / "config.json").read_text())["image_token_index"]
    dirs = trainer_dirs()
    total_steps = args.warmup + args.rounds * args.steps_per_round
    options = {"steps": total_steps + 2, "precision": args.precision}
    configs = {
        "padded": train_config(folder, dirs["padded"], packing=False, padding_free=False, **options),
        "padding_free": train_config(folder, dirs["padding_free"], packing=False, **options),
        "packed": train_config(folder, dirs["packed"], packing=True, **options),
    }
    distributed.init_distributed()  # one world-of-one process group for the Trainers, made before any baseline
    first = next(trainer_stream(configs["padded"])[0])
    first_padding_free = next(trainer_stream(configs["padding_free"])[0])
    peak = measure_matmul_peak(setup)

    gpu = f", {torch.cuda.get_device_name(setup.device)}" if setup.device.type == "cuda" else ""
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs{gpu}, torch.set_num_threads({args.threads}); "
          f"torch {torch.__version__}, transformers {transformers_version}, torchtune {torchtune_version}; "
          f"{args.precision} on {setup.device}; MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}")
    print(f"model: {folder}: {describe_model(folder)}")
    print(f"data: SyntheticImageText long_tail: 0-2 images per sample, text Pareto(alpha 1.1, scale 24) capped at {SEQ_LEN}; "
          f"{ROWS} samples per step for (a)/(b)/(r)/(d) (padded to the longest, rounded up to 8; (b): in one row, "
          f"rounded up to 8), {ROWS} packed rows of "
          f"{SEQ_LEN} for (c) (first-fit, {OPEN_ROWS} open rows, <= {MAX_IMAGES_PER_ROW} images per row)")
    print(f"training: fusion-only, AdamW(lr {LR}, betas {BETAS}, wd 0, fused), "
          f"grad-norm clip {MAX_GRAD_NORM}; HF: sdpa, full logits + HF's loss; fusiontrain: FSDP2 world of 1 "
          f"({'nccl' if setup.device.type == 'cuda' else 'gloo'}), chunked loss ({LOSS_CHUNKS} chunks, gradient in forward); "
          f"torchtune: its modules and recipe step, CEWithChunkedOutputLoss ({LOSS_CHUNKS} chunks)")
    print(f"timing: {args.warmup} warm-up steps per variant (memory peak), then {args.rounds} rounds x "
          f"{args.steps_per_round} timed steps per variant, interleaved a, b, r, c, d, a, ...; matmul peak {peak['dtype']} "
          f"{peak['size']}^2: median {peak['median'] / 1e9:,.1f} GFLOP/s, best {peak['best'] / 1e9:,.1f} "
          f"(of {peak['reps']})", flush=True)

    builders = {
        "a": lambda: HFVariant(folder, configs["padded"], first, setup),
        "b": lambda: FusiontrainVariant(
            "b", "(b) fusiontrain, padding-free", configs["padding_free"], first_padding_free, setup
        ),
        "r": lambda: FusiontrainVariant("r", "(r) fusiontrain, padded rows", configs["padded"], first, setup),
        "c": lambda: FusiontrainVariant("c", "(c) fusiontrain, packed", configs["packed"], first, setup),
        "d": lambda: TorchtuneVariant(folder, configs["padded"], setup),
    }
    runs: dict[str, Run] = {}
    for key, build in builders.items():
        baseline = memory_baseline(setup)
        run = runs[key] = Run(build(), rss_before=baseline)  # each resets the peak once loaded
        for _ in range(args.warmup):
            run.timed_step(setup, image_token_id, -1)
        run.peak_memory = peak_above(setup, baseline)
        print(f"  {run.variant.name}: built, {args.warmup} warm-up steps "
              f"({'RSS' if setup.device.type == 'cpu' else 'CUDA memory'} before it built its model: "
              f"{baseline / 2**20:,.1f} MiB)", flush=True)
    malloc_as_usual()  # the memory windows are over; the timed steps run with glibc's usual thresholds
    for round_index in range(args.rounds):
        for _ in range(args.steps_per_round):
            for run in runs.values():
                run.timed_step(setup, image_token_id, round_index)
    profile_table = runs["c"].variant.profile() if args.profile else None
    distributed.shutdown()

    compared = check_same_batches(runs, first)
    print(f"(a), (r) and (d) trained on identical padded batches: all {compared} compared (tokens, labels, images, masks); "
          f"(b) on the same samples (tokens, labels, images)")
    a, b, d = (runs[k].variant for k in "abd")
    print(f"parameters: HF {a.params_total:,} total, {a.params_trainable:,} trainable ({a.params_requires_grad:,} with "
          f"requires_grad: the whole embedding matrix, original rows' gradient masked); fusiontrain {b.params_total:,} total, "
          f"{b.params_trainable:,} trainable; torchtune {d.params_total:,} total (no rows for the padding aspect ratio), "
          f"{d.params_trainable:,} trainable")
    if not a.params_trainable == b.params_trainable == d.params_trainable:
        print("  WARNING: the trainable parameter counts differ")
    padded = runs["a"].records
    samples = sum(len(r.samples) for r in padded)
    print(f"data seen by (a)/(b)/(r)/(d): {samples} samples, mean {sum(r.real_tokens for r in padded) / samples:.1f} tokens "
          f"and {sum(r.images for r in padded) / samples:.2f} images per sample; (c) read "
          f"{sum(len(r.samples) for r in runs['c'].records)} samples")

    flops = SampleFlops(runs["b"].variant.trainer.model, image_token_id)
    summaries = {key: summarise(run, runs["a"], args.rounds, flops, peak["median"]) for key, run in runs.items()}
    memory_label = "peak CUDA alloc above (MiB)" if setup.device.type == "cuda" else "peak RSS above (MiB)"
    print(console_table("Training throughput, same weights and samples (median of rounds; spread min-max)", summaries,
                        memory_label))
    print("per-round real tok/s: " + "; ".join(
        f"{k}: " + ", ".join(f"{x:,.0f}" for x in s["tokens_per_s"]["rounds"]) for k, s in summaries.items()))
    print("model FLOPs per step (the samples' work): " + "; ".join(
        f"{k}: {statistics.mean(flops.of_sizes(r.samples) for r in run.records if r.round >= 0) / 1e9:,.0f} GFLOP"
        for k, run in runs.items()))
    ok, lines = check_step0(runs, a.reference_loss, setup.agreement_rtol())
    print("\nStep-0 loss on the identical first padded batch (see the module docstring for #39379):")
    print("\n".join(lines))
    print("per-step losses: " + "; ".join(f"{k}: " + ", ".join(f"{r.loss:.3f}" for r in run.records) for k, run in runs.items()))
    if profile_table is not None:
        print(f"\ntorch.profiler, 2 steps of {runs['c'].variant.name}, top 10 by self "
              f"{'CUDA' if setup.device.type == 'cuda' else 'CPU'} time:\n{profile_table}")
    wall = time.perf_counter() - started
    print(f"total wall time {wall:.0f} s")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                        "transformers": transformers_version, "torchtune": torchtune_version,
                        "device": str(setup.device), "precision": args.precision},
            "model": describe_model(folder),
            "warmup_steps": args.warmup, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
            "peak": peak,
            "memory_label": memory_label,
            "variants": summaries,
            "step0": {"hf_without_39379": a.reference_loss, "agree": ok, "rtol": setup.agreement_rtol()},
            "wall_s": wall,
        }, indent=2))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
