"""Memory of a fusion-only run, side by side: ``python benchmarks/memory.py [--model bench|tiny]``.

Prints five tables, each measured in this run (nothing is taken from elsewhere):

1. Per-rank bytes of parameters, gradients and optimizer state after one step on 1, 2 and 4 gloo
   ranks (summed over each rank's local shards), with each rank's peak host memory while the
   model was built and loaded (peak RSS above the RSS before building), next to the full model.
2. Activation memory kept for backward (bytes saved by autograd) with activation checkpointing
   off, on every 2nd block, and on every block.
3. The loss's peak memory at a 32k vocabulary: one cross-entropy over the full logits against the
   chunked loss (peak RSS of a fresh process, above its RSS before the loss). Subprocesses run
   with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the RSS.
4. A FusionLayer sharded as one FSDP unit against its two halves as separate units, on 2 ranks:
   step time and peak RSS.
5. Frozen weights stored in bf16 (``model.frozen_dtype: bfloat16``) against fp32 storage, both with
   bf16 compute (``parallel.mixed_precision: bf16``), on 2 ranks: per-rank parameter bytes and the
   losses of the same 3 steps (the tolerance is zero: bf16 compute casts every fp32 frozen shard
   to bf16 before its all-gather, the same cast bf16 storage does once at load).

The ``--worker`` modes run inside the processes this script launches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "out"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def current_rss() -> int:
    """This process's resident set size now, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([f"\n{title}", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# -- checkpoints ----------------------------------------------------------------------------------


def model_folder(kind: str) -> Path:
    """The benchmark's HF Mllama folder (written once into benchmarks/out/)."""
    from benchmarks.models import bench_mllama_config
    from fusiontrain import tiny

    folder = OUT / f"{kind}_mllama"
    if not (folder / "config.json").is_file():
        config = bench_mllama_config() if kind == "bench" else None
        tiny.save_tiny_mllama(folder, config=config, save_tokenizer=False)
    return folder


def train_overrides(folder: Path, seq_len: int) -> list[str]:
    return [
        f"model.hf_mllama={folder}",
        f"batch.seq_len={seq_len}",
        "batch.micro_batch_size=2",
        "batch.global_batch_size=8",
        "data.synthetic_max_text=200",
        "logging.every_n_steps=0",
        "eval.every_n_steps=0",
    ]


# -- workers (run inside launched processes) -------------------------------------------------------


