"""Non-finite losses and gradients (``loss.nonfinite``): the decision logic alone, then the real
trainer on 2 gloo ranks with a NaN injected into one rank's loss (``FUSIONTRAIN_INJECT_NONFINITE``):
a skipped step leaves the weights as they were and the run goes on; ``stop`` ends every rank with
an error naming the step and rank and leaves only finite checkpoints; k non-finite steps in a row
stop a ``skip`` run; a checkpoint with a NaN on one rank is refused."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusiontrain.train.optim import lr_multiplier
from fusiontrain.config import ConfigError, load_config
from fusiontrain.train.nonfinite import (
    INJECT_ENV,
    Decision,
    NonFiniteError,
    NonFiniteGuard,
    StepReport,
    decide,
    injection_from_env,
    parse_injection,
)
from tests.helpers.launch import REPO_ROOT, run_torchrun, run_world
from tests.helpers.strict_json import loads_strict

HARNESS = str(REPO_ROOT / "tests" / "helpers" / "train_harness.py")
SAVE_HELPER = str(REPO_ROOT / "tests" / "helpers" / "nonfinite_save.py")
TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
RUN = ["logging.every_n_steps=0", "eval.every_n_steps=0", "data.num_workers=0"]

NAN = float("nan")


# -- the decision, unit by unit ------------------------------------------------------------------


def _report(step: int = 5, loss: float = 2.0, grad_norm: float = 1.0, loss_ranks=(), grad_ranks=()) -> StepReport:
    return StepReport(step, loss, grad_norm, tuple(loss_ranks), tuple(grad_ranks))


def test_a_finite_step_is_applied_and_resets_the_count() -> None:
    assert decide(_report(), mode="skip", max_consecutive=3, consecutive=2) == Decision(skip=False, consecutive=0)
    assert decide(_report(), mode="stop", max_consecutive=3, consecutive=0) == Decision(skip=False, consecutive=0)


@pytest.mark.parametrize(
    "report",
    [
        _report(loss=NAN, grad_norm=NAN, loss_ranks=[1]),
        _report(loss=math.inf),  # every rank finite, the global sum overflowed
        _report(grad_norm=math.inf, grad_ranks=[0]),
        _report(grad_norm=NAN),
    ],
)
def test_any_non_finite_value_skips_then_stops_at_the_kth_in_a_row(report: StepReport) -> None:
    first = decide(report, mode="skip", max_consecutive=3, consecutive=0)
    assert first == Decision(skip=True, consecutive=1)
    assert decide(report, mode="skip", max_consecutive=3, consecutive=1) == Decision(skip=True, consecutive=2)
    third = decide(report, mode="skip", max_consecutive=3, consecutive=2)
    assert third.skip and third.consecutive == 3
    assert "3 non-finite steps in a row (steps 3..5)" in third.error
    assert "loss.max_consecutive_nonfinite=3" in third.error
    stop = decide(report, mode="stop", max_consecutive=3, consecutive=0)
    assert stop.error.startswith("step 5: ") and "loss.nonfinite=stop" in stop.error
    assert decide(report, mode="skip", max_consecutive=1, consecutive=0).error is not None


def test_messages_name_the_step_and_the_ranks() -> None:
    assert _report(7, NAN, math.inf, loss_ranks=[1]).describe() == (
        "step 7: non-finite loss first seen on ranks [1] (loss=nan, grad_norm=inf)"
    )
    assert "non-finite gradients (loss finite on every rank) first seen on ranks [0, 1]" in (
        _report(grad_norm=NAN, grad_ranks=[0, 1]).describe()
    )
    assert "non-finite global loss" in _report(loss=math.inf).describe()


def test_guard_counts_skips_and_restores_its_counts() -> None:
    """Single process (no process group): the decision from the step's reduced values."""
    cpu = torch.device("cpu")
    guard = NonFiniteGuard("skip", 2)
    assert guard.check_step(0, 8.0, 4, 1.0, (), list, cpu) is False
    assert guard.check_step(1, NAN, 4, NAN, (0,), list, cpu) is True
    assert guard.check_step(2, 6.0, 4, 0.5, (), list, cpu) is False  # the count in a row resets
    inf_grads = [torch.tensor([1.0, math.inf])]
    assert guard.check_step(3, 6.0, 4, math.inf, (), lambda: inf_grads, cpu) is True
    assert guard.state_dict() == {"skipped": 2, "consecutive": 1}
    resumed = NonFiniteGuard("skip", 2)
    resumed.load_state_dict(guard.state_dict())
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite gradients .* ranks \[0\].*2 non-finite steps in a row"):
        resumed.check_step(4, 6.0, 4, math.inf, (), lambda: inf_grads, cpu)
    with pytest.raises(NonFiniteError, match=r"step 0: non-finite loss first seen on ranks \[0\] \(loss=inf"):
        NonFiniteGuard("stop", 3).check_step(0, math.inf, 4, 1.0, (0,), list, cpu)


