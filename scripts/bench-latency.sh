#!/usr/bin/env bash
# Latency benchmark: ack and end-to-end latency of the brokers, next to the floors of the
# same path measured in the same run.
#
#   ./scripts/bench-latency.sh [--quick] [--duration-s N] [--peak-duration-s N]
#                              [--paths "loopback lab"] [--rates "1000 10000 100000"]
#                              [--base-port P] [--prefix P] [--guest-halt-poll-ns N|keep]
#
# For each path (loopback: scripts/cluster.sh with 1 and 4 brokers; lab: scripts/lab.sh
# namespaces, 1 broker on the kernel backend and 1 on the XDP backend):
#   1. a short end-to-end run at full speed (1 KiB, order 5, ack 1, default batching, the
#      subscriber checking every message as in the paced runs): the peak;
#   2. `loadgen --test latency` (1 KiB messages, order 5, ack 1, open-loop pacing, latency
#      from each message's due time, a subscriber checking every message) at each of
#      --rates with one message per batch, and at 50% of the peak with the peak run's
#      batching (the publish test's defaults: 64 KiB batches, linger 500 us);
#   3. the floors: `pingpong` (1 KiB kernel TCP round trips, paced closed loop, one message
#      outstanding) at 1,000 and 10,000 msgs/s, and Redis Streams XADD (redis-server from
#      Debian on a private port, in memory, 1 KiB field) twice: paced as the brokers are
#      (`pingpong run --protocol redis-xadd`: open loop at 1,000 and 10,000 msgs/s, latency
#      from the due time), and back to back (`redis-benchmark -c 1 -P 1`: closed loop, which
#      keeps both CPUs busy and so never pays an idle CPU's wake-up).
#   4. one kernel broker once more with `--idle spin` at 10,000 msgs/s on each path, beside
#      the backends' defaults (kernel: sleep in epoll; xdp: busy-poll its core): a broker
#      that owns its core, and the kernel broker the xdp figures can be read against.
#   5. before and after the runs, the machine's noise: `pingpong noise` spinning on both
#      CPUs at once for --duration-s, the time a thread that never sleeps loses to
#      interrupts, other threads and the hypervisor, and the wait percentiles this puts under
#      any latency measured through the CPU (entries with kind "noise").
# Pinning: brokers and the floors' servers on CPU 1, loadgen and the floors' clients on CPU
# 0 (printed with the figures). Each entry carries the CPU steal /proc/stat showed during it.
# Writes target/bench/latency.json (a list of entries, see docs/results.md "Latency") and
# prints a table. The lab needs root; without root only loopback runs.
# --quick: loopback, 1 broker, rates "1000 10000" (and 50% of peak), 1 s runs: a smoke test
# in well under a minute (after the build).
# --base-port P: ports P to P+500 are used (default 9700); --prefix: the lab's namespace
# prefix and the hugepage pool's name (default emblat).
# --guest-halt-poll-ns N: on a VM with the cpuidle-haltpoll driver, how long an idle vCPU
# polls before it halts, set for the run and restored after (default `keep`: as the machine
# is). A wake-up that comes while the vCPU halts costs an exit to the hypervisor (30-50 us
# per wake-up on the VM this was written on, whose command line sets 0), and every round
# trip here wakes an idle CPU at least twice, floors included; 200000 is the kernel's own
# default, closer to how an idle core of a bare-metal server wakes.
# A benchmark, not a test: it asserts nothing about speed, it reports.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

duration=10
peak_duration=3
paths="loopback lab"
rates="1000 10000 100000"
loopback_brokers="1 4"
base_port=9700
prefix=emblat
floor_rates="1000 10000"
halt_poll_ns=keep
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) duration=1; peak_duration=1; paths=loopback; rates="1000 10000"; loopback_brokers=1
                 floor_rates=10000; shift ;;
        --duration-s) duration=$2; shift 2 ;;
        --peak-duration-s) peak_duration=$2; shift 2 ;;
        --paths) paths=$2; shift 2 ;;
        --rates) rates=$2; shift 2 ;;
        --base-port) base_port=$2; shift 2 ;;
        --prefix) prefix=$2; shift 2 ;;
        --guest-halt-poll-ns) halt_poll_ns=$2; shift 2 ;;
        -h|--help) sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-latency: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $(nproc) -ge 2 ]] || { echo "bench-latency: needs 2 CPUs (brokers on CPU 1, clients on CPU 0)" >&2; exit 1; }
