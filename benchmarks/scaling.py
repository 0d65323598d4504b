"""Data-parallel scaling on this machine: ``python benchmarks/scaling.py [--steps 6] [--ranks 1,2,4] [--json PATH]``.

What it measures
    Step time, real-token throughput and rank 0's peak host memory of fusiontrain training on
    1, 2 and 4 gloo ranks (FSDP2 over CPU processes) at a FIXED GLOBAL BATCH: the benchmark
    Mllama (63M parameters, d=512, 32k vocabulary), fusion-only, fp32, 8 packed rows of 256
    tokens per optimizer step, every sample one image + 64 tokens
    (``data.synthetic_lengths=fixed data.synthetic_max_text=63``), micro-batches of 2 rows. So
    1 rank accumulates 4 micro-batches, 2 ranks 2 each and 4 ranks 1 each: every step does the
    same work at every world size (asserted: the real tokens of every step match).

How
    Each configuration is one ``torch.distributed.run --standalone`` training run in a fresh
    process group, with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed tensors leave the RSS) and
    ``OMP_NUM_THREADS`` set per rank. Numbers come from rank 0's ``metrics.jsonl``; the first
    step is warm-up and left out. The machine has few cores, so two thread settings are run:

    1. "fixed total threads": ``OMP_NUM_THREADS = max(1, cores // ranks)``: 1 rank already uses
       every core through intra-op threads; more ranks than cores oversubscribe them.
    2. "one thread per rank": 1 rank uses one core, so adding ranks (up to the core count)
       adds cores: this isolates the parallel speed-up of data parallelism.

    A run whose (ranks, threads) is the same in both settings is run once and shown in both.
    ``python -m fusiontrain plan --gpu cpu --json`` predicts each world size's peak memory (a
    fake-tensor trace of the same step) and gives AdamW's state per rank; parameter and gradient
    shards per rank are counted from the model built on the meta device (FSDP2 shards dim 0,
    padded, so rank 0 holds ``ceil(d0 / N)`` rows).

How to read it
    - median step (s): median over the timed steps; real tokens/s = real tokens per step / that.
    - speed-up = (1-rank median step) / (N-rank median step), within a thread setting.
    - efficiency = speed-up / N (per rank, the usual definition).
    - core-limited ideal = cores busy at N ranks / cores busy at 1 rank, where cores busy =
      min(ranks x threads, cores): the best speed-up this machine allows. "vs ideal" = speed-up /
      core-limited ideal. In setting 1 the ideal is 1: adding ranks adds no cores.
    - peak / rank: rank 0's RSS high-water mark during training above its RSS before the model
      was built (fusiontrain.train.metrics), next to the planner's prediction.
    - communication + contention: for each 1 < N <= cores, a 1-rank, 1-thread run of 1/N of the
      global batch does each rank's share of the compute alone; the N-rank step time beyond it is
      what the collectives, waiting on each other and sharing memory bandwidth cost.
    - The per-rank memory table lists parameter / gradient / AdamW bytes per rank and the planner's
      peak broken down by component; "What limits this machine" sums it all up from these numbers.

Other work on the machine
    Timings here are only as good as the machine is quiet. Before each run the script waits (up to
    ``--quiet-wait`` s) for the cores to idle, and it records each run's "CPU share": the CPU time
    of its processes over the CPU time the whole machine spent meanwhile (/proc/stat). Near 100%
    the run had the cores to itself; well below, other work competed and its time is inflated (the
    summary names such runs). ``--repeats R`` runs everything R times and keeps each
    configuration's fastest run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.memory import mib, model_folder, table  # noqa: E402

TINY_CONFIG = REPO / "configs" / "tiny.yaml"
MICRO_BATCH = 2
GLOBAL_BATCH = 8
SEQ_LEN = 256
TEXT_TOKENS = 63  # + the image token: 64 tokens per sample, 4 samples per 256-token row
CONTENDED = 0.9  # a run that got less of the machine's busy CPU time than this shared the cores

SETTING_TITLES = {
    "fixed total threads": "1. Fixed total threads: OMP_NUM_THREADS = max(1, cores // ranks) per rank",
    "one thread per rank": "2. One thread per rank: OMP_NUM_THREADS = 1 (1 rank uses one core)",
}
# How many OpenMP threads each rank gets, by setting: f(ranks, cores).
THREAD_SETTINGS: dict[str, Callable[[int, int], int]] = {
    "fixed total threads": lambda ranks, cores: max(1, cores // ranks),
    "one thread per rank": lambda ranks, cores: 1,
}


@dataclass
class Measurement:
    """One training run, as rank 0's metrics.jsonl saw it (warm-up step left out)."""

    ranks: int
    threads: int
    global_batch: int
    step_times: list[float] = field(default_factory=list)
    real_tokens: list[int] = field(default_factory=list)  # per step, all steps, summed over ranks
    peak_bytes: int = 0  # rank 0, max over all steps
    wall_s: float = 0.0
    cpu_share: float = 1.0  # of all CPU time the machine used during the run, the share this run used
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.step_times)

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_times)

    @property
    def tokens_per_step(self) -> float:
        return statistics.mean(self.real_tokens[1:] or self.real_tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.median_step


# -- running things --------------------------------------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot, summed over cores (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_children_seconds() -> float:
    """CPU seconds of this script's finished subprocesses (and theirs: torchrun waits its workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(max_wait_s: float, cores_busy_limit: float = 0.25) -> float:
    """Wait until the machine is nearly idle (under ``cores_busy_limit`` cores busy over 2 s), at
    most ``max_wait_s``; returns the seconds waited. Other work on the cores skews every timing."""
    started = time.perf_counter()
    while time.perf_counter() - started < max_wait_s:
        before = machine_busy_seconds()
        time.sleep(2)
        if (machine_busy_seconds() - before) / 2 < cores_busy_limit:
            break
    return time.perf_counter() - started


def cores_available() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() as a fallback)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def overrides(folder: Path, steps: int, global_batch: int = GLOBAL_BATCH) -> list[str]:
    """The config overrides every run and plan shares (the output folder comes separately)."""
    return [
        f"model.hf_mllama={folder}",
        "data.synthetic_lengths=fixed",
        f"data.synthetic_max_text={TEXT_TOKENS}",
        "data.packing=true",
        f"batch.seq_len={SEQ_LEN}",
        f"batch.micro_batch_size={MICRO_BATCH}",
        f"batch.global_batch_size={global_batch}",
        "data.num_workers=0",
        "eval.every_n_steps=0",
        "logging.every_n_steps=0",
        f"max_steps={steps}",
    ]


def run_training(folder: Path, ranks: int, threads: int, global_batch: int, steps: int, out: Path) -> Measurement:
    """Train in fresh processes under torch.distributed.run and read rank 0's metrics.jsonl."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
        "-m", "fusiontrain", "train", "--config", str(TINY_CONFIG),
        *overrides(folder, steps, global_batch), f"output_dir={out}",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MALLOC_MMAP_THRESHOLD_": "65536",  # large frees go back to the OS: RSS follows tensors
        "PYTHONPATH": str(REPO),
    }
    result = Measurement(ranks=ranks, threads=threads, global_batch=global_batch)
    started, busy, own = time.perf_counter(), machine_busy_seconds(), own_children_seconds()
    try:
        done = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        result.error = "timed out after 3600 s"
        return result
    result.wall_s = time.perf_counter() - started
    result.cpu_share = min(1.0, (own_children_seconds() - own) / max(machine_busy_seconds() - busy, 1e-9))
    if done.returncode != 0:
        result.error = f"exit status {done.returncode}: " + " | ".join(done.stderr.strip().splitlines()[-5:])
        return result
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result.step_times = [row["step_time_s"] for row in rows[1:]]
    result.real_tokens = [row["real_tokens"] for row in rows]
    result.peak_bytes = max(row["peak_memory_bytes"] for row in rows)
    return result


