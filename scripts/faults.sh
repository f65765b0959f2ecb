#!/usr/bin/env bash
# The fault matrix of Embarcadero-rs: 4 broker processes on one hugetlbfs pool, each
# replicating to its own directory (replication factor 2), driven by the load generator with
# order 5 and ack 2 while a fault is injected. A subscriber on a broker that stays up verifies
# every message (exactly once, in order, bytes intact).
#
#   ./scripts/faults.sh [--duration-s N] [--repeat N] [--base-port P] [--metrics-base-port M]
#                       [--pool PATH] [SCENARIO...]
#
# Brokers listen on 127.0.0.1:P+i (default 9600) with metrics on :M+i (default P+100); the
# pool file is PATH (default: scripts/cluster.sh's, named after P).
#
# Scenarios (default: all):
#   baseline         no fault
#   kill-nonhead     kill -9 broker 2 mid-run; its publishers reconnect and resend
#   kill-head        kill -9 broker 0 (the sequencer) mid-run; a standby takes the lease over
#   pause-head       SIGSTOP broker 0 past its lease, then SIGCONT: it must stay fenced
#   restart-nonhead  kill -9 broker 2, restart it with the same id 2 s later (it takes the
#                    crashed claim on the id over once that stayed still for a lease)
#   pool-loss        run, stop every broker, delete the pool, rebuild it from the replica
#                    files (--recover-from): the log must be the same, batch for batch
#   history          publish 4x the pool (256 MiB) at ack 2 (brokers 1 and 3 replicate),
#                    then a subscriber on broker 2 (no replica) asks for position 0: it is
#                    redirected to broker 1, which serves the part the pool no longer holds
#                    from its replica file, then the pool; all of it is read back
#
# --repeat N runs the scenarios N times (default 1) and prints, per scenario, the runs, the
# failures, and the failover and longest ack wait (p50 and max over the runs).
#
# Writes target/faults/summary.json: one entry per scenario and run with scenario, run, completed,
# messages_acked, lost, duplicates, order_violations and failover_ms (kill to the standby's
# takeover, where the sequencer changed), and ack_gap_max_ms (the publishers' longest wait
# for a new ack: after a head kill, the time to the first ack of the new sequencer). Also target/faults/figures.json: throughput at ack 2
# and ack 1 in the same run, and the disk's fdatasync bandwidth (dd oflag=dsync), the ceiling
# of ack 2. Exits non-zero when any scenario lost, duplicated or misordered a message.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

duration_s=8
repeat=1
metrics_base_port=
base_port=9600
cluster_args=()
scenarios=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --duration-s) duration_s=$2; shift 2 ;;
        --repeat) repeat=$2; shift 2 ;;
        --base-port) base_port=$2; shift 2 ;;
        --metrics-base-port) metrics_base_port=$2; cluster_args+=("$1" "$2"); shift 2 ;;
        --pool) cluster_args+=("$1" "$2"); shift 2 ;;
        -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "faults: unknown option $1" >&2; exit 2 ;;
        *) scenarios+=("$1"); shift ;;
    esac
