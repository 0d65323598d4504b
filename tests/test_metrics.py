"""MetricsLogger: metrics.jsonl, the console (lines or a tqdm bar), and wandb offline runs read back
from their ``run-<id>.wandb`` datastore."""

from __future__ import annotations

import io
import json
import struct
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from fusiontrain.train.metrics import MetricsLogger, wandb_metrics
from tests.helpers.strict_json import loads_strict, non_strict_lines

CONFIG = {"max_steps": 10, "optim": {"lr": 1e-4, "betas": [0.9, 0.95]}, "logging": {"wandb": {"mode": "offline"}}}


def step_metrics(step: int) -> dict[str, Any]:
    """What the trainer logs for ``step`` (an eval loss on step 1, skips from step 2)."""
    metrics = {
        "loss": 2.5 - 0.25 * step,
        "lr": 1e-4 * (step + 1) / 10,
        "grad_norm": 0.8 + 0.1 * step,
        "tokens": 4096,
        "real_tokens": 3900 + step,
        "real_token_share": (3900 + step) / 4096,
        "tokens_per_s": 12000.0 + 100 * step,
        "step_time_s": 0.33,
        "peak_memory_bytes": 123_456_789,
        "skipped": {"too_long": 2, "missing_image": step} if step >= 2 else {},
    }
    # a mixture's per-source metrics (llava holds no target at step 0: its loss is None)
    metrics["source/llava/loss"] = None if step == 0 else 2.4 - 0.2 * step
    metrics["source/llava/tokens"] = 0 if step == 0 else 1000
    metrics["source/cauldron/loss"] = 2.6 - 0.25 * step
    metrics["source/cauldron/samples"] = 7 + step
    if step == 1:
        metrics["eval_loss"] = 2.2
        metrics["eval_loss/cauldron"] = 2.1
    return metrics


@pytest.fixture(autouse=True)
def wandb_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No wandb settings from the outside, and a quiet wandb."""
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def no_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import wandb`` fail, to show that a code path never imports it."""
    monkeypatch.setitem(sys.modules, "wandb", None)


def run_logger(output_dir: Path, steps: range, **kwargs: Any) -> MetricsLogger:
    kwargs.setdefault("stream", io.StringIO())
    logger = MetricsLogger(output_dir, is_main=True, config=CONFIG, max_steps=10, world_size=2, **kwargs)
    for step in steps:
        logger.log(step, step_metrics(step))
    logger.close()
    return logger


# -- reading an offline run back ---------------------------------------------------------------


def datastore_records(path: Path) -> Iterator[bytes]:
    """The records of a wandb datastore (``run-<id>.wandb``): a LevelDB-style log of 32 KiB blocks
    after a 7-byte header; each chunk has a 7-byte header (crc32, length, type)."""
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            yield pending


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """The run record, config, per-step history and final summary of an offline run folder."""
    from wandb.proto import wandb_internal_pb2

    def key(item: Any) -> str:
        return "/".join(item.nested_key) if item.nested_key else item.key

    (datastore,) = run_dir.glob("run-*.wandb")
    run, config, history, summary = None, {}, {}, {}
    for raw in datastore_records(datastore):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history[record.history.step.num] = {key(item): json.loads(item.value_json) for item in record.history.item}
        elif kind == "summary":
            summary.update({key(item): json.loads(item.value_json) for item in record.summary.update})
    return {"run": run, "config": config, "history": history, "summary": summary}


def offline_run_dirs(wandb_dir: Path, run_id: str) -> list[Path]:
    return sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}*"))  # a "-1" suffix when started within the same second


# -- tests -------------------------------------------------------------------------------------


def test_wandb_metrics_flattens_skipped() -> None:
    flat = wandb_metrics({"loss": 1.0, "skipped": {"too_long": 2, "missing_image": 1}})
    assert flat == {"loss": 1.0, "skipped/too_long": 2, "skipped/missing_image": 1, "skipped/total": 3}
    assert wandb_metrics({"loss": 1.0, "skipped": {}}) == {"loss": 1.0, "skipped/total": 0}


def test_offline_run_records_history_summary_and_config(tmp_path: Path) -> None:
    logger = run_logger(tmp_path, range(3), wandb_mode="offline", wandb_project="ft-test", progress=False)
    assert len(logger.run_id) == 8
    (run_dir,) = offline_run_dirs(tmp_path, logger.run_id)
    stored = read_offline_run(run_dir)

    assert (stored["run"].run_id, stored["run"].project, stored["run"].display_name) == (logger.run_id, "ft-test", tmp_path.name)
    assert stored["config"]["optim"] == CONFIG["optim"]
    system = stored["config"]["system"]
    assert system["world_size"] == 2 and system["device"] == "cpu"
    assert {"torch_version", "fusiontrain_version", "hostname"} <= set(system)

    history = stored["history"]
    assert sorted(history) == [0, 1, 2]
    for step in range(3):
        expected = wandb_metrics(step_metrics(step))
        assert {k: history[step][k] for k in expected} == pytest.approx(expected)
    assert history[1]["eval_loss"] == pytest.approx(2.2)
    assert history[2]["skipped/too_long"] == 2 and history[2]["skipped/total"] == 4

    summary = stored["summary"]
    assert summary["loss"] == pytest.approx(step_metrics(2)["loss"])
    assert summary["eval_loss"] == pytest.approx(2.2)
    assert summary["skipped/total"] == 4
    assert summary["_step"] == 2

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2] and rows[2]["skipped"] == {"too_long": 2, "missing_image": 2}


