"""Strict JSON: every ``metrics.jsonl`` the suite writes must parse with a parser that refuses
``NaN``, ``Infinity`` and ``-Infinity`` (which Python's ``json`` writes and accepts by default, and
which jq, JavaScript and most log pipelines reject)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def loads_strict(text: str) -> Any:
    """``json.loads`` that raises on ``NaN`` / ``Infinity`` / ``-Infinity``."""
    return json.loads(text, parse_constant=_refuse)


def non_strict_lines(root: Path) -> tuple[int, list[str]]:
    """(how many ``metrics.jsonl`` files lie under ``root``, ``"<file>:<line>: <error>"`` for each
    line of them that a strict parser refuses)."""
    files = sorted(root.rglob("metrics.jsonl"))
    problems = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                loads_strict(line)
            except ValueError as error:
                problems.append(f"{path}:{number}: {error}")
    return len(files), problems