def test_guard_refuses_to_save_non_finite_values() -> None:
    guard = NonFiniteGuard("skip", 3)
    finite = {"a": torch.ones(3), "b": torch.zeros(2)}
    guard.check_before_save(4, finite, [torch.ones(2)], torch.device("cpu"))
    with pytest.raises(NonFiniteError, match=r"refusing to write checkpoint step_4: .*ranks \[0\].*parameters here: b"):
        guard.check_before_save(4, {**finite, "b": torch.tensor([0.0, NAN])}, [], torch.device("cpu"))
    with pytest.raises(NonFiniteError, match="non-finite optimizer state here"):
        guard.check_before_save(4, finite, [torch.tensor([math.inf])], torch.device("cpu"))


def test_injection_parsing() -> None:
    one = parse_injection("step=3,rank=1")
    assert (one.first, one.last, one.ranks, math.isnan(one.value)) == (3, 3, frozenset({1}), True)
    assert one.applies(3, 1) and not one.applies(3, 0) and not one.applies(2, 1)
    spread = parse_injection("step=2-4, rank=0+1, value=inf")
    assert (spread.first, spread.last, spread.ranks, spread.value) == (2, 4, frozenset({0, 1}), math.inf)
    assert parse_injection("step=5").applies(5, 7)
    for bad in ("rank=1", "step=x", "step=4-2", "step=1,rank=1,rank=2", "step=1,value=0", "step=1,when=2", "3"):
        with pytest.raises(ValueError, match=INJECT_ENV):
            parse_injection(bad)
    assert injection_from_env({}) is None and injection_from_env({INJECT_ENV: "step=1"}).applies(1, 0)
    loss = torch.tensor(2.0, requires_grad=True)
    guard = NonFiniteGuard("skip", 3, injection=parse_injection("step=1"))
    assert guard.inject(loss, 0) is loss and torch.isnan(guard.inject(loss, 1))


def test_config_keys(tiny_mllama_dir: Path) -> None:
    config = load_config(TINY_CONFIG, [f"model.hf_mllama={tiny_mllama_dir}"])
    assert (config.loss.nonfinite, config.loss.max_consecutive_nonfinite) == ("skip", 3)
    with pytest.raises(ConfigError, match="loss.nonfinite"):
        load_config(TINY_CONFIG, [f"model.hf_mllama={tiny_mllama_dir}", "loss.nonfinite=ignore"])
    with pytest.raises(ConfigError, match="loss.max_consecutive_nonfinite"):
        load_config(TINY_CONFIG, [f"model.hf_mllama={tiny_mllama_dir}", "loss.max_consecutive_nonfinite=0"])


# -- the real trainer on 2 gloo ranks ----------------------------------------------------------------


