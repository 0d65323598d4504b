"""How often compiled flex_attention compiles over packed batches: ``python benchmarks/flex_compiles.py``.

On CUDA, packed rows attend through ``torch.compile(flex_attention)`` with the ``BlockMask``s
fusiontrain builds per micro-batch (``fusiontrain.modules.masks``): the block-causal mask of the
self-attention, whose shape is fixed (``[b, s, s]``), and the encoder mask of the
cross-attention, whose key length ``s_e`` (the widest row's image slots times the tokens per
image) changes from batch to batch. This script runs the same compiled function
(``fusiontrain.modules.attention._flex_attention(True)``) on the CPU, where inductor compiles
flex_attention too, over ``--batches`` micro-batches of the long-tailed packed mix
(``benchmarks/attention.py``'s: rows of 1024 tokens), for both masks, forward only (flex_attention
has no backward on the CPU; on CUDA the backward kernel is compiled with the forward, per graph), and reports after each batch the distinct shapes seen, dynamo's compiled graphs so far, and
the batch's wall time. Outputs are checked against SDPA under the dense masks.

Dynamo's automatic dynamic shapes bound the count: the first ``s_e`` compiles a static kernel; the
first batch with another ``s_e`` recompiles once with ``s_e`` symbolic, and that kernel serves
every later shape.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attention import ARGS, long_tail_batches  # noqa: E402
from fusiontrain.modules.attention import _flex_attention  # noqa: E402
from fusiontrain.modules.masks import encoder_block_mask  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--rows", type=int, default=2)
    args = parser.parse_args()
    from torch._dynamo.utils import counters  # dynamo's own tally of compiled graphs

    flex = _flex_attention(True)
    batches, _ = long_tail_batches(args.batches, args.rows, seed=0)
    n_h, n_kv, h_d = ARGS.num_heads, ARGS.num_kv_heads, ARGS.head_dim
    generator = torch.Generator().manual_seed(0)
    seen: set[tuple[int, ...]] = set()
    print("| batch | s_e | distinct (b, s, s_e) so far | compiled graphs so far | wall (s) | max abs diff vs SDPA |")
    print("|---:|---:|---:|---:|---:|---:|")
    for index, batch in enumerate(batches):
        b, s = batch.tokens.shape
        s_e = batch.encoder_mask.shape[-1]
        seen.add((b, s, s_e))
        q = torch.randn(b, n_h, s, h_d, generator=generator)
        # The key/value heads repeated to the query heads (enable_gqa off): see the docstring.
        k_e, v_e = (torch.randn(b, n_kv, s_e, h_d, generator=generator).repeat_interleave(n_h // n_kv, 1) for _ in range(2))
        started = time.perf_counter()
        cross = encoder_block_mask(batch.encoder_mask)
        out = flex(q, k_e, v_e, block_mask=cross.block_mask)
        seconds = time.perf_counter() - started
        sees = batch.encoder_mask.any(-1)[:, None, :, None]  # tokens that see no image: 0 by convention
        opened = batch.encoder_mask | ~batch.encoder_mask.any(-1, keepdim=True)
        dense = torch.nn.functional.scaled_dot_product_attention(q, k_e, v_e, attn_mask=opened[:, None])
        diff = (out - dense).where(sees, 0.0).abs().max().item()
        graphs = counters["stats"]["unique_graphs"]
        print(f"| {index} | {s_e} | {len(seen)} | {graphs} | {seconds:.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