def run_plan(folder: Path, ranks: int) -> dict[str, Any]:
    """``python -m fusiontrain plan --gpu cpu --json`` for ``ranks`` ranks of the same config."""
    command = [
        sys.executable, "-m", "fusiontrain", "plan", "--config", str(TINY_CONFIG),
        "--gpus", str(ranks), "--gpu", "cpu", "--json", *overrides(folder, steps=1),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True, timeout=900)
    return json.loads(done.stdout)


def model_state_per_rank(folder: Path, ranks: int) -> dict[str, int]:
    """Rank 0's bytes of parameter shards and trainable-shard gradients (fp32) under FSDP2, which
    shards dim 0 padded to a multiple of ``ranks`` (rank 0 holds ``ceil(d0 / ranks)`` rows)."""
    from fusiontrain.source.model_source import ModelSource
    from fusiontrain.train.model import build_meta_model
    from fusiontrain.config import load_config

    model_config = load_config(TINY_CONFIG, overrides(folder, steps=1)).model
    model = build_meta_model(model_config, ModelSource.from_config(model_config))
    params = grads = 0
    for p in model.parameters():
        rows = math.ceil(p.shape[0] / ranks) if p.dim() else 1
        elements = rows * math.prod(p.shape[1:])
        params += elements * p.element_size()
        grads += elements * 4 if p.requires_grad else 0
    return {"params": params, "grads": grads}


