"""Mixtures of data sources, in one process: the weighted shares of each epoch, the row plan over
a mixture, its config, the per-source split inside the chunked loss, and prepare's report per
source. The training runs of mixtures are in tests/test_mixture_runs.py."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from fusiontrain.config import ConfigError, load_config
from fusiontrain.data.mixture import SourceMixture
from fusiontrain.data.row_plan import RowLimits, RowPlan
from fusiontrain.data.sizes import SampleSizes
from fusiontrain.train.loss import chunked_cross_entropy_sum

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"
TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")


# -- the mixture's epochs ----------------------------------------------------------------------------


def test_a_3_to_1_mixture_gives_its_shares_per_epoch_and_binomial_shares_within_a_window() -> None:
    """Two sources of 1,200 and 800 samples at weights 3:1: each epoch of 2,000 draws exactly
    1,500 and 500 (the larger source repeats, the smaller is sub-sampled), a source's samples
    come round again only after all of them have, and any window of consecutive samples holds
    the weights' shares within binomial tolerance (the draws are shuffled together)."""
    mixture = SourceMixture(("big", "small"), (1200, 800), (3.0, 1.0))
    assert mixture.quotas() == (1500, 500)
    seen = {0: [], 1: []}
    for epoch in range(3):
        order = mixture.order(epoch, seed=7)
        assert len(order) == 2000
        by_source = {0: [], 1: []}
        for sample_id in order:
            source, index = mixture.source_of(sample_id)
            by_source[source].append(index)
        assert len(by_source[0]) == 1500 and len(by_source[1]) == 500
        for source in (0, 1):
            seen[source] += sorted(by_source[source])  # a set per epoch; laps checked below
        window = [mixture.source_of(i)[0] for i in order[:400]]
        share = window.count(0) / 400
        assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 400), share
    # big: 4,500 draws over 3 epochs = laps of 1,200: every sample 3 or 4 times, never 2 apart
    counts = torch.bincount(torch.tensor(seen[0]), minlength=1200)
    assert set(counts.tolist()) <= {3, 4} and int(counts.sum()) == 4500
    # small: 1,500 draws of 800: every sample once or twice
    counts = torch.bincount(torch.tensor(seen[1]), minlength=800)
    assert set(counts.tolist()) <= {1, 2} and int(counts.sum()) == 1500
    assert mixture.order(0, seed=7) == mixture.order(0, seed=7) != mixture.order(1, seed=7)
    assert mixture.order(0, seed=7) != mixture.order(0, seed=8)


