"""How fast ``torch.mm`` runs on the benchmark Mllama's own matmul shapes, against the square
matmul that ``vs_hf.py`` takes as the machine's peak: ``python benchmarks/matmul_shapes.py``.

``vs_hf.py`` states each variant's model FLOP/s as a share of a float32 2048 x 2048 x 2048
``torch.mm``. A training step's matmuls have other shapes: rows of packed tokens against the
decoder's width d = 512 and MLP width 1536, and the loss's chunks of target rows against the
32,000-row output projection. This prints each shape's rate (forward ``x @ W.T``: the weight
transposed, as ``F.linear`` passes it; and the plain ``x @ W``), median of interleaved rounds, so
that a share of the peak can be read against what the shapes themselves reach.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

# (what it is, rows m, inner k, columns n): the output is [m, n]
SHAPES: list[tuple[str, int, int, int]] = [
    ("square, the peak of vs_hf.py", 2048, 2048, 2048),
    ("packed rows x MLP up (d -> 1536)", 4096, 512, 1536),
    ("packed rows x MLP down (1536 -> d)", 4096, 1536, 512),
    ("packed rows x attention projection (d -> d)", 4096, 512, 512),
    ("padding-free rows x MLP up", 384, 512, 1536),
    ("loss chunk x output projection (d -> 32,000)", 512, 512, 32_000),
    ("loss chunk gradient x projection (32,000 -> d)", 512, 32_000, 512),
]


def rate(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> float:
    """FLOP/s of one ``torch.mm(a, b, out=out)``."""
    started = time.perf_counter()
    torch.mm(a, b, out=out)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds (after 2 warm-up ones)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    cases = []
    for name, m, k, n in SHAPES:
        x = torch.randn(m, k, generator=generator)
        weight = torch.randn(n, k, generator=generator)  # as nn.Linear stores it: [out, in]
        cases.append((name, m, k, n, x, weight.T, weight.T.contiguous(), torch.empty(m, n)))
    rates: dict[tuple[str, str], list[float]] = {}
    for round_index in range(args.rounds + 2):
        for name, _, _, _, x, transposed, plain, out in cases:
            for layout, b in (("x @ W.T", transposed), ("x @ W", plain)):
                measured = rate(x, b, out)
                if round_index >= 2:
                    rates.setdefault((name, layout), []).append(measured)
    peak = statistics.median(rates[(SHAPES[0][0], "x @ W")])
    print(f"torch {torch.__version__}, {args.threads} threads, float32; median of {args.rounds} interleaved rounds")
    print(f"{'shape':<50} {'m x k x n':>20} {'x @ W.T GFLOP/s':>16} {'x @ W GFLOP/s':>14} {'of the square':>14}")
    for name, m, k, n, *_ in cases:
        transposed = statistics.median(rates[(name, "x @ W.T")])
        plain = statistics.median(rates[(name, "x @ W")])
        print(f"{name:<50} {f'{m} x {k} x {n}':>20} {transposed / 1e9:>16.1f} {plain / 1e9:>14.1f} "
              f"{max(transposed, plain) / peak:>13.0%}")


if __name__ == "__main__":
    main()