def _rows(output_dir: Path) -> list[dict]:
    """metrics.jsonl, read by a strict JSON parser (NaN and Infinity are not JSON)."""
    return [loads_strict(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _train_failing(output_dir: Path, mllama: Path, inject: str, *overrides: str) -> tuple[str, list[str], float]:
    """A 2-rank CLI run that must fail; returns the launcher's report, each rank's stderr, and how
    long it took."""
    args = ["-m", "fusiontrain", "train", "--config", TINY_CONFIG, f"model.hf_mllama={mllama}", f"output_dir={output_dir}",
            *RUN, *overrides]
    logs = output_dir.parent / "torchrun_logs"
    started = time.monotonic()
    with pytest.raises(AssertionError, match="launch failed") as failure:
        run_torchrun(
            args, nproc=2, timeout=120, env={INJECT_ENV: inject}, extra_torchrun_args=["--log-dir", str(logs), "--tee", "3"]
        )
    seconds = time.monotonic() - started
    stderr = []
    for rank in (0, 1):
        (path,) = logs.glob(f"**/attempt_0/{rank}/stderr.log")
        stderr.append(path.read_text())
    return str(failure.value), stderr, seconds


def _every_rank_failed_with(report: str, stderr: list[str], message: str) -> None:
    """Every rank raised ``message`` (each logs it before the others may be torn down) and exited
    non-zero (1; or SIGTERM from torchrun, which ends the other ranks once one has failed)."""
    for rank, text in enumerate(stderr):
        assert f"rank {rank}: {message}" in text, text[-4000:]
    exit_codes = re.findall(r"rank\s*:\s*(\d) \(local_rank: \d\)\n\s*exitcode\s*:\s*(-?\d+)", report)
    assert sorted(rank for rank, _ in exit_codes) == ["0", "1"], report[-3000:]
    assert all(code in ("1", "-15") for _, code in exit_codes), exit_codes


def test_skip_leaves_the_weights_of_a_nan_step_untouched_and_goes_on(tmp_path, tiny_mllama_dir) -> None:
    out, run = tmp_path / "h", tmp_path / "run"
    args = [HARNESS, str(out), "--dump-every-step", "--config", TINY_CONFIG, f"model.hf_mllama={tiny_mllama_dir}",
            f"output_dir={run}", "max_steps=5", *RUN]
    run_world(args, nproc=2, timeout=120, env={INJECT_ENV: "step=2,rank=1"})
    rows = _rows(run)
    assert [row["skipped_step"] for row in rows] == [False, False, True, False, False]
    assert [row["nonfinite_skipped"] for row in rows] == [0, 0, 1, 1, 1]
    assert rows[2]["loss"] is None and rows[2]["nonfinite"]["loss"] == "nan"  # strict JSON: null, and why
    assert all(math.isfinite(rows[s]["loss"]) and "nonfinite" not in rows[s] for s in (0, 1, 3, 4))
    # The schedule advanced through the skipped step: the LRs are those of a run without a NaN.
    optim = load_config(TINY_CONFIG, [f"model.hf_mllama={tiny_mllama_dir}"]).optim
    want = [optim.lr * lr_multiplier(step, optim, 5) for step in range(5)]
    assert [row["lr"] for row in rows] == pytest.approx(want, rel=1e-12, abs=0)
    assert want[3] != want[2]  # would repeat if the skipped step had not advanced the schedule
    after = [load_file(out / "steps" / f"after_{s}.safetensors") for s in range(5)]
    assert after[0].keys() == after[2].keys() and after[0]
    moments = [name for name in after[2] if name.endswith(("/exp_avg", "/exp_avg_sq"))]
    counts = [name for name in after[2] if name.endswith("/step")]
    assert moments and counts and len(moments) == 2 * len(counts)  # AdamW's state is dumped too
    for step in (1, 3, 4):  # every other step moves the weights and AdamW's moments and counts ...
        assert any(not torch.equal(after[step][k], after[step - 1][k]) for k in after[step] if "/" not in k), step
        assert all(not torch.equal(after[step][k], after[step - 1][k]) for k in counts), step
        assert any(not torch.equal(after[step][k], after[step - 1][k]) for k in moments), step
    for name in after[2]:  # ... the NaN step leaves every one as it was, weights and state alike
        assert torch.equal(after[2][name], after[1][name]), name
    for state in after:
        assert all(torch.isfinite(t).all() for t in state.values())
    report = json.loads((out / "report.json").read_text())
    assert not report["unmoved_trainable"]


def test_stop_fails_every_rank_and_leaves_only_finite_checkpoints(tmp_path, tiny_mllama_dir) -> None:
    from fusiontrain.checkpoint.parts import CheckpointPart

    run = tmp_path / "run"
    report, stderr, seconds = _train_failing(
        run, tiny_mllama_dir, "step=2,rank=1",
        "max_steps=5", "loss.nonfinite=stop", "checkpoint.every_n_steps=1", "checkpoint.keep_last_n=0",
    )
    print(f"stop run failed after {seconds:.1f} s")
    _every_rank_failed_with(report, stderr, "step 2: non-finite loss first seen on ranks [1] (loss=nan, grad_norm=nan); stopping")
    assert seconds < 90
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1", "step_2"]  # no step_3
    newest = CheckpointPart(run / "checkpoints" / "step_2", "fusion")
    assert newest.names()
    for name in newest.names():
        assert torch.isfinite(newest.read(name)).all(), name
    assert len(_rows(run)) == 2


def test_k_nonfinite_steps_in_a_row_stop_a_skip_run(tmp_path, tiny_mllama_dir) -> None:
    from fusiontrain.checkpoint.layout import read_manifest

    run = tmp_path / "run"
    report, stderr, seconds = _train_failing(
        run, tiny_mllama_dir, "step=1-9,rank=0", "max_steps=8", "checkpoint.every_n_steps=1", "checkpoint.keep_last_n=0"
    )
    print(f"3-in-a-row run failed after {seconds:.1f} s")
    _every_rank_failed_with(
        report,
        stderr,
        "step 3: non-finite loss first seen on ranks [0] (loss=nan, grad_norm=nan); 3 non-finite steps in a row "
        "(steps 1..3), stopping (loss.max_consecutive_nonfinite=3)",
    )
    rows = _rows(run)
    assert [row["skipped_step"] for row in rows] == [False, True, True]
    assert [row["nonfinite_skipped"] for row in rows] == [0, 1, 2]
    assert read_manifest(run / "checkpoints" / "step_3")["state"]["nonfinite"] == {"skipped": 2, "consecutive": 2}
    assert not (run / "checkpoints" / "step_4").exists()


def test_a_checkpoint_with_a_nan_on_one_rank_is_refused(tmp_path, tiny_mllama_dir) -> None:
    out, run = tmp_path / "h", tmp_path / "run"
    args = [SAVE_HELPER, str(out), "--config", TINY_CONFIG, f"model.hf_mllama={tiny_mllama_dir}", f"output_dir={run}",
            "max_steps=2", "checkpoint.every_n_steps=1", "checkpoint.keep_last_n=0", *RUN]
    run_world(args, nproc=2, timeout=120)
    results = [json.loads((out / f"rank_{rank}.json").read_text()) for rank in (0, 1)]
    corrupted = results[1]["corrupted"]
    assert corrupted
    for result in results:
        assert result["error"].startswith("refusing to write checkpoint step_3: non-finite values on ranks [1]")
        assert "the earlier checkpoints are kept" in result["error"]
        assert result["on_disk"] == ["step_1", "step_2"]
    assert corrupted in results[1]["error"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1", "step_2"]
