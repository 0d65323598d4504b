"""The planner's predicted peak memory against measured training runs, side by side:
``python benchmarks/plan_accuracy.py``.

For each configuration of the benchmark Mllama (63M parameters, fp32 on CPU, gloo), in one run:

- ``python -m fusiontrain plan --gpu cpu --json`` predicts rank 0's peak (no weights read, one
  step traced on fake tensors);
- ``torchrun ... -m fusiontrain train`` trains 2 steps on worst-case batches (every row full,
  every image slot used: ``data.synthetic_lengths=fixed``), and rank 0 reports its peak: the RSS
  high-water mark during the steps above the RSS before the model was built, with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the RSS.

The error is (predicted - measured) / measured. tests/test_plan.py asserts it stays within 10% on
four of these configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.memory import model_folder, table  # noqa: E402

TINY_CONFIG = REPO / "configs" / "tiny.yaml"
FIXED = ["data.synthetic_lengths=fixed", "data.synthetic_max_text=63", "batch.seq_len=256", "batch.micro_batch_size=2"]
CONFIGS: dict[str, tuple[int, list[str]]] = {
    "1 rank, packed, no AC": (1, ["batch.global_batch_size=2"]),
    "1 rank, packed, no AC, 4 micro-batches": (1, ["batch.global_batch_size=8"]),
    "2 ranks, packed, full AC": (2, ["batch.global_batch_size=4", "parallel.activation_checkpointing=full"]),
    "2 ranks, padding-free, no AC": (
        2,
        ["batch.global_batch_size=4", "data.packing=false", "data.max_images_per_row=1", "data.synthetic_max_text=255"],
    ),
    "2 ranks, decoder trained, AC every 2nd, 2 micro-batches": (
        2,
        ["batch.global_batch_size=8", "model.decoder_trainable=true", "parallel.activation_checkpointing=2"],
    ),
    "4 ranks, packed, full AC": (4, ["batch.global_batch_size=8", "parallel.activation_checkpointing=full"]),
}


def measure(name: str, folder: Path, out: Path) -> dict:
    """Predicted and measured peak (bytes) of configuration ``name``."""
    nproc, extra = CONFIGS[name]
    overrides = [f"model.hf_mllama={folder}", *FIXED, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    plan = subprocess.run(
        [sys.executable, "-m", "fusiontrain", "plan", "--config", str(TINY_CONFIG), "--gpus", str(nproc), "--gpu", "cpu",
         "--json", *overrides],
        check=True, capture_output=True, text=True, env=env, cwd=REPO,
    )
    predicted = json.loads(plan.stdout)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "fusiontrain",
         "train", "--config", str(TINY_CONFIG), *overrides, f"output_dir={out}", "max_steps=2", "data.num_workers=0",
         "eval.every_n_steps=0", "logging.every_n_steps=0"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"ranks": nproc, "predicted": predicted["peak_bytes"], "measured": rows[1]["peak_memory_bytes"],
            "components": predicted["memory_bytes"], "phase": predicted["peak_phase"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    folder = model_folder("bench")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, name in enumerate(CONFIGS):
            results[name] = measure(name, folder, Path(tmp) / str(index))
    mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
    rows = [
        [name, r["ranks"], mib(r["predicted"]), mib(r["measured"]), f"{(r['predicted'] - r['measured']) / r['measured']:+.1%}"]
        for name, r in results.items()
    ]
    print(f"model: {folder} (bench Mllama, 63M parameters), fp32 on CPU, gloo; 2 rows x 256 tokens per micro-batch")
    print(table("Planner vs measured peak memory per rank (MiB)",
                ["configuration", "ranks", "predicted", "measured", "error"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
