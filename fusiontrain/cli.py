"""Command-line interface: ``python -m fusiontrain <command> [options]``.

Only the standard library is imported at module level; each command imports its heavy
dependencies (torch, transformers, ...) lazily inside its handler, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _run_demo(args: argparse.Namespace) -> int:
    """Handler of ``demo``: runs :func:`fusiontrain.demo.main` (imported lazily)."""
    from fusiontrain import demo as demo_module

    result = demo_module.main(args)
    return int(result) if isinstance(result, int) else 0


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="python -m fusiontrain",
        description="Train deep-fusion multimodal models (vision encoder + decoder LLM) with FSDP2.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run the end-to-end demo job on tiny, locally built models",
        description="Run the end-to-end demo job on tiny, locally built models.",
    )
    demo.add_argument(
        "--output-dir", default="demo_output", help="where the demo writes its outputs"
    )
    demo.set_defaults(func=_run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen command, return an exit code."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return func(args)

