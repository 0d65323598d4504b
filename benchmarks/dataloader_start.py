"""How dataloader workers start (``data.worker_start``): fork, forkserver and spawn side by side,
``python benchmarks/dataloader_start.py [--workers 2] [--batches 40] [--rounds 3]``.

Each measurement is a fresh process that does what a training rank does: it starts a one-rank
gloo process group (whose threads a fork would copy), builds the tiny Mllama's caption dataset
(PNG images decoded and tiled in the workers) and the rank's loader, then iterates; the loader
starts the forkserver helper (with the modules its stream needs) as the trainer's does. It reports

- *setup*: from the process start to the loader built;
- *first batch*: from ``iter()`` (the helper, under forkserver, and the workers start) to the
  first micro-batch;
- *steady*: micro-batches per second after the first;
- the micro-batches are checked to be the same under every method (the tokens of all of them).

Rounds alternate the methods, and the table gives the median over rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.sizes import write_data  # noqa: E402

METHODS = ("fork", "forkserver", "spawn")


def measure_one(method: str, mllama: Path, data: Path, out: Path, workers: int, batches: int, setup_s: float) -> dict:
    """One rank's measurement in this (fresh) process."""
    started = time.perf_counter()
    import torch.distributed as dist

    from fusiontrain.config import load_config
    from fusiontrain.source.model_source import ModelSource
    from fusiontrain.train.data import build_dataset, build_train_loader

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one rank: no port
    overrides = [
        f"model.hf_mllama={mllama}", "data.format=caption", f"data.train.path={data}", f"output_dir={out}",
        f"data.num_workers={workers}", f"data.worker_start={method}", "batch.seq_len=64",
        "batch.micro_batch_size=2", "batch.global_batch_size=2",
    ]
    config = load_config(str(REPO / "configs" / "tiny.yaml"), overrides)
    source = ModelSource.from_config(config.model)
    model = source.build_meta()
    image_format = source.family.image_format(model)
    inputs = source.input_folders(model)
    dataset = build_dataset(config, image_format, inputs, model, split="train")
    loader = build_train_loader(
        config, dataset, image_format, inputs, rank=0, world=1, combine=lambda table: table, ignore_index=-100
    )
    built = time.perf_counter()
    time.sleep(max(0.0, setup_s - (built - started)))  # the rest of a training rank's setup (the model)
    built = time.perf_counter()
    iterator = iter(loader)
    digest = hashlib.sha256()
    first = next(iterator)
    digest.update(first.tokens.numpy().tobytes())
    first_at = time.perf_counter()
    for _ in range(batches - 1):
        digest.update(next(iterator).tokens.numpy().tobytes())
    done = time.perf_counter()
    loader.close()
    dist.destroy_process_group()
    return {
        "setup_s": built - started,
        "first_batch_s": first_at - built,
        "steady_batches_per_s": (batches - 1) / (done - first_at),
        "digest": digest.hexdigest()[:16],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setup", type=float, default=0.0, help="pad each rank's setup to this many seconds (the model build)")
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--folders", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        mllama, data, out = (Path(p) for p in args.folders)
        print(json.dumps(measure_one(args.one, mllama, data, out, args.workers, args.batches, args.setup)))
        return

    from fusiontrain import tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mllama, _ = tiny.save_tiny_mllama(root / "mllama")
        data = write_data(root / "data", 400, "caption")
        results: dict[str, list[dict]] = {method: [] for method in METHODS}
        for round_index in range(args.rounds):
            for method in METHODS:
                command = [
                    sys.executable, __file__, "--one", method, "--workers", str(args.workers), "--batches",
                    str(args.batches), "--setup", str(args.setup), "--folders", str(mllama), str(data), str(root / f"run_{method}_{round_index}"),
                ]
                run = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
                if run.returncode != 0:
                    raise SystemExit(f"{method} round {round_index} failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
                output = run.stdout
                results[method].append(json.loads(output.strip().splitlines()[-1]))
    digests = {result["digest"] for runs in results.values() for result in runs}
    print(f"{args.workers} workers, {args.batches} micro-batches of 2 caption samples (tiny Mllama, 64 tokens), "
          f"median of {args.rounds} rounds; the same batches under every method: {len(digests) == 1}")
    print(f"{'worker start':<12} {'setup s':>8} {'first batch s':>14} {'steady batches/s':>17}")
    for method, runs in results.items():
        def median(key: str) -> float:
            return statistics.median(run[key] for run in runs)

        print(f"{method:<12} {median('setup_s'):>8.2f} {median('first_batch_s'):>14.2f} {median('steady_batches_per_s'):>17.1f}")
    if len(digests) != 1:
        raise SystemExit("the methods delivered different batches")


if __name__ == "__main__":
    main()
