"""Packed self- and cross-attention against the dense-mask path: ``python benchmarks/attention.py``.

``--batches`` micro-batches (default 3) of ``--rows`` rows (default 4) of the long-tailed mix that
``benchmarks/vs_hf.py``'s (c) trains on (``SyntheticImageText(lengths="long_tail")``: 0-2 images
of 65 encoder tokens per sample, text lengths Pareto-distributed; packed first-fit with 8 open rows
into rows of 1024 tokens and up to 16 images; the rows in the order the packer closes them), at the benchmark Mllama's sizes (d=512, 8 query / 4 key-value heads of 64, MLP 1536), fp32
on the CPU, forward and backward:

- **self-attention**: ``attend`` over ``[b, n_h, s, h_d]`` queries, under the dense ``[b, s, s]``
  block-diagonal causal mask (today's CPU path) and under the packed layout (SDPA per segment,
  grouped by length; :mod:`fusiontrain.modules.packed`);
- **cross-attention**: ``attend`` from ``[b, n_h, s, h_d]`` queries to ``[b, n_kv, s_e, h_d]``
  encoder keys, as the cross-attention layer runs it: under the dense ``[b, s, s_e]`` encoder mask
  (every token computed, the rows that see no image opened, then zeroed), and through the gathered
  layout (only the tokens that see an image gathered, each attending its own images' tokens, then
  written back into zeros);
- **cross-attention layer**: a whole Llama 3.2 cross-attention layer (norms, q/k/v/o projections,
  attention, gated MLP) both ways, which adds the projections and the MLP: the gathered path also
  skips them for the tokens that see no image.

The variants' timed runs are interleaved (dense self, packed self, dense cross, gathered cross, ...
then again; each run covers every micro-batch) over ``--rounds`` rounds, so that noise on this shared machine hits them alike; the
table gives each variant's median and spread (min-max) and the median of the per-round ratios. The
host-side cost of building the mask or the layout (once per micro-batch, shared by every layer) is
reported apart, and so is each variant's CPU use (process CPU time over wall time x threads), with
the machine's load average: on a shared 2-core machine, other processes' work shows there.

The script re-executes itself with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set (both
paths run under it). With the default spinning threads on a machine whose cores other processes
share, every parallel region waits on a descheduled thread: on this machine under a load of 5, the
packed self-attention (about 20 ops per layer) then ran 1.4x slower than the dense path (3 ops)
while taking half its time single-threaded and with passive waiting. Pass
``OMP_WAIT_POLICY=ACTIVE`` to measure with spinning threads. Outputs and the gradients of every input and parameter are compared between the
two paths: the largest absolute difference, and the largest relative to the reference's largest
magnitude.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__" and "OMP_WAIT_POLICY" not in os.environ:
    # Idle OpenMP threads yield instead of spinning. On a shared machine a spinning thread waits
    # for a descheduled one at every parallel region, which taxes many small ops far more than a
    # few large ones; re-exec so that the setting applies before torch starts its thread pool.
    script = str(Path(__file__).resolve())
    os.execve(sys.executable, [sys.executable, script, *sys.argv[1:]], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusiontrain.data.batch import Batch  # noqa: E402
from fusiontrain.data.packing import FirstFitPacker, collate_rows  # noqa: E402
from fusiontrain.data.synthetic import SyntheticImageText  # noqa: E402
from fusiontrain.families.fixed_size_image import FixedSizeImage  # noqa: E402
from fusiontrain.families.llama import LlamaDecoderArgs, llama_cross_attention_layer  # noqa: E402
from fusiontrain.modules.attention import attend  # noqa: E402
from fusiontrain.modules.masks import block_causal_mask  # noqa: E402
from fusiontrain.modules.packed import cross_attention_layout, self_attention_layout  # noqa: E402

SEQ_LEN = 1024
MAX_IMAGES = 16
OPEN_ROWS = 8
TOKENS_PER_IMAGE = 65  # one 112 px tile of 14 px patches, plus the class token
ARGS = LlamaDecoderArgs(
    vocab_size=32_000, hidden_size=512, intermediate_size=1536, num_heads=8, num_kv_heads=4, head_dim=64,
    rms_norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=None, max_seq_len=SEQ_LEN,
)  # fmt: skip


def long_tail_batches(count: int, rows: int, seed: int) -> tuple[list[Batch], int]:
    """``count`` micro-batches of ``rows`` packed rows of the long-tailed mix (the rows in the order
    the packer closes them), and the number of samples skipped because they cannot fit a row."""
    image_format = FixedSizeImage(112, TOKENS_PER_IMAGE)
    data = SyntheticImageText(
        100_000, vocab_size=ARGS.vocab_size, image_token_id=ARGS.vocab_size, image_format=image_format,
        max_text=SEQ_LEN, lengths="long_tail", seed=seed,
    )  # fmt: skip
    packer = FirstFitPacker(SEQ_LEN, MAX_IMAGES, OPEN_ROWS)
    closed, too_long, index = [], 0, 0
    while len(closed) < count * rows:
        sample = data[index]
        if len(sample) > SEQ_LEN:
            too_long += 1
        else:
            closed += packer.add(index, sample)
        index += 1
    batches = [collate_rows(closed[i * rows : (i + 1) * rows], SEQ_LEN, image_format) for i in range(count)]
    return batches, too_long


def forward_backward(run: Callable[[], torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output of ``run()`` and the gradients of ``inputs`` for output gradient ``grad``."""
    out = run()
    return out.detach(), list(torch.autograd.grad(out, inputs, grad))


