"""The docs name only config keys and command-line flags that exist.

README.md and docs/*.md are read as a user reads them: every config key they show (an inline code
span that is a dotted key, ``key=value`` or ``key: value``, and every ``key=value`` override in a
code block) must be a key of the config or a section of it, and every flag given to a
``fusiontrain`` command (``python -m fusiontrain <command> ... --flag``, in code blocks and inline
code) must be an option of that command. A renamed key or flag makes this fail until the docs
follow.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from fusiontrain.cli import build_parser
from fusiontrain.config import describe
from fusiontrain.inference.command import build_parser as generate_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = ("model", "data", "batch", "optim", "parallel", "distributed", "loss", "checkpoint", "logging", "eval", "plan")
KEY = re.compile(rf"^(?:{'|'.join(SECTIONS)})(?:\.[a-z_][a-z0-9_]*)+$")
OVERRIDE = re.compile(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})(?:\.[a-z_][a-z0-9_]*)+)=")
FILE_SUFFIXES = (".safetensors", ".json", ".jsonl", ".yaml", ".py", ".md", ".txt", ".npy", ".tar", ".parquet")
COMMAND = re.compile(r"fusiontrain\s+([a-z][a-z-]*)((?:[^\n`]|\\\n)*)")


def _code(text: str) -> tuple[list[str], list[str]]:
    """(inline code spans, code blocks) of a Markdown text."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose), blocks


def config_keys_named(text: str) -> set[str]:
    spans, blocks = _code(text)
    named = set()
    for span in spans:
        key = re.split(r"[=:\s]", span.strip(), maxsplit=1)[0]
        if KEY.match(key) and not key.endswith(FILE_SUFFIXES):
            named.add(key)
    for block in [*blocks, *spans]:
        named |= {key for key in OVERRIDE.findall(block) if not key.endswith(FILE_SUFFIXES)}
    return named


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def command_options() -> dict[str, set[str]]:
    """Each ``python -m fusiontrain`` command's option strings."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    options = {name: _options(sub) for name, sub in commands.items()}
    options["generate"] |= _options(generate_parser())  # generate parses its own arguments
    return options


def flags_named(text: str) -> list[tuple[str, str]]:
    """``(command, flag)`` for every flag given to a ``fusiontrain <command>`` in code."""
    spans, blocks = _code(text)
    found = []
    for piece in [*blocks, *spans]:
        for command, rest in COMMAND.findall(piece):
            found += [(command, flag) for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest)]
    return found


def test_the_docs_name_only_config_keys_that_exist() -> None:
    keys = [key for key, _, _ in describe()]
    known = set(keys) | {".".join(key.split(".")[:depth]) for key in keys for depth in range(1, key.count(".") + 1)}
    wrong = {}
    for path in DOCS:
        unknown = sorted(config_keys_named(path.read_text()) - known)
        if unknown:
            wrong[path.relative_to(REPO).as_posix()] = unknown
    assert not wrong, f"config keys the docs name that do not exist: {wrong}"
    sectioned = {key for key in keys if "." in key}
    assert config_keys_named((REPO / "docs" / "config.md").read_text()) == sectioned  # the checker sees them all


def test_the_docs_give_commands_only_flags_they_take() -> None:
    options = command_options()
    wrong = []
    seen = 0
    for path in DOCS:
        for command, flag in flags_named(path.read_text()):
            seen += 1
            if command not in options:
                wrong.append(f"{path.name}: no command {command!r}")
            elif flag not in options[command]:
                wrong.append(f"{path.name}: `fusiontrain {command}` has no {flag}")
    assert seen > 20, seen  # the checker finds the docs' commands
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_the_checker_catches_a_wrong_key_and_flag() -> None:
    text = "Set `model.lora.rnak` and run `python -m fusiontrain plan --config x.yaml --gpu-kind h100`.\n"
    assert config_keys_named(text) == {"model.lora.rnak"}
    assert ("plan", "--gpu-kind") in flags_named(text) and "--gpu-kind" not in command_options()["plan"]
