#!/usr/bin/env bash
# Benchmark of the two network backends on the namespace lab link, in one run:
#
#   ./scripts/bench-lab.sh [--duration-s N] [--mtu "1500 3500"] [--gso "on off"]
#                          [--backends "kernel xdp"] [--xdp-mode auto|driver|generic]
#                          [--brokers N] [--client-cc NAME] [--in-flight-batches N]
#                          [--xdp-args "FLAGS"] [--queues N] [--perf-dir DIR]
#                          [--prefix NAME] [--base-port N]
#
# For MTU 1500 and 3500, and the client's GSO/TSO on and off (or the ones named):
#   iperf3 from the client namespace to broker 0's namespace (-P 4): the link's ceiling;
#   4 brokers with --net kernel, then 4 brokers with --net xdp (XDP + AF_XDP + smoltcp),
#   each in its own namespace, driven by the same loadgen run (publish, 1 KiB messages,
#   order 5, ack 1, 3 connections per broker) from the client namespace.
# Reports MB/s, ack latency p50/p99, broker CPU seconds per GB (utime + stime of the broker
# processes over the run), lost/duplicates/order violations, and CPU steal; writes
# target/bench/lab.json (a list of entries; the iperf3 ones have backend "iperf3").
# Each broker's metrics at the end of its run: target/bench/lab-runs/<backend>-<mtu>-<gso>-brokerI.metrics.
# --brokers N runs N brokers instead of 4 (still 3 connections each).
# --client-cc sets the congestion control of the client's routes to the brokers (default
# cubic, Linux's own default, whatever the host uses; "host" keeps the host's).
# net.core.netdev_max_backlog is raised to 10000 for the run (restored on exit): veth
# delivers through the per-CPU backlog, and at 1000 it overflowed, for both backends.
# --in-flight-batches is passed to the load generator (its default: 64 per connection).
# --xdp-mode is passed to the XDP brokers; the default, by-gso, picks generic with the
# client's GSO off (on veth, driver mode copies every frame once more and queues it through
# a 256-entry ring that overflowed) and driver with GSO on (generic mode would get the
# client's 64 KB GSO packets, which do not fit a UMEM frame); see docs/results.md.
# --queues N gives each veth end N queues (lab.sh up --queues; the XDP brokers take all).
# --xdp-args adds broker flags to the XDP brokers, e.g. "--xdp-busy-poll-us 50".
# --perf-dir DIR records `perf record -g -a` (both CPUs) during each broker run into
# DIR/<backend>-<mtu>-<gso>.data (perf must be installed).
# --prefix NAME names the lab's namespaces and pool file (default embbench), --base-port N
# its ports: broker i on N+i, its metrics on N+50+i, iperf3 on N+99 (default: brokers on
# 9500+i, metrics on 9600+i, iperf3 on 5399), so that two runs on one host do not collide.
# Needs root. A benchmark, not a test: it asserts nothing about speed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
. scripts/lab.sh

duration=5
brokers=4
client_cc=cubic
queues=1
loadgen_extra=()
xdp_extra=()
mtus="1500 3500"
gsos="on off"
backends="kernel xdp"
perf_dir=
xdp_mode=by-gso
prefix=embbench
base_port=9500
metrics_port=9600
iperf_port=5399
while [[ $# -gt 0 ]]; do
    case $1 in
        --duration-s) duration=$2; shift 2 ;;
        --mtu) mtus=$2; shift 2 ;;
        --gso) gsos=$2; shift 2 ;;
        --backends) backends=$2; shift 2 ;;
        --perf-dir) perf_dir=$2; shift 2 ;;
        --xdp-mode) xdp_mode=$2; shift 2 ;;
        --brokers) brokers=$2; shift 2 ;;
        --queues) queues=$2; shift 2 ;;
        # shellcheck disable=SC2206 # the flags are separate words
        --xdp-args) xdp_extra+=($2); shift 2 ;;
        --client-cc) client_cc=$2; shift 2 ;;
        --prefix) prefix=$2; shift 2 ;;
        --base-port) base_port=$2; metrics_port=$((base_port + 50)); iperf_port=$((base_port + 99)); shift 2 ;;
        --in-flight-batches) loadgen_extra+=(--in-flight-batches "$2"); shift 2 ;;
        -h|--help) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-lab: unknown option $1" >&2; exit 2 ;;
    esac
done
[[ $(id -u) -eq 0 ]] || { echo "bench-lab: needs root (network namespaces, XDP)" >&2; exit 1; }
ensure_cargo
ensure_packages iperf3 python3
ensure_xdp_build_deps
prepare_hugepages 400
cargo build --release -q -p broker -p client -p xdp-prog

pool=/dev/hugepages/$prefix-pool
out=target/bench
work=$out/lab-runs
mkdir -p "$work"
entries=$work/entries.jsonl
: > "$entries"
pids=()

