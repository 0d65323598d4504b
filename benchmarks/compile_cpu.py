"""torch.compile (inductor) on the CPU, per block and per training step: ``python benchmarks/compile_cpu.py``.

Measures what ``parallel.compile`` (``fusiontrain.parallel.fsdp.apply_compile``: ``torch.compile`` per
block) buys on the CPU, on the benchmark Mllama (``benchmarks.models.bench_mllama_config``, written
once to ``benchmarks/out/bench_mllama``; the weights are its own) and on the long-tailed data mix
of ``benchmarks/vs_hf.py``, in fp32.

Per block kind, on the inputs the block gets in the real model (captured with forward hooks from
a full forward of each micro-batch, built by the Trainer's own loader):

- ``vision layer``: a layer of the frozen vision tower (``encoder.vision.layers.0``), forward only,
  as fusion-only training runs it (nothing there needs a gradient);
- ``projection layer``: a trainable global layer of the projection head
  (``encoder.projection.layers.0``), forward + backward to its parameters;
- ``decoder self-attention layer``: a frozen decoder layer after the first fusion layer
  (``decoder.layers.4``), forward + backward to its input (training backpropagates through it);
- ``fusion layer``: a ``FusionLayer`` (``decoder.layers.5``: a frozen self-attention layer plus a
  trainable cross-attention layer), forward + backward to its input and the fusion parameters.

each on packed rows (4 rows of 1024 tokens; self-attention per segment through
``fusiontrain.modules.packed``, which is opaque to torch.compile: a graph break) and on padded
batches (4 samples padded to the longest, so the length varies per batch). Cross-attention runs
on the tokens that see an image only, so its token count varies per batch in both layouts.

For each (kind, layout, compile mode): the block is compiled afresh (``torch._dynamo.reset()``),
with ``dynamic=None`` (PyTorch's default: static shapes first, then a dynamic recompile when a
shape changes) or ``dynamic=True``. The first call of each micro-batch is a warm-up; the graphs
compiled are counted with a counting wrapper around inductor (``graphs``: on the first
micro-batch; ``recompiles``: on the later ones), and the compile time is the warm-up time of
all micro-batches minus the eager time of the same. Graph breaks come from
``torch._dynamo.explain`` on the first micro-batch. Then ``--rounds`` rounds each time eager and
compiled over all micro-batches, interleaved in one process; the table gives the median round
and the spread, compiled / eager per round (median and spread), and the largest difference of the
outputs and gradients, relative to the eager value's largest magnitude.

The whole step: two Trainers (FSDP2 over a world of one, gloo) on the same packed stream, one with
``parallel.compile=true``; their ``train_step`` calls alternate, so step i of both sees the same
batch. The first ``--warmup-steps`` steps are warm-up (compiles and recompiles); then step times
(median, spread) of the rest, and the losses of both, which must agree.

Compiles are cold: the script gives inductor a fresh cache folder and turns its FX-graph and
AOTAutograd caches off (a rerun would otherwise load the graphs from disk in a fraction of the
time). Within the run, inductor still reuses C++ kernels it has built (same source).

CPU use: process CPU time over wall time x threads, per variant (well under 100% means other
processes took the cores and the times are not clean). Flags: ``--batches``, ``--rounds``,
``--threads`` (default 2), ``--kinds``, ``--layouts``, ``--modes``, ``--steps`` (0: no whole-step
run), ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
if __name__ == "__main__":  # cold compiles: inductor's on-disk caches would hide the compile time on a rerun
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusiontrain-inductor-")
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._inductor.compile_fx import compile_fx  # noqa: E402

from benchmarks.memory import model_folder  # noqa: E402
from benchmarks.vs_hf_data import train_config as vs_hf_train_config  # noqa: E402
from fusiontrain.parallel import distributed
from fusiontrain.source.model_source import ModelSource  # noqa: E402
from fusiontrain.train.data import build_dataset  # noqa: E402
from fusiontrain.train.model import prepare_model  # noqa: E402
from fusiontrain.config import TrainConfig  # noqa: E402
from fusiontrain.data import Batch  # noqa: E402
from fusiontrain.train.data import build_train_loader  # noqa: E402
from fusiontrain.weights.hf_checkpoint import materialize  # noqa: E402
from fusiontrain.train.trainer import Trainer  # noqa: E402

CPU = torch.device("cpu")

# block kind -> (module path in the model, what backward computes: "none", "params", "input+params")
KINDS: dict[str, tuple[str, str]] = {
    "vision layer": ("encoder.vision.layers.0", "none"),
    "projection layer": ("encoder.projection.layers.0", "params"),
    "decoder self-attention layer": ("decoder.layers.4", "input+params"),
    "fusion layer": ("decoder.layers.5", "input+params"),
}
LAYOUTS = ("packed", "padded")
MODES = ("default", "dynamic")


def train_config(folder: Path, output_dir: Path, *, packing: bool, steps: int, compile: bool) -> TrainConfig:
    """vs_hf.py's fusion-only fp32 Trainer config (padded rows or packed), with or without
    ``parallel.compile``. Unpacked means padded rows here (``data.padding_free=false``): the
    layout whose compiled blocks the padded measurements are about."""
    return vs_hf_train_config(
        folder, output_dir, packing=packing, steps=steps, padding_free=False,
        extra=[f"parallel.compile={'true' if compile else 'false'}"],
    )


def micro_batches(config: TrainConfig, model: torch.nn.Module, count: int) -> list[Batch]:
    """The first ``count`` micro-batches the Trainer of ``config`` would read, on the CPU (with
    their packed layouts built)."""
    source = ModelSource.from_config(config.model)
    spec = source.family.image_format(model)
    inputs = source.input_folders(model)
    dataset = build_dataset(config, spec, inputs, model, split="train")
    loader = build_train_loader(
        config, dataset, spec, inputs, rank=0, world=1, combine=lambda table: table, ignore_index=config.loss.ignore_index
    )
    stream = iter(loader)
    return [next(stream).to(CPU) for _ in range(count)]


def loaded_model(config: TrainConfig) -> torch.nn.Module:
    """The benchmark model with its weights, plain (no parallelism wrappers), in training mode."""
    pretrained = prepare_model(config.model, ModelSource.from_config(config.model), seed=0)
    model = materialize(pretrained.model.float(), CPU)
    pretrained.load()
    return model.train()


# -- per-block inputs and runs --------------------------------------------------------------------


@dataclass
class BlockCall:
    """One captured call of a block: its positional input and keyword arguments."""

    x: torch.Tensor
    kwargs: dict[str, Any]
    grad: torch.Tensor  # the output gradient fed to backward


def capture_calls(model: torch.nn.Module, paths: list[str], batches: list[Batch]) -> dict[str, list[BlockCall]]:
    """For each block path, its call in a full forward of each micro-batch."""
    calls: dict[str, list[BlockCall]] = {path: [] for path in paths}
    generator = torch.Generator().manual_seed(0)

    def hook(path: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0].detach().clone()
            grad = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            calls[path].append(BlockCall(x, dict(kwargs), grad))

        return record

    handles = [model.get_submodule(path).register_forward_pre_hook(hook(path), with_kwargs=True) for path in paths]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch.tokens, **batch.model_inputs())
    finally:
        for handle in handles:
            handle.remove()
    for path in paths:  # detach what the block reads besides x (the encoder's output, for a fusion layer)
        for call in calls[path]:
            call.kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in call.kwargs.items()}
    return calls


def run_block(block: Callable[..., torch.Tensor], params: list[torch.Tensor], call: BlockCall, backward: str) -> list[torch.Tensor]:
    """One forward (+ backward): the output and the gradients that training takes."""
    x = call.x.requires_grad_(backward == "input+params")
    if backward == "none":
        with torch.no_grad():
            return [block(x, **call.kwargs)]
    out = block(x, **call.kwargs)
    wrt = ([x] if backward == "input+params" else []) + params
    grads = torch.autograd.grad(out, wrt, call.grad)
    return [out.detach(), *grads]


class CountingInductor:
    """Inductor, counting the graphs it is asked to compile (each graph-break piece, each
    recompile)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        self.graphs += 1
        return compile_fx(gm, example_inputs)