# -- reading the results ---------------------------------------------------------------------------


def cores_busy(ranks: int, threads: int, cores: int) -> int:
    return min(ranks * threads, cores)


def scaling_rows(
    name: str, ranks_list: list[int], runs: dict[tuple[int, int, int], Measurement], plans: dict[int, dict], cores: int
) -> list[dict[str, Any]]:
    """One setting's numbers per world size, relative to its 1-rank run."""
    threads_of = THREAD_SETTINGS[name]
    base = runs[(1, threads_of(1, cores), GLOBAL_BATCH)]
    rows = []
    for ranks in ranks_list:
        threads = threads_of(ranks, cores)
        run = runs[(ranks, threads, GLOBAL_BATCH)]
        row: dict[str, Any] = {"ranks": ranks, "threads_per_rank": threads, "ok": run.ok, "error": run.error}
        row["planner_peak_bytes"] = plans[ranks]["peak_bytes"]
        if run.ok and base.ok:
            speedup = base.median_step / run.median_step
            ideal = cores_busy(ranks, threads, cores) / cores_busy(1, base.threads, cores)
            row.update(
                median_step_s=run.median_step,
                step_min_s=min(run.step_times),
                step_max_s=max(run.step_times),
                real_tokens_per_s=run.tokens_per_s,
                speedup=speedup,
                efficiency=speedup / ranks,
                core_limited_ideal=ideal,
                vs_ideal=speedup / ideal,
                peak_bytes=run.peak_bytes,
                memory_vs_1_rank=run.peak_bytes / base.peak_bytes,
                cpu_share=run.cpu_share,
            )
        rows.append(row)
    return rows


def format_scaling(name: str, rows: list[dict[str, Any]]) -> str:
    header = [
        "ranks", "threads/rank", "median step (s)", "timed steps min-max", "real tokens/s", "speed-up", "efficiency (/N)",
        "core-limited ideal", "vs ideal", "peak/rank MiB", "vs 1 rank", "planner peak MiB", "CPU share",
    ]
    cells = []
    for r in rows:
        if not r["ok"]:
            cells.append([str(r["ranks"]), str(r["threads_per_rank"]), "FAILED", *["-"] * 8, mib(r["planner_peak_bytes"]), "-"])
            continue
        cells.append([
            str(r["ranks"]), str(r["threads_per_rank"]), f"{r['median_step_s']:.2f}", f"{r['step_min_s']:.2f}-{r['step_max_s']:.2f}",
            f"{r['real_tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x", f"{r['efficiency']:.0%}", f"{r['core_limited_ideal']:.2f}x",
            f"{r['vs_ideal']:.0%}", mib(r["peak_bytes"]), f"{r['memory_vs_1_rank']:.2f}x", mib(r["planner_peak_bytes"]),
            f"{r['cpu_share']:.0%}",
        ])
    return table(SETTING_TITLES[name], header, cells)