stop_brokers() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}
backlog_before=$(sysctl -n net.core.netdev_max_backlog)
cleanup() {
    sysctl -q -w net.core.netdev_max_backlog="$backlog_before" || true
    stop_brokers
    scripts/lab.sh down --prefix "$prefix" >/dev/null 2>&1 || true
    rm -f "$pool"
}
trap cleanup EXIT
[[ $backlog_before -ge 10000 ]] || sysctl -q -w net.core.netdev_max_backlog=10000

steal_total() { awk '/^cpu /{s=0; for(i=2;i<=NF;i++) s+=$i; print $9, s; exit}' /proc/stat; }
cpu_ticks() {  # utime+stime of the given PIDs
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

xdp_mode_for() {  # gso
    if [[ $xdp_mode != by-gso ]]; then echo "$xdp_mode"
    elif [[ $1 == off ]]; then echo generic
    else echo driver
    fi
}

start_brokers() {  # backend gso
    local backend=$1 i mode
    mode=$(xdp_mode_for "$2")
    for ((i = 0; i < brokers; i++)); do
        local args=(--net "$backend" --id "$i" --pool "$pool" --listen "10.77.$i.2:$((base_port + i))" --idle sleep
            --metrics "10.77.$i.2:$((metrics_port + i))")
        [[ $backend == xdp ]] && args+=(--iface "$prefix-b$i" --xdp-mode "$mode" --cores 1 "${xdp_extra[@]}")
        [[ $i -eq 0 ]] && args+=(--head --format --pool-bytes 512M)
        ip netns exec "$prefix-broker$i" taskset -c 1 target/release/broker "${args[@]}" \
            > "$work/broker$i.log" 2>&1 &
        pids+=($!)
        if [[ $i -eq 0 ]]; then
            for _ in $(seq 100); do grep -q "^listening on" "$work/broker0.log" && break; sleep 0.1; done
        fi
    done
    for ((i = 0; i < brokers; i++)); do
        for _ in $(seq 100); do grep -q "^listening on" "$work/broker$i.log" && break; sleep 0.1; done
        grep -q "^listening on" "$work/broker$i.log" || { tail -5 "$work/broker$i.log"; echo "broker $i did not start" >&2; exit 1; }
    done
}

run_backend() {  # backend mtu gso
    local backend=$1 mtu=$2 gso=$3 list=() i
    for ((i = 0; i < brokers; i++)); do list+=("10.77.$i.2:$((base_port + i))"); done
    start_brokers "$backend" "$gso"
    local before after json=$work/$backend-$mtu-$gso.json
    before=$(cpu_ticks "${pids[@]}")
    local perf_pid=
    if [[ -n $perf_dir ]]; then
        mkdir -p "$perf_dir"
        perf record -q -g -a -o "$perf_dir/$backend-$mtu-$gso.data" -- sleep "$duration" > /dev/null 2>&1 &
        perf_pid=$!
    fi
    ip netns exec "$prefix-client" taskset -c 0 target/release/loadgen --test publish --order 5 --ack 1 \
        --message-bytes 1024 --connections-per-broker 3 --duration-s "$duration" --progress none "${loadgen_extra[@]}" \
        --backend-label "$backend" --brokers "$(IFS=,; echo "${list[*]}")" --json "$json" > "$work/loadgen.log" 2>&1 ||
        echo "  (loadgen exited non-zero: see $work/loadgen.log)"
    after=$(cpu_ticks "${pids[@]}")
    for ((i = 0; i < brokers; i++)); do
        ip netns exec "$prefix-broker$i" python3 -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())" \
            "http://10.77.$i.2:$((metrics_port + i))/metrics" > "$work/$backend-$mtu-$gso-broker$i.metrics" 2>&1 || true
    done
    [[ -z $perf_pid ]] || wait "$perf_pid" || true
    stop_brokers
    rm -f "$pool"
    local mode=-
    [[ $backend != xdp ]] || mode=$(xdp_mode_for "$gso")
    python3 - "$json" "$backend" "$mtu" "$gso" "$((after - before))" "$(getconf CLK_TCK)" "$mode" "$client_cc" >> "$entries" <<'PY'
import json, sys
path, backend, mtu, gso, ticks, hz, mode, cc = sys.argv[1:]
try:
    s = json.load(open(path))
except (OSError, ValueError):
    s = {"mb_per_s": 0, "ack_latency_us": {}, "lost": None, "duplicates": None, "order_violations": None, "bytes_acked": 0}
gb = s.get("bytes_acked", 0) / 1e9
cpu_s = int(ticks) / int(hz)
print(json.dumps({"backend": backend, "mtu": int(mtu), "client_gso": gso == "on", "mb_per_s": s["mb_per_s"],
                  "ack_latency_us": s["ack_latency_us"], "broker_cpu_s_per_gb": round(cpu_s / gb, 3) if gb else None,
                  "lost": s["lost"], "duplicates": s["duplicates"], "order_violations": s["order_violations"],
                  "xdp_mode": None if mode == "-" else mode, "client_cc": cc}))
PY
    tail -1 "$entries" | python3 -c "import json,sys; e=json.load(sys.stdin); print(f\"  {e['backend']:<7} mtu {e['mtu']} gso {'on ' if e['client_gso'] else 'off'}: {e['mb_per_s']:8.1f} MB/s, p50 {e['ack_latency_us'].get('p50')} us, cpu {e['broker_cpu_s_per_gb']} s/GB\")"
}

