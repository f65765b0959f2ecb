#!/usr/bin/env bash
# The Embarcadero-rs demonstration, installing what is missing first.
#
#   ./scripts/demo.sh [LOADGEN ARGS...]
#
# Builds in release, reserves hugepages when it can (and says so when it cannot), starts a
# local cluster of 4 broker processes on loopback sharing one pool, and runs the load
# generator end to end against it: 1 KiB messages, order 5, ack 1, 3 connections per broker,
# a subscriber verifying every message (content, exactly once, order). Prints the table and
# leaves the JSON summary at target/demo/summary.json. Extra arguments go to the load
# generator (see target/release/loadgen --help), e.g. --duration-s 30 or --order 2.
# As root it then runs the kernel-bypass path too (4 brokers over XDP in network
# namespaces, end to end).
# Exits non-zero when the run lost, duplicated or misordered anything.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_cargo
ensure_packages build-essential pkg-config util-linux curl
. scripts/lab.sh
ensure_xdp_build_deps
# 1 GiB pool: 512 pages of 2 MiB, and some room.
prepare_hugepages 600

echo "== building (release)"
cargo build --release -q -p broker -p client

mkdir -p target/demo
defaults=()
if [[ " $* " != *" --total-bytes "* && " $* " != *" --duration-s "* ]]; then
    defaults+=(--total-bytes 512MiB)
fi
echo "== 4 brokers, load generator end to end"
./scripts/cluster.sh run --brokers 4 --dir target/demo/cluster -- \
    ./target/release/loadgen --brokers '{brokers}' --test end-to-end --order 5 --ack 1 \
    --message-bytes 1024 --connections-per-broker 3 --json target/demo/summary.json \
    "${defaults[@]}" "$@"
echo "== summary: target/demo/summary.json; broker logs: target/demo/cluster/"

# The kernel-bypass path: 4 brokers, each in its own network namespace, taking publisher
# traffic through XDP + AF_XDP + smoltcp.
if [[ $(id -u) -eq 0 ]]; then
    echo "== the same over the kernel-bypass path (XDP, AF_XDP, smoltcp), in network namespaces"
    cargo build --release -q -p xdp-prog
    ./scripts/test-bypass.sh e2e
else
    echo "== skipping the kernel-bypass path: it needs root (network namespaces, XDP)"
fi