def format_model_state(ranks_list: list[int], state: dict[int, dict[str, int]], plans: dict[int, dict]) -> str:
    """Per-rank model state (what sharding divides) next to the planner's full peak breakdown."""
    components: list[str] = []
    for ranks in ranks_list:
        components += [c for c in plans[ranks]["memory_bytes"] if c not in components]
    rows = [
        ["parameter shards (counted)", *[mib(state[n]["params"]) for n in ranks_list]],
        ["gradient shards, fp32 (counted)", *[mib(state[n]["grads"]) for n in ranks_list]],
        ["AdamW state (planner)", *[mib(optimizer_bytes(plans[n])) for n in ranks_list]],
        *[[f"  planner at peak: {c}", *[mib(plans[n]["memory_bytes"].get(c, 0)) for n in ranks_list]] for c in components],
        ["  planner peak", *[mib(plans[n]["peak_bytes"]) for n in ranks_list]],
    ]
    return table("Per-rank memory components (MiB, rank 0), by ranks", ["", *[f"{n} rank{'s' * (n > 1)}" for n in ranks_list]], rows)


def optimizer_bytes(plan: dict[str, Any]) -> int:
    return next((v for k, v in plan["memory_bytes"].items() if k.startswith("optimizer state")), 0)


def gathered_bytes_per_rank(ranks: int, model_bytes: int) -> float:
    """Bytes a rank receives from parameter all-gathers in one step (forward + backward per micro-batch)."""
    micro_batches = GLOBAL_BATCH // (MICRO_BATCH * ranks)
    return micro_batches * 2 * (ranks - 1) / ranks * model_bytes


