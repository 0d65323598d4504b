#!/usr/bin/env bash
# Run the fast test selection (the one `make test-fast` runs) under each torch release that
# pyproject.toml admits besides the suite's own (torch 2.13.0, `make test`), with the lowest
# `datasets` release it admits, so that both ends of the declared ranges have run.
#
#   scripts/compat.sh                 # every release in COMPAT_TORCH
#   scripts/compat.sh 2.14.1          # just this one
#
# Each release gets its own virtualenv under $COMPAT_VENVS (default .compat/, git-ignored),
# built once: torch first in its own pip call (2.14.1 is a CUDA build of about 5.5 GB, which pip
# takes from this machine's disk and which runs on the CPU), then the project with the same
# extras as `make test`. The summary line of each run, with the versions, is printed at the end;
# README.md ("Versions that ran") records them with dates.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

COMPAT_TORCH=(2.14.1)
LOWEST_DATASETS="datasets==5.1.0"   # the first release with split_dataset_by_node(strategy=)
VENVS="${COMPAT_VENVS:-$ROOT/.compat}"
FAST_SELECTION=(tests -q -n 2 --dist worksteal -m "not slow" -p no:cacheprovider)

if [[ $# -gt 0 ]]; then versions=("$@"); else versions=("${COMPAT_TORCH[@]}"); fi
PY=python3
command -v python3.11 >/dev/null 2>&1 && PY=python3.11

summary=()
status=0
for version in "${versions[@]}"; do
    venv="$VENVS/torch-$version"
    stamp="$venv/.fusiontrain-installed"
    if [[ ! -x "$venv/bin/python" ]]; then
        echo "[compat] creating $venv"
        mkdir -p "$VENVS"
        "$PY" -m venv "$venv"
    fi
    if [[ ! -f "$stamp" || "$ROOT/pyproject.toml" -nt "$stamp" ]]; then
        echo "[compat] installing torch==$version, then fusiontrain[dev,reference,peft,audio] with $LOWEST_DATASETS"
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet "torch==$version"
        "$venv/bin/python" -m pip install --quiet -e ".[dev,reference,peft,audio]" "torch==$version" "$LOWEST_DATASETS"
        touch "$stamp"
    fi
    versions_line="$("$venv/bin/python" -c 'import torch, datasets, transformers; print(f"torch {torch.__version__}, datasets {datasets.__version__}, transformers {transformers.__version__}")' 2>/dev/null)"
    echo "[compat] $versions_line: pytest ${FAST_SELECTION[*]}"
    log="$VENVS/torch-$version.log"
    set +e
    "$venv/bin/python" -m pytest "${FAST_SELECTION[@]}" 2>&1 | tee "$log"
    code=${PIPESTATUS[0]}
    set -e
    result="$(grep -E '^[=]* *[0-9]+ (passed|failed)|^[0-9]+ (passed|failed)' "$log" | tail -1 | tr -d '=' | sed 's/^ *//')"
    summary+=("$(date -u +%F) $versions_line: ${result:-no summary} (exit $code)")
    [[ $code -eq 0 ]] || status=1
done

echo
echo "[compat] summary"
printf '  %s\n' "${summary[@]}"
exit "$status"
