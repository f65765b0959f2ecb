#!/usr/bin/env bash
# Benchmark of the kernel-TCP brokers on loopback, against iperf3 in the same run.
#
#   ./scripts/bench-kernel.sh [--duration-s N]
#
# Runs, pinned (brokers on CPU 1, load generator and iperf3 client on CPU 0, iperf3 server
# on CPU 1):
#   1. iperf3 -P 12 on loopback: the ceiling of kernel TCP here;
#   2. the load generator against a 4-broker cluster: 1 KiB messages, order 5, ack 1,
#      publish test, over 1 connection (to the head), 4 (one per broker) and 12 (three per
#      broker);
#   3. ack latency at about 10% of the 12-connection throughput (paced).
# Prints a table and writes target/bench/kernel.json. A benchmark, not a test: it asserts
# nothing about speed, it reports.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

duration=10
while [[ $# -gt 0 ]]; do
    case $1 in
        --duration-s) duration=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-kernel: unknown option $1" >&2; exit 2 ;;
    esac
done

ensure_cargo
ensure_packages iperf3 util-linux python3
. scripts/lab.sh
ensure_xdp_build_deps
prepare_hugepages 600
cargo build --release -q -p broker -p client
out=target/bench
mkdir -p "$out"

# Steal time (the hypervisor running other guests on our CPUs) makes figures meaningless;
# it is measured over the whole run and reported with them.
steal_before=$(awk '/^cpu /{print $9; exit}' /proc/stat)
total_before=$(awk '/^cpu /{s=0; for(i=2;i<=NF;i++) s+=$i; print s; exit}' /proc/stat)

echo "== iperf3 -P 12, loopback, ${duration}s (server CPU 1, client CPU 0)"
taskset -c 1 iperf3 -s -1 -p 5299 >/dev/null 2>&1 &
iperf_server=$!
sleep 0.5
taskset -c 0 iperf3 -c 127.0.0.1 -p 5299 -P 12 -t "$duration" -J > "$out/iperf3.json"
wait "$iperf_server" || true

run_loadgen() {  # name, extra loadgen args... (--single-broker: publish to the head only)
    local name=$1; shift
    local targets='{brokers}'
    if [[ ${1:-} == --single-broker ]]; then
        targets=127.0.0.1:9100
        shift
    fi
    echo "== loadgen $name"
    ./scripts/cluster.sh run --brokers 4 --cpus 1 --dir "$out/cluster-$name" -- \
        taskset -c 0 ./target/release/loadgen --brokers "$targets" --test publish --order 5 --ack 1 \
        --message-bytes 1024 --duration-s "$duration" --progress none --json "$out/$name.json" "$@" \
        | grep -E "connections \(total\)|throughput MB|ack latency"
}
run_loadgen conn1 --single-broker --connections-per-broker 1
run_loadgen conn4 --connections-per-broker 1
run_loadgen conn12 --connections-per-broker 3
peak_msgs=$(python3 -c "import json; print(int(json.load(open('$out/conn12.json'))['msgs_per_s']))")
rate=$((peak_msgs / 10))
echo "== loadgen latency at ~10% of peak ($rate msgs/s)"
./scripts/cluster.sh run --brokers 4 --cpus 1 --dir "$out/cluster-latency" -- \
    taskset -c 0 ./target/release/loadgen --brokers '{brokers}' --test publish --order 5 --ack 1 \
    --message-bytes 1024 --duration-s "$duration" --connections-per-broker 3 --rate-msgs-per-s "$rate" \
    --progress none --json "$out/latency.json" | grep -E "throughput MB|ack latency"

steal_after=$(awk '/^cpu /{print $9; exit}' /proc/stat)
total_after=$(awk '/^cpu /{s=0; for(i=2;i<=NF;i++) s+=$i; print s; exit}' /proc/stat)
steal_pct=$(( 100 * (steal_after - steal_before) / (total_after - total_before) ))

python3 - "$out" "$steal_pct" <<'PY'
import json, sys
out, steal = sys.argv[1], int(sys.argv[2])
iperf = json.load(open(f"{out}/iperf3.json"))["end"]["sum_received"]["bits_per_second"] / 8e6
rows = {name: json.load(open(f"{out}/{name}.json")) for name in ("conn1", "conn4", "conn12", "latency")}
result = {
    "pinning": "brokers and iperf3 server on CPU 1; loadgen and iperf3 client on CPU 0",
    "iperf3_p12_mb_per_s": round(iperf, 1),
    "cpu_steal_percent": steal,
    "runs": [],
}
print(f"\n{'run':<34} {'MB/s':>9} {'x iperf3':>9} {'ack p50 us':>11} {'ack p99 us':>11}")
print(f"{'iperf3 -P 12 loopback':<34} {iperf:>9.1f} {1.0:>9.2f} {'-':>11} {'-':>11}")
for name, label in (("conn1", "1 broker x 1 conn (1)"), ("conn4", "4 brokers x 1 conn (4)"), ("conn12", "4 brokers x 3 conns (12)"), ("latency", "12 conns, paced at ~10% of peak")):
    r = rows[name]
    lat = r["ack_latency_us"]
    print(f"{label:<34} {r['mb_per_s']:>9.1f} {r['mb_per_s'] / iperf:>9.2f} {lat['p50']:>11} {lat['p99']:>11}")
    result["runs"].append({"run": name, "connections": r["connections"], "mb_per_s": r["mb_per_s"],
                           "ratio_to_iperf3": round(r["mb_per_s"] / iperf, 3), "msgs_per_s": r["msgs_per_s"],
                           "ack_latency_us": lat, "order": r["order"], "ack": r["ack"], "message_bytes": r["message_bytes"]})
print(f"CPU steal during the run: {steal}%" + ("  (above 10%: the host is busy, figures are not trustworthy)" if steal > 10 else ""))
json.dump(result, open(f"{out}/kernel.json", "w"), indent=2)
print(f"\nwrote {out}/kernel.json")
PY