def differences(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """Largest absolute difference, and largest relative to each reference's largest magnitude."""
    absolute = max((a - b).abs().max().item() for a, b in zip(ours, reference))
    relative = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(ours, reference))
    return absolute, relative


def median_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


Variants = dict[str, Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]]


def variants(batch: Batch, layer: torch.nn.Module, generator: torch.Generator) -> Variants:
    """The six timed runs on ``batch`` (dense then packed, for self-attention, cross-attention and
    the cross-attention layer), each returning its output and gradients."""
    b, s = batch.tokens.shape
    encoder_mask = batch.encoder_mask
    s_e = encoder_mask.shape[-1]
    n_h, n_kv, h_d, d = ARGS.num_heads, ARGS.num_kv_heads, ARGS.head_dim, ARGS.hidden_size
    q, k, v = (torch.randn(b, n, s, h_d, generator=generator).requires_grad_() for n in (n_h, n_kv, n_kv))
    q_c = torch.randn(b, n_h, s, h_d, generator=generator).requires_grad_()
    k_c, v_c = (torch.randn(b, n_kv, s_e, h_d, generator=generator).requires_grad_() for _ in range(2))
    attention_grad = torch.randn(b, n_h, s, h_d, generator=generator)
    x = torch.randn(b, s, d, generator=generator).requires_grad_()
    encoder = torch.randn(b, s_e, d, generator=generator).requires_grad_()
    layer_grad = torch.randn(b, s, d, generator=generator)
    layer_inputs = [x, encoder, *layer.parameters()]

    dense_mask = block_causal_mask(batch.segment_ids)
    self_layout = self_attention_layout(batch.segment_ids)
    cross_layout = cross_attention_layout(encoder_mask)
    sees_nothing = ~encoder_mask.any(-1, keepdim=True)  # [b, s, 1]
    opened = encoder_mask | sees_nothing  # as the layer runs it: open, attend, zero

    def dense_cross() -> torch.Tensor:
        return attend(q_c, k_c, v_c, mask=opened).masked_fill(sees_nothing[:, None], 0.0)

    def gathered_cross() -> torch.Tensor:  # as the layer runs it: gather, attend, write back
        index, n = cross_layout.token_index, cross_layout.token_index.numel()
        picked = q_c.transpose(1, 2).reshape(b * s, n_h, h_d).index_select(0, index)
        out = attend(picked.view(1, n, n_h, h_d).transpose(1, 2), k_c, v_c, mask=cross_layout.attention)
        full = q_c.new_zeros(b * s, n_h, h_d).index_copy(0, index, out.transpose(1, 2).reshape(n, n_h, h_d))
        return full.view(b, s, n_h, h_d).transpose(1, 2)

    def layer_with(mask: object) -> Callable[[], torch.Tensor]:
        return lambda: layer(x, encoder_input=encoder, encoder_mask=mask)

    return {
        "self, dense mask": lambda: forward_backward(lambda: attend(q, k, v, mask=dense_mask), [q, k, v], attention_grad),
        "self, packed": lambda: forward_backward(lambda: attend(q, k, v, mask=self_layout), [q, k, v], attention_grad),
        "cross, dense mask": lambda: forward_backward(dense_cross, [q_c, k_c, v_c], attention_grad),
        "cross, gathered": lambda: forward_backward(gathered_cross, [q_c, k_c, v_c], attention_grad),
        "cross layer, dense mask": lambda: forward_backward(layer_with(encoder_mask), layer_inputs, layer_grad),
        "cross layer, gathered": lambda: forward_backward(layer_with(cross_layout), layer_inputs, layer_grad),
    }


PAIRS = [
    ("self, dense mask", "self, packed"),
    ("cross, dense mask", "cross, gathered"),
    ("cross layer, dense mask", "cross layer, gathered"),
]


