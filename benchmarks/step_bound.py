"""How close vs_hf.py's fusiontrain steps can come to the matmul peak: ``python benchmarks/step_bound.py``.

For (b) padding-free and (c) packed, on vs_hf.py's model and data: a few steps under
``torch.profiler`` (CPU, no shapes or FLOPs recorded, so the profile costs little), split into
the matmuls (``aten::mm`` / ``addmm`` / ``bmm``), SDPA's attention kernels and everything else (the
elementwise work: norms, activations, softmax, copies, the optimizer). Over those same steps,
fusiontrain's model FLOPs (vs_hf.py's count: the samples' work) give three rates: over the
measured time, over the matmuls' and attention's time alone (what the step would reach if
everything else cost nothing), and over the matmuls' time alone. Compared with the 2048^2 matmul
peak vs_hf.py measures, the second is the bound that removing overheads can reach with these
kernels on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.memory import model_folder  # noqa: E402
from benchmarks.vs_hf import measure_matmul_peak, trainer_dirs  # noqa: E402
from benchmarks.vs_hf_data import SampleFlops, sample_sizes, train_config, trainer_stream  # noqa: E402
from benchmarks.vs_hf_variants import FusiontrainVariant, Setup, malloc_as_usual  # noqa: E402
from fusiontrain.parallel import distributed  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def measure(key: str, packing: bool, steps: int, warmup: int) -> dict[str, float]:
    """Profile ``steps`` steps of variant ``key`` after ``warmup``: seconds by kind, model FLOPs."""
    from torch.profiler import ProfilerActivity, profile

    folder = model_folder("bench")
    image_token_id = json.loads((folder / "config.json").read_text())["image_token_index"]
    layout = "packed" if packing else "padding_free"
    config = train_config(folder, trainer_dirs()[layout], packing=packing, steps=steps + warmup + 2, precision="fp32")
    first = next(trainer_stream(config)[0])
    variant = FusiontrainVariant(key, key, config, first, Setup(torch.device("cpu"), "fp32"))
    for _ in range(warmup):
        variant.step()
    malloc_as_usual()
    counter = SampleFlops(variant.trainer.model, image_token_id)
    flops, wall = 0.0, 0.0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            started = time.perf_counter()
            batch, _ = variant.step()
            wall += time.perf_counter() - started
            flops += counter.of_sizes(sample_sizes(batch, image_token_id))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    matmuls = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e6
    attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key) / 1e6
    return {"wall_s": wall, "ops_s": total, "matmul_s": matmuls, "attention_s": attention, "flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-b", type=int, default=12, help="profiled steps of (b) (short: ~0.5 s each)")
    parser.add_argument("--steps-c", type=int, default=2, help="profiled steps of (c) (~5 s each)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(2)
    distributed.init_distributed()
    try:
        peak = measure_matmul_peak(Setup(torch.device("cpu"), "fp32"))
        runs = {
            "(b) padding-free": measure("b", False, args.steps_b, warmup=3),
            "(c) packed": measure("c", True, args.steps_c, warmup=2),
        }
    finally:
        distributed.shutdown()
    print(f"torch {torch.__version__}, 2 threads, fp32; matmul peak 2048^2: median {peak['median'] / 1e9:.1f} "
          f"GFLOP/s, best {peak['best'] / 1e9:.1f}")
    print("| variant | steps' ops (s) | matmuls | attention | the rest | model GFLOP/s over the time | "
          "over matmuls + attention alone | over matmuls alone |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        ops, flops = run["ops_s"], run["flops"]
        rest = ops - run["matmul_s"] - run["attention_s"]

        def rate(seconds: float) -> str:
            per_s = flops / seconds
            return f"{per_s / 1e9:.1f} ({per_s / peak['median']:.0%} / {per_s / peak['best']:.0%})"

        print(f"| {name} | {ops:.2f} | {run['matmul_s'] / ops:.1%} | {run['attention_s'] / ops:.1%} | {rest / ops:.1%} | "
              f"{rate(ops)} | {rate(run['matmul_s'] + run['attention_s'])} | {rate(run['matmul_s'])} |")
    print("rates: GFLOP/s (share of the median / best matmul peak)")


if __name__ == "__main__":
    main()