def relative_difference(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(got, want))


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and process CPU seconds of ``fn()``."""
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu_start


def compiled_vs_eager(times: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict[str, Any]:
    """The timed repetitions (seconds, eager and compiled, paired by index) as milliseconds and
    compiled / eager ratios of wall and CPU time: median, min and max over the pairs."""
    ratios = [c / e for c, e in zip(times["compiled"], times["eager"])]
    cpu_ratios = [c / e for c, e in zip(cpu["compiled"], cpu["eager"])]
    return {
        "eager_ms": [t * 1e3 for t in times["eager"]],
        "compiled_ms": [t * 1e3 for t in times["compiled"]],
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "eager_cpu_ms": [t * 1e3 for t in cpu["eager"]],
        "compiled_cpu_ms": [t * 1e3 for t in cpu["compiled"]],
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "cpu_ratio_min": min(cpu_ratios),
        "cpu_ratio_max": max(cpu_ratios),
    }


def graph_breaks(block: torch.nn.Module, call: BlockCall, backward: str) -> tuple[int, list[str]]:
    """Graph breaks dynamo reports for the block's forward on ``call`` (and their reasons)."""
    torch._dynamo.reset()
    x = call.x.requires_grad_(backward == "input+params")
    explanation = torch._dynamo.explain(block)(x, **call.kwargs)
    torch._dynamo.reset()
    reasons = sorted({str(b.reason).splitlines()[0][:120] for b in explanation.break_reasons})
    return explanation.graph_break_count, reasons