def worker_shards(args: argparse.Namespace) -> None:
    """Build + load under FSDP, one step; report local bytes of params / grads / optimizer state."""
    import torch

    from fusiontrain.config import load_config
    from fusiontrain.train.trainer import Trainer

    before = current_rss()
    overrides = train_overrides(Path(args.folder), args.seq_len) + [f"output_dir={args.out}.run", *args.extra]
    trainer = Trainer(load_config(TINY_CONFIG, overrides))
    load_peak = peak_rss() - before
    step_times, losses = [], []
    for step in range(args.steps):
        started = time.perf_counter()
        losses.append(trainer.train_step(step)["loss"])
        step_times.append(time.perf_counter() - started)

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = list(trainer.model.parameters())
    param_bytes = sum(local(p).numel() * local(p).element_size() for p in params)
    trainable = [p for p in params if p.requires_grad]
    # Gradients live from backward to the optimizer step (then set to None): one fp32 value per
    # local element of each trainable shard; frozen parameters get none.
    grad_bytes = sum(local(p).numel() * 4 for p in trainable)
    state_bytes = sum(
        local(v).numel() * local(v).element_size()
        for state in trainer.optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    full_bytes = sum(p.numel() * p.element_size() for p in params)
    report = {
        "rank": trainer.context.rank,
        "params": param_bytes,
        "grads": grad_bytes,
        "optimizer": state_bytes,
        "full_model": full_bytes,
        "load_peak": load_peak,
        "step_peak": peak_rss() - before,
        "step_time": statistics.median(step_times[1:] or step_times),
        "frozen_params": sum(local(p).numel() * local(p).element_size() for p in params if not p.requires_grad),
        "losses": losses,
    }
    Path(f"{args.out}.rank{trainer.context.rank}.json").write_text(json.dumps(report))
    trainer.close()


def worker_activations(args: argparse.Namespace) -> None:
    """Bytes autograd saves for backward in one forward, under each checkpointing mode."""
    import torch

    from fusiontrain.data import collate_padded
    from fusiontrain.train.loss import chunked_cross_entropy_sum
    from fusiontrain.models import load_hf_mllama
    from fusiontrain.parallel.fsdp import apply_activation_checkpointing
    from fusiontrain.train.data import build_dataset
    from fusiontrain.config import DataConfig, TrainConfig
    from fusiontrain.families import model_family
    from fusiontrain.source.model_source import ModelSource

    results = {}
    for every in (0, 2, 1):
        model = load_hf_mllama(args.folder).train()
        apply_activation_checkpointing(model, every)
        model.set_skip_output_projection(True)
        family = model_family("mllama")
        spec = family.image_format(model)
        config = TrainConfig(data=DataConfig(synthetic_max_text=args.seq_len - 2))
        config.batch.seq_len = args.seq_len
        inputs = ModelSource(family, {"hf_mllama": Path(args.folder)}).input_folders(model)
        data = build_dataset(config, spec, inputs, model, split="train")
        batch = collate_padded([data[i] for i in range(2)], args.seq_len, spec)
        saved = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.untyped_storage().nbytes() if t.device.type != "meta" else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = model(batch.tokens, encoder_input=batch.encoder_input, encoder_mask=batch.encoder_mask, input_pos=batch.input_pos)
            loss = chunked_cross_entropy_sum(hidden, batch.labels, model.decoder.output, num_chunks=8)
        loss.backward()
        results[{0: "none", 2: "every 2nd block", 1: "every block (full)"}[every]] = sum(saved)
    Path(args.out).write_text(json.dumps(results))


def worker_loss(args: argparse.Namespace) -> None:
    """Peak RSS of one loss forward + backward at a 32k vocabulary."""
    import torch
    import torch.nn.functional as F

    from fusiontrain.train.loss import chunked_cross_entropy_sum

    torch.manual_seed(0)
    b, s, d, v = 4, 1024, 512, 32_000
    hidden = torch.randn(b, s, d, requires_grad=True)
    output = torch.nn.Linear(d, v, bias=False)
    labels = torch.randint(0, v, (b, s))
    before = current_rss()
    if args.chunks == 0:
        loss = F.cross_entropy(output(hidden).float().flatten(0, 1), labels.flatten(), reduction="sum")
    else:
        loss = chunked_cross_entropy_sum(hidden, labels, output, num_chunks=args.chunks)
    loss.backward()
    Path(args.out).write_text(json.dumps({"peak": peak_rss() - before, "logits_fp32": b * s * v * 4}))


# -- the driver -----------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    # Large allocations go to mmap and back to the OS when freed, so RSS follows tensor lifetimes
    # (glibc otherwise keeps freed heap memory resident and the peaks stop meaning anything).
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"}


def _launch(nproc: int, worker_args: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__, *worker_args]
    subprocess.run(command, check=True, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)


def _run(worker_args: list[str]) -> None:
    subprocess.run([sys.executable, __file__, *worker_args], check=True, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, timeout=900)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--worker", choices=["shards", "activations", "loss"])
    parser.add_argument("--folder")
    parser.add_argument("--out")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=0)
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args()
    if args.worker:
        {"shards": worker_shards, "activations": worker_activations, "loss": worker_loss}[args.worker](args)
        return

    folder = model_folder(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="fusiontrain-memory-"))
    print(f"model: {folder} ({args.model}), seq_len {args.seq_len}, fusion-only, fp32 on CPU, gloo")

    rows = []
    for nproc in (1, 2, 4):
        out = tmp / f"shards{nproc}"
        _launch(nproc, ["--worker", "shards", "--folder", str(folder), "--out", str(out), "--seq-len", str(args.seq_len), "--steps", "1"])
        reports = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]
        worst = max(reports, key=lambda r: r["load_peak"])
        rows.append([
            str(nproc),
            mib(reports[0]["full_model"]),
            mib(max(r["params"] for r in reports)),
            mib(max(r["grads"] for r in reports)),
            mib(max(r["optimizer"] for r in reports)),
            mib(worst["load_peak"]),
        ])
    print(table(
        "1. Per-rank memory (MiB; the largest rank): parameters, fp32 gradients and AdamW state after one step",
        ["ranks", "full model", "params / rank", "grads / rank", "optimizer / rank", "peak RSS while loading / rank"],
        rows,
    ))

    out = tmp / "activations.json"
    _run(["--worker", "activations", "--folder", str(folder), "--out", str(out), "--seq-len", str(args.seq_len)])
    activations = json.loads(out.read_text())
    base = activations["none"]
    print(table(
        f"2. Activations saved for backward, batch 2 x {args.seq_len} tokens + 1 image each (MiB)",
        ["activation checkpointing", "saved", "vs none"],
        [[mode, mib(value), f"{value / base:.2f}x"] for mode, value in activations.items()],
    ))

    rows = []
    for chunks in (0, 8, 16):
        out = tmp / f"loss{chunks}.json"
        _run(["--worker", "loss", "--out", str(out), "--chunks", str(chunks)])
        result = json.loads(out.read_text())
        rows.append(["unchunked (full fp32 logits)" if chunks == 0 else f"chunked, {chunks} chunks", mib(result["peak"])])
    print(table(
        f"3. Loss peak at vocab 32000, b=4, s=1024, d=512 (fp32 [b, s, v] logits = {mib(4 * 1024 * 32000 * 4)} MiB)",
        ["loss", "peak RSS above start (MiB)"],
        rows,
    ))

    rows = []
    for mode in ("unit", "split"):
        out = tmp / f"fusion_{mode}"
        _launch(2, ["--worker", "shards", "--folder", str(folder), "--out", str(out), "--seq-len", str(args.seq_len), "--steps", "6",
                    f"parallel.fusion_layer_sharding={mode}"])
        reports = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
        rows.append([mode, f"{max(r['step_time'] for r in reports):.3f}", mib(max(r["step_peak"] for r in reports))])
    print(table(
        "4. FusionLayer sharding on 2 ranks: one FSDP unit vs its two halves",
        ["FusionLayer units", "median step time (s)", "peak RSS / rank (MiB)"],
        rows,
    ))

    reports = {}
    for frozen in ("float32", "bfloat16"):
        out = tmp / f"frozen_{frozen}"
        _launch(2, ["--worker", "shards", "--folder", str(folder), "--out", str(out), "--seq-len", str(args.seq_len), "--steps", "3",
                    "parallel.mixed_precision=bf16", f"model.frozen_dtype={frozen}", "batch.global_batch_size=4"])
        reports[frozen] = max((json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)), key=lambda r: r["params"])
    fp32 = reports["float32"]
    rows = [
        [
            f"frozen {frozen}",
            mib(report["params"]),
            mib(report["frozen_params"]),
            f"{report['params'] / fp32['params']:.2f}x",
            " ".join(f"{loss:.6f}" for loss in report["losses"]),
            f"{max(abs(a - b) for a, b in zip(report['losses'], fp32['losses'])):.1e}",
        ]
        for frozen, report in reports.items()
    ]
    print(table(
        "5. Frozen weights stored bf16 (model.frozen_dtype) on 2 ranks, bf16 compute, global batch 4: per-rank parameter "
        "bytes and the losses of 3 steps (tolerance: 0, bitwise)",
        ["storage", "params / rank (MiB)", "of which frozen", "vs fp32 storage", "losses", "max |loss diff|"],
        rows,
    ))


if __name__ == "__main__":
    main()