done
[[ ${#scenarios[@]} -gt 0 ]] || scenarios=(baseline kill-nonhead kill-head pause-head restart-nonhead pool-loss history)

ensure_cargo
ensure_packages python3 coreutils curl
metrics_base_port=${metrics_base_port:-$((base_port + 100))}
prepare_hugepages 600
cargo build --release -q -p broker -p client
cargo build --release -q -p broker --example log_digest

out=target/faults
mkdir -p "$out"
results=$out/results.jsonl
: > "$results"
# The brokers' default sequencer lease (--lease-ms), passed explicitly: the pause below is
# measured in it.
lease_ms=50

now_ms() { date +%s%3N; }

# Whatever happens, stop what this script started: the cluster of the current scenario and a
# restoring head.
current_dir= restore_pid=
cleanup() {
    [[ -n $restore_pid ]] && kill "$restore_pid" 2>/dev/null || true
    [[ -n $current_dir ]] && ./scripts/cluster.sh stop --dir "$current_dir" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Starts the 4-broker cluster in $1; further arguments go to cluster.sh start.
start_cluster() {
    local dir=$1; shift
    rm -rf "$dir"
    current_dir=$dir
    ./scripts/cluster.sh start --brokers 4 --pool-bytes 512M --base-port "$base_port" --dir "$dir" \
        --hold-timeout-ms 10000 --replicas --broker-args "--lease-ms $lease_ms" \
        "${cluster_args[@]}" "$@" >/dev/null
}

# Runs the load generator against the cluster in $1 (extra arguments follow), subscriber on
# broker 3, which no scenario disturbs.
run_loadgen() {
    local dir=$1; shift
    ./target/release/loadgen --brokers "$(cat "$dir/brokers")" --subscriber-broker "${subscriber_broker:-3}" \
        --test end-to-end --order 5 --ack 2 --message-bytes 1024 --connections-per-broker 1 \
        --reconnect-timeout-ms 30000 --drain-timeout-s 60 --progress none \
        --json "$dir/summary.json" "$@" > "$dir/loadgen.log" 2>&1
}

# Prints the milliseconds from $2 (epoch ms) to the first takeover line in the logs of $1.
takeover_ms() {
    python3 - "$1" "$2" <<'PY'
import datetime, glob, re, sys
dir, killed = sys.argv[1], int(sys.argv[2])
times = []
for path in glob.glob(f"{dir}/broker-*.log"):
    for line in open(path, errors="replace"):
        if "took the sequencer lease over" in line:
            stamp = re.match(r"\[(\S+)", line).group(1).rstrip("Z")
            t = datetime.datetime.fromisoformat(stamp).replace(tzinfo=datetime.timezone.utc)
            times.append(int(t.timestamp() * 1000))
later = [t - killed for t in times if t >= killed]
print(min(later) if later else "null")
PY
}

record() {
    local scenario=$1 dir=$2 failover=$3 extra=${4:-}
    python3 - "$scenario" "$dir/summary.json" "$failover" "$run" "$extra" >> "$results" <<'PY'
import json, os, sys
scenario, path, failover, run, extra = sys.argv[1:]
entry = {"scenario": scenario, "run": int(run), "completed": False, "messages_acked": 0, "lost": None,
         "duplicates": None, "order_violations": None,
         "failover_ms": None if failover == "null" else int(failover)}
if os.path.exists(path):
    s = json.load(open(path))
    entry.update(completed=bool(s["passed"]), messages_acked=s["messages_acked"],
                 lost=s["lost"], duplicates=s["duplicates"],
                 order_violations=s["order_violations"], errors=s["errors"][:5],
                 reconnects=s.get("reconnects"), batches_resent=s.get("batches_resent"),
                 ack_gap_max_ms=s.get("ack_gap_max_ms"), mb_per_s=s.get("mb_per_s"))
if extra:
    entry.update(json.loads(extra))
    if entry.get("log_matches") is False:
        entry["completed"] = False
    # The history scenario must have read from disk after a redirect, or it proved nothing.
    if entry.get("history_batches_delivered") == 0 or entry.get("subscriber_redirects") == 0:
        entry["completed"] = False
print(json.dumps(entry))
PY
    tail -1 "$results"
    # The replica files hold the whole log once per broker (GBs per scenario): keep them
    # only where something went wrong.
    if tail -1 "$results" | grep -q '"completed": true'; then
        drop_replicas "$dir"
    else
        echo "faults: $scenario: replica files kept in $dir for inspection"
    fi
}

drop_replicas() { rm -rf "$1"/replica-*; }

fault_run() {
    local scenario=$1 dir=$out/$1$run_suffix failover=null killed
    start_cluster "$dir"
    run_loadgen "$dir" --duration-s "$duration_s" &
    local loadgen=$!
    # The fault lands in the middle of the run (the brokers are up, the load is on).
    sleep $((duration_s / 3 + 1))
    killed=$(now_ms)
    case $scenario in
        kill-nonhead) ./scripts/cluster.sh signal 2 KILL --dir "$dir" ;;
        kill-head) ./scripts/cluster.sh signal 0 KILL --dir "$dir" ;;
        pause-head)
            ./scripts/cluster.sh signal 0 STOP --dir "$dir"
            sleep $((lease_ms * 3 / 1000 + 1))
            ./scripts/cluster.sh signal 0 CONT --dir "$dir" ;;
        restart-nonhead)
            ./scripts/cluster.sh signal 2 KILL --dir "$dir"
            sleep 2
            ./scripts/cluster.sh restart 2 --dir "$dir" ;;
    esac
    wait "$loadgen" || true
    case $scenario in kill-head | pause-head) failover=$(takeover_ms "$dir" "$killed") ;; esac
    ./scripts/cluster.sh stop --dir "$dir" >/dev/null
    record "$scenario" "$dir" "$failover"
}

