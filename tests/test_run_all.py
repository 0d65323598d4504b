"""benchmarks/run_all.py rewrites benchmarks/RESULTS.md from its own runs: what it does not write
(sections written by hand, the GPU results) is kept, in order, the GPU results last."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import run_all


def test_rewriting_results_keeps_the_sections_written_by_hand_and_the_gpu_results_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Benchmark results\n\nWritten by run_all.\n\n"
        "## Generated (a.py)\n\nold numbers\n\n```\n## not a heading: output inside a block\n```\n\n"
        "## By hand, first\n\n| x |\n|---|\n| 1 |\n\n"
        "## Generated too (b.py)\n\nold\n\n"
        "## By hand, second\n\ntext\n\n"
        f"{run_all.GPU_HEADING} (scripts/gpu_check.py)\n\nthe GPU table\n"
    )
    monkeypatch.setattr(run_all, "RESULTS", results)
    by_hand, gpu = run_all.kept_sections({"Generated (a.py)", "Generated too (b.py)"})
    assert by_hand == ["## By hand, first\n\n| x |\n|---|\n| 1 |\n", "## By hand, second\n\ntext\n"]
    assert gpu == f"\n{run_all.GPU_HEADING} (scripts/gpu_check.py)\n\nthe GPU table\n"
    assert run_all.kept_sections(set())[0][0].startswith("## Generated (a.py)")  # nothing generated: all kept
    results.unlink()
    assert run_all.kept_sections(set()) == ([], "")