def describe(batches: list[Batch], too_long: int) -> None:
    """What the micro-batches hold: segments, images, and the share of pairs each path computes."""
    segments, pairs, dense_pairs, seen, cross_pairs, slots = [], 0, 0, 0, 0, 0
    for batch in batches:
        b, s = batch.tokens.shape
        row_offsets = s * torch.arange(b).repeat_interleave(s)
        lengths = torch.unique_consecutive(batch.segment_ids.flatten() + row_offsets, return_counts=True)[1]
        segments += lengths.tolist()
        pairs += int((lengths * (lengths + 1) // 2).sum())
        dense_pairs += b * s * s
        seen += int(batch.encoder_mask.any(-1).sum())
        cross_pairs += int(batch.encoder_mask.sum())
        slots += batch.encoder_mask.numel()
    tokens = sum(batch.tokens.numel() for batch in batches)
    print(
        f"{len(batches)} micro-batches of {batches[0].tokens.shape[0]} rows x {SEQ_LEN} tokens: {len(segments)} segments "
        f"(padding included), median {statistics.median(segments):.0f} tokens, longest {max(segments)}; {too_long} "
        f"samples over {SEQ_LEN} tokens skipped; encoder tokens per row "
        f"{', '.join(str(batch.encoder_mask.shape[-1]) for batch in batches)}; {seen / tokens:.0%} of tokens see an image"
    )
    print(
        f"pairs computed: self-attention, the causal pairs of each segment are {pairs / dense_pairs:.1%} of the dense "
        f"rows' s^2; cross-attention, each token's own images are {cross_pairs / slots:.1%} of the dense s x s_e"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=3, help="micro-batches timed in each round")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per micro-batch (vs_hf's (c) takes 4)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())

    batches, too_long = long_tail_batches(args.batches, args.rows, args.seed)
    describe(batches, too_long)
    print(
        f"fp32, {args.threads} threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), {args.rounds} "
        "interleaved rounds, forward + backward over all micro-batches\n"
    )

    torch.manual_seed(0)
    layer = llama_cross_attention_layer(ARGS)
    with torch.no_grad():  # open the gates (shut at init), so that images change the output
        layer.ca_scale.scale.fill_(0.5)
        layer.mlp_scale.scale.fill_(0.5)
    generator = torch.Generator().manual_seed(0)
    runs = [variants(batch, layer, generator) for batch in batches]
    names = list(runs[0])

    results = [{name: run[name]() for name in names} for run in runs]  # warm-up, and the values compared
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, float] = {name: 0.0 for name in names}
    for _ in range(args.rounds):
        for name in names:
            start, cpu_start = time.perf_counter(), time.process_time()
            for run in runs:
                run[name]()
            times[name].append(time.perf_counter() - start)
            cpu_times[name] += time.process_time() - cpu_start

    def build_ms(build: Callable[[Batch], object]) -> float:
        return median_ms(lambda: [build(batch) for batch in batches])

    builds = {
        "self, dense mask": build_ms(lambda batch: block_causal_mask(batch.segment_ids)),
        "self, packed": build_ms(lambda batch: self_attention_layout(batch.segment_ids)),
        "cross, gathered": build_ms(lambda batch: cross_attention_layout(batch.encoder_mask)),
    }
    builds["cross layer, gathered"] = builds["cross, gathered"]
    print(
        "| variant | fwd+bwd median (ms) | spread (ms) | packed / dense: median of rounds (spread) | "
        "mask or layout build (ms) | max abs diff | max rel diff | CPU use |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for dense_name, packed_name in PAIRS:
        ratios = [p / r for p, r in zip(times[packed_name], times[dense_name])]
        absolute, relative = 0.0, 0.0
        for result in results:
            (dense_out, dense_grads), (packed_out, packed_grads) = result[dense_name], result[packed_name]
            a, r = differences([packed_out, *packed_grads], [dense_out, *dense_grads])
            absolute, relative = max(absolute, a), max(relative, r)
        for name in (dense_name, packed_name):
            ms = [t * 1e3 for t in times[name]]
            ratio = f"**{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f})" if name == packed_name else ""
            diff = (f"{absolute:.1e}", f"{relative:.1e}") if name == packed_name else ("", "")
            build = f"{builds[name]:.1f}" if name in builds else "-"
            cpu_use = cpu_times[name] / (sum(times[name]) * args.threads)
            print(
                f"| {name} | {statistics.median(ms):.0f} | {min(ms):.0f}-{max(ms):.0f} | {ratio} | {build} | "
                f"{diff[0]} | {diff[1]} | {cpu_use:.0%} |"
            )
    total_dense = [a + c for a, c in zip(times["self, dense mask"], times["cross, dense mask"])]
    total_packed = [a + c for a, c in zip(times["self, packed"], times["cross, gathered"])]
    ratios = [p / r for p, r in zip(total_packed, total_dense)]
    print(
        f"\nself- + cross-attention together: packed / dense = **{statistics.median(ratios):.2f}x** "
        f"(spread {min(ratios):.2f}-{max(ratios):.2f} over {args.rounds} rounds); goal 0.5x or less"
    )
    print(
        "diffs: outputs and the gradients of q, k, v (attention rows) or of x, the encoder embeddings and every "
        "layer parameter (layer rows), largest over the micro-batches; relative to the reference's largest magnitude"
    )
    print("build: host time to build the dense mask or the layout for all micro-batches, once per micro-batch in training")
    print(
        f"CPU use: process CPU time over wall time x threads (well under 100%: other processes took the cores); "
        f"load average before / after: {load_before} / {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