def overhead_estimates(
    ranks_list: list[int], runs: dict[tuple[int, int, int], Measurement], cores: int
) -> dict[int, dict[str, float]]:
    """For 1 < N <= cores: N ranks x 1 thread against 1 rank x 1 thread doing one rank's share."""
    estimates = {}
    for ranks in ranks_list:
        full, alone = runs.get((ranks, 1, GLOBAL_BATCH)), runs.get((1, 1, GLOBAL_BATCH // ranks))
        if 1 < ranks <= cores and full is not None and alone is not None and full.ok and alone.ok:
            extra = full.median_step - alone.median_step
            estimates[ranks] = {"step_s": full.median_step, "alone_s": alone.median_step, "extra_s": extra, "share": extra / full.median_step}
    return estimates


def limits_paragraph(
    cores: int, ranks_list: list[int], runs: list[Measurement], settings: dict[str, list[dict[str, Any]]],
    overhead: dict[int, dict[str, float]], state: dict[int, dict[str, int]], plans: dict[int, dict], load: tuple[float, float],
) -> str:
    """What bounds the scaling here, from the numbers above."""
    by_ranks = {name: {r["ranks"]: r for r in rows if r["ok"]} for name, rows in settings.items()}
    fixed, single = by_ranks["fixed total threads"], by_ranks["one thread per rank"]
    lines = [f"What limits this machine ({cores} cores; load average {load[0]:.2f} before, {load[1]:.2f} after the runs):"]
    measured = [r for r in runs if r.ok]
    contended = [r for r in measured if r.cpu_share < CONTENDED]
    if contended:
        worst = min(contended, key=lambda r: r.cpu_share)
        lines.append(
            f"- Other work shared the cores: {len(contended)} of {len(measured)} runs got under {CONTENDED:.0%} of the CPU time "
            f"the machine spent while they ran (lowest {worst.cpu_share:.0%}: {worst.ranks} rank(s) x {worst.threads} thread(s), "
            f"global batch {worst.global_batch}). Their step times are inflated and every ratio using them is unreliable; "
            "rerun on an idle machine or with --repeats."
        )
    if 1 in fixed and cores in fixed and cores > 1:
        one, many = fixed[1], fixed[cores]
        lines.append(
            f"- Compute: {cores} cores in total. 1 rank x {one['threads_per_rank']} threads takes {one['median_step_s']:.2f} s a step, "
            f"{cores} ranks x {many['threads_per_rank']} thread {many['median_step_s']:.2f} s (speed-up {many['speedup']:.2f}x): "
            f"with the cores fixed, adding ranks only trades intra-op threads for processes, so the ideal is 1x."
        )
    over = [n for n in ranks_list if n > cores and n in single]
    if over:
        below = max((n for n in single if n <= cores), default=1)
        for n in over:
            t_n, t_below = single[n]["median_step_s"], single[below]["median_step_s"]
            verdict = "slower" if t_n > 1.05 * t_below else "faster" if t_n < 0.95 * t_below else "the same within 5%"
            lines.append(
                f"- {n} ranks on {cores} cores oversubscribe them {n / cores:g}x: {t_n:.2f} s a step against {t_below:.2f} s at "
                f"{below} ranks ({verdict}). More ranks add no cores, only context switches; what they can win is less data "
                "moved per rank (fewer micro-batches each, below)."
            )
    if 1 in single:
        best = max((n for n in single if n <= cores), default=1)
        if best > 1:
            threaded = [r for r in runs if r.ok and r.ranks == 1 and r.threads == best and r.global_batch == GLOBAL_BATCH]
            by_threads = (
                f"; 1 rank with {best} threads instead gets {single[1]['median_step_s'] / threaded[0].median_step:.2f}x "
                "from the same cores" if threaded else ""
            )
            lines.append(
                f"- Parallel speed-up, one thread per rank: {single[best]['speedup']:.2f}x on {best} ranks "
                f"(ideal {single[best]['core_limited_ideal']:.0f}x; {single[best]['vs_ideal']:.0%} of it){by_threads}."
            )
    lines.append(
        "- Communication: gloo runs FSDP's all-gathers and reduce-scatters through shared memory / loopback TCP on the same "
        "cores that compute; there are no separate copy engines or streams as on a GPU, so collectives serialize with "
        "compute instead of overlapping it."
    )
    volume = {n: gathered_bytes_per_rank(n, state[1]["params"]) for n in ranks_list if n > 1}
    if volume:
        lines.append(
            "  FSDP all-gathers every parameter, the frozen ones too, in forward and again in backward for each micro-batch: "
            "about " + ", ".join(f"{mib(b)} MiB per rank per step at {n} ranks" for n, b in volume.items())
            + f" (accumulation steps x 2 x (N-1)/N x the {mib(state[1]['params'])} MiB model, as the planner counts it)."
        )
    for n, e in overhead.items():
        lines.append(
            f"  Measured at {n} ranks: 1 rank x 1 thread does one rank's share (1/{n} of the batch) in {e['alone_s']:.2f} s; "
            f"{n} ranks take {e['step_s']:.2f} s, so {e['extra_s']:.2f} s ({e['share']:.0%} of the step) goes to collectives, "
            "waiting for the slowest rank and sharing memory bandwidth and caches (not separable here)."
        )
    if 1 in single and len(single) > 1:
        biggest = max(single)
        sharded = {n: state[n]["params"] + state[n]["grads"] + optimizer_bytes(plans[n]) for n in (1, biggest)}
        one, many = plans[1]["memory_bytes"], plans[biggest]["memory_bytes"]
        fixed_parts = {c: v for c, v in many.items() if v > 0 and v >= one.get(c, 0)}
        lines.append(
            f"- Memory: sharding divides parameters, gradients and AdamW state ({mib(sharded[1])} -> {mib(sharded[biggest])} MiB "
            f"per rank from 1 to {biggest} ranks), but at the planner's peak {mib(sum(fixed_parts.values()))} MiB per rank do not "
            f"shrink with N ({', '.join(fixed_parts)}): the micro-batch is {MICRO_BATCH} rows at every N, and each rank "
            f"gathers whole FSDP units. So the measured peak per rank only falls to {single[biggest]['memory_vs_1_rank']:.2f}x "
            f"of 1 rank's (planner: {plans[biggest]['peak_bytes'] / plans[1]['peak_bytes']:.2f}x), and the host's total "
            f"grows with N (N x the peak, plus a Python + torch runtime per process)."
        )
    return "\n".join(lines)


# -- the driver ------------------------------------------------------------------------------------


def parse_ranks(text: str) -> list[int]:
    ranks = sorted({int(part) for part in text.split(",") if part.strip()} | {1})  # 1 rank is the baseline
    for n in ranks:
        if GLOBAL_BATCH % (MICRO_BATCH * n):
            raise SystemExit(f"--ranks: {n} does not divide the global batch ({GLOBAL_BATCH} rows of micro-batches of {MICRO_BATCH})")
    return ranks


def faster(kept: Measurement | None, new: Measurement) -> Measurement:
    """Of two repeats, the one with the shorter median step (other work only ever adds time)."""
    if kept is None or not kept.ok:
        return new
    return new if new.ok and new.median_step < kept.median_step else kept


def planned_runs(ranks_list: list[int], cores: int) -> list[tuple[int, int, int]]:
    """(ranks, threads, global batch) of every distinct run: both settings, then the references."""
    keys = [(n, threads_of(n, cores), GLOBAL_BATCH) for threads_of in THREAD_SETTINGS.values() for n in ranks_list]
    keys += [(1, 1, GLOBAL_BATCH // n) for n in ranks_list if 1 < n <= cores]
    return list(dict.fromkeys(keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--ranks", default="1,2,4", help="world sizes, comma-separated (1 is always run)")
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--repeats", type=int, default=1, help="run everything this often, keep each run's fastest")
    parser.add_argument("--quiet-wait", type=float, default=120, help="before each run, wait up to this many seconds for an idle machine")
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step is warm-up)")
    ranks_list = parse_ranks(args.ranks)
    cores = cores_available()
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    folder = model_folder("bench")
    tmp = Path(tempfile.mkdtemp(prefix="fusiontrain-scaling-"))
    print(
        f"benchmark Mllama ({folder}), fusion-only, fp32, CPU, gloo; global batch {GLOBAL_BATCH} rows x {SEQ_LEN} tokens packed "
        f"(1 image + {TEXT_TOKENS + 1} tokens per sample), micro-batch {MICRO_BATCH}; {args.steps} steps per run, "
        f"first is warm-up; {cores} cores",
        flush=True,
    )

    runs: dict[tuple[int, int, int], Measurement] = {}
    for repeat in range(args.repeats):
        for ranks, threads, batch in planned_runs(ranks_list, cores):
            waited = wait_for_quiet(args.quiet_wait)
            out = tmp / f"r{ranks}_t{threads}_b{batch}_{repeat}"
            run = run_training(folder, ranks, threads, batch, args.steps, out)
            status = f"{run.median_step:.2f} s/step" if run.ok else f"FAILED ({run.error})"
            print(
                f"  ran {ranks} rank(s) x {threads} thread(s), global batch {batch}: {status}, {run.wall_s:.0f} s wall, "
                f"{run.cpu_share:.0%} of the machine's busy CPU time (waited {waited:.0f} s for quiet)",
                flush=True,
            )
            runs[(ranks, threads, batch)] = faster(runs.get((ranks, threads, batch)), run)

    main_runs = [r for (_, _, batch), r in runs.items() if batch == GLOBAL_BATCH and r.ok]
    token_counts = {(r.ranks, r.threads): r.real_tokens for r in main_runs}
    assert len({tuple(t) for t in token_counts.values()}) <= 1, f"real tokens per step differ across runs: {token_counts}"

    plans = {n: run_plan(folder, n) for n in ranks_list}
    state = {n: model_state_per_rank(folder, n) for n in ranks_list}
    settings = {name: scaling_rows(name, ranks_list, runs, plans, cores) for name in THREAD_SETTINGS}
    overhead = overhead_estimates(ranks_list, runs, cores)
    load = (load_before, os.getloadavg()[0])

    tokens = main_runs[0].real_tokens[1] if main_runs and len(main_runs[0].real_tokens) > 1 else None
    print(f"\nreal tokens per step: {tokens} at every world size (checked)")
    for name, rows in settings.items():
        print(format_scaling(name, rows))
    print(format_model_state(ranks_list, state, plans))
    print()
    print(limits_paragraph(cores, ranks_list, list(runs.values()), settings, overhead, state, plans, load))
    wall = time.perf_counter() - started
    print(f"\ntotal wall time {wall:.0f} s")

    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"cores": cores, "load_average_before": load[0], "load_average_after": load[1]},
            "config": {"global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH, "seq_len": SEQ_LEN, "steps": args.steps,
                       "real_tokens_per_step": tokens, "overrides": overrides(folder, args.steps)},
            "runs": [asdict(r) for r in runs.values()],
            "settings": settings,
            "model_state_per_rank": state,
            "plans": plans,
            "communication_and_contention": overhead,
            "wall_s": wall,
        }, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