run_iperf() {  # mtu gso
    local mtu=$1 gso=$2
    ip netns exec "$prefix-broker0" taskset -c 1 iperf3 -s -1 -p "$iperf_port" > /dev/null 2>&1 &
    local server=$!
    sleep 0.5
    ip netns exec "$prefix-client" taskset -c 0 iperf3 -c 10.77.0.2 -p "$iperf_port" -P 4 -t "$duration" -J > "$work/iperf3-$mtu-$gso.json" || true
    wait "$server" || true
    python3 - "$work/iperf3-$mtu-$gso.json" "$mtu" "$gso" >> "$entries" <<'PY'
import json, sys
path, mtu, gso = sys.argv[1:]
bps = json.load(open(path))["end"]["sum_received"]["bits_per_second"]
print(json.dumps({"backend": "iperf3", "mtu": int(mtu), "client_gso": gso == "on", "mb_per_s": round(bps / 8e6, 1),
                  "ack_latency_us": None, "broker_cpu_s_per_gb": None, "lost": 0, "duplicates": 0, "order_violations": 0}))
PY
    tail -1 "$entries" | python3 -c "import json,sys; e=json.load(sys.stdin); print(f\"  iperf3  mtu {e['mtu']} gso {'on ' if e['client_gso'] else 'off'}: {e['mb_per_s']:8.1f} MB/s\")"
}

read -r steal0 total0 < <(steal_total)
for mtu in $mtus; do
    for gso in $gsos; do
        echo "== MTU $mtu, client GSO $gso"
        scripts/lab.sh up --prefix "$prefix" --brokers "$brokers" --base-port "$base_port" --mtu "$mtu" --gso "$gso" --queues "$queues" > "$work/lab.log" 2>&1 ||
            { cat "$work/lab.log"; exit 1; }
        if [[ $client_cc != host ]]; then
            # Per route: a namespace may only pick from net.ipv4.tcp_allowed_congestion_control.
            while read -r route; do
                # shellcheck disable=SC2086 # the route's words are separate arguments
                ip netns exec "$prefix-client" ip route replace $route congctl "$client_cc"
            done < <(ip netns exec "$prefix-client" ip route show | grep '^10\.77\.')
            echo "  client congestion control: $client_cc (per route)"
        else
            echo "  client congestion control: $(ip netns exec "$prefix-client" sysctl -n net.ipv4.tcp_congestion_control)"
        fi
        run_iperf "$mtu" "$gso"
        for backend in $backends; do
            run_backend "$backend" "$mtu" "$gso"
        done
        scripts/lab.sh down --prefix "$prefix" > /dev/null 2>&1
    done
done
read -r steal1 total1 < <(steal_total)
steal_pct=$(( 100 * (steal1 - steal0) / (total1 - total0) ))

python3 - "$entries" "$out/lab.json" "$steal_pct" <<'PY'
import json, sys
entries = [json.loads(line) for line in open(sys.argv[1])]
json.dump(entries, open(sys.argv[2], "w"), indent=2)
steal = int(sys.argv[3])
print(f"\n{'backend':<8} {'mtu':>5} {'gso':>4} {'MB/s':>9} {'p50 us':>8} {'p99 us':>8} {'cpu s/GB':>9} {'xdp/kernel':>11}")
for e in entries:
    lat = e["ack_latency_us"] or {}
    ratio = ""
    if e["backend"] == "xdp":
        k = next((x for x in entries if x["backend"] == "kernel" and x["mtu"] == e["mtu"] and x["client_gso"] == e["client_gso"]), None)
        ratio = f"{e['mb_per_s'] / k['mb_per_s']:.2f}" if k and k["mb_per_s"] else "-"
    print(f"{e['backend']:<8} {e['mtu']:>5} {'on' if e['client_gso'] else 'off':>4} {e['mb_per_s']:>9.1f} "
          f"{str(lat.get('p50', '-')):>8} {str(lat.get('p99', '-')):>8} {str(e['broker_cpu_s_per_gb'] or '-'):>9} {ratio:>11}")
print(f"CPU steal during the run: {steal}%" + ("  (above 10%: figures are not trustworthy)" if steal > 10 else ""))
print(f"wrote {sys.argv[2]}")
PY