def test_resumed_logger_continues_the_same_run(tmp_path: Path) -> None:
    first = run_logger(tmp_path, range(2), wandb_mode="offline", progress=False)
    second = run_logger(tmp_path, range(2, 4), wandb_mode="offline", run_id=first.run_id, start_step=2, progress=False)
    assert second.run_id == first.run_id
    before, after = [read_offline_run(d) for d in offline_run_dirs(tmp_path, first.run_id)]
    assert after["run"].run_id == first.run_id
    assert sorted(before["history"]) == [0, 1] and sorted(after["history"]) == [2, 3]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]  # appended, not replaced


@pytest.mark.usefixtures("no_wandb")
def test_disabled_writes_metrics_jsonl_without_wandb(tmp_path: Path) -> None:
    logger = run_logger(tmp_path, range(3), wandb_mode="disabled", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": step, **step_metrics(step)} for step in range(3)]
    assert not (tmp_path / "wandb").exists()
    assert len(logger.run_id) == 8  # an id to store in checkpoints all the same
    assert run_logger(tmp_path / "again", range(1), run_id="keepme12", progress=False).run_id == "keepme12"


@pytest.mark.usefixtures("no_wandb")
def test_non_finite_values_are_strict_json_null_with_the_reason(tmp_path: Path) -> None:
    """NaN / inf / -inf are written as null, with ``nonfinite`` saying which was which; the
    session's strict-JSON check would refuse the file Python's json writes by default."""
    logger = MetricsLogger(tmp_path, is_main=True, config=CONFIG, max_steps=10, world_size=2, stream=io.StringIO())
    logger.log(0, {**step_metrics(0), "loss": float("nan"), "grad_norm": float("inf"), "eval_loss": float("-inf")})
    logger.log(1, step_metrics(1))
    logger.close()
    first, second = [loads_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert first["loss"] is None and first["grad_norm"] is None and first["eval_loss"] is None
    assert first["nonfinite"] == {"loss": "nan", "grad_norm": "inf", "eval_loss": "-inf"}
    assert first["lr"] == step_metrics(0)["lr"] and first["skipped"] == {}
    assert "nonfinite" not in second and second["loss"] == step_metrics(1)["loss"]
    assert non_strict_lines(tmp_path) == (1, [])

    lax = tmp_path / "lax" / "metrics.jsonl"
    lax.parent.mkdir()
    lax.write_text(json.dumps({"step": 0, "loss": float("nan")}) + "\n")  # what json.dumps writes by default
    count, problems = non_strict_lines(tmp_path)
    assert count == 2 and len(problems) == 1 and problems[0].startswith(f"{lax}:1: NaN")
    lax.unlink()  # the session's own check would flag it too


@pytest.mark.usefixtures("no_wandb")
def test_other_ranks_record_nothing(tmp_path: Path) -> None:
    stream = io.StringIO()
    logger = MetricsLogger(tmp_path, is_main=False, stream=stream, wandb_mode="offline", run_id="abc", progress=True)
    logger.log(0, step_metrics(0))
    logger.close()
    assert list(tmp_path.iterdir()) == [] and stream.getvalue() == ""
    assert logger.run_id == "abc"


def test_wandb_mode_from_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # online in the config, offline from the environment: no network needed; WANDB_DIR wins over output_dir
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    logger = run_logger(tmp_path / "run", range(2), wandb_mode="online", progress=False)
    (run_dir,) = offline_run_dirs(tmp_path / "wandb_dir", logger.run_id)
    assert sorted(read_offline_run(run_dir)["history"]) == [0, 1]
    assert not (tmp_path / "run" / "wandb").exists()

    # offline in the config, disabled from the environment: wandb is not even imported
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setitem(sys.modules, "wandb", None)
    run_logger(tmp_path / "quiet", range(2), wandb_mode="offline", progress=False)
    assert [p.name for p in (tmp_path / "quiet").iterdir()] == ["metrics.jsonl"]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.usefixtures("no_wandb")
def test_console_lines_when_not_a_terminal(tmp_path: Path) -> None:
    stream = io.StringIO()
    run_logger(tmp_path, range(4), stream=stream, console_every=2)
    lines = stream.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["step=0", "step=2"]
    assert "loss=2.5" in lines[0] and "\r" not in stream.getvalue()


@pytest.mark.usefixtures("no_wandb")
@pytest.mark.parametrize("make_stream, progress", [(FakeTerminal, None), (io.StringIO, True)])
def test_progress_bar_on_a_terminal_or_when_forced(tmp_path: Path, make_stream: type, progress: bool | None) -> None:
    stream = make_stream()
    logger = MetricsLogger(tmp_path, is_main=True, stream=stream, max_steps=10, start_step=5, progress=progress)
    for step in range(5, 8):
        logger.log(step, {**step_metrics(step), "eval_loss": 0.5} if step == 6 else step_metrics(step))
    logger.close()
    text = stream.getvalue()
    final = text.split("\r")[-1]
    assert "8/10" in final and "loss=0.7500" in final and "tok/s=12,700" in final
    assert "<" in final  # tqdm's elapsed<remaining (the ETA)
    assert "step 6 eval_loss=0.5\n" in text  # eval losses stay in the scrollback
    assert "step=" not in text  # no plain lines beside the bar


@pytest.mark.usefixtures("no_wandb")
def test_missing_wandb_package_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(tmp_path, is_main=True, wandb_mode="offline", progress=False)
