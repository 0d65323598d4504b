"""Run every benchmark and write ``benchmarks/RESULTS.md``: ``python benchmarks/run_all.py``.

Each benchmark runs in its own process, one after the other (they time the whole machine, so
nothing else should run meanwhile); its printed tables go into RESULTS.md under its heading, with
the machine, the commit, the date and the command that reproduces them. Sections it does not
write (measurements written by hand, the GPU results) are kept. About 22 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "RESULTS.md"

# (title, script and arguments, what it shows)
BENCHMARKS: list[tuple[str, list[str], str]] = [
    (
        "fusiontrain against HF transformers and torchtune (vs_hf.py)",
        ["benchmarks/vs_hf.py", "--profile", "--json", "benchmarks/out/vs_hf.json"],
        "Same weights, same data, one process, the five models alive side by side and their timed steps "
        "interleaved: (a) HF MllamaForConditionalGeneration with a padding collator and frozen parameters set "
        "by hand, (b) fusiontrain padding-free (the same samples per step in one row, its default), (r) "
        "fusiontrain on (a)'s padded rows, (c) fusiontrain packed, (d) torchtune 0.6.1 padded (its modules, "
        "converter, chunked loss and recipe step). Ratios to (a) are taken round by round (median and min-max "
        "over rounds); model FLOP/s count the samples' work only, as a share of a measured matmul peak. The "
        "timed rounds run with glibc's usual malloc thresholds (the memory windows before them with a 64 KiB "
        "mmap threshold). The profile is (c)'s top operators.",
    ),
    (
        "The model's matmul shapes against the square peak (matmul_shapes.py)",
        ["benchmarks/matmul_shapes.py"],
        "torch.mm on the benchmark Mllama's own shapes (packed and padding-free rows against d = 512 and the MLP's "
        "1536, the loss's chunks against the 32k output projection), with a preallocated output, against the "
        "2048^2 matmul vs_hf.py takes as the machine's peak; median of interleaved rounds.",
    ),
    (
        "Packed attention against the dense-mask path (attention.py)",
        ["benchmarks/attention.py"],
        "Self-attention, cross-attention and a whole cross-attention layer on one packed micro-batch of the "
        "long-tailed mix, forward and backward in fp32: per-sample SDPA and gathered cross-attention against "
        "SDPA under the dense masks; interleaved rounds; outputs and gradients compared.",
    ),
    (
        "Packed against padded batches (packing.py)",
        ["benchmarks/packing.py"],
        "Real-token share and real tokens/s of padded, padding-free, greedy-packed and first-fit-packed batches.",
    ),
    (
        "How dataloader workers start (dataloader_start.py)",
        ["benchmarks/dataloader_start.py", "--setup", "8"],
        "fork, forkserver and spawn (data.worker_start), each in a fresh one-rank gloo process that starts the "
        "worker server first thing, as the trainer does, with its setup padded to 8 s (a model build): time to "
        "the first micro-batch and steady micro-batches/s of 2 workers over the tiny Mllama's caption data; "
        "the batches are checked to be the same under every method.",
    ),
    (
        "Memory (memory.py)",
        ["benchmarks/memory.py"],
        "Per-rank parameters, gradients and optimizer state on 1, 2 and 4 ranks; activations under "
        "checkpointing; the chunked loss; FusionLayer sharding; frozen weights stored in bf16 (model.frozen_dtype) "
        "against fp32 storage under bf16 compute, with the loss difference.",
    ),
    (
        "Scaling over gloo ranks (scaling.py)",
        ["benchmarks/scaling.py"],
        "Throughput and per-rank memory on 1, 2 and 4 ranks at a fixed global batch.",
    ),
    (
        "The planner against measured memory (plan_accuracy.py)",
        ["benchmarks/plan_accuracy.py"],
        "`python -m fusiontrain plan` against the measured peak of real training runs.",
    ),
    (
        "torch.compile on the CPU (compile_cpu.py)",
        [
            "benchmarks/compile_cpu.py", "--kinds", "decoder self-attention layer", "fusion layer",
            "--layouts", "packed", "--modes", "default", "--steps", "0",
        ],
        "parallel.compile's per-block torch.compile (inductor) against eager on packed rows of the long-tailed mix, "
        "forward + backward, interleaved rounds: time, compile time, graphs, recompiles, graph breaks, differences. "
        "The short form (2 decoder block kinds, no whole-step run); the full measurement is "
        "`python benchmarks/compile_cpu.py` (about 30 minutes on 2 cores).",
    ),
    (
        "LoRA + fusion against peft on transformers (lora.py)",
        ["benchmarks/lora.py"],
        "LoRA on every decoder self-attention and MLP linear plus the fusion parameters in full, same batches, one "
        "process: (a) peft's get_peft_model on MllamaForConditionalGeneration with the same targets and the fusion "
        "modules as modules_to_save, (b) fusiontrain's model.lora. Trainable parameters, AdamW state, the checkpoint "
        "of the trained state, tokens/s.",
    ),
]


def vs_hf_table() -> str:
    """vs_hf.py's results (its ``--json``) as a Markdown table."""
    from benchmarks.vs_hf_report import markdown_table

    return markdown_table(json.loads((REPO / "benchmarks" / "out" / "vs_hf.json").read_text()))


