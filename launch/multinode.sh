#!/usr/bin/env bash
# Several nodes, N processes each: run this once on every node (same arguments everywhere).
# The nodes meet in a c10d rendezvous hosted by NODE_RANK=0 at MASTER_ADDR:MASTER_PORT.
#
#   # on the first node (its address is 10.0.0.1):
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 launch/multinode.sh --config configs/X.yaml
#   # on the second node:
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 NPROC_PER_NODE=8 launch/multinode.sh --config configs/X.yaml
#
# Required environment:
#   MASTER_ADDR     address (IP or hostname) of the NODE_RANK=0 node, reachable from every node.
#   NNODES          number of nodes ("MIN:MAX" for an elastic range also works).
#   NODE_RANK       0..NNODES-1. Node 0 hosts the rendezvous store; the others connect to it.
#                   With c10d the global ranks of a node's processes are assigned by the
#                   rendezvous (ordered by hostname), NOT by NODE_RANK; only the static backend
#                   maps NODE_RANK to ranks NODE_RANK*NPROC_PER_NODE...
#   NPROC_PER_NODE  processes per node (GPUs per node; on CPU, cores or fewer).
# Optional environment:
#   MASTER_PORT        rendezvous port on MASTER_ADDR; default 29500.
#   RDZV_ID            rendezvous id, the same on every node of one job; default "fusiontrain".
#                      Use a fresh one per job (e.g. the scheduler's job id).
#   RDZV_BACKEND       c10d (default) or static (fixed ranks from NODE_RANK, no elasticity).
#   RDZV_CONF          extra c10d rendezvous settings, e.g. "join_timeout=900,read_timeout=120".
#   PYTHON             interpreter; default `python` (`python3` when there is no `python`).
#   OMP_NUM_THREADS    threads per process; default 1, kept when already set.
#   FUSIONTRAIN_ENTRY  what each process runs instead of `-m fusiontrain train` (split on
#                      whitespace), e.g. FUSIONTRAIN_ENTRY=path/to/script.py.
#   TORCHRUN_ARGS      extra torchrun options (split on whitespace), e.g. "--max-restarts 2".
#
# All arguments are passed to the entry point (config and overrides).
set -euo pipefail

die() {
    echo "launch/multinode.sh: $*" >&2
    exit 2
}

missing=()
for var in MASTER_ADDR NNODES NODE_RANK NPROC_PER_NODE; do
    [[ -n "${!var:-}" ]] || missing+=("$var")
done
if ((${#missing[@]})); then
    die "set ${missing[*]} (MASTER_ADDR: address of node 0; NNODES: node count; NODE_RANK: 0..NNODES-1; NPROC_PER_NODE: processes per node)"
fi
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-fusiontrain}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"

[[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "NNODES must be a positive integer (or MIN:MAX), got '$NNODES'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] || die "NODE_RANK must be a non-negative integer, got '$NODE_RANK'"
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'"
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] && ((MASTER_PORT > 0 && MASTER_PORT < 65536)) ||
    die "MASTER_PORT must be a TCP port, got '$MASTER_PORT'"
if ((NODE_RANK >= ${NNODES##*:})); then
    die "NODE_RANK ($NODE_RANK) must be below NNODES ($NNODES)"
fi

if [[ -z "${PYTHON:-}" ]]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

read -r -a ENTRY <<<"${FUSIONTRAIN_ENTRY:--m fusiontrain train}"
read -r -a EXTRA <<<"${TORCHRUN_ARGS:-}"

case "$RDZV_BACKEND" in
c10d)
    # Node 0 hosts the rendezvous store, every other node is a client. (torchrun's own guess
    # - "host it if MASTER_ADDR is one of my addresses" - is ambiguous when several nodes
    # share a machine, as in tests on 127.0.0.1.) --node-rank is not passed: c10d ignores it.
    is_host=$([[ "$NODE_RANK" == 0 ]] && echo 1 || echo 0)
    RDZV_ARGS=(
        --rdzv-backend c10d
        --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
        --rdzv-id "$RDZV_ID"
        --rdzv-conf "is_host=$is_host${RDZV_CONF:+,$RDZV_CONF}"
    )
    ;;
static)
    RDZV_ARGS=(
        --rdzv-backend static
        --node-rank "$NODE_RANK"
        --master-addr "$MASTER_ADDR"
        --master-port "$MASTER_PORT"
    )
    ;;
*)
    die "RDZV_BACKEND must be c10d or static, got '$RDZV_BACKEND'"
    ;;
esac

set -x
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --nproc-per-node "$NPROC_PER_NODE" \
    "${RDZV_ARGS[@]}" \
    ${EXTRA[@]+"${EXTRA[@]}"} \
    "${ENTRY[@]}" "$@"