def bench_block(
    kind: str, block: torch.nn.Module, calls: list[BlockCall], backward: str, mode: str, rounds: int, threads: int
) -> dict[str, Any]:
    """Eager against compiled on ``calls``, interleaved (see the module docstring)."""
    params = [p for p in block.parameters() if p.requires_grad] if backward != "none" else []
    torch._dynamo.reset()
    backend = CountingInductor()
    compiled = torch.compile(block, backend=backend, dynamic=True if mode == "dynamic" else None)

    eager_results = [run_block(block, params, call, backward) for call in calls]  # eager warm-up and reference
    eager_warm = sum(timed(lambda c=call: run_block(block, params, c, backward))[0] for call in calls)
    first_graphs, warm_total, compiled_results = 0, 0.0, []
    for index, call in enumerate(calls):
        seconds, _ = timed(lambda c=call: compiled_results.append(run_block(compiled, params, c, backward)))
        warm_total += seconds
        if index == 0:
            first_graphs = backend.graphs
    recompiles = backend.graphs - first_graphs
    difference = max(relative_difference(c, e) for c, e in zip(compiled_results, eager_results))

    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    cpu: dict[str, list[float]] = {"eager": [], "compiled": []}
    graphs_before_timing = backend.graphs
    for _ in range(rounds):
        for name, fn in (("eager", block), ("compiled", compiled)):
            wall, cpu_seconds = timed(lambda f=fn: [run_block(f, params, call, backward) for call in calls])
            times[name].append(wall)
            cpu[name].append(cpu_seconds)
    torch._dynamo.reset()
    return {
        "kind": kind,
        "mode": mode,
        "backward": backward,
        **compiled_vs_eager(times, cpu),
        "compile_s": warm_total - eager_warm,
        "graphs_first_batch": first_graphs,
        "recompiles_later_batches": recompiles,
        "graphs_during_timing": backend.graphs - graphs_before_timing,  # 0 unless a repeat recompiled
        "max_rel_diff": difference,
        "cpu_use_eager": sum(cpu["eager"]) / (sum(times["eager"]) * threads),
        "cpu_use_compiled": sum(cpu["compiled"]) / (sum(times["compiled"]) * threads),
    }


# -- the whole step -------------------------------------------------------------------------------


