#!/usr/bin/env bash
# Runs every test of Embarcadero-rs, installing what is missing first.
#
#   ./scripts/test.sh
#
# Lints (rustfmt, clippy with warnings as errors), the unit and integration tests of every
# crate (as root also the hugepage and two-process tests), both deterministic simulations
# (scripts/sim.sh: the log core, the whole system) over 1,000 seeds each, the proof that
# they catch each injected fault, a short
# coverage-guided fuzzing run of every parser and the connection state machine, a 4-process
# cluster end to end, a quick latency benchmark, the fault matrix, the kernel-bypass tests, and the attacks of
# scripts/hostile.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_cargo
# kcat, confluent-kafka (librdkafka) and kafka-python: Kafka clients no one here wrote, for
# the Kafka listener's tests (target/kafka-py, KAFKA_PYTHON).
ensure_packages build-essential pkg-config util-linux python3 kcat
ensure_kafka_clients
. scripts/lab.sh
ensure_xdp_build_deps
# 64 pages for the tests, 128 for the 256 MiB cluster pool.
prepare_hugepages 256

echo "== lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release --features client/sim -- -D warnings
# The fuzz crate is its own workspace (built instrumented by scripts/fuzz.sh): lint it too.
cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check
cargo clippy --manifest-path fuzz/Cargo.toml --workspace --all-targets --release \
    --target-dir target/fuzz/check -- -D warnings

echo "== tests"
cargo test --workspace --release
# The vendored smoltcp's TCP tests, with the receive target's (vendor/README.md); its own
# lock file and target directory, as a crate outside the workspace.
cargo test --manifest-path vendor/smoltcp/Cargo.toml --release -q --no-default-features \
    --features std,medium-ip,proto-ipv4,socket-tcp --target-dir target/vendor-smoltcp socket::tcp
cargo test --manifest-path fuzz/Cargo.toml -p fuzz-input --release --target-dir target/fuzz/seeds

echo "== simulations (core and whole system): 1000 seeds each must pass"
# Built first, so that a build failure is never mistaken for a caught fault below.
cargo build --release -q -p shared-log --example sim
cargo build --release -q -p client --features sim --bin sim
mkdir -p target/test
./scripts/sim.sh --seeds 1000
echo "== whole-system simulation: 20 seeds run twice give the same digests"
target/release/sim --seeds 20 --check-determinism

for fault in skip-invalidate skip-flush forget-resend drop-bytes lose-synced; do
    echo "== simulation with --fault $fault: must fail"
    if ./scripts/sim.sh --seeds 100 --fault "$fault" > target/test/sim-fault.log 2>&1; then
        cat target/test/sim-fault.log
        echo "the simulation did not catch --fault $fault" >&2
        exit 1
    fi
    echo "caught: $(grep -c '^FAIL' target/test/sim-fault.log || true) seeds of 100 failed"
done

echo "== fuzz: the wire parsers and the connection state machine, 300,000 inputs per target from the seed corpus, seed 1 (libFuzzer)"
./scripts/fuzz.sh --runs-per-target 300000 --seed 1 --fresh-corpus

echo "== 4 broker processes on one hugetlbfs pool, loadgen end to end (order 5, ack 1)"
cargo build --release -q -p broker -p client
summary=target/test/cluster-e2e.json
mkdir -p target/test
rm -f "$summary"
./scripts/cluster.sh run --brokers 4 --pool-bytes 256M --base-port 9300 --dir target/test/cluster \
    --hold-timeout-ms 10000 -- \
    ./target/release/loadgen --brokers '{brokers}' --test end-to-end --order 5 --ack 1 \
    --message-bytes 1024 --total-bytes 64MiB --connections-per-broker 3 --progress none --json "$summary" >/dev/null
python3 - "$summary" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
bad = {k: s[k] for k in ("lost", "duplicates", "order_violations", "corrupt", "position_gaps") if s[k]}
assert s["passed"] and not bad and s["messages_received"] == s["messages_sent"] > 0, (bad, s["errors"])
print(f"cluster end to end: {s['messages_sent']} messages sent, acked and delivered in order; lost 0, duplicates 0")
PY

echo "== latency benchmark, quick (scripts/bench-latency.sh --quick): every run measured, nothing lost"
./scripts/bench-latency.sh --quick > target/test/bench-latency.log
python3 - target/bench/latency.json <<'PY'
import json, sys
entries = json.load(open(sys.argv[1]))
backends = {e["backend"] for e in entries}
assert {"kernel", "tcp-pingpong", "redis-xadd"} <= backends, backends
paced = [e for e in entries if e["kind"] == "paced"]
assert len(paced) >= 3, paced
for e in paced:
    assert e["passed"] and e["lost"] == 0 and e["msgs_acked"] > 0, e
    assert e["ack_p50_us"] and e["e2e_p50_us"] and e["ack_p50_us"] <= e["ack_p99_us"] <= e["ack_p999_us"], e
noise = [e for e in entries if e["kind"] == "noise"]
assert sorted((e["when"], e["cpu"]) for e in noise) == [("after", 0), ("after", 1), ("before", 0), ("before", 1)], noise
for e in noise:
    assert e["seconds"] > 0 and 0 <= e["lost_pct"] < 100 and e["wait_p99_us"] <= e["wait_p999_us"], e
runs = [e for e in entries if e["kind"] != "noise"]
for e in runs:
    assert e["ack_p50_us"] and e["msgs_acked"] and e["cpu_pinning"] and e["steal_pct"] is not None, e
paced_redis = [e for e in runs if e["backend"] == "redis-xadd" and e["rate_label"] != "closed loop"]
assert paced_redis and all(e["client_cpu_cores"] for e in paced_redis), paced_redis
print(f"latency benchmark (quick): {len(runs)} runs, {len(paced)} paced, none lost; the noise of both CPUs")
PY

echo "== fault matrix: kills, pause, restart and pool loss under order 5, ack 2 (scripts/faults.sh)"
./scripts/faults.sh --duration-s 6

echo "== kernel-bypass backend (XDP + AF_XDP + smoltcp) in network namespaces"
cargo build --release -q -p xdp-prog
./scripts/test-bypass.sh all

echo "== hostile clients and operators against live clusters, each beside a checked loadgen run (scripts/hostile.sh)"
./scripts/hostile.sh

echo "== all tests passed"
