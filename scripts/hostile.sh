#!/usr/bin/env bash
# Attacks on live clusters, each next to a real loadgen end-to-end run (a subscriber checks
# every message: content, exactly once, order), against a baseline run without attackers
# measured in the same script:
#
#   scripts/hostile.sh [--duration-s S] [--kernel-only] [--base-port P] [--out DIR]
#
# Kernel backend, 2 broker processes on loopback (ports P, P+1, metrics P+100, P+101;
# default P = 9400; a broker started by an attack takes P+50 and P+51):
#   slowloris           4 publishers trickle a 64 KiB batch, 1 byte/s, on the loadgen's topic
#   silent              200 connections that never send a byte (from 127.0.0.2)
#   stalled-subscriber  a subscriber from position 0 of the loadgen's topic that never reads
#   topic-spam          Hellos naming 20 made-up topics
#   metrics-silent      200 silent connections to the metrics endpoint, scraped meanwhile
#   late-subscriber     a subscriber from position 0 of a topic whose log has wrapped
#   format-live-pool    `broker --head --format` on the pool the cluster uses
#   duplicate-id        a second broker with the id of a live one
#   kafka-garbage       on the head's Kafka listener (port P+200): requests of a negative and an
#                       oversize length, for an unknown API, with a cut header, claiming 2^31
#                       topics (each closed),
#                       a client that never reads its responses (left open, no longer read),
#                       then a fresh client's ApiVersions (answered)
#   kafka-hoard         16 Kafka connections with 32 Fetches each waiting on the offsets topic,
#                       never read, while another commits offsets for a new group each time
#                       (every commit acknowledged, the hoarders left open, a fresh client's
#                       ApiVersions answered)
# XDP backend (as root), in the namespace lab: the SYN flood and the host's own traffic
# (scripts/test-bypass.sh syn-flood and host-traffic), and slowloris over XDP.
#
# Writes DIR/summary.json (default target/hostile): one entry per attack with attack, backend, passed,
# loadgen_passed, lost, duplicates, order_violations, mb_per_s, ack_p99_us, the baseline's
# mb_per_s and ack_p99_us, throughput_ratio, expected (what the attacker must get) and
# attacker (what it got). Exits 1 if any attack did not pass. Builds nothing: run
#   cargo build --release -p broker -p client -p xdp-prog
# first (CARGO_TARGET_DIR honoured). Assertions are on JSON and exit codes only.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}/release
duration=4
kernel_only=0
base_port=9400
out=target/hostile
while [[ $# -gt 0 ]]; do
    case $1 in
        --duration-s) duration=$2; shift 2 ;;
        --kernel-only) kernel_only=1; shift ;;
        --base-port) base_port=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "hostile: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for bin in broker loadgen hostile; do
    [[ -x $target/$bin ]] || { echo "missing $target/$bin: cargo build --release -p broker -p client" >&2; exit 2; }
done

rm -rf "$out"
mkdir -p "$out"
cluster_dir=$out/cluster
head=127.0.0.1:$base_port
metrics=127.0.0.1:$((base_port + 100))
pids=()

cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    scripts/cluster.sh stop --dir "$cluster_dir" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Room for a topic per run and the Kafka listener's offsets topic (payload logs of ~8 MiB
# per broker); the deadlines of a broker
# facing the network, at their defaults except the Hello deadline (2 s, so the run stays
# short).
scripts/cluster.sh start --brokers 2 --base-port "$base_port" --pool-bytes 256M \
    --dir "$cluster_dir" --hold-timeout-ms 10000 \
    --kafka-base-port $((base_port + 200)) \
    --broker-args "--topics-max 12 --goi-entries 65536 --hello-timeout-ms 2000" >/dev/null
brokers=$(cat "$cluster_dir/brokers")
pool=$(cat "$cluster_dir/pool")