# Benchmarks whose numbers are also rendered as a Markdown table above their console output.
TABLES = {"benchmarks/vs_hf.py": vs_hf_table}


def git_commit() -> str:
    """The checked-out commit, marked ``-dirty`` when the work tree has changes."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True)
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def machine() -> str:
    import torch
    import transformers

    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
    )


GPU_HEADING = "## On a GPU"


def kept_sections(generated_titles: set[str]) -> tuple[list[str], str]:
    """What RESULTS.md holds that this run does not write, kept as it is: the sections written by
    hand (measurements at several commits, a machine of their own), in their order, and the GPU
    results (from ``scripts/gpu_check.py`` on a lent GPU; this script runs on the CPU and cannot
    redo them), which stay last."""
    if not RESULTS.is_file():
        return [], ""
    text = RESULTS.read_text()
    gpu_start = text.find("\n" + GPU_HEADING)
    gpu = "" if gpu_start < 0 else "\n" + text[gpu_start + 1 :]
    body = text if gpu_start < 0 else text[:gpu_start]
    sections: list[list[str]] = []  # each "## " heading's lines (none before the first: the header)
    in_code = False
    for line in body.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if line.startswith("## ") and not in_code:
            sections.append([])
        if sections:
            sections[-1].append(line)
    by_hand = []
    for lines in sections:
        if lines[0].removeprefix("## ").strip() not in generated_titles:
            by_hand.append("\n".join(lines).rstrip() + "\n")
    return by_hand, gpu


def run(script: list[str]) -> tuple[str, float]:
    """Run one benchmark; its stdout and its wall time."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *script], cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(script)} failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip(), time.perf_counter() - started


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    sections = []
    for title, script, what in BENCHMARKS:
        print(f"running {' '.join(script)} ...", flush=True)
        output, seconds = run(script)
        rendered = TABLES[script[0]]() + "\n\n" if script[0] in TABLES else ""
        sections.append(
            f"## {title}\n\n{what}\n\n{rendered}`python {' '.join(script)}` ({seconds:.0f} s):\n\n```\n{output}\n```\n"
        )
    header = (
        "# Benchmark results\n\n"
        f"Written by `python benchmarks/run_all.py` on {datetime.date.today().isoformat()}, commit `{git_commit()}`.\n\n"
        f"Machine: {machine()}.\n\n"
        "Reproduce: `make test` once (it builds `.venv`), then `.venv/bin/python benchmarks/run_all.py` on an "
        "otherwise idle machine. Every number of its sections comes from this one run (sections written by hand "
        "say when and where they were measured); ratios are taken within a table, never across machines.\n"
    )
    by_hand, gpu = kept_sections({title for title, _, _ in BENCHMARKS})
    RESULTS.write_text(header + "\n" + "\n".join(sections + by_hand) + gpu)
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