def test_within_a_source_no_sample_repeats_before_all_have_come() -> None:
    mixture = SourceMixture(("a", "b"), (10, 7), (5.0, 1.0))
    stream = []
    for epoch in range(6):
        stream += [mixture.source_of(i)[1] for i in mixture.order(epoch, seed=1) if mixture.source_of(i)[0] == 0]
    # positions in the source's own stream: laps of 10 distinct samples, whatever the epochs
    draws = [mixture._draws(0, epoch, seed=1) for epoch in range(6)]
    flat = [int(i) for d in draws for i in d]
    for lap in range(len(flat) // 10):
        assert sorted(flat[lap * 10 : (lap + 1) * 10]) == list(range(10))
    assert sorted(stream) == sorted(flat)


def test_unweighted_sources_are_each_visited_once_per_epoch() -> None:
    mixture = SourceMixture(("a", "b", "c"), (5, 3, 4))
    assert mixture.quotas() == (5, 3, 4)
    assert sorted(mixture.order(2, seed=0)) == list(range(12))


def test_the_row_plan_packs_a_mixture_and_counts_its_bad_samples() -> None:
    """The plan takes the mixture's order: with packing each epoch's rows hold exactly the drawn
    usable samples; a bad sample drawn is counted (so its source gives a little less)."""
    mixture = SourceMixture(("a", "b"), (30, 20), (1.0, 1.0))
    table = torch.zeros(50, 4, dtype=torch.long)
    table[:, 0] = torch.arange(50) % 7 + 3  # tokens
    table[:, 1] = 1  # one image each
    table[:, 2] = 5
    table[3, 3] = 1  # sample 3 (of source a) is bad: skip code 1
    limits = RowLimits(seq_len=32, max_images=4, max_encoder_tokens=None, packing=True, open_rows=4)
    plan = RowPlan(SampleSizes(table), limits, seed=3, order=lambda epoch: mixture.order(epoch, seed=3))
    for epoch in range(3):
        rows = plan.epoch(epoch)
        drawn = mixture.order(epoch, seed=3)
        packed = sorted(i for row in rows.rows for i in row)
        assert packed == sorted(i for i in drawn if i != 3)
        assert sum(rows.skipped.values()) == drawn.count(3)


def test_mixture_config_validation(tiny_mllama_dir: Path) -> None:
    model = f"model.hf_mllama={tiny_mllama_dir}"
    two = "data.train=[{path: a.jsonl, format: llava, weight: 3}, {path: b.jsonl, format: chat, weight: 1}]"
    config = load_config(TINY_CONFIG, [model, two])
    assert [source.weight for source in config.data.train] == [3.0, 1.0]
    errors = {
        "data.train=[{path: a.jsonl, format: llava, weight: 3}, {path: b.jsonl, format: chat}]": "'data.train[1].weight' is missing",
        "data.train=[{path: x/a.jsonl, format: llava}, {path: y/a.jsonl, format: chat}]": "two sources are named 'a'",
        "data.train=[{path: a.jsonl, format: llava, weight: -1}, {path: b.jsonl, format: chat, weight: 1}]": "must be a positive number",
        "data.train=[{path: a.jsonl, format: llava}, {format: chat}]": "'data.train[1].path' is required",
        "data.train=[{path: a.jsonl, format: llava}, {path: b.jsonl, fromat: chat}]": "unknown config key 'data.train[1].fromat'",
        "data.eval=[{path: a.jsonl, format: chat, weight: 2}, {path: b.jsonl, format: chat}]": "eval sources are each evaluated whole",
        "data.train=[]": "empty list",
    }
    for override, message in errors.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(TINY_CONFIG, [model, override])


# -- the per-source split inside the chunked loss ---------------------------------------------------


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("num_chunks", [1, 3])
def test_per_source_loss_sums_equal_each_source_alone_and_add_up(trainable: bool, num_chunks: int) -> None:
    torch.manual_seed(0)
    d, v, b, s = 16, 50, 2, 12
    output = nn.Linear(d, v, bias=False)
    output.weight.requires_grad_(trainable)
    hidden = torch.randn(b, s, d, requires_grad=True)
    labels = torch.randint(0, v, (b, s))
    labels[:, :3] = -100
    sources = torch.randint(0, 3, (b, s))
    flat_labels = labels.reshape(-1)
    index = torch.nonzero(flat_labels != -100).squeeze(1)
    per_source = torch.zeros(3)
    total = chunked_cross_entropy_sum(
        hidden, labels, output, num_chunks=num_chunks, target_index=index,
        target_sources=sources.reshape(-1)[index], per_source=per_source,
    )
    plain = chunked_cross_entropy_sum(hidden, labels, output, num_chunks=num_chunks, target_index=index)
    torch.testing.assert_close(total, plain, atol=1e-5, rtol=0)
    for k in range(3):
        alone = torch.where(sources == k, labels, -100)
        want = torch.nn.functional.cross_entropy(output(hidden).reshape(-1, v).float(), alone.reshape(-1), reduction="sum")
        torch.testing.assert_close(per_source[k], want.detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(per_source.sum(), total.detach(), atol=1e-4, rtol=1e-6)
    total.backward()  # the split adds nothing to the graph
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_prepare_reports_each_source_and_adding_a_source_measures_only_that_one(
    tmp_path: Path, tiny_mllama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """prepare: per source, records, bad records by reason, usable tokens and images, samples per
    epoch and share; a second mixture that adds a source finds the first two sources' caches."""
    from fusiontrain.data.sizes import load_cached
    from fusiontrain.train.data import build_dataset, sized_sources
    from fusiontrain.train.data import prepare_from_config
    from fusiontrain.source.model_source import ModelSource
    from fusiontrain.train.model import build_meta_model

    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    two = f"data.train=[{{path: {data / 'llava.jsonl'}, format: llava, weight: 3}}, {{path: {data / 'cauldron.parquet'}, format: cauldron, weight: 1}}]"
    base = [f"model.hf_mllama={tiny_mllama_dir}", f"output_dir={tmp_path / 'run'}", "batch.seq_len=128"]
    report = prepare_from_config(load_config(TINY_CONFIG, [*base, two]))
    lines = report.splitlines()
    assert lines[0].startswith("measured 11 samples of the mixture of 2 sources of data.train (llava, cauldron)"), report
    assert "llava: 7 records, 4 usable, bad {'image_count_mismatch': 1, 'malformed_json': 1, 'unknown_role': 1}" in report
    assert "8 samples per epoch (72.7% of the mixture, 1.14x its records)" in report  # 11 * 3 / 4 = 8.25 -> 8
    assert "cauldron: 4 records, 4 usable, bad none" in report and "3 samples per epoch (27.3% of the mixture" in report

    three = two[:-1] + f", {{path: {data / 'sharegpt.jsonl'}, format: sharegpt, weight: 1}}]"
    config = load_config(TINY_CONFIG, [*base, three])
    source = ModelSource.from_config(config.model)
    model = build_meta_model(config.model, source)
    image_format, inputs = source.family.image_format(model), source.input_folders(model)
    dataset = build_dataset(config, image_format, inputs, model, split="train")
    found = [load_cached(s.dirs, s.key, len(s.dataset)) is not None for s in sized_sources(config, dataset, image_format, inputs)]
    assert found == [True, True, False]
