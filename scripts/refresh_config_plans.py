"""Rewrite the plan comment of each real-model config in configs/ with what the planner prints now.

    python scripts/refresh_config_plans.py

A config with a plan comment has a line ``# plan (python -m fusiontrain plan --config CONFIG; ...):``
and a ``plan:`` section naming the device kind it is written for (``plan.gpu``; the world size is
its mesh or ``plan.gpus``). The comment block after that line (up to the first line that is not a
comment) is replaced by the output of ``python -m fusiontrain train --config CONFIG --dry-run
--gpu <plan.gpu>``: the config's own defaults, with the device kind pinned so that a machine with
a GPU of another kind writes the same comment. tests/test_plan.py fails when a comment is stale.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusiontrain.config import load_config  # noqa: E402  (after the repo is on the path)

MARKER = re.compile(r"^# plan \(python -m fusiontrain plan --config \S+; scripts/refresh_config_plans\.py writes it\):$", re.MULTILINE)


def refresh(config: Path) -> bool:
    """Rewrite ``config``'s plan comment; False when it has no plan marker line."""
    text = config.read_text()
    marker = MARKER.search(text)
    if marker is None:
        return False
    gpu = load_config(config).plan.gpu
    if gpu is None:
        raise SystemExit(f"{config}: a config with a plan comment must name its device kind in plan.gpu")
    command = [sys.executable, "-m", "fusiontrain", "train", "--config", str(config.relative_to(REPO)), "--dry-run"]
    output = subprocess.run([*command, "--gpu", gpu], cwd=REPO, check=True, capture_output=True, text=True).stdout
    lines = text[marker.end() + 1 :].splitlines(keepends=True)
    rest = 0
    while rest < len(lines) and lines[rest].startswith("#"):
        rest += 1
    comment = "".join(f"#   {line}".rstrip() + "\n" for line in output.splitlines())
    config.write_text(text[: marker.end() + 1] + comment + "".join(lines[rest:]))
    return True


def main() -> None:
    for config in sorted((REPO / "configs").glob("*.yaml")):
        if refresh(config):
            print(f"refreshed {config.relative_to(REPO)}")


if __name__ == "__main__":
    main()
