"""Training runs of mixtures, as users run them: every format's example file mixed on 2 ranks
(bad records counted by reason while the run goes on), resumed elastically on 1 rank (the same
sample ids and losses), per-source losses that add up to the loss, padding-free rows, and ``plan``
on a mixture."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.helpers.launch import run_world

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"
TINY_CONFIG = str(REPO / "configs" / "tiny.yaml")


def _chat_records(path: Path, count: int) -> Path:
    """``count`` short chat records about the example images, two of them bad (a missing image,
    an unknown role)."""
    images = ["images/ring.png", "images/wide_ring.png", "images/blue.png"]
    lines = []
    for k in range(count):
        record = {
            "images": [images[k % 3]],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Picture {k}?"}]},
                {"role": "assistant", "content": f"Answer {k % 5}."},
            ],
        }
        if k == 5:
            record["images"] = ["images/nowhere.png"]
        if k == 9:
            record["messages"][1]["role"] = "critic"
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(out: Path, nproc: int, data: Path, *overrides: str) -> list[dict]:
    sources = (
        f"data.train=[{{path: {data / 'llava.jsonl'}, format: llava, weight: 1}}, "
        f"{{path: {data / 'cauldron.parquet'}, format: cauldron, weight: 1}}, "
        f"{{path: {data / 'sharegpt.jsonl'}, format: sharegpt, weight: 1}}, "
        f"{{path: {data / 'chat.jsonl'}, format: chat, name: questions, weight: 2}}]"
    )
    run_world(
        ["-m", "fusiontrain", "train", "--config", TINY_CONFIG, f"model.hf_mllama={data / 'mllama'}", f"output_dir={out}",
         sources, f"data.eval=[{{path: {data / 'sharegpt.jsonl'}, format: sharegpt}}, {{path: {data / 'chat.jsonl'}, format: chat, name: questions}}]",
         "batch.seq_len=128", "batch.global_batch_size=4", "batch.micro_batch_size=2", "max_steps=4",
         "checkpoint.every_n_steps=2", "eval.every_n_steps=2", "eval.num_samples=4", "logging.every_n_steps=0",
         "data.log_sample_ids=true", "data.num_workers=1", *overrides],
        nproc=nproc,
        timeout=300,
    )
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _sample_ids(out: Path) -> dict[int, list]:
    """Step -> every sample id the step's rows held, over all ranks (sorted)."""
    by_step: dict[int, list] = {}
    for log in sorted((out / "sample_ids").glob("rank_*.jsonl")):
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            by_step.setdefault(entry["step"], []).extend(i for _, ids in entry["rows"] for i in ids)
    return {step: sorted(ids) for step, ids in by_step.items()}


@pytest.mark.timeout(600)
def test_a_mixed_run_on_2_ranks_resumed_on_1_continues_the_same_samples_and_reports_each_source(
    tmp_path: Path, tiny_mllama_dir: Path
) -> None:
    """llava, cauldron, sharegpt and chat sources at weights 1:1:1:2, packed, on 2 ranks with a worker each:
    4 steps, checkpoints after 2 and 4. Then the step-2 checkpoint resumed on 1 rank (elastic):
    steps 2-3 hold the same sample ids and give the same losses. Every step reports each source,
    and the per-source losses weighted by their tokens sum to the loss; the eval sets report
    under their names; the bad records of every format are counted by reason while the run goes on."""
    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    shutil.copytree(tiny_mllama_dir, data / "mllama")
    _chat_records(data / "chat.jsonl", 24)
    first = _run(tmp_path / "two", 2, data)
    assert [row["step"] for row in first] == [0, 1, 2, 3]
    for row in first:
        names = ("llava", "cauldron", "sharegpt", "questions")
        weighted = sum(row[f"source/{n}/loss"] * row[f"source/{n}/tokens"] for n in names if row[f"source/{n}/tokens"])
        assert math.isclose(weighted, row["loss"] * row["tokens"], rel_tol=1e-5), row
        assert sum(row[f"source/{n}/tokens"] for n in names) == row["tokens"]
        assert sum(row[f"source/{n}/real_tokens"] for n in names) == row["real_tokens"]
    assert {"eval_loss", "eval_loss/sharegpt", "eval_loss/questions"} <= set(first[1])
    skipped = first[-1]["skipped"]
    for reason in ("malformed_json", "unknown_role", "image_count_mismatch", "missing_image", "corrupt_image"):
        assert skipped.get(reason, 0) > 0, (reason, skipped)
    samples = [sum(row[f"source/{n}/samples"] for row in first) for n in ("llava", "cauldron", "sharegpt", "questions")]
    assert samples[3] > max(samples[:3]), samples  # the weight-2 source gives the most samples

    resumed = _run(tmp_path / "one", 1, data, f"checkpoint.resume={tmp_path / 'two' / 'checkpoints' / 'step_2'}")
    assert [row["step"] for row in resumed] == [2, 3]
    ids_two, ids_one = _sample_ids(tmp_path / "two"), _sample_ids(tmp_path / "one")
    assert ids_one[2] == ids_two[2] and ids_one[3] == ids_two[3]
    for got, want in zip(resumed, first[2:]):
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-5, abs_tol=1e-6), (got["loss"], want["loss"])
        for name in ("llava", "cauldron", "sharegpt", "questions"):
            assert got[f"source/{name}/samples"] == want[f"source/{name}/samples"]


def test_padding_free_rows_and_the_planner_take_a_mixture(tmp_path: Path, tiny_mllama_dir: Path, capsys) -> None:
    """Without packing (padding-free rows, in the training process) each source's samples and
    tokens are counted and its losses add up to the loss; ``plan`` sizes a mixture's run as any."""
    from fusiontrain.cli import main as cli_main

    data = tmp_path / "data"
    shutil.copytree(EXAMPLES, data)
    shutil.copytree(tiny_mllama_dir, data / "mllama")
    _chat_records(data / "chat.jsonl", 12)
    rows = _run(
        tmp_path / "padding_free", 1, data, "data.packing=false", "data.num_workers=0", "max_steps=2",
        "checkpoint.every_n_steps=0", "eval.every_n_steps=0", "data.log_sample_ids=false",
    )
    names = ("llava", "cauldron", "sharegpt", "questions")
    for row in rows:
        # global batch 4, one sample per slot; a sample found bad as it is built (a missing image) leaves its slot empty
        assert 1 <= sum(row[f"source/{n}/samples"] for n in names) <= 4
        weighted = sum(row[f"source/{n}/loss"] * row[f"source/{n}/tokens"] for n in names if row[f"source/{n}/tokens"])
        assert math.isclose(weighted, row["loss"] * row["tokens"], rel_tol=1e-5), row
    mixture = f"data.train=[{{path: {data / 'llava.jsonl'}, format: llava, weight: 1}}, {{path: {data / 'chat.jsonl'}, format: chat, weight: 2}}]"
    code = cli_main(["plan", "--config", TINY_CONFIG, "--gpus", "2", f"model.hf_mllama={data / 'mllama'}", "batch.seq_len=128", mixture])
    assert code == 0 and "memory per device" in capsys.readouterr().out