if [[ " $paths " == *" lab "* && $(id -u) -ne 0 ]]; then
    echo "bench-latency: not root: the lab (network namespaces, XDP) is skipped; loopback only"
    paths=${paths//lab/}
fi

ensure_cargo
ensure_packages redis-server redis-tools python3 util-linux coreutils
if [[ " $paths " == *" lab "* ]]; then
    . scripts/lab.sh
    ensure_xdp_build_deps
fi
prepare_hugepages 400
cargo build --release -q -p broker -p client
[[ " $paths " != *" lab "* ]] || cargo build --release -q -p xdp-prog

pinning="brokers, pingpong serve and redis-server on CPU 1; loadgen, pingpong run and redis-benchmark on CPU 0 (taskset)"
broker_cpu=1 client_cpu=0
cluster_port=$base_port            # loopback brokers: P.., their metrics P+100..
lab_port=$((base_port + 300))      # lab broker, its metrics at +1
redis_port=$((base_port + 400))
pingpong_port=$((base_port + 500))
out=target/bench
work=$out/latency-runs
mkdir -p "$work"
entries=$work/entries.jsonl
: > "$entries"
pool=/dev/hugepages/$prefix-pool
[[ -d /dev/hugepages ]] && mount | grep -q " /dev/hugepages type hugetlbfs" || pool=/dev/shm/$prefix-pool
server_pids=()
lab_up=0
halt_poll_param=/sys/module/haltpoll/parameters/guest_halt_poll_ns
halt_poll_before=
cleanup() {
    local pid
    for pid in "${server_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${server_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    scripts/cluster.sh stop --dir "$work/cluster" > /dev/null 2>&1 || true
    [[ $lab_up -eq 0 ]] || scripts/lab.sh down --prefix "$prefix" > /dev/null 2>&1 || true
    rm -f "$pool"
    [[ -z $halt_poll_before ]] || echo "$halt_poll_before" > "$halt_poll_param"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [[ $halt_poll_ns != keep && -w $halt_poll_param ]]; then
    [[ $halt_poll_ns =~ ^[0-9]+$ ]] || { echo "bench-latency: --guest-halt-poll-ns takes a number or keep" >&2; exit 2; }
    halt_poll_before=$(cat "$halt_poll_param")
    echo "$halt_poll_ns" > "$halt_poll_param"
fi
[[ ! -r $halt_poll_param ]] || pinning="$pinning; guest halt polling $(cat "$halt_poll_param") ns (${halt_poll_before:-unchanged} before the run)"

# Steal (the hypervisor running others on our CPUs) and total jiffies, from /proc/stat.
steal_snapshot() { awk '/^cpu /{s=0; for(i=2;i<=NF;i++) s+=$i; print $9, s; exit}' /proc/stat; }
steal_pct_since() {  # steal total (from steal_snapshot)
    local steal total
    read -r steal total < <(steal_snapshot)
    python3 -c "import sys; s0, t0, s1, t1 = map(int, sys.argv[1:]); print(round(100 * (s1 - s0) / max(t1 - t0, 1), 1))" \
        "$1" "$2" "$steal" "$total"
}

# How the broker under test waits when idle (its --idle), recorded with each entry.
broker_idle=sleep

# Appends an entry made from a loadgen JSON: path backend brokers kind rate_label json steal
add_loadgen_entry() {
    python3 - "$@" "$pinning" "$duration" "$broker_idle" >> "$entries" <<'PY'
import json, sys
path, backend, brokers, kind, rate_label, source, steal, pinning, duration, idle = sys.argv[1:]
try:
    s = json.load(open(source))
except (OSError, ValueError) as error:
    s = {"errors": [f"no loadgen JSON: {error}"], "passed": False}
paced = kind == "paced"
ack = s.get("ack_latency_from_intended_us" if paced else "ack_latency_us") or {}
e2e = s.get("e2e_latency_from_intended_us") or {}
dist = s.get("latency_distributions_us") or {}
print(json.dumps({
    "backend": backend, "path": path, "brokers": int(brokers), "kind": kind, "broker_idle": idle,
    "rate_msgs_per_s": s.get("rate_msgs_per_s", 0), "rate_label": rate_label,
    "latency_from": "due time" if paced else "sealing of the batch",
    "ack_p50_us": ack.get("p50"), "ack_p90_us": ack.get("p90"), "ack_p99_us": ack.get("p99"),
    "ack_p999_us": ack.get("p999"), "ack_max_us": ack.get("max"),
    "e2e_p50_us": e2e.get("p50") if paced else None, "e2e_p90_us": e2e.get("p90") if paced else None,
    "e2e_p99_us": e2e.get("p99") if paced else None, "e2e_p999_us": e2e.get("p999") if paced else None,
    "e2e_max_us": e2e.get("max") if paced else None,
    "msgs_acked": s.get("messages_acked"), "lost": s.get("lost"),
    "achieved_msgs_per_s": round(s.get("msgs_per_s", 0)), "mb_per_s": s.get("mb_per_s"),
    "messages_per_batch": s.get("messages_per_batch"),
    "batching": (f"{s['messages_per_batch']} message(s) per batch" if s.get("messages_per_batch")
                 else f"up to {s.get('batch_bytes')} bytes, linger {s.get('linger_us')} us"),
    "loadgen_cpu_cores": s.get("loadgen_cpu_cores"),
    "passed": s.get("passed"), "errors": s.get("errors", []),
    "seconds": s.get("seconds"), "cpu_pinning": pinning, "steal_pct": float(steal),
    "ack_distribution_us": dist.get("ack_from_intended" if paced else "ack"),
    "e2e_distribution_us": dist.get("e2e_from_intended") if paced else None,
}))
PY
}

# One loadgen run: path backend brokers kind rate_label json [netns] -- loadgen args...
run_loadgen() {
    local path=$1 backend=$2 brokers=$3 kind=$4 label=$5 json=$6 netns=$7 steal0 total0
    shift 7
    local wrap=()
    [[ -z $netns ]] || wrap=(ip netns exec "$netns")
    read -r steal0 total0 < <(steal_snapshot)
    rm -f "$json"
    timeout $((duration + 60)) "${wrap[@]}" taskset -c "$client_cpu" target/release/loadgen --progress none \
        --order 5 --ack 1 --message-bytes 1024 --backend-label "$backend" --json "$json" "$@" \
        > "$json.log" 2>&1 || echo "  (loadgen exited non-zero: see $json.log)"
    add_loadgen_entry "$path" "$backend" "$brokers" "$kind" "$label" "$json" "$(steal_pct_since "$steal0" "$total0")"
    show_last
}

show_last() {
    tail -1 "$entries" | python3 -c "
import json, sys
e = json.load(sys.stdin)
f = lambda v: '-' if v is None else v
print(f\"  {e['path']:<8} {e['backend']:<12} {e['brokers']} broker(s) {e.get('broker_idle') or '-':<5} {e['kind']:<6} {str(e['rate_label']):>12}: \"
      f\"ack p50/p99/p99.9 {f(e['ack_p50_us'])}/{f(e['ack_p99_us'])}/{f(e['ack_p999_us'])} us, \"
      f\"e2e p50/p99 {f(e['e2e_p50_us'])}/{f(e['e2e_p99_us'])} us, {f(e['achieved_msgs_per_s'])} msgs/s, lost {f(e['lost'])}, steal {e['steal_pct']}%\")"
}

# A paced run of one message per batch. path backend brokers targets netns rate tag
run_one_message_batches() {
    local path=$1 backend=$2 brokers=$3 targets=$4 netns=$5 rate=$6 tag=$7
    run_loadgen "$path" "$backend" "$brokers" paced "$rate" "$work/$tag-$rate.json" "$netns" \
        --brokers "$targets" --test latency --duration-s "$duration" --drain-timeout-s 10 \
        --topic "lat-$tag-$rate" --rate-msgs-per-s "$rate" --messages-per-batch 1
}

# Peak, then the paced runs. path backend brokers targets netns
run_rates() {
    local path=$1 backend=$2 brokers=$3 targets=$4 netns=$5 tag="$1-$2-$3" peak rate
    run_loadgen "$path" "$backend" "$brokers" peak peak "$work/$tag-peak.json" "$netns" \
        --brokers "$targets" --test end-to-end --topic "peak-$tag" --duration-s "$peak_duration" --drain-timeout-s 10
    peak=$(python3 -c "import json, sys; print(int(json.load(open(sys.argv[1])).get('msgs_per_s', 0)))" "$work/$tag-peak.json" 2>/dev/null || echo 0)
    local paced=(--brokers "$targets" --test latency --duration-s "$duration" --drain-timeout-s 10)
    for rate in $rates; do
        run_one_message_batches "$path" "$backend" "$brokers" "$targets" "$netns" "$rate" "$tag"
    done
    [[ $peak -ge 2 ]] || return 0
    rate=$((peak / 2))
    run_loadgen "$path" "$backend" "$brokers" paced "50% of peak" "$work/$tag-half-peak.json" "$netns" \
        "${paced[@]}" --topic "lat-$tag-half" --rate-msgs-per-s "$rate" --batch-bytes 64KiB --linger-us 500
}

# The machine's own noise: `pingpong noise` spinning on both CPUs at once for --duration-s
# (how much of its CPU a thread that never sleeps gets, and the wait percentiles that bound
# any latency measured through that CPU). when: before / after the runs
run_noise() {
    local when=$1 cpu pid pids=()
    for cpu in "$client_cpu" "$broker_cpu"; do
        taskset -c "$cpu" target/release/pingpong noise --duration-s "$duration" --json "$work/noise-$when-$cpu.json" \
            > /dev/null 2> "$work/noise-$when-$cpu.log" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || echo "  (pingpong noise exited non-zero: see $work/noise-$when-*.log)"; done
    for cpu in "$client_cpu" "$broker_cpu"; do
        python3 - "$work/noise-$when-$cpu.json" "$when" "$cpu" >> "$entries" <<'PY'
import json, sys
source, when, cpu = sys.argv[1:]
try:
    r = json.load(open(source))
except (OSError, ValueError):
    r = {}
r.update({"backend": "cpu-noise", "kind": "noise", "path": "machine", "brokers": 0, "cpu": int(cpu), "when": when})
print(json.dumps(r))
print(f"  cpu {cpu} noise ({when}): lost {r.get('lost_pct', 0):.1f}%, gaps >100 us {r.get('gaps_over_100us')}, "
      f">1 ms {r.get('gaps_over_1ms')}, max {r.get('gap_max_us')} us, wait p99/p99.9 {r.get('wait_p99_us')}/{r.get('wait_p999_us')} us",
      file=sys.stderr)
PY
    done
}

# One paced `pingpong run` of run_floors (it sees run_floors' client_wrap): path name rate
# pingpong-args...; appends the entry.
run_floor_client() {
    local path=$1 name=$2 rate=$3 steal0 total0
    shift 3
    local json=$work/$path-$name-$rate.json
    read -r steal0 total0 < <(steal_snapshot)
    timeout $((duration + 30)) "${client_wrap[@]}" taskset -c "$client_cpu" target/release/pingpong run \
        --rate-msgs-per-s "$rate" --duration-s "$duration" --json "$json" "$@" > /dev/null 2> "$json.log" ||
        echo "  (pingpong exited non-zero: see $json.log)"
    python3 - "$json" "$path" "$rate" "$(steal_pct_since "$steal0" "$total0")" "$pinning" "$name" >> "$entries" <<'PY'
import json, sys
source, path, rate, steal, pinning, name = sys.argv[1:]
try:
    r = json.load(open(source))
except (OSError, ValueError):
    r = {"latency_us": {}, "messages": None, "msgs_per_s": 0, "method": None}
lat = r["latency_us"]
print(json.dumps({"backend": "redis-xadd" if name == "redis" else "tcp-pingpong", "path": path, "brokers": 0,
    "kind": "floor", "rate_msgs_per_s": int(rate), "rate_label": rate, "latency_from": "due time",
    "method": r.get("method"), "ack_p50_us": lat.get("p50"), "ack_p90_us": lat.get("p90"),
    "ack_p99_us": lat.get("p99"), "ack_p999_us": lat.get("p999"), "ack_max_us": lat.get("max"),
    "e2e_p50_us": None, "e2e_p99_us": None, "e2e_p999_us": None, "msgs_acked": r.get("messages"), "lost": None,
    "achieved_msgs_per_s": round(r.get("msgs_per_s", 0)), "client_cpu_cores": r.get("cpu_cores"),
    "cpu_pinning": pinning, "steal_pct": float(steal),
    "ack_distribution_us": r.get("latency_distribution_us"), "e2e_distribution_us": None}))
PY
    show_last
}

# Floors on a path: pingpong, and Redis XADD paced as the brokers are (pingpong --protocol
# redis-xadd) and back to back (redis-benchmark). path server_ip server_netns client_netns
run_floors() {
    local path=$1 ip=$2 server_ns=$3 client_ns=$4 steal0 total0 server_wrap=() client_wrap=() rate
    [[ -z $server_ns ]] || server_wrap=(ip netns exec "$server_ns")
    [[ -z $client_ns ]] || client_wrap=(ip netns exec "$client_ns")
    "${server_wrap[@]}" taskset -c "$broker_cpu" target/release/pingpong serve --listen "$ip:$pingpong_port" \
        --idle-exit-s 30 > "$work/pingpong-serve-$path.log" 2>&1 &
    local serve_pid=$!
    server_pids+=("$serve_pid")
    sleep 0.3
    for rate in $floor_rates; do
        run_floor_client "$path" pingpong "$rate" --connect "$ip:$pingpong_port"
    done
    kill "$serve_pid" 2>/dev/null || true
    wait "$serve_pid" 2>/dev/null || true

    local redis_dir requests
    redis_dir=$(mktemp -d)
    "${server_wrap[@]}" taskset -c "$broker_cpu" redis-server --port "$redis_port" --bind "$ip" --save '' \
        --appendonly no --dir "$redis_dir" --daemonize no --protected-mode no > "$work/redis-$path.log" 2>&1 &
    local redis_pid=$!
    server_pids+=("$redis_pid")
    for _ in $(seq 50); do
        "${client_wrap[@]}" redis-cli -h "$ip" -p "$redis_port" ping > /dev/null 2>&1 && break
        sleep 0.1
    done
    for rate in $floor_rates; do
        run_floor_client "$path" redis "$rate" --connect "$ip:$redis_port" --protocol redis-xadd
    done
    # About --duration-s worth of requests at ~15,000 round trips a second.
    requests=$((duration * 15000))
    read -r steal0 total0 < <(steal_snapshot)
    timeout $((duration * 4 + 30)) "${client_wrap[@]}" taskset -c "$client_cpu" redis-benchmark -h "$ip" -p "$redis_port" \
        -c 1 -P 1 -n "$requests" XADD bench-stream MAXLEN '~' 100000 '*' m "$(head -c 1024 /dev/zero | tr '\0' x)" \
        > "$work/redis-$path.txt" 2>&1 || echo "  (redis-benchmark exited non-zero: see $work/redis-$path.txt)"
    local steal
    steal=$(steal_pct_since "$steal0" "$total0")
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
    rm -rf "$redis_dir"
    python3 - "$work/redis-$path.txt" "$path" "$requests" "$steal" "$pinning" >> "$entries" <<'PY'
import json, re, sys
source, path, requests, steal, pinning = sys.argv[1:]
text = open(source, errors="replace").read().replace("\r", "\n")
# "99.900% <= 0.327 milliseconds (cumulative count 99900)": the distribution, in us.
points = [(float(p), round(float(ms) * 1000)) for p, ms in
          re.findall(r"^\s*([0-9.]+)% <= ([0-9.]+) milliseconds", text.split("Cumulative distribution")[0], re.M)]
def at(percentile):
    return next((value for p, value in points if p >= percentile), None)
rps = re.search(r"throughput summary: ([0-9.]+) requests per second", text)
print(json.dumps({"backend": "redis-xadd", "path": path, "brokers": 0, "kind": "floor",
    "rate_msgs_per_s": round(float(rps.group(1))) if rps else None, "rate_label": "closed loop",
    "latency_from": "request sent", "method": "redis-benchmark -c 1 -P 1, XADD with a 1 KiB field, back to back",
    "ack_p50_us": at(50), "ack_p90_us": at(90), "ack_p99_us": at(99), "ack_p999_us": at(99.9),
    "ack_max_us": at(100), "e2e_p50_us": None, "e2e_p99_us": None, "e2e_p999_us": None,
    "msgs_acked": int(requests) if points else None, "lost": None,
    "achieved_msgs_per_s": round(float(rps.group(1))) if rps else None, "cpu_pinning": pinning,
    "steal_pct": float(steal),
    "ack_distribution_us": [{"percentile": p, "value_us": v} for p, v in points], "e2e_distribution_us": None}))
PY
    show_last
}

# Every run has a topic of its own (the subscriber reads it from position 0): the peak, the
# rates and 50% of the peak.
topics_max=$(( $(wc -w <<<"$rates") + 2 ))
read -r run_steal0 run_total0 < <(steal_snapshot)
echo "pinning: $pinning"
echo "== the machine's noise"
run_noise before
if [[ " $paths " == *" loopback "* ]]; then
    echo "== loopback"
    run_floors loopback 127.0.0.1 "" ""
    # Each broker count with the default, then one broker on a core of its own that it
    # busy-polls.
    for run in $(printf '%s:sleep ' $loopback_brokers) 1:spin; do
        brokers=${run%:*} broker_idle=${run#*:}
        scripts/cluster.sh start --brokers "$brokers" --base-port "$cluster_port" --pool "$pool" --pool-bytes 256M \
            --broker-args "--topics-max $topics_max --idle $broker_idle" --cpus "$broker_cpu" --dir "$work/cluster" > "$work/cluster.log" 2>&1 || { cat "$work/cluster.log"; exit 1; }
        targets=$(cat "$work/cluster/brokers")
        if [[ $broker_idle == spin ]]; then
            run_one_message_batches loopback kernel 1 "$targets" "" 10000 loopback-kernel-1-spin
        else
            run_rates loopback kernel "$brokers" "$targets" ""
        fi
        scripts/cluster.sh stop --dir "$work/cluster" > /dev/null
    done
fi

if [[ " $paths " == *" lab "* ]]; then
    echo "== lab (scripts/lab.sh --prefix $prefix, 1 broker)"
    lab_up=1
    scripts/lab.sh up --prefix "$prefix" --brokers 1 --base-port "$lab_port" > "$work/lab.log" 2>&1 ||
        { cat "$work/lab.log"; exit 1; }
    broker_ip=10.77.0.2
    run_floors lab "$broker_ip" "$prefix-broker0" "$prefix-client"
    for run in kernel:sleep xdp:spin kernel:spin; do
        backend=${run%:*} broker_idle=${run#*:}
        args=(--net "$backend" --idle "$broker_idle" --id 0 --pool "$pool" --listen "$broker_ip:$lab_port"
            --metrics "$broker_ip:$((lab_port + 1))" --head --format --pool-bytes 256M --topics-max "$topics_max")
        [[ $backend == xdp ]] && args+=(--iface "$prefix-b0" --xdp-mode driver --cores "$broker_cpu")
        log=$work/lab-broker-$backend-$broker_idle.log
        ip netns exec "$prefix-broker0" taskset -c "$broker_cpu" target/release/broker "${args[@]}" > "$log" 2>&1 &
        broker_pid=$!
        server_pids+=("$broker_pid")
        for _ in $(seq 100); do grep -q "^listening on" "$log" && break; sleep 0.1; done
        grep -q "^listening on" "$log" ||
            { tail -5 "$log"; echo "bench-latency: the $backend broker did not start" >&2; exit 1; }
        if [[ $run == kernel:spin ]]; then
            run_one_message_batches lab "$backend" 1 "$broker_ip:$lab_port" "$prefix-client" 10000 lab-kernel-1-spin
        else
            run_rates lab "$backend" 1 "$broker_ip:$lab_port" "$prefix-client"
        fi
        kill "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
        rm -f "$pool"
    done
    scripts/lab.sh down --prefix "$prefix" > /dev/null 2>&1
    lab_up=0
fi
run_noise after
run_steal=$(steal_pct_since "$run_steal0" "$run_total0")

python3 - "$entries" "$out/latency.json" "$pinning" "$run_steal" <<'PY'
import json, sys
source, target, pinning, steal = sys.argv[1:]
entries = [json.loads(line) for line in open(source)]
json.dump(entries, open(target, "w"), indent=2)
f = lambda v: "-" if v is None else str(v)
noise = [e for e in entries if e["kind"] == "noise"]
# The client's CPU (loadgen, or pingpong's client for the floors; redis-benchmark unmeasured).
def cores(e):
    value = e.get("loadgen_cpu_cores", e.get("client_cpu_cores"))
    return "-" if value is None else f"{value:.2f}"
entries = [e for e in entries if e["kind"] != "noise"]
print(f"\n{'path':<8} {'backend':<12} {'brk':>3} {'idle':>5} {'rate msgs/s':>12} {'batch':>6} {'achieved':>9} "
      f"{'ack p50':>8} {'p99':>7} {'p99.9':>7} {'e2e p50':>8} {'p99':>7} {'acked':>8} {'lost':>5} {'cores':>5} {'steal%':>6}")
for e in entries:
    rate = "peak" if e["kind"] == "peak" else e["rate_label"]
    batch = "-" if e["kind"] == "floor" else ("1" if e.get("messages_per_batch") == 1 else "64KiB")
    print(f"{e['path']:<8} {e['backend']:<12} {e['brokers']:>3} {e.get('broker_idle') or '-':>5} {rate:>12} {batch:>6} {f(e['achieved_msgs_per_s']):>9} "
          f"{f(e['ack_p50_us']):>8} {f(e['ack_p99_us']):>7} {f(e['ack_p999_us']):>7} {f(e['e2e_p50_us']):>8} "
          f"{f(e['e2e_p99_us']):>7} {f(e['msgs_acked']):>8} {f(e['lost']):>5} {cores(e):>5} {e['steal_pct']:>6}")
print("latencies in us; paced runs from each message's due time, peak runs from sealing (unpaced);")
print("idle: the broker's --idle (kernel default sleep, xdp default spin); - for floors")
print("cores: the client's own CPU (user + system) per second: loadgen, or pingpong's client for a floor")
print("batch: 1 = one message per batch, 64KiB = the publish test's batching (64 KiB, linger 500 us)")
print(f"pinning: {pinning}")
for e in noise:
    print(f"CPU {e['cpu']} noise {e['when']} the runs ({e.get('seconds', 0):.0f} s spinning, both CPUs at once): "
          f"lost {e.get('lost_pct', 0):.1f}%, gaps >100 us {e.get('gaps_over_100us')}, >1 ms {e.get('gaps_over_1ms')}, "
          f"max {e.get('gap_max_us')} us; wait p99 / p99.9 {e.get('wait_p99_us')} / {e.get('wait_p999_us')} us")
print(f"CPU steal over the whole run: {steal}%" + ("  (above 10%: the host is busy, figures are not trustworthy)" if float(steal) > 10 else ""))
print(f"wrote {target}")
PY
