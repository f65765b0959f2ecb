#!/usr/bin/env bash
# A local Embarcadero-rs cluster: N broker processes on loopback sharing one pool.
#
#   scripts/cluster.sh run [options] -- COMMAND...   start, run COMMAND, stop (also on Ctrl-C)
#   scripts/cluster.sh start [options]               start in the background
#   scripts/cluster.sh stop [--dir DIR]              stop what `start` started
#   scripts/cluster.sh signal I SIG [--dir DIR]      send SIG (KILL, STOP, CONT...) to broker I
#   scripts/cluster.sh restart I [--dir DIR]         start broker I again (same id and flags,
#                                                    never --format), after a kill
#
# Options:
#   --brokers N        brokers to start (default 4); broker 0 is the head (sequencer)
#   --base-port P      broker i listens on 127.0.0.1:P+i, metrics on :P+100+i (default 9100)
#   --metrics-base-port M  metrics of broker i on :M+i instead of :P+100+i
#   --pool PATH        pool file (default /dev/hugepages/embarcadero-cluster-P, or /dev/shm/...
#                      without hugetlbfs)
#   --pool-bytes SIZE  pool size (default 1G)
#   --dir DIR          logs, PIDs and the address list (default target/cluster)
#   --coherence MODE   noncoherent (default) or coherent
#   --cpus LIST        pin every broker to these CPUs (taskset list, e.g. 1 or 0-1)
#   --hold-timeout-ms N  order-5 gap hold timeout of the brokers (default: the broker's)
#   --replicas         broker i replicates to DIR/replica-i; the head creates topics with
#                      replication factor 2 (ack level 2)
#   --replica-brokers "I J"  with --replicas: only these brokers replicate (default: all)
#   --broker-args "A"  extra arguments for every broker (word-split)
#   --kafka-base-port K  broker i also takes Kafka clients on 127.0.0.1:K+i (--kafka-listen)
#
# The pool is a file on hugetlbfs (/dev/hugepages) when hugepages are available, else a
# /dev/shm file, announced. COMMAND runs with BROKERS=127.0.0.1:P,127.0.0.1:P+1,... set, and
# an argument of COMMAND that is exactly {brokers} is replaced by that list.
# Broker binaries come from target/release (build them first: cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "cluster: $*" >&2; exit 1; }

action=${1:-}
[[ -n $action ]] || { usage; exit 2; }
shift
target_broker= target_signal=
case $action in
    signal) target_broker=${1:?signal needs a broker index}; target_signal=${2:?signal needs a signal}; shift 2 ;;
    restart) target_broker=${1:?restart needs a broker index}; shift ;;
esac
brokers=4 base_port=9100 metrics_base_port= pool_arg= pool_bytes=1G dir=target/cluster
coherence=noncoherent cpus= hold_ms= replicas=0 replica_brokers= broker_args= kafka_base_port=
command=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --brokers) brokers=$2; shift 2 ;;
        --base-port) base_port=$2; shift 2 ;;
        --metrics-base-port) metrics_base_port=$2; shift 2 ;;
        --pool) pool_arg=$2; shift 2 ;;
        --pool-bytes) pool_bytes=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        --coherence) coherence=$2; shift 2 ;;
        --cpus) cpus=$2; shift 2 ;;
        --hold-timeout-ms) hold_ms=$2; shift 2 ;;
        --replicas) replicas=1; shift ;;
        --replica-brokers) replica_brokers=$2; shift 2 ;;
        --kafka-base-port) kafka_base_port=$2; shift 2 ;;
        --broker-args) broker_args=$2; shift 2 ;;
        --) shift; command=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ $brokers =~ ^[0-9]+$ && $brokers -ge 1 ]] || die "--brokers needs a positive number"
[[ -n $metrics_base_port ]] || metrics_base_port=$((base_port + 100))
binary=target/release/broker
addresses() {
    local list=()
    for ((i = 0; i < brokers; i++)); do list+=("127.0.0.1:$((base_port + i))"); done
    (IFS=,; echo "${list[*]}")
}

pool_path() {
    if [[ -n $pool_arg ]]; then
        echo "$pool_arg"
    elif mount | grep -q " /dev/hugepages type hugetlbfs"; then
        echo "/dev/hugepages/embarcadero-cluster-$base_port"
    else
        echo "/dev/shm/embarcadero-cluster-$base_port"
    fi
}

stop_cluster() {
    [[ -f $dir/pids ]] || return 0
    local pids
    pids=$(cat "$dir/pids")
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 50); do
        local alive=0
        for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive -eq 0 ]] && break
        sleep 0.1
    done
    for pid in $pids; do
        if kill -0 "$pid" 2>/dev/null; then
            echo "cluster: broker pid $pid did not stop in 5 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$dir/pids" "$(cat "$dir/pool" 2>/dev/null || echo /nonexistent)" "$dir/pool"
    echo "cluster: stopped"
}