# loadgen NAME TOPIC: an end-to-end run on TOPIC; its JSON in $out/NAME-loadgen.json. At
# order 5 a broker's payload log must hold what one session has in flight there (else a
# batch that lost the race for room waits out the gap timeout): 16 batches of 64 KiB per
# connection.
loadgen() {
    timeout 120 "$target/loadgen" --brokers "$brokers" --topic "$2" --test end-to-end \
        --order 5 --ack 1 --message-bytes 1024 --duration-s "$duration" \
        --connections-per-broker 2 --in-flight-batches 16 --progress none \
        --json "$out/$1-loadgen.json" \
        >"$out/$1-loadgen.log" 2>&1 || true
}

# attack NAME EXPECTED -- ATTACK COMMAND...: runs the attack in the background next to a
# loadgen run on topic hostile-NAME, then records both.
attack() {
    local name=$1 expected=$2
    shift 3
    echo "== $name"
    "$@" --json "$out/$name-attacker.json" >"$out/$name-attacker.log" 2>&1 &
    local attacker=$!
    pids+=("$attacker")
    sleep 0.5
    loadgen "$name" "hostile-$name"
    wait "$attacker" || true
    echo "$name $expected" >>"$out/attacks"
}

echo "== baseline: no attacker"
loadgen baseline hostile-baseline

attack slowloris 'outcomes.DeadlineExpired == 4' -- \
    "$target/hostile" slowloris --broker "$head" --create-on "$brokers" --topic hostile-slowloris --connections 4 \
    --duration-s $((duration + 2))
attack silent 'outcomes.DeadlineExpired == 64 and outcomes.ConnectionLimit == 136 and last_answer_s < 4' -- \
    "$target/hostile" --source-ip 127.0.0.2 silent --broker "$head" --connections 200 \
    --duration-s $((duration + 2))
attack stalled-subscriber 'outcomes.PositionTruncated == 1' -- \
    "$target/hostile" stalled-subscriber --broker "$head" --create-on "$brokers" --topic hostile-stalled-subscriber \
    --duration-s $((duration + 2))
attack topic-spam 'outcomes.UnknownTopic == 20' -- \
    "$target/hostile" topic-spam --broker "$head" --count 20
attack metrics-silent 'scrapes_failed == 0 and scrapes_ok > 0 and silent_closed_by_endpoint == silent_connections' -- \
    "$target/hostile" metrics-silent --metrics "$metrics" --connections 200 \
    --duration-s $((duration + 1))
attack late-subscriber 'from_zero == "PositionTruncated" and log_start > 0 and first_delivery_from_log_start == log_start' -- \
    "$target/hostile" late-subscriber --broker "$head" --topic hostile-baseline
attack kafka-garbage 'malformed_closed == 5 and unread_left_open and unread_requests_sent > 0 and fresh_answered' -- \
    "$target/hostile" kafka-garbage --kafka 127.0.0.1:$((base_port + 200)) --duration-s "$duration"
attack kafka-hoard 'hoarders_open == hoarders and commits_acked > 0 and commits_refused == 0 and fresh_answered' -- \
    "$target/hostile" kafka-hoard --kafka 127.0.0.1:$((base_port + 200)) --connections 16 \
    --duration-s "$duration"

# Operator mistakes: each command must be refused with its exit code (broker --help: 4
# --format of a live pool, 3 an id a live broker holds) while the cluster runs on.
operator() {
    local name=$1 expected_code=$2
    shift 2
    echo "== $name"
    local status=0
    timeout 30 "$@" >"$out/$name-attacker.log" 2>&1 &
    local command=$!
    loadgen "$name" "hostile-$name"
    wait "$command" || status=$?
    printf '{"exit_code": %d}\n' "$status" >"$out/$name-attacker.json"
    echo "$name exit_code == $expected_code" >>"$out/attacks"
}
operator format-live-pool 4 "$target/broker" --id 3 --head --format --pool "$pool" \
    --pool-bytes 128M --brokers-max 4 --listen 127.0.0.1:$((base_port + 50)) \
    --allow-shm-fallback
operator duplicate-id 3 "$target/broker" --id 1 --pool "$pool" \
    --listen 127.0.0.1:$((base_port + 51)) --allow-shm-fallback

scripts/cluster.sh stop --dir "$cluster_dir" >/dev/null

