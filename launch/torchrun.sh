#!/usr/bin/env bash
# One node, N processes: torchrun --standalone running `python -m fusiontrain train`.
#
#   launch/torchrun.sh --config configs/X.yaml [dotted.key=value ...]
#   NPROC_PER_NODE=2 PYTHON=.venv/bin/python launch/torchrun.sh --config configs/X.yaml
#
# Environment knobs (all optional):
#   NPROC_PER_NODE     processes to start; default: the number of GPUs `nvidia-smi -L` lists,
#                      or 1 when there is no nvidia-smi / no GPU. On a CPU machine set it yourself
#                      (one process per core, or fewer).
#   PYTHON             interpreter that runs torchrun and the workers; default `python`
#                      (`python3` when there is no `python`). E.g. PYTHON=.venv/bin/python.
#   OMP_NUM_THREADS    threads per process; default 1 (torchrun's own default for N > 1, and the
#                      right value on CPU, where N processes would otherwise fight over the
#                      cores). Kept as is when already set.
#   FUSIONTRAIN_ENTRY  what each process runs instead of `-m fusiontrain train` (split on
#                      whitespace), e.g. FUSIONTRAIN_ENTRY=path/to/script.py. For tests and
#                      debugging.
#   TORCHRUN_ARGS      extra torchrun options (split on whitespace), e.g. "--max-restarts 1".
#
# All arguments are passed to the entry point (config and overrides).
set -euo pipefail

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
    if [[ "$NPROC_PER_NODE" -lt 1 ]]; then
        NPROC_PER_NODE=1
    fi
fi
if ! [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/torchrun.sh: NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'" >&2
    exit 2
fi

if [[ -z "${PYTHON:-}" ]]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

read -r -a ENTRY <<<"${FUSIONTRAIN_ENTRY:--m fusiontrain train}"
read -r -a EXTRA <<<"${TORCHRUN_ARGS:-}"

set -x
exec "$PYTHON" -m torch.distributed.run \
    --standalone \
    --nproc-per-node "$NPROC_PER_NODE" \
    ${EXTRA[@]+"${EXTRA[@]}"} \
    "${ENTRY[@]}" "$@"
