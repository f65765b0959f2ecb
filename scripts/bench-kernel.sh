#!/usr/bin/env bash
# Benchmark of the kernel-TCP brokers on loopback, against iperf3 in the same run.
#
#   ./scripts/bench-kernel.sh [--duration-s N] [--base-port P] [--pool PATH]
#
# Runs, pinned (brokers on CPU 1, load generator and iperf3 client on CPU 0, iperf3 server
# on CPU 1), each for --duration-s (default 10):
#   1. iperf3 -P 12 on loopback: the ceiling of kernel TCP here;
#   2. the load generator against a 4-broker cluster: 1 KiB messages, order 5, ack 1,
#      publish test, over 1 connection (to the head), 4 (one per broker) and 12 (three per
#      broker);
#   3. ack latency at about 10% of the 12-connection throughput (paced);
#   4. end to end: 4 brokers x 3 connections with a subscriber (on broker 0, in the
#      loadgen) verifying every message: content, exactly once, order.
# Writes target/bench/kernel.json, a list of entries, one per run: test ("iperf3",
# "publish", "end-to-end"), run (iperf3, conn1, conn4, conn12, paced, end-to-end),
# brokers (the brokers published to), connections, mb_per_s, ratio_to_iperf3,
# loadgen_cpu_s_per_gb (the loadgen's user + system CPU seconds per GB acknowledged; null
# for iperf3), lost / duplicates / order_violations (the subscriber's counts; null where
# nothing subscribed), passed (the loadgen's verdict), ack_latency_us, msgs_per_s,
# rate_msgs_per_s, order, ack, message_bytes, and cpu_steal_percent (of the whole script
# run). Prints a table. A benchmark, not a test: it asserts nothing about speed, it reports.
# --base-port P: brokers on 127.0.0.1:P+i, metrics on P+100+i, iperf3 on P+200 (default
# 9100); --pool PATH: the brokers' pool file (default scripts/cluster.sh's).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

duration=10
base_port=9100
pool_args=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --duration-s) duration=$2; shift 2 ;;
        --base-port) base_port=$2; shift 2 ;;
        --pool) pool_args=(--pool "$2"); shift 2 ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-kernel: unknown option $1" >&2; exit 2 ;;
    esac
done
[[ $base_port =~ ^[0-9]+$ && $base_port -ge 1 && $((base_port + 200)) -le 65535 ]] ||
    { echo "bench-kernel: --base-port needs a port P with P + 200 <= 65535, got '$base_port'" >&2; exit 2; }
iperf_port=$((base_port + 200))

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

echo "== iperf3 -P 12, loopback, ${duration}s (server CPU 1, client CPU 0); load average $(cut -d' ' -f1-3 /proc/loadavg)"
taskset -c 1 iperf3 -s -1 -p "$iperf_port" >/dev/null 2>&1 &
iperf_server=$!
sleep 0.5
taskset -c 0 iperf3 -c 127.0.0.1 -p "$iperf_port" -P 12 -t "$duration" -J > "$out/iperf3.json"
wait "$iperf_server" || true

run_loadgen() {  # name, extra loadgen args... (--single-broker: publish to the head only)
    local name=$1; shift
    local targets='{brokers}'
    if [[ ${1:-} == --single-broker ]]; then
        targets=127.0.0.1:$base_port
        shift
    fi
    echo "== loadgen $name"
    # The loadgen exits non-zero when its checks fail; the JSON says so, and the table shows it.
    ./scripts/cluster.sh run --brokers 4 --cpus 1 --base-port "$base_port" "${pool_args[@]}" --dir "$out/cluster-$name" -- \
        taskset -c 0 ./target/release/loadgen --brokers "$targets" --order 5 --ack 1 \
        --message-bytes 1024 --duration-s "$duration" --progress none --json "$out/$name.json" "$@" \
        | grep -E "connections \(total\)|throughput MB|ack latency|lost|order violations" || true
}
run_loadgen conn1 --single-broker --test publish --connections-per-broker 1
run_loadgen conn4 --test publish --connections-per-broker 1
run_loadgen conn12 --test publish --connections-per-broker 3
peak_msgs=$(python3 -c "import json; print(int(json.load(open('$out/conn12.json'))['msgs_per_s']))")
rate=$((peak_msgs / 10))
run_loadgen paced --test publish --connections-per-broker 3 --rate-msgs-per-s "$rate"
run_loadgen end-to-end --test end-to-end --connections-per-broker 3