if [[ $kernel_only -eq 0 && $(id -u) -eq 0 ]]; then
    for case in syn-flood host-traffic slowloris; do
        echo "== xdp: $case"
        status=0
        TEST_BYPASS_JSON_DIR=$out/xdp scripts/test-bypass.sh "$case" >"$out/xdp-$case.log" 2>&1 || status=$?
        printf '{"exit_code": %d}\n' "$status" >"$out/xdp-$case-attacker.json"
    done
elif [[ $kernel_only -eq 0 ]]; then
    echo "skipped: the XDP attacks need root (network namespaces, XDP)"
fi

python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

class Fields(dict):
    """Names and attributes with 0 for a missing count, so rules read like `outcomes.X == 4`."""
    def __getitem__(self, name):
        value = self.get(name, 0)
        return Fields(value) if isinstance(value, dict) else value
    __getattr__ = __getitem__

baseline = load(f"{out}/baseline-loadgen.json") or {}
entries = []
def loadgen_fields(s):
    s = s or {}
    bad = {k: s.get(k, 0) for k in ("lost", "duplicates", "order_violations", "corrupt")}
    return {
        "loadgen_passed": bool(s.get("passed")) and not any(bad.values())
            and s.get("messages_received", 0) == s.get("messages_sent", -1) > 0,
        "lost": bad["lost"], "duplicates": bad["duplicates"],
        "order_violations": bad["order_violations"],
        "mb_per_s": s.get("mb_per_s", 0.0),
        "ack_p99_us": s.get("ack_latency_us", {}).get("p99", 0),
        "loadgen_errors": s.get("errors", []),
    }

base = loadgen_fields(baseline)
for line in open(f"{out}/attacks"):
    name, rule = line.strip().split(" ", 1)
    attacker = load(f"{out}/{name}-attacker.json")
    entry = {"attack": name, "backend": "kernel", "expected": rule, "attacker": attacker}
    entry.update(loadgen_fields(load(f"{out}/{name}-loadgen.json")))
    entry["baseline_mb_per_s"] = base["mb_per_s"]
    entry["baseline_ack_p99_us"] = base["ack_p99_us"]
    entry["throughput_ratio"] = round(entry["mb_per_s"] / base["mb_per_s"], 3) if base["mb_per_s"] else 0.0
    try:
        got = attacker is not None and bool(eval(rule, {}, Fields(attacker)))
    except Exception as error:
        got = False
        entry["rule_error"] = str(error)
    entry["attacker_as_expected"] = got
    # A 2-core machine shares its CPUs with the attacker: a loose floor on throughput.
    entry["passed"] = got and entry["loadgen_passed"] and entry["throughput_ratio"] >= 0.2
    entries.append(entry)

for case in ("syn-flood", "host-traffic", "slowloris"):
    attacker = load(f"{out}/xdp-{case}-attacker.json")
    if attacker is None:
        continue
    details = load(f"{out}/xdp/{case}.json")
    entry = {"attack": case, "backend": "xdp", "expected": "scripts/test-bypass.sh " + case + " passes",
             "attacker": attacker, "details": details, "passed": attacker.get("exit_code") == 0}
    if details:
        for key in ("loadgen_passed", "lost", "duplicates", "order_violations", "mb_per_s",
                    "ack_p99_us", "baseline_mb_per_s", "baseline_ack_p99_us", "throughput_ratio"):
            if key in details:
                entry[key] = details[key]
    entries.append(entry)

summary = {"baseline": base, "attacks": entries, "passed": all(e["passed"] for e in entries)}
with open(f"{out}/summary.json", "w") as f:
    json.dump(summary, f, indent=2)
print(f"baseline: {base['mb_per_s']:.0f} MB/s, ack p99 {base['ack_p99_us']} us, loadgen passed: {base['loadgen_passed']}")
for e in entries:
    print(f"{'PASS' if e['passed'] else 'FAIL'} {e['backend']:6} {e['attack']:20} "
          f"loadgen {'ok' if e.get('loadgen_passed') else 'FAILED'}, "
          f"{e.get('mb_per_s', 0):.0f} MB/s (x{e.get('throughput_ratio', 0)}), "
          f"attacker got {json.dumps(e['attacker'])}")
sys.exit(0 if summary["passed"] and base["loadgen_passed"] else 1)
PY
