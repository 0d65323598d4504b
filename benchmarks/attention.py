"""Packed self- and cross-attention against the dense-mask path: ``python benchmarks/attention.py``.

One micro-batch of the long-tailed mix that ``benchmarks/vs_hf.py``'s (c) trains on
(``SyntheticImageText(lengths="long_tail")``: 0-2 images of 65 encoder tokens per sample, text
lengths Pareto-distributed; packed first-fit with 8 open rows into rows of 1024 tokens and up to 16
images), at the benchmark Mllama's sizes (d=512, 8 query / 4 key-value heads of 64, MLP 1536), fp32
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

The four variants' timed runs are interleaved (dense self, packed self, dense cross, packed cross,
then again) over ``--rounds`` rounds, so that noise on this shared machine hits them alike; the
table gives each variant's median and spread (min-max) and the median of the per-round ratios. The
host-side cost of building the mask or the layout (once per micro-batch, shared by every layer) is
reported apart. Outputs and the gradients of every input and parameter are compared between the
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusiontrain.data.batch import Batch  # noqa: E402
from fusiontrain.data.packing import FirstFitPacker, collate_rows  # noqa: E402
from fusiontrain.data.synthetic import SyntheticImageText  # noqa: E402
from fusiontrain.families.encoder import FixedSizeImage  # noqa: E402
from fusiontrain.models.llama import LlamaDecoderArgs, llama_cross_attention_layer  # noqa: E402
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


def long_tail_batch(rows: int, seed: int) -> tuple[Batch, int]:
    """``rows`` packed rows of the long-tailed mix (the first rows the packer closes), and the
    number of samples skipped because they cannot fit a row."""
    image_format = FixedSizeImage(112, TOKENS_PER_IMAGE)
    data = SyntheticImageText(
        100_000, vocab_size=ARGS.vocab_size, image_token_id=ARGS.vocab_size, image_format=image_format,
        max_text=SEQ_LEN, lengths="long_tail", seed=seed,
    )  # fmt: skip
    packer = FirstFitPacker(SEQ_LEN, MAX_IMAGES, OPEN_ROWS)
    closed, too_long, index = [], 0, 0
    while len(closed) < rows:
        sample = data[index]
        if len(sample) > SEQ_LEN:
            too_long += 1
        else:
            closed += packer.add(index, sample)
        index += 1
    return collate_rows(closed[:rows], SEQ_LEN, image_format), too_long


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4, help="packed rows in the micro-batch (vs_hf's (c) takes 4)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    batch, too_long = long_tail_batch(args.rows, args.seed)
    b, s = batch.tokens.shape
    encoder_mask = batch.encoder_mask
    s_e = encoder_mask.shape[-1]
    lengths = torch.unique_consecutive(batch.segment_ids.flatten() + s * torch.arange(b).repeat_interleave(s), return_counts=True)[1]
    sees = encoder_mask.any(-1)
    print(
        f"micro-batch: {b} rows x {s} tokens, {len(lengths)} segments (padding included; {too_long} samples over "
        f"{SEQ_LEN} tokens skipped), longest {int(lengths.max())}, {int(batch.is_real.sum())} real tokens; "
        f"{s_e} encoder tokens per row ({s_e // TOKENS_PER_IMAGE} image slots), {int(sees.sum())} tokens "
        f"({sees.float().mean():.0%}) see an image"
    )
    print(
        f"attended pairs: self-attention {int((lengths * (lengths + 1) // 2).sum())} of {b * s * (s + 1) // 2} causal "
        f"pairs in the dense rows; cross-attention {int(encoder_mask.sum())} of {b * s * s_e}"
    )
    print(f"fp32, {args.threads} threads, {args.rounds} interleaved rounds, forward + backward\n")

    # Self-attention inputs, and the cross-attention layer with its gates open.
    generator = torch.Generator().manual_seed(0)
    n_h, n_kv, h_d, d = ARGS.num_heads, ARGS.num_kv_heads, ARGS.head_dim, ARGS.hidden_size
    q, k, v = (torch.randn(b, n, s, h_d, generator=generator).requires_grad_() for n in (n_h, n_kv, n_kv))
    self_grad = torch.randn(b, n_h, s, h_d, generator=generator)
    torch.manual_seed(0)
    layer = llama_cross_attention_layer(ARGS)
    with torch.no_grad():
        layer.ca_scale.scale.fill_(0.5)
        layer.mlp_scale.scale.fill_(0.5)
    x = torch.randn(b, s, d, generator=generator).requires_grad_()
    encoder = torch.randn(b, s_e, d, generator=generator).requires_grad_()
    cross_grad = torch.randn(b, s, d, generator=generator)
    cross_inputs = [x, encoder, *layer.parameters()]
    q_c = torch.randn(b, n_h, s, h_d, generator=generator).requires_grad_()
    k_c, v_c = (torch.randn(b, n_kv, s_e, h_d, generator=generator).requires_grad_() for _ in range(2))

    dense_mask = block_causal_mask(batch.segment_ids)
    self_layout = self_attention_layout(batch.segment_ids)
    cross_layout = cross_attention_layout(encoder_mask)
    sees_nothing = ~encoder_mask.any(-1, keepdim=True)  # [b, s, 1]
    opened = encoder_mask | sees_nothing

    def dense_cross() -> torch.Tensor:
        return attend(q_c, k_c, v_c, mask=opened).masked_fill(sees_nothing[:, None], 0.0)

    def gathered_cross() -> torch.Tensor:
        index, n = cross_layout.token_index, cross_layout.token_index.numel()
        picked = q_c.transpose(1, 2).reshape(b * s, n_h, h_d).index_select(0, index)
        out = attend(picked.view(1, n, n_h, h_d).transpose(1, 2), k_c, v_c, mask=cross_layout.attention)
        full = q_c.new_zeros(b * s, n_h, h_d).index_copy(0, index, out.transpose(1, 2).reshape(n, n_h, h_d))
        return full.view(b, s, n_h, h_d).transpose(1, 2)

    variants: dict[str, Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]] = {
        "self, dense mask": lambda: forward_backward(lambda: attend(q, k, v, mask=dense_mask), [q, k, v], self_grad),
        "self, packed": lambda: forward_backward(lambda: attend(q, k, v, mask=self_layout), [q, k, v], self_grad),
        "cross, dense mask": lambda: forward_backward(dense_cross, [q_c, k_c, v_c], self_grad),
        "cross, gathered": lambda: forward_backward(gathered_cross, [q_c, k_c, v_c], self_grad),
        "cross layer, dense mask": lambda: forward_backward(
            lambda: layer(x, encoder_input=encoder, encoder_mask=encoder_mask), cross_inputs, cross_grad
        ),
        "cross layer, gathered": lambda: forward_backward(
            lambda: layer(x, encoder_input=encoder, encoder_mask=cross_layout), cross_inputs, cross_grad
        ),
    }

    results = {name: run() for name, run in variants.items()}  # warm-up, and the values compared
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    build_ms = {
        "self, dense mask": median_ms(lambda: block_causal_mask(batch.segment_ids)),
        "self, packed": median_ms(lambda: self_attention_layout(batch.segment_ids)),
        "cross, dense mask": 0.0,  # the batch's encoder mask, used as is
        "cross, gathered": median_ms(lambda: cross_attention_layout(encoder_mask)),
        "cross layer, dense mask": 0.0,
        "cross layer, gathered": median_ms(lambda: cross_attention_layout(encoder_mask)),
    }
    print("| variant | fwd+bwd median (ms) | spread (ms) | packed / dense, median of rounds (spread) | mask or layout build (ms) | max abs diff | max rel diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    pairs = [
        ("self, dense mask", "self, packed"),
        ("cross, dense mask", "cross, gathered"),
        ("cross layer, dense mask", "cross layer, gathered"),
    ]
    for dense_name, packed_name in pairs:
        ratios = [p / r for p, r in zip(times[packed_name], times[dense_name])]
        dense_out, dense_grads = results[dense_name]
        packed_out, packed_grads = results[packed_name]
        absolute, relative = differences([packed_out, *packed_grads], [dense_out, *dense_grads])
        for name in (dense_name, packed_name):
            ms = [t * 1e3 for t in times[name]]
            is_packed = name == packed_name
            ratio = f"**{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f})" if is_packed else ""
            diff = (f"{absolute:.1e}", f"{relative:.1e}") if is_packed else ("", "")
            print(
                f"| {name} | {statistics.median(ms):.1f} | {min(ms):.1f}-{max(ms):.1f} | {ratio} | "
                f"{build_ms[name]:.1f} | {diff[0]} | {diff[1]} |"
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
        "layer parameter (layer rows)"
    )


if __name__ == "__main__":
    main()
