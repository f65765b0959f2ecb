#!/usr/bin/env bash
# Runs every test of Embarcadero-rs, installing what is missing first.
#
#   ./scripts/test.sh
#
# Lints (rustfmt, clippy with warnings as errors), the unit and integration tests of every
# crate (as root also the hugepage and two-process tests), the deterministic simulation over
# 1,000 seeds, and the proof that the simulation catches each injected coherence fault.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_cargo
ensure_packages build-essential pkg-config util-linux
. scripts/lab.sh
ensure_xdp_build_deps
prepare_hugepages 64

echo "== lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings

echo "== tests"
cargo test --workspace --release

echo "== simulation: 1000 seeds must pass"
# Built first, so that a build failure is never mistaken for a caught fault below.
cargo build --release -q -p broker --example sim
sim=target/release/examples/sim
"$sim" --seeds 1000 --quiet

for fault in skip-invalidate skip-flush; do
    echo "== simulation with --fault $fault: must fail (the FAIL lines below are the expected catches)"
    if "$sim" --seeds 50 --quiet --fault "$fault"; then
        echo "the simulation did not catch --fault $fault" >&2
        exit 1
    fi
done
echo "== all tests passed"
