#!/usr/bin/env bash
# Runs the Embarcadero-rs demonstration, installing what is missing first.
#
#   ./scripts/demo.sh
#
# Today this runs the log core in one process (the brokers' network front ends and the load
# generator arrive with the kernel-TCP issue): the deterministic simulation of brokers,
# sequencer and readers on the simulated coherence model, and the core benchmark on real
# memory with the real cache-line instructions, pinned to one core. Figures are printed and
# left in target/bench/core.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_cargo
ensure_packages build-essential pkg-config util-linux
. scripts/lab.sh
ensure_xdp_build_deps
prepare_hugepages 64

echo "== simulation: 200 seeds of brokers, sequencer and readers on the simulated coherence model"
cargo run --release -q -p broker --example sim -- --seeds 200
echo "== log core benchmark (noncoherent: real clwb/clflushopt/mfence)"
cargo bench -q -p broker --bench core
