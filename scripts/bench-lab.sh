#!/usr/bin/env bash
# Benchmark of the two network backends on the namespace lab link, in one run:
#
#   ./scripts/bench-lab.sh [--lab "fair pessimistic legacy"] [--duration-s N] [--mtu "1500 3500"]
#                          [--gso "on off"] [--backends "kernel xdp"] [--fixed-load-mb-per-s N]
#                          [--xdp-mode auto|driver|generic] [--brokers N] [--client-cc NAME]
#                          [--in-flight-batches N] [--xdp-args "FLAGS"] [--queues N]
#                          [--perf-dir DIR] [--prefix P] [--base-port P]
#
# For MTU 1500 and 3500, and the client's GSO/TSO on and off (or the ones named):
#   iperf3 from the client namespace to broker 0's namespace (-P 4): the link's ceiling;
#   4 brokers with --net kernel, then 4 brokers with --net xdp (XDP + AF_XDP + smoltcp),
#   each in its own namespace, driven by the same loadgen runs (publish, 1 KiB messages,
#   order 5, ack 1, 3 connections per broker) from the client namespace: one unpaced
#   (saturation throughput, ack latency), then one paced at --fixed-load-mb-per-s (default
#   300, a load both backends sustain) on freshly started brokers, over which the broker
#   CPU's busy time (user + nice + system + irq + softirq of the `cpu1` line of /proc/stat:
#   the brokers are pinned to CPU 1, the loadgen to CPU 0) gives broker_cpu_s_per_gb.
#
# --lab picks where the kernel's receive work runs (docs/results.md, "A fair lab"); several,
# quoted, run one after the other into the same lab.json:
#   fair (default)  GRO on the broker ends of the veth pairs, threaded NAPI on both ends, a
#                   pfifo qdisc on every end (else veth drops what overflows the receiving
#                   end's 256-entry ring), the NAPI kthreads (napi/DEV-ID) pinned with
#                   taskset: the client ends' on the client CPU; the broker ends' on the
#                   broker CPU for the kernel backend (a NIC queue whose interrupt is bound
#                   to the broker core) and on the client CPU for the XDP backend (the
#                   kernel's copies into the UMEM stand in for a zero-copy NIC's DMA, so the
#                   sender pays them);
#   pessimistic     as fair, but the broker ends' NAPI on the broker CPU for both backends;
#   legacy          no GRO or threaded NAPI: veth runs the receiving side in the sender's
#                   softirq, on the client CPU, for both backends.
#
# Writes target/bench/lab.json, a list of entries: lab, backend ("iperf3" for the link's
# ceiling), mtu, client_gso, mb_per_s (saturation), ack_latency_us (saturation),
# broker_cpu_s_per_gb (fixed load, /proc/stat), fixed_load_mb_per_s (asked) and
# fixed_load_achieved_mb_per_s, broker_end_napi_cpu_s_per_gb (fixed load, the broker ends'
# NAPI threads, wherever they ran; null in the legacy lab), broker_process_cpu_s_per_gb
# (saturation) and fixed_load_broker_process_cpu_s_per_gb (utime + stime of the broker
# processes, which leaves out the kernel's receive work in softirq or NAPI threads, but
# unlike /proc/stat is not raised by other processes on the broker CPU),
# client_veth_tx_dropped and fixed_load_client_veth_tx_dropped (packets the client ends of the
# veth pairs dropped on transmit: the receiving end's ring or backlog was full),
# lost / duplicates / order_violations (null: a publish run has no subscriber to check them;
# see scripts/bench-kernel.sh for the verified end-to-end run), passed (the loadgen's verdict
# on both runs), xdp_mode, client_cc. Also prints a table and the CPU steal of the run.
# Each broker's metrics at the end of its saturation run:
# target/bench/lab-runs/<lab>-<backend>-<mtu>-<gso>-brokerI.metrics.
# --brokers N runs N brokers instead of 4 (still 3 connections each).
# --client-cc sets the congestion control of the client's routes to the brokers (default
# cubic, Linux's own default, whatever the host uses; "host" keeps the host's).
# net.core.netdev_max_backlog is raised to 10000 for the run (restored on exit): veth
# delivers through the per-CPU backlog, and at 1000 it overflowed, for both backends.
# --in-flight-batches is passed to the load generator (its default: 64 per connection).
# --xdp-mode is passed to the XDP brokers; the default, by-gso, picks generic with the
# client's GSO off in the legacy lab (on veth, driver mode copies every frame once more and
# queues it through a 256-entry ring that overflowed) and driver with GSO on (generic mode
# would get the client's 64 KB GSO packets, which do not fit a UMEM frame); in the fair and
# pessimistic labs always driver: with GRO on the broker end generic XDP runs after GRO and
# linearizes every packet once more; see docs/results.md.
# --queues N gives each veth end N queues (lab.sh up --queues; the XDP brokers take all).
# --xdp-args adds broker flags to the XDP brokers, e.g. "--xdp-busy-poll-us 50".
# --perf-dir DIR records `perf record -g -a` (both CPUs) during each saturation run into
# DIR/<lab>-<backend>-<mtu>-<gso>.data (perf must be installed).
# --prefix P names the lab's namespaces and interfaces (lab.sh --prefix; default embbench)
# and the pool file /dev/hugepages/P-pool; --base-port P: broker i listens on P+i, its
# metrics on P+100+i, iperf3 on P+200 (default 9500).
# Needs root. A benchmark, not a test: it asserts nothing about speed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
. scripts/lab.sh