def bench_step(folder: Path, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """Eager and compiled Trainers on the same packed stream, steps alternating."""
    scratch = Path(tempfile.mkdtemp(prefix="fusiontrain-compile-"))
    trainers = {
        name: Trainer(train_config(folder, scratch / name, packing=True, steps=steps, compile=name == "compiled"))
        for name in ("eager", "compiled")
    }
    for trainer in trainers.values():
        trainer.metrics.close()  # steps are driven here; nothing is logged
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    cpu: dict[str, list[float]] = {"eager": [], "compiled": []}
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    graphs_before = _graph_count()
    recompile_steps = []
    for step in range(steps):
        for name, trainer in trainers.items():
            before = _graph_count()
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics = trainer.train_step(step)
            wall, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            losses[name].append(metrics["loss"])
            times[name].append(wall)
            cpu[name].append(cpu_seconds)
            if name == "compiled" and _graph_count() > before and step > 0:
                recompile_steps.append(step)
    timed_times = {name: values[warmup:] for name, values in times.items()}
    timed = compiled_vs_eager(timed_times, {name: values[warmup:] for name, values in cpu.items()})
    return {
        "steps": steps,
        "warmup_steps": warmup,
        **timed,
        "eager_ms": [t * 1e3 for t in times["eager"]],  # every step, the warm-up ones included
        "compiled_ms": [t * 1e3 for t in times["compiled"]],
        "eager_cpu_ms": [t * 1e3 for t in cpu["eager"]],
        "compiled_cpu_ms": [t * 1e3 for t in cpu["compiled"]],
        "first_step_extra_s": times["compiled"][0] - times["eager"][0],
        "warmup_extra_s": sum(times["compiled"][:warmup]) - sum(times["eager"][:warmup]),
        "graphs_compiled": _graph_count() - graphs_before,
        "steps_with_new_graphs": recompile_steps,
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(losses["compiled"], losses["eager"])),
        "cpu_use_eager": sum(cpu["eager"][warmup:]) / (sum(timed_times["eager"]) * threads),
        "cpu_use_compiled": sum(cpu["compiled"][warmup:]) / (sum(timed_times["compiled"]) * threads),
    }


