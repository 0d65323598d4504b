"""The loss over the target positions only, against every position projected, side by side:
``python benchmarks/loss_targets.py [--batches 8]``.

Data: the long-tail synthetic samples of ``benchmarks/vs_hf.py`` (0-2 images, Pareto text lengths
capped at 1024; image tokens, final positions and padding are not targets), collated the two ways
that benchmark trains: 4 samples padded to the longest, and 4 packed rows of 1024. Model side: the
output projection of ``benchmarks.models.bench_mllama_config`` (d = 512, v = 32k, fp32) on random
final hidden states ``[b, s, d]``; 8 loss chunks.

For each batch, in this process, the loss's forward + backward runs twice: with the batch's target
index (what the trainer runs), and with an index of every position (``arange(b * s)``: the same
chunked code projecting every position, as the loss did before it gathered the targets). Both
give the same loss and hidden-state gradient (checked). Printed: the median loss time, and the
loss's peak tensor memory above its inputs (``TensorMemoryTracker``: every live tensor the loss
and its backward create), for a frozen projection (fusion-only, the default) and a trainable one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusiontrain.data import Batch, collate_padded  # noqa: E402
from fusiontrain.data.packing import FirstFitPacker, collate_rows  # noqa: E402
from fusiontrain.data.synthetic import SyntheticImageText  # noqa: E402
from fusiontrain.families.mllama.tiles import MllamaTiles  # noqa: E402
from fusiontrain.train.loss import chunked_cross_entropy_sum  # noqa: E402
from fusiontrain.plan.memory import TensorMemoryTracker  # noqa: E402
from benchmarks.models import bench_mllama_config  # noqa: E402

SEQ_LEN, ROWS, CHUNKS, IGNORE = 1024, 4, 8, -100


def batches(count: int, *, packed: bool) -> list[Batch]:
    """``count`` batches of the long-tail data, padded (4 samples) or packed (4 rows)."""
    text = bench_mllama_config().text_config
    vision = bench_mllama_config().vision_config
    tokens_per_tile = (vision.image_size // vision.patch_size) ** 2 + 1
    image_format = MllamaTiles(vision.image_size, tokens_per_tile, vision.max_num_tiles)
    data = SyntheticImageText(
        4096, vocab_size=text.vocab_size, image_token_id=text.vocab_size, image_format=image_format,
        max_text=SEQ_LEN, lengths="long_tail",
    )
    samples = iter(range(len(data)))
    if not packed:
        return [collate_padded([data[next(samples)] for _ in range(ROWS)], SEQ_LEN, image_format) for _ in range(count)]
    packer, rows, out = FirstFitPacker(SEQ_LEN, max_images=16, max_open_rows=8), [], []
    while len(out) < count:
        index = next(samples)
        rows += packer.add(index, data[index])
        if len(rows) >= ROWS:
            out.append(collate_rows(rows[:ROWS], SEQ_LEN, image_format))
            rows = rows[ROWS:]
    return out


def run(
    hidden: torch.Tensor, batch: Batch, output: nn.Module, index: torch.Tensor
) -> tuple[float, int, float, torch.Tensor]:
    """(seconds, peak bytes, loss, hidden gradient) of one loss forward + backward."""
    leaf = hidden.detach().requires_grad_(True)
    output.zero_grad(set_to_none=True)
    tracker = TensorMemoryTracker("loss")
    started = time.perf_counter()
    with tracker:
        loss = chunked_cross_entropy_sum(leaf, batch.labels, output, num_chunks=CHUNKS, target_index=index)
        loss.backward()
    seconds = time.perf_counter() - started
    return seconds, tracker.peak, loss.item(), leaf.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    text = bench_mllama_config().text_config
    print(f"output projection d={text.hidden_size} v={text.vocab_size} fp32, {CHUNKS} loss chunks, "
          f"{args.batches} batches each, torch threads {torch.get_num_threads()}")
    print("| batches | projection | targets / slots | loss ms, every position | loss ms, targets | "
          "peak MiB, every position | peak MiB, targets |")
    print("|---|---|---|---|---|---|---|")
    for packed in (False, True):
        data = batches(args.batches, packed=packed)
        for frozen in (True, False):
            output = nn.Linear(text.hidden_size, text.vocab_size, bias=False).requires_grad_(not frozen)
            results: dict[str, list[tuple[float, int]]] = {"all": [], "targets": []}
            targets = slots = 0
            for batch in data:
                batch = batch.with_target_index(IGNORE)
                hidden = torch.randn(*batch.labels.shape, text.hidden_size)
                every = torch.arange(batch.labels.numel())
                all_s, all_peak, all_loss, all_grad = run(hidden, batch, output, every)
                got_s, got_peak, got_loss, got_grad = run(hidden, batch, output, batch.target_index)
                assert abs(got_loss - all_loss) <= 1e-5 * abs(all_loss), (got_loss, all_loss)
                torch.testing.assert_close(got_grad, all_grad, rtol=1e-4, atol=1e-6)
                results["all"].append((all_s, all_peak))
                results["targets"].append((got_s, got_peak))
                targets, slots = targets + batch.target_index.numel(), slots + batch.labels.numel()
            ms = {k: statistics.median(s for s, _ in v) * 1e3 for k, v in results.items()}
            peak = {k: max(p for _, p in v) / 2**20 for k, v in results.items()}
            print(f"| {'packed' if packed else 'padded'} | {'frozen' if frozen else 'trainable'} | "
                  f"{targets / slots:.0%} | {ms['all']:.0f} | {ms['targets']:.0f} | {peak['all']:.0f} | {peak['targets']:.0f} |")


if __name__ == "__main__":
    main()
