"""Write docs/config.md's config-key table from the code (fusiontrain.config.describe).

    python scripts/config_table.py          # rewrite the table in docs/config.md
    python scripts/config_table.py --check  # exit 1 when docs/config.md's table is not the generated one

The table is the block of lines starting with ``| key | default | meaning |``; tests/test_config.py fails when it differs from what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusiontrain.config import describe  # noqa: E402  (after the repo is on the path)

CONFIG_DOC = REPO / "docs" / "config.md"
HEADER = "| key | default | meaning |"


def config_table() -> str:
    """The Markdown table of every config key, its default and its help, in declaration order."""
    rows = [HEADER, "|---|---|---|"]
    rows += [f"| `{key}` | `{default}` | {help_text.replace('|', '/')} |" for key, default, help_text in describe()]
    return "\n".join(rows) + "\n"


def replace_table(readme: str) -> str:
    """``readme`` with its config table replaced by :func:`config_table`."""
    start = readme.index(HEADER)
    end = start
    lines = readme[start:].splitlines(keepends=True)
    for line in lines:
        if not line.startswith("|"):
            break
        end += len(line)
    return readme[:start] + config_table() + readme[end:]


def main(argv: list[str]) -> int:
    text = CONFIG_DOC.read_text()
    new = replace_table(text)
    if "--check" in argv:
        if new != text:
            print("docs/config.md's config table is stale: run python scripts/config_table.py", file=sys.stderr)
            return 1
        return 0
    CONFIG_DOC.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
