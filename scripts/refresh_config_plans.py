"""Rewrite the plan comment of each real-model config in configs/ with what the planner prints now.

    python scripts/refresh_config_plans.py

Each config names its launch size in a line ``# plan: --gpu KIND --gpus N``; the comment block
that follows it (up to the first line that is not a comment) is replaced by the output of
``python -m fusiontrain train --config CONFIG --dry-run --gpu KIND --gpus N``.
tests/test_plan.py fails when a comment is stale.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^# plan: (--gpu \S+ --gpus \d+)$", re.MULTILINE)


def refresh(config: Path) -> bool:
    """Rewrite ``config``'s plan comment; False when it has no ``# plan:`` line."""
    text = config.read_text()
    marker = MARKER.search(text)
    if marker is None:
        return False
    command = [sys.executable, "-m", "fusiontrain", "train", "--config", str(config.relative_to(REPO)), "--dry-run"]
    output = subprocess.run(
        [*command, *marker.group(1).split()], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
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