# The log read back from disk: 4x the pool published at ack 2, then read from position 0.
history_run() {
    local dir=$out/history$run_suffix from_disk=0 served redirects
    start_cluster "$dir" --pool-bytes 256M --replica-brokers "1 3"
    subscriber_broker=2 run_loadgen "$dir" --total-bytes 1GiB --subscribe-after-publish || true
    for i in 1 3; do
        served=$(curl -s "http://127.0.0.1:$((metrics_base_port + i))/metrics" \
            | awk '/^embarcadero_history_batches_delivered_total/ {print $2}')
        from_disk=$((from_disk + ${served:-0}))
    done
    ./scripts/cluster.sh stop --dir "$dir" >/dev/null
    redirects=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("subscriber_redirects", 0))' \
        "$dir/summary.json" 2>/dev/null || echo 0)
    record history "$dir" null "{\"history_batches_delivered\": $from_disk, \"subscriber_redirects\": $redirects}"
}

pool_loss() {
    local dir=$out/pool-loss$run_suffix
    start_cluster "$dir"
    # The whole log must fit in the rebuilt pool (a longer one is restored up to its tail).
    run_loadgen "$dir" --total-bytes 96MiB || true
    local pool before after
    pool=$(cat "$dir/pool")
    before=$(./target/release/examples/log_digest "$pool" loadgen || echo '{}')
    # Losing the pool: every broker stops, the pool file is deleted (cluster.sh stop does).
    ./scripts/cluster.sh stop --dir "$dir" >/dev/null
    [[ ! -e $pool ]]
    local dirs
    dirs=$(printf '%s,' "$dir"/replica-{0,1,2,3}); dirs=${dirs%,}
    RUST_LOG=info ./target/release/broker --id 0 --head --format --pool "$pool" --pool-bytes 512M \
        --brokers-max 4 --listen "127.0.0.1:$base_port" --recover-from "$dirs" \
        > "$dir/restore.log" 2>&1 &
    local head=$!
    restore_pid=$head
    for _ in $(seq 1 300); do
        grep -q "^listening on" "$dir/restore.log" && break
        kill -0 "$head" 2>/dev/null || break
        sleep 0.1
    done
    after=$(./target/release/examples/log_digest "$pool" loadgen || echo '{}')
    kill "$head" 2>/dev/null || true
    wait "$head" 2>/dev/null || true
    restore_pid=
    rm -f "$pool"
    local extra
    extra=$(python3 -c '
import json, sys
b, a = json.loads(sys.argv[1]), json.loads(sys.argv[2] or "{}")
print(json.dumps({"log_before": b, "log_after": a, "log_matches": bool(b) and b == a}))' "$before" "$after")
    record pool-loss "$dir" null "$extra"
}

for run in $(seq 1 "$repeat"); do
    for scenario in "${scenarios[@]}"; do
        # Each run keeps its own directory (a failed one keeps its replica files).
        run_suffix=$([[ $repeat -eq 1 ]] || echo "-run$run")
        echo "== fault scenario: $scenario (run $run of $repeat)"
        case $scenario in
            baseline | kill-nonhead | kill-head | pause-head | restart-nonhead) fault_run "$scenario" ;;
            pool-loss) pool_loss ;;
            history) history_run ;;
            *) echo "faults: unknown scenario $scenario" >&2; exit 2 ;;
        esac
    done
