#!/usr/bin/env bash
# Create/refresh the repo-local virtualenv used by `make test` and `make demo`.
#
# torch is pinned to the CPU build used on CPU machines and CI, and installed FIRST in its own
# pip call, so the editable install that follows finds it already satisfied and pulls no CUDA.
# Fast no-op when the stamp file is newer than pyproject.toml.
#
# pip installs without byte-compiling, and compileall then compiles the whole environment on
# every core: pip compiles one file at a time, a quarter of a clean install's time here. The .pyc
# files matter where PYTHONDONTWRITEBYTECODE is set (as on this project's CI machine): Python then
# never writes them itself, and every process of the suite would compile what it imports.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
STAMP="$VENV/.fusiontrain-installed"
TORCH_PIN="torch==2.13.0"

if [[ ! -x "$VENV/bin/python" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then
        PY=python3.11
    else
        PY=python3
    fi
    echo "[setup_env] creating $VENV with $PY ($("$PY" --version 2>&1))"
    "$PY" -m venv "$VENV"
fi

if [[ -f "$STAMP" && "$STAMP" -nt "$ROOT/pyproject.toml" ]]; then
    echo "[setup_env] $VENV is up to date (stamp newer than pyproject.toml); skipping installs"
    exit 0
fi

PIP=("$VENV/bin/python" -m pip)
echo "[setup_env] upgrading pip"
"${PIP[@]}" install --quiet --upgrade pip
echo "[setup_env] installing $TORCH_PIN (own pip call, before anything else)"
"${PIP[@]}" install --quiet --no-compile "$TORCH_PIN"
echo "[setup_env] installing fusiontrain in editable mode with [dev,reference,peft,audio] extras ($TORCH_PIN held)"
"${PIP[@]}" install --quiet --no-compile -e ".[dev,reference,peft,audio]" "$TORCH_PIN"
echo "[setup_env] byte-compiling the environment on every core"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
# torch ships one module in Python 3.12 syntax, for 3.12 only; pip's own compile skips it too.
"$VENV/bin/python" -m compileall -q -j 0 -x '/torch/testing/_internal/py312_intrinsics\.py$' "$SITE" > /dev/null
"$VENV/bin/python" -c 'import torch; print("[setup_env] torch", torch.__version__)'
touch "$STAMP"
echo "[setup_env] done"
