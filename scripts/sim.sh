#!/usr/bin/env bash
# Runs every deterministic simulation, each seed reproducible on its own:
#   core    the log core (shared-log): brokers' rings, the sequencer and readers on the
#           pool's non-coherent memory model, in random interleavings;
#   system  the whole system (client's `sim`): brokers (their connection state machine),
#           the sequencer with standbys, replicas (ack 2, the pool lost at the end),
#           publishers and subscribers over a simulated network and clock, with resets,
#           crashes and restarts, pauses and partitions.
#
# Usage: scripts/sim.sh [--seeds N] [--seed S] [--fault NAME] [--only core|system]
#   --seeds N   seeds S..S+N-1 of each simulation (default 100)
#   --seed S    first seed (default 0); `--seeds 1 --seed S` reproduces one failing run
#   --fault F   inject a bug; the simulation that knows F runs (and must fail):
#               core: skip-invalidate, skip-flush;
#               system: forget-resend, drop-bytes, lose-synced
#   --only X    run one simulation
# Exits non-zero when any seed fails (each failure is printed with its seed).
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=100 seed=0 fault="" only=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --seeds) seeds=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --fault) fault=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "sim.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $fault in
    "") ;;
    skip-invalidate | skip-flush) only=${only:-core} ;;
    forget-resend | drop-bytes | lose-synced) only=${only:-system} ;;
    *) echo "sim.sh: unknown fault $fault (see --help)" >&2; exit 2 ;;
esac

fault_args=()
[[ -n $fault ]] && fault_args=(--fault "$fault")
status=0
if [[ $only != system ]]; then
    cargo build --release -q -p shared-log --example sim
    target/release/examples/sim --seeds "$seeds" --seed "$seed" --quiet "${fault_args[@]}" || status=1
fi
if [[ $only != core ]]; then
    cargo build --release -q -p client --features sim --bin sim
    target/release/sim --seeds "$seeds" --seed "$seed" "${fault_args[@]}" || status=1
fi
exit $status