start_cluster() {
    [[ -x $binary ]] || die "$binary not found: run cargo build --release first"
    [[ -f $dir/pids ]] && stop_cluster
    mkdir -p "$dir"
    local pool fallback=()
    pool=$(pool_path)
    if [[ $pool == /dev/shm/* ]]; then
        echo "cluster: WARNING: no hugetlbfs at /dev/hugepages; the pool is a /dev/shm file (run scripts/setup-hugepages.sh as root for hugepages)" >&2
        fallback=(--allow-shm-fallback)
    fi
    echo "$pool" > "$dir/pool"
    : > "$dir/pids"
    for ((i = 0; i < brokers; i++)); do
        local args=(--id "$i" --pool "$pool" --listen "127.0.0.1:$((base_port + i))"
            --metrics "127.0.0.1:$((metrics_base_port + i))" --coherence "$coherence" "${fallback[@]}")
        if [[ $i -eq 0 ]]; then
            args+=(--head --format --pool-bytes "$pool_bytes" --brokers-max "$brokers")
        fi
        [[ -n $hold_ms ]] && args+=(--hold-timeout-ms "$hold_ms")
        [[ -n $kafka_base_port ]] && args+=(--kafka-listen "127.0.0.1:$((kafka_base_port + i))")
        if [[ $replicas -eq 1 ]]; then
            args+=(--replication-factor 2)
            if [[ -z $replica_brokers || " $replica_brokers " == *" $i "* ]]; then
                args+=(--replica-dir "$dir/replica-$i")
            fi
        fi
        # shellcheck disable=SC2206 # word-splitting the extra arguments is the point
        [[ -n $broker_args ]] && args+=($broker_args)
        local pin=()
        [[ -n $cpus ]] && pin=(taskset -c "$cpus")
        printf '%s\n' "${pin[@]}" "$binary" "${args[@]}" > "$dir/cmd-$i"
        RUST_LOG=${RUST_LOG:-info} "${pin[@]}" "$binary" "${args[@]}" > "$dir/broker-$i.log" 2>&1 &
        echo $! >> "$dir/pids"
        if [[ $i -eq 0 ]]; then wait_listening 0; fi
    done
    for ((i = 1; i < brokers; i++)); do wait_listening "$i"; done
    addresses > "$dir/brokers"
    echo "cluster: $brokers brokers on $(addresses), pool $pool, logs in $dir"
}

broker_pid() { sed -n "$(($1 + 1))p" "$dir/pids"; }

signal_broker() {
    local pid
    pid=$(broker_pid "$target_broker")
    [[ -n $pid ]] || die "no broker $target_broker in $dir/pids"
    kill -s "$target_signal" "$pid"
    echo "cluster: sent SIG$target_signal to broker $target_broker (pid $pid)"
}

# Starts broker $target_broker again with the flags it had, minus --format (the pool stays).
restart_broker() {
    local i=$target_broker old cmd=()
    old=$(broker_pid "$i")
    [[ -n $old ]] || die "no broker $i in $dir/pids"
    if kill -0 "$old" 2>/dev/null; then die "broker $i (pid $old) still runs: signal it first"; fi
    local skip=0 word
    while IFS= read -r word; do
        if [[ $skip -gt 0 ]]; then skip=$((skip - 1)); continue; fi
        case $word in
            --format) continue ;;
            --pool-bytes | --brokers-max) skip=1; continue ;;
        esac
        cmd+=("$word")
    done < "$dir/cmd-$i"
    RUST_LOG=${RUST_LOG:-info} "${cmd[@]}" >> "$dir/broker-$i.log" 2>&1 &
    local pid=$!
    sed -i "$((i + 1))s/.*/$pid/" "$dir/pids"
    echo "cluster: restarted broker $i (pid $pid)"
}

# Waits until broker $1 prints its listening line; fails with its log if it exits.
wait_listening() {
    local i=$1 pid
    pid=$(sed -n "$((i + 1))p" "$dir/pids")
    for _ in $(seq 1 300); do
        grep -q "^listening on" "$dir/broker-$i.log" 2>/dev/null && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "cluster: broker $i exited during start-up:" >&2
            tail -5 "$dir/broker-$i.log" >&2
            stop_cluster
            exit 1
        fi
        sleep 0.1
    done
    stop_cluster
    die "broker $i did not start listening within 30 s (see $dir/broker-$i.log)"
}

case $action in
    start) start_cluster ;;
    stop) stop_cluster ;;
    signal) signal_broker ;;
    restart) restart_broker ;;
    run)
        [[ ${#command[@]} -gt 0 ]] || die "run needs a command after --"
        trap stop_cluster EXIT
        trap 'exit 130' INT TERM
        start_cluster
        # An argument that is exactly {brokers} becomes the address list.
        list=$(addresses)
        for i in "${!command[@]}"; do
            [[ ${command[$i]} == "{brokers}" ]] && command[i]=$list
        done
        BROKERS=$list "${command[@]}"
        ;;
    *) usage; exit 2 ;;
esac