labs=fair
duration=5
brokers=4
client_cc=cubic
queues=1
fixed_load_mb_per_s=300
loadgen_extra=()
xdp_extra=()
mtus="1500 3500"
gsos="on off"
backends="kernel xdp"
perf_dir=
xdp_mode=by-gso
prefix=embbench
base_port=9500
while [[ $# -gt 0 ]]; do
    case $1 in
        --lab) labs=$2; shift 2 ;;
        --duration-s) duration=$2; shift 2 ;;
        --mtu) mtus=$2; shift 2 ;;
        --gso) gsos=$2; shift 2 ;;
        --backends) backends=$2; shift 2 ;;
        --fixed-load-mb-per-s) fixed_load_mb_per_s=$2; shift 2 ;;
        --perf-dir) perf_dir=$2; shift 2 ;;
        --xdp-mode) xdp_mode=$2; shift 2 ;;
        --brokers) brokers=$2; shift 2 ;;
        --queues) queues=$2; shift 2 ;;
        --xdp-args)
            # shellcheck disable=SC2206 # the flags are separate words
            xdp_extra+=($2); shift 2 ;;
        --client-cc) client_cc=$2; shift 2 ;;
        --in-flight-batches) loadgen_extra+=(--in-flight-batches "$2"); shift 2 ;;
        --prefix) prefix=$2; shift 2 ;;
        --base-port) base_port=$2; shift 2 ;;
        -h|--help) sed -n '2,68p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-lab: unknown option $1" >&2; exit 2 ;;
    esac
done
die() { echo "bench-lab: $*" >&2; exit 2; }
for lab in $labs; do
    [[ $lab == fair || $lab == pessimistic || $lab == legacy ]] || die "--lab needs fair, pessimistic or legacy (or several, quoted), got '$lab'"
done
[[ $fixed_load_mb_per_s =~ ^[0-9]+$ && $fixed_load_mb_per_s -ge 1 ]] || die "--fixed-load-mb-per-s needs a positive whole number, got '$fixed_load_mb_per_s'"
[[ $base_port =~ ^[0-9]+$ && $base_port -ge 1 && $((base_port + 200)) -le 65535 ]] || die "--base-port needs a port P with P + 200 <= 65535, got '$base_port'"
[[ $(id -u) -eq 0 ]] || { echo "bench-lab: needs root (network namespaces, XDP)" >&2; exit 1; }
ensure_cargo
ensure_packages iperf3 python3 util-linux
ensure_xdp_build_deps
prepare_hugepages 400
cargo build --release -q -p broker -p client -p xdp-prog