done

echo "== figures: ack 2 against ack 1 in the same run, and the disk's fdatasync bandwidth"
dir=$out/figures
figure() {
    local label=$1 ack=$2
    ./target/release/loadgen --brokers "$(cat "$dir/brokers")" --test publish --order 5 \
        --ack "$ack" --message-bytes 1024 --connections-per-broker 1 --duration-s 5 \
        --topic "figures-$label" --progress none --json "$dir/$label.json" > "$dir/$label.log" 2>&1 || true
}
start_cluster "$dir"
figure ack1 1
figure ack2-all 2
./scripts/cluster.sh stop --dir "$dir" >/dev/null
drop_replicas "$dir"
# The same with only brokers 1 and 2 replicating (rf 2 needs one): half the disk traffic.
dir=$out/figures-two
start_cluster "$dir" --replica-brokers "1 2"
figure ack2-two 2
./scripts/cluster.sh stop --dir "$dir" >/dev/null
drop_replicas "$dir"
cp "$dir/ack2-two.json" "$out/figures/" 2>/dev/null || true
dir=$out/figures
dd if=/dev/zero of="$out/dsync.bin" bs=1M count=64 oflag=dsync 2> "$dir/dd.log" >/dev/null || true
rm -f "$out/dsync.bin"

python3 - "$results" "$out/summary.json" "$dir" "$out/figures.json" <<'PY'
import json, re, sys, os
results, summary_path, dir, figures_path = sys.argv[1:]
entries = [json.loads(line) for line in open(results) if line.strip()]
json.dump(entries, open(summary_path, "w"), indent=2)
def mb(label):
    path = f"{dir}/{label}.json"
    return json.load(open(path)).get("mb_per_s") if os.path.exists(path) else None
dd = open(f"{dir}/dd.log").read()
m = re.search(r"([\d.,]+) ([kMG]?B)/s", dd)
scale = {"kB": 1e-3, "MB": 1, "GB": 1e3, "B": 1e-6}
dsync = float(m.group(1).replace(",", ".")) * scale[m.group(2)] if m else None
figures = {"ack1_mb_per_s": mb("ack1"), "ack2_mb_per_s": mb("ack2-all"),
           "ack2_two_replicas_mb_per_s": mb("ack2-two"), "fdatasync_mb_per_s": dsync,
           "settings": "4 brokers, 1 KiB messages, order 5, 1 connection per broker, 5 s each; "
                       "ack2: every broker replicates (rf 2); ack2_two_replicas: brokers 1 and 2; "
                       "fdatasync: dd bs=1M oflag=dsync on the same disk"}
json.dump(figures, open(figures_path, "w"), indent=2)
print(json.dumps(figures))
def failed(e):
    return not e["completed"] or e["lost"] or e["duplicates"] or e["order_violations"]
def p50_max(values):
    values = sorted(v for v in values if v is not None)
    return f"{values[(len(values) - 1) // 2]} / {values[-1]}" if values else "-"
print(f"{'scenario':<16} {'runs':>4} {'failed':>6} {'failover ms p50 / max':>22} {'ack wait ms p50 / max':>22}")
for name in dict.fromkeys(e["scenario"] for e in entries):
    runs = [e for e in entries if e["scenario"] == name]
    print(f"{name:<16} {len(runs):>4} {sum(map(bool, map(failed, runs))):>6} "
          f"{p50_max(e['failover_ms'] for e in runs):>22} "
          f"{p50_max(e.get('ack_gap_max_ms') for e in runs):>22}")
bad = [f"{e['scenario']} (run {e['run']})" for e in entries if failed(e)]
print(f"faults: {len(entries)} scenario runs, {len(entries) - len(bad)} clean" + (f"; failed: {bad}" if bad else ""))
sys.exit(1 if bad else 0)
PY
