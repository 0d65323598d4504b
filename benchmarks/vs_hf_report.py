"""Tables of ``benchmarks/vs_hf.py``: the console table it prints and the Markdown table
``benchmarks/run_all.py`` writes into RESULTS.md, both from the same summary (the script's
``--json`` ``variants``), so the two never disagree.

A summary per variant (key ``a`` .. ``d``) holds, over the timed rounds: ``tokens_per_s``
(median, min, max of the per-round real tokens/s), ``ratio`` (median, min, max of the per-round
tokens/s over (a)'s in the same round; absent for (a)), ``flops_per_s`` (median of rounds) and
``peak_share`` (that over the measured matmul peak), plus ``real_token_share``,
``samples_per_step``, ``median_step_s``, ``cpu_utilisation``, ``peak_memory_bytes`` and
``step0_loss``.
"""

from __future__ import annotations

from typing import Any


def _spread(low: float, high: float, fmt: str) -> str:
    return f"{low:{fmt}}-{high:{fmt}}"


def rows(summaries: dict[str, dict[str, Any]], memory_label: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table (ratios as median and min-max over rounds)."""
    base_memory = summaries["a"]["peak_memory_bytes"]
    header = [
        "variant", "real tok/s (median)", "spread", "vs (a): median of rounds", "spread",
        "real-token share", "samples/step", "median step (s)", "model GFLOP/s", "share of matmul peak", "CPU use",
        memory_label, "vs (a)", "step-0 loss",
    ]
    table = []
    for key, s in summaries.items():
        tps, ratio = s["tokens_per_s"], s.get("ratio")
        table.append([
            s["name"],
            f"{tps['median']:,.0f}",
            _spread(tps["min"], tps["max"], ",.0f"),
            "1.00x" if ratio is None else f"{ratio['median']:.2f}x",
            "" if ratio is None else _spread(ratio["min"], ratio["max"], ".2f"),
            f"{s['real_token_share']:.1%}",
            f"{s['samples_per_step']:.1f}",
            f"{s['median_step_s']:.2f}",
            f"{s['flops_per_s'] / 1e9:,.1f}",
            f"{s['peak_share']:.1%}",
            f"{s['cpu_utilisation']:.0%}",
            f"{s['peak_memory_bytes'] / 2**20:,.1f}",
            f"{s['peak_memory_bytes'] / base_memory:.2f}x",
            f"{s['step0_loss']:.4f}",
        ])
    return header, table


def console_table(title: str, summaries: dict[str, dict[str, Any]], memory_label: str) -> str:
    header, table = rows(summaries, memory_label)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *table)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([f"\n{title}", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, table)])


def markdown_table(results: dict[str, Any]) -> str:
    """The ``--json`` results as a Markdown table with the run's peak and rounds under it."""
    header, table = rows(results["variants"], results["memory_label"])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    peak = results["peak"]
    lines.append("")
    lines.append(
        f"{results['rounds']} interleaved rounds of {results['steps_per_round']} timed steps per variant (after "
        f"{results['warmup_steps']} warm-up steps, over which the memory peak is read); spread = min-max over rounds. "
        f"Matmul peak: {peak['dtype']} `torch.mm` {peak['size']}x{peak['size']}, median of {peak['reps']} = "
        f"{peak['median'] / 1e9:,.1f} GFLOP/s (best {peak['best'] / 1e9:,.1f}). Model FLOPs: the samples' work only "
        f"(fusiontrain's counter per sample: no padding), the same count for every variant on the same samples."
    )
    return "\n".join(lines)