steal_after=$(awk '/^cpu /{print $9; exit}' /proc/stat)
total_after=$(awk '/^cpu /{s=0; for(i=2;i<=NF;i++) s+=$i; print s; exit}' /proc/stat)
steal_pct=$(( 100 * (steal_after - steal_before) / (total_after - total_before) ))

python3 - "$out" "$steal_pct" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, sys
out, steal, loadavg = sys.argv[1], int(sys.argv[2]), sys.argv[3]
iperf_json = json.load(open(f"{out}/iperf3.json"))
iperf = iperf_json["end"]["sum_received"]["bits_per_second"] / 8e6
entries = [{"test": "iperf3", "run": "iperf3", "brokers": 0, "connections": 12, "mb_per_s": round(iperf, 1),
            "ratio_to_iperf3": 1.0, "loadgen_cpu_s_per_gb": None, "lost": None, "duplicates": None,
            "order_violations": None, "passed": True, "cpu_steal_percent": steal}]
labels = {"conn1": "1 broker x 1 conn (1)", "conn4": "4 brokers x 1 conn (4)", "conn12": "4 brokers x 3 conns (12)",
          "paced": "12 conns, paced at ~10% of peak", "end-to-end": "end to end, 12 conns, verified"}
for name in labels:
    try:
        r = json.load(open(f"{out}/{name}.json"))
    except (OSError, ValueError) as error:
        sys.exit(f"bench-kernel: the {name} run left no summary ({error}): see its output above and {out}/cluster-{name}/")
    gb = r["bytes_acked"] / 1e9
    checked = r["test"] in ("end-to-end", "latency")
    entries.append({
        "test": r["test"], "run": name, "brokers": len(r["brokers"]), "connections": r["connections"],
        "mb_per_s": r["mb_per_s"], "ratio_to_iperf3": round(r["mb_per_s"] / iperf, 3),
        "loadgen_cpu_s_per_gb": round(r["loadgen_cpu_cores"] * r["seconds"] / gb, 3) if gb else None,
        "lost": r["lost"] if checked else None, "duplicates": r["duplicates"] if checked else None,
        "order_violations": r["order_violations"] if checked else None, "passed": r["passed"],
        "ack_latency_us": r["ack_latency_us"], "msgs_per_s": r["msgs_per_s"], "rate_msgs_per_s": r["rate_msgs_per_s"],
        "order": r["order"], "ack": r["ack"], "message_bytes": r["message_bytes"], "cpu_steal_percent": steal})
print(f"\n{'run':<34} {'MB/s':>9} {'x iperf3':>9} {'ack p50 us':>11} {'ack p99 us':>11} {'loadgen s/GB':>13} {'lost/dup/order':>15}")
print(f"{'iperf3 -P 12 loopback':<34} {iperf:>9.1f} {1.0:>9.2f} {'-':>11} {'-':>11} {'-':>13} {'-':>15}")
for e in entries[1:]:
    lat = e["ack_latency_us"]
    checks = "-" if e["lost"] is None else f"{e['lost']}/{e['duplicates']}/{e['order_violations']}"
    print(f"{labels[e['run']]:<34} {e['mb_per_s']:>9.1f} {e['ratio_to_iperf3']:>9.2f} {lat.get('p50', '-'):>11} "
          f"{lat.get('p99', '-'):>11} {str(e['loadgen_cpu_s_per_gb']):>13} {checks:>15}" + ("" if e["passed"] else "  FAILED"))
print(f"CPU steal during the run: {steal}%" + ("  (above 10%: the host is busy, figures are not trustworthy)" if steal > 10 else "")
      + f"; load average at the end: {loadavg}")
json.dump(entries, open(f"{out}/kernel.json", "w"), indent=2)
print(f"\nwrote {out}/kernel.json")
PY