def _graph_count() -> int:
    """Graphs dynamo has compiled in this process (its ``unique_graphs`` counter)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


# -- report ---------------------------------------------------------------------------------------


def block_table(rows: list[dict[str, Any]]) -> Iterator[str]:
    yield (
        "| block | layout | dynamic | eager ms (spread) | compiled ms (spread) | compiled / eager (spread) | "
        "CPU time compiled / eager (spread) | compile s | graphs (1st batch) | recompiles (later batches) | "
        "graph breaks | max rel diff | CPU use e / c |"
    )
    yield "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for row in rows:
        eager, comp = row["eager_ms"], row["compiled_ms"]
        yield (
            f"| {row['kind']} | {row['layout']} | {'True' if row['mode'] == 'dynamic' else 'None'} | "
            f"{statistics.median(eager):.0f} ({min(eager):.0f}-{max(eager):.0f}) | "
            f"{statistics.median(comp):.0f} ({min(comp):.0f}-{max(comp):.0f}) | "
            f"**{row['ratio_median']:.2f}x** ({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) | "
            f"{row['cpu_ratio_median']:.2f}x ({row['cpu_ratio_min']:.2f}-{row['cpu_ratio_max']:.2f}) | {row['compile_s']:.1f} | "
            f"{row['graphs_first_batch']} | {row['recompiles_later_batches']} | {row['graph_breaks']} | "
            f"{row['max_rel_diff']:.1e} | {row['cpu_use_eager']:.0%} / {row['cpu_use_compiled']:.0%} |"
        )


def step_lines(step: dict[str, Any]) -> Iterator[str]:
    eager, comp = step["eager_ms"][step["warmup_steps"] :], step["compiled_ms"][step["warmup_steps"] :]
    yield (
        f"whole step (Trainer, packed, {step['steps']} steps alternating, first {step['warmup_steps']} warm-up): "
        f"eager {statistics.median(eager):.0f} ms ({min(eager):.0f}-{max(eager):.0f}), compiled "
        f"{statistics.median(comp):.0f} ms ({min(comp):.0f}-{max(comp):.0f}); compiled / eager **{step['ratio_median']:.2f}x** "
        f"({step['ratio_min']:.2f}-{step['ratio_max']:.2f}); CPU time compiled / eager {step['cpu_ratio_median']:.2f}x "
        f"({step['cpu_ratio_min']:.2f}-{step['cpu_ratio_max']:.2f}); CPU use {step['cpu_use_eager']:.0%} / {step['cpu_use_compiled']:.0%}"
    )
    yield (
        f"  compile cost: first step +{step['first_step_extra_s']:.1f} s, warm-up steps together "
        f"+{step['warmup_extra_s']:.1f} s; {step['graphs_compiled']} graphs compiled, steps after the first that compiled "
        f"new graphs: {step['steps_with_new_graphs'] or 'none'}; largest loss difference {step['loss_max_abs_diff']:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3, help="micro-batches per layout (each round runs all)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--kinds", nargs="*", choices=list(KINDS), default=list(KINDS), help="block kinds (none: step only)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="torch.compile dynamic=None / True")
    parser.add_argument("--steps", type=int, default=8, help="whole-step run: steps per Trainer (0: skip it)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="whole-step run: untimed first steps")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    if args.steps and args.steps <= args.warmup_steps:
        parser.error("--steps must exceed --warmup-steps (or be 0)")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    folder = model_folder("bench")
    scratch = Path(tempfile.mkdtemp(prefix="fusiontrain-compile-"))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch.set_num_threads({args.threads}); torch "
        f"{torch.__version__}; fp32; model {folder.name}; {args.batches} micro-batches per layout, {args.rounds} "
        f"interleaved rounds",
        flush=True,
    )

    rows: list[dict[str, Any]] = []
    for layout in args.layouts if args.kinds else []:
        config = train_config(folder, scratch / layout, packing=layout == "packed", steps=1, compile=False)
        model = loaded_model(config)
        batches = micro_batches(config, model, args.batches)
        shapes = ", ".join(f"{tuple(b.tokens.shape)}" for b in batches)
        print(f"{layout}: micro-batch token shapes {shapes}", flush=True)
        calls = capture_calls(model, [KINDS[k][0] for k in args.kinds], batches)
        for kind in args.kinds:
            path, backward = KINDS[kind]
            block = model.get_submodule(path)
            breaks, reasons = graph_breaks(block, calls[path][0], backward)
            for mode in args.modes:
                row = bench_block(kind, block, calls[path], backward, mode, args.rounds, args.threads)
                row.update(layout=layout, graph_breaks=breaks, graph_break_reasons=reasons)
                rows.append(row)
                print(list(block_table([row]))[-1], flush=True)
        del model, calls, batches

    step = None
    if args.steps:
        distributed.init_distributed()
        step = bench_step(folder, args.steps, args.warmup_steps, args.threads)
        distributed.shutdown()

    print()
    print("\n".join(block_table(rows)))
    for row in rows:
        if row["graph_break_reasons"] and row["mode"] == args.modes[0]:
            print(f"graph breaks of {row['kind']} ({row['layout']}): {'; '.join(row['graph_break_reasons'])}")
    if step is not None:
        print()
        print("\n".join(step_lines(step)))
    print(
        "\nblocks: times are one round (all micro-batches, forward + backward as fusion-only training runs them; the "
        "vision layer forward only); compile s = compiled warm-up minus eager time over the micro-batches; graphs = "
        "graphs inductor compiled on the first micro-batch, recompiles = on the later ones; max rel diff over outputs "
        "and gradients"
    )
    load_after = os.getloadavg()
    print(
        f"load average before / after: {' '.join(f'{x:.1f}' for x in load_before)} / "
        f"{' '.join(f'{x:.1f}' for x in load_after)}; total wall time {time.perf_counter() - started:.0f} s"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"blocks": rows, "step": step, "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()