metrics_port=$((base_port + 100))
iperf_port=$((base_port + 200))
broker_cpu=1
client_cpu=0
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
# Busy jiffies of the broker CPU: user + nice + system + irq + softirq (not idle, iowait, steal).
broker_cpu_busy() { awk -v cpu="cpu$broker_cpu" '$1 == cpu {print $2 + $3 + $4 + $7 + $8; exit}' /proc/stat; }
cpu_ticks() {  # utime+stime of the given PIDs
    local total=0 pid
    for pid in "$@"; do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# Packets the client ends of the veth pairs dropped on transmit, all together: veth counts
# there what did not fit the receiving end's 256-entry ring (a drop the sender's TCP
# retransmits) or its backlog.
client_tx_dropped() {
    local total=0 i
    for ((i = 0; i < brokers; i++)); do
        total=$((total + $(ip netns exec "$prefix-client" cat "/sys/class/net/$prefix-c$i/statistics/tx_dropped")))
    done
    echo "$total"
}

# PIDs of the NAPI kthreads of the lab's broker ends (side b) or client ends (side c). A
# thread is named napi/DEV-ID, cut to the 15 characters of a task's comm.
napi_pids() {  # b|c
    local name="napi/$prefix-$1" comm dir
    name=${name:0:15}
    for dir in /proc/[0-9]*; do
        comm=$(cat "$dir/comm" 2>/dev/null) || continue
        [[ $comm == "$name"* ]] && echo "${dir#/proc/}"
    done
    return 0
}

# GRO on the broker ends, then threaded NAPI on both ends (a device takes `threaded` only
# once it has NAPI: the broker ends get it with GRO, the client ends with their XDP program),
# and a pfifo qdisc on every end: with NAPI, veth queues each packet on the receiving end's
# 256-entry ring, and without a qdisc (veth's default noqueue) it drops what does not fit,
# while with one it stops the queue until the ring drains, as a NIC's queue does.
tune_lab() {
    [[ $lab != legacy ]] || return 0
    local i
    for ((i = 0; i < brokers; i++)); do
        ip netns exec "$prefix-client" tc qdisc replace dev "$prefix-c$i" root pfifo limit 1000
        ip netns exec "$prefix-broker$i" tc qdisc replace dev "$prefix-b$i" root pfifo limit 1000
        ip netns exec "$prefix-broker$i" ethtool -K "$prefix-b$i" gro on
        ip netns exec "$prefix-broker$i" sh -c "echo 1 > /sys/class/net/$prefix-b$i/threaded"
        ip netns exec "$prefix-client" sh -c "echo 1 > /sys/class/net/$prefix-c$i/threaded" ||
            echo "  note: no threaded NAPI on $prefix-c$i (no XDP program there?): its receive work stays in softirq"
    done
}

broker_end_cpu() {  # backend
    if [[ $lab == fair && $1 == xdp ]]; then echo "$client_cpu"; else echo "$broker_cpu"; fi
}

# Pins the NAPI kthreads (after the brokers started: attaching XDP may recreate them) and
# sets napi_broker_pids.
napi_broker_pids=()
place_napi() {  # backend
    napi_broker_pids=()
    [[ $lab != legacy ]] || return 0
    local pid cpu
    cpu=$(broker_end_cpu "$1")
    mapfile -t napi_broker_pids < <(napi_pids b)
    [[ ${#napi_broker_pids[@]} -ge $brokers ]] ||
        { echo "bench-lab: found ${#napi_broker_pids[@]} NAPI threads of the broker ends, expected $brokers (is /sys/class/net/$prefix-b0/threaded 1?)" >&2; exit 1; }
    for pid in "${napi_broker_pids[@]}"; do taskset -p -c "$cpu" "$pid" > /dev/null; done
    for pid in $(napi_pids c); do taskset -p -c "$client_cpu" "$pid" > /dev/null; done
}

xdp_mode_for() {  # gso
    if [[ $xdp_mode != by-gso ]]; then echo "$xdp_mode"
    elif [[ $1 == off && $lab == legacy ]]; then echo generic
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
        ip netns exec "$prefix-broker$i" taskset -c "$broker_cpu" target/release/broker "${args[@]}" \
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
    place_napi "$backend"
}

# One loadgen run on freshly started brokers; writes its JSON to $json and sets
# process_ticks (the broker processes' utime + stime), cpu_busy (the broker CPU's busy
# jiffies), napi_ticks (the broker ends' NAPI threads) and tx_dropped (client_tx_dropped)
# over it.
loadgen_run() {  # backend gso json rate-msgs-per-s perf-file|-
    local backend=$1 gso=$2 json=$3 rate=$4 perf_file=$5 list=() i
    for ((i = 0; i < brokers; i++)); do list+=("10.77.$i.2:$((base_port + i))"); done
    start_brokers "$backend" "$gso"
    local process_before busy_before napi_before perf_pid=
    if [[ $perf_file != - ]]; then
        perf record -q -g -a -o "$perf_file" -- sleep "$duration" > /dev/null 2>&1 &
        perf_pid=$!
    fi
    process_before=$(cpu_ticks "${pids[@]}")
    busy_before=$(broker_cpu_busy)
    napi_before=$(cpu_ticks "${napi_broker_pids[@]}")
    local dropped_before
    dropped_before=$(client_tx_dropped)
    ip netns exec "$prefix-client" taskset -c "$client_cpu" target/release/loadgen --test publish --order 5 --ack 1 \
        --message-bytes 1024 --connections-per-broker 3 --duration-s "$duration" --progress none "${loadgen_extra[@]}" \
        --rate-msgs-per-s "$rate" --backend-label "$backend" --brokers "$(IFS=,; echo "${list[*]}")" --json "$json" \
        > "$work/loadgen.log" 2>&1 || echo "  (loadgen exited non-zero: see $work/loadgen.log)"
    cpu_busy=$(($(broker_cpu_busy) - busy_before))
    process_ticks=$(($(cpu_ticks "${pids[@]}") - process_before))
    napi_ticks=$(($(cpu_ticks "${napi_broker_pids[@]}") - napi_before))
    tx_dropped=$(($(client_tx_dropped) - dropped_before))
    [[ -z $perf_pid ]] || wait "$perf_pid" || true
}

run_backend() {  # backend mtu gso
    local backend=$1 mtu=$2 gso=$3 i name="$lab-$1-$2-$3"
    local perf_file=-
    if [[ -n $perf_dir ]]; then
        mkdir -p "$perf_dir"
        perf_file=$perf_dir/$name.data
    fi
    loadgen_run "$backend" "$gso" "$work/$name.json" 0 "$perf_file"
    local saturation_ticks=$process_ticks saturation_dropped=$tx_dropped
    for ((i = 0; i < brokers; i++)); do
        ip netns exec "$prefix-broker$i" python3 -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())" \
            "http://10.77.$i.2:$((metrics_port + i))/metrics" > "$work/$name-broker$i.metrics" 2>&1 || true
    done
    stop_brokers
    rm -f "$pool"
    loadgen_run "$backend" "$gso" "$work/$name-fixed.json" $((fixed_load_mb_per_s * 1000000 / 1024)) -
    stop_brokers
    rm -f "$pool"
    local mode=- napi_cpu=-
    [[ $backend != xdp ]] || mode=$(xdp_mode_for "$gso")
    [[ $lab == legacy ]] || napi_cpu=$(broker_end_cpu "$backend")
    python3 - "$work/$name.json" "$work/$name-fixed.json" "$lab" "$backend" "$mtu" "$gso" "$saturation_ticks" \
        "$process_ticks" "$cpu_busy" "$napi_ticks" "$(getconf CLK_TCK)" "$fixed_load_mb_per_s" "$mode" "$client_cc" "$napi_cpu" \
        "$saturation_dropped" "$tx_dropped" >> "$entries" <<'PY'
import json, sys
(saturation_path, fixed_path, lab, backend, mtu, gso, saturation_ticks, fixed_process_ticks, busy_ticks, napi_ticks, hz,
 fixed_load, mode, cc, napi_cpu, saturation_dropped, fixed_dropped) = sys.argv[1:]
def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return {"mb_per_s": 0, "ack_latency_us": {}, "bytes_acked": 0, "passed": False}
saturation, fixed = load(saturation_path), load(fixed_path)
hz = int(hz)
def per_gb(ticks, summary):
    gb = summary.get("bytes_acked", 0) / 1e9
    return round(int(ticks) / hz / gb, 3) if gb else None
print(json.dumps({
    "lab": lab, "backend": backend, "mtu": int(mtu), "client_gso": gso == "on",
    "mb_per_s": saturation["mb_per_s"], "ack_latency_us": saturation["ack_latency_us"],
    "broker_cpu_s_per_gb": per_gb(busy_ticks, fixed), "fixed_load_mb_per_s": int(fixed_load),
    "fixed_load_achieved_mb_per_s": fixed["mb_per_s"],
    "broker_end_napi_cpu_s_per_gb": None if lab == "legacy" else per_gb(napi_ticks, fixed),
    "broker_end_napi_cpu": None if napi_cpu == "-" else int(napi_cpu),
    "broker_process_cpu_s_per_gb": per_gb(saturation_ticks, saturation),
    "fixed_load_broker_process_cpu_s_per_gb": per_gb(fixed_process_ticks, fixed),
    # Publish runs have no subscriber: nothing checked loss, duplicates or order.
    "lost": None, "duplicates": None, "order_violations": None,
    "client_veth_tx_dropped": int(saturation_dropped), "fixed_load_client_veth_tx_dropped": int(fixed_dropped),
    "passed": bool(saturation.get("passed")) and bool(fixed.get("passed")),
    "xdp_mode": None if mode == "-" else mode, "client_cc": cc}))
PY
    tail -1 "$entries" | python3 -c "import json,sys; e=json.load(sys.stdin); print(f\"  {e['backend']:<7} mtu {e['mtu']} gso {'on ' if e['client_gso'] else 'off'}: {e['mb_per_s']:8.1f} MB/s, p50 {e['ack_latency_us'].get('p50')} us; at {e['fixed_load_achieved_mb_per_s']:.0f} MB/s broker CPU {e['broker_cpu_s_per_gb']} s/GB\")"
}

run_iperf() {  # mtu gso
    local mtu=$1 gso=$2 pid
    ip netns exec "$prefix-broker0" taskset -c "$broker_cpu" iperf3 -s -1 -p "$iperf_port" > /dev/null 2>&1 &
    local server=$!
    sleep 0.5
    if [[ $lab != legacy ]]; then
        for pid in $(napi_pids b); do taskset -p -c "$(broker_end_cpu kernel)" "$pid" > /dev/null; done
        for pid in $(napi_pids c); do taskset -p -c "$client_cpu" "$pid" > /dev/null; done
    fi
    ip netns exec "$prefix-client" taskset -c "$client_cpu" iperf3 -c 10.77.0.2 -p "$iperf_port" -P 4 -t "$duration" -J > "$work/$lab-iperf3-$mtu-$gso.json" || true
    wait "$server" || true
    python3 - "$work/$lab-iperf3-$mtu-$gso.json" "$lab" "$mtu" "$gso" >> "$entries" <<'PY'
import json, sys
path, lab, mtu, gso = sys.argv[1:]
bps = json.load(open(path))["end"]["sum_received"]["bits_per_second"]
print(json.dumps({"lab": lab, "backend": "iperf3", "mtu": int(mtu), "client_gso": gso == "on", "mb_per_s": round(bps / 8e6, 1),
                  "ack_latency_us": None, "broker_cpu_s_per_gb": None, "fixed_load_mb_per_s": None,
                  "lost": None, "duplicates": None, "order_violations": None}))
PY
    tail -1 "$entries" | python3 -c "import json,sys; e=json.load(sys.stdin); print(f\"  iperf3  mtu {e['mtu']} gso {'on ' if e['client_gso'] else 'off'}: {e['mb_per_s']:8.1f} MB/s\")"
}

read -r steal0 total0 < <(steal_total)
for lab in $labs; do
    for mtu in $mtus; do
        for gso in $gsos; do
            echo "== lab $lab, MTU $mtu, client GSO $gso; load average $(cut -d' ' -f1-3 /proc/loadavg)"
            scripts/lab.sh up --prefix "$prefix" --brokers "$brokers" --base-port "$base_port" --mtu "$mtu" --gso "$gso" --queues "$queues" > "$work/lab.log" 2>&1 ||
                { cat "$work/lab.log"; exit 1; }
            tune_lab
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
done
read -r steal1 total1 < <(steal_total)
steal_pct=$(( 100 * (steal1 - steal0) / (total1 - total0) ))

python3 - "$entries" "$out/lab.json" "$steal_pct" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, sys
entries = [json.loads(line) for line in open(sys.argv[1])]
json.dump(entries, open(sys.argv[2], "w"), indent=2)
steal, loadavg = int(sys.argv[3]), sys.argv[4]
print(f"\n{'lab':<12} {'backend':<8} {'mtu':>5} {'gso':>4} {'MB/s':>9} {'p50 us':>8} {'p99 us':>8} {'xdp/kernel':>11} "
      f"{'fixed MB/s':>11} {'cpu s/GB':>9} {'xdp/kernel':>11} {'ok':>3}")
def kernel_of(e):
    return next((x for x in entries if x["backend"] == "kernel" and x["lab"] == e["lab"] and x["mtu"] == e["mtu"]
                 and x["client_gso"] == e["client_gso"]), None)
for e in entries:
    lat = e["ack_latency_us"] or {}
    ratio = cpu_ratio = ""
    k = kernel_of(e) if e["backend"] == "xdp" else None
    if k:
        ratio = f"{e['mb_per_s'] / k['mb_per_s']:.2f}" if k["mb_per_s"] else "-"
        if e["broker_cpu_s_per_gb"] and k["broker_cpu_s_per_gb"]:
            cpu_ratio = f"{e['broker_cpu_s_per_gb'] / k['broker_cpu_s_per_gb']:.2f}"
    fixed = e.get("fixed_load_achieved_mb_per_s")
    print(f"{e['lab']:<12} {e['backend']:<8} {e['mtu']:>5} {'on' if e['client_gso'] else 'off':>4} {e['mb_per_s']:>9.1f} "
          f"{str(lat.get('p50', '-')):>8} {str(lat.get('p99', '-')):>8} {ratio:>11} "
          f"{'-' if fixed is None else f'{fixed:.0f}':>11} {str(e['broker_cpu_s_per_gb'] or '-'):>9} {cpu_ratio:>11} "
          f"{'-' if 'passed' not in e else ('yes' if e['passed'] else 'NO'):>3}")
print(f"CPU steal during the run: {steal}%" + ("  (above 10%: figures are not trustworthy)" if steal > 10 else "")
      + f"; load average at the end: {loadavg}")
print(f"wrote {sys.argv[2]}")
PY
