#!/usr/bin/env bash
# Tests of the kernel-bypass backend (broker --net xdp), end to end, as root:
#
#   scripts/test-bypass.sh [e2e|busy-poll|queues|loss|faults|failover|errors|all]  (default all)
#
#   e2e     4 brokers over XDP/AF_XDP/smoltcp in a lab of the test's own; loadgen end-to-end
#           order 5, ack 1; asserts on the loadgen's JSON and on the XDP counters (no broker
#           packet passed to the kernel, no_socket 0)
#   queues  the same with 2 rx queues per broker interface (a socket on each, one loop),
#           connections spread over both
#   busy-poll  the same in driver mode with preferred busy polling (--xdp-busy-poll-us 50)
#   loss    the same with 1% random loss in both directions (nftables in the client namespace)
#   faults  the same with the broker-side fault-injecting device (hidden debug flag
#           --debug-inject-faults drop=1,duplicate=1,reorder=1,corrupt=1,seed=N)
#   failover  the same lab at ack 2 (every broker replicating, rf 2), the head killed (-9)
#           mid-run: a standby takes the sequencer over, the publishers notice the silent
#           connections (no kernel TCP to reset them), reconnect and resend; every
#           acknowledged message is delivered once, in order (subscriber on broker 3); the
#           killed broker's program is detached with xdp-ctl afterwards
#   errors  missing interface, attach refused (MTU too large for driver mode), a second
#           broker on a taken interface, hugepages missing for the UMEM: each exits non-zero
#           with its error, leaves no program
#
# Each case is bounded (timeout 60 s). Builds nothing: run
#   cargo build --release -p broker -p client -p xdp-prog
# first (CARGO_TARGET_DIR honoured). Without root it prints "skipped: needs root" and exits 0.
# Assertions are on exit codes and JSON, never on log text.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}/release
if [[ $(id -u) -ne 0 ]]; then
    echo "skipped: needs root (network namespaces, XDP)"
    exit 0
fi
for bin in broker loadgen xdp-ctl; do
    [[ -x $target/$bin ]] || { echo "missing $target/$bin: cargo build --release -p broker -p client -p xdp-prog" >&2; exit 2; }
done
command -v jq >/dev/null || { echo "needs jq (apt-get install -y jq)" >&2; exit 2; }

prefix=${TEST_BYPASS_PREFIX:-bt$$}
prefix=${prefix:0:8}
pool=/dev/hugepages/$prefix-pool
work=$(mktemp -d /tmp/test-bypass.XXXXXX)
pids=()
brokers=4
base_port=${TEST_BYPASS_BASE_PORT:-9300}

cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
    scripts/lab.sh down --prefix "$prefix" >/dev/null 2>&1 || true
    rm -f "$pool"
}
trap 'cleanup; rm -rf "$work"' EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }

lab_up() { scripts/lab.sh up --prefix "$prefix" --brokers "$brokers" "$@" >"$work/lab.log" 2>&1 || { cat "$work/lab.log"; fail "lab up"; }; }

# Starts broker i over XDP; extra flags after i ({i} in a flag becomes i).
start_broker() {
    local i=$1; shift
    set -- "${@//\{i\}/$i}"
    local head=()
    [[ $i -eq 0 ]] && head=(--head --format --pool-bytes 256M)
    ip netns exec "$prefix-broker$i" "$target/broker" --net xdp --iface "$prefix-b$i" \
        --id "$i" --pool "$pool" --listen "10.77.$i.2:$((base_port + i))" --cores $((i % 2)) \
        --idle sleep "${head[@]}" "$@" >"$work/broker$i.log" 2>&1 &
    pids+=($!)
}

start_cluster() {
    local i
    start_broker 0 "$@"
    sleep 1
    for ((i = 1; i < brokers; i++)); do start_broker "$i" "$@"; done
    # Every broker attaches its program once it is up.
    for _ in $(seq 100); do
        local up=0
        for ((i = 0; i < brokers; i++)); do
            ip netns exec "$prefix-broker$i" "$target/xdp-ctl" status "$prefix-b$i" >/dev/null 2>&1 && up=$((up + 1))
        done
        [[ $up -eq $brokers ]] && return 0
        sleep 0.1
    done
    tail -n 5 "$work"/broker*.log
    fail "brokers did not start"
}

run_loadgen() {
    local list=() i
    for ((i = 0; i < brokers; i++)); do list+=("10.77.$i.2:$((base_port + i))"); done
    ip netns exec "$prefix-client" timeout 50 "$target/loadgen" --test end-to-end --order 5 --ack 1 \
        --brokers "$(IFS=,; echo "${list[*]}")" --total-bytes "$1" --json "$work/result.json" "${@:2}" \
        >"$work/loadgen.log" 2>&1 || { tail -n 30 "$work/loadgen.log"; tail -n 5 "$work"/broker*.log; fail "loadgen exited non-zero"; }
    jq -e '.passed == true and .lost == 0 and .duplicates == 0 and .order_violations == 0
        and .messages_received == .messages_sent and .messages_sent > 0' "$work/result.json" >/dev/null ||
        { cat "$work/result.json"; fail "loadgen result"; }
    echo "  loadgen: $(jq -c '{messages_sent, messages_received, lost, duplicates, order_violations, passed}' "$work/result.json")"
}

check_counters() {
    local i counters
    for ((i = 0; i < brokers; i++)); do
        counters=$(ip netns exec "$prefix-broker$i" "$target/xdp-ctl" counters "$prefix-b$i")
        echo "  $prefix-b$i: $(tr "\n" " " <<<"$counters")"
        # Broker traffic never reached the kernel (ARP does: the kernel keeps neighbours).
        [[ $(awk '/no_socket/ {print $2}' <<<"$counters") == 0 ]] || fail "no_socket not 0 on $prefix-b$i"
        [[ $(awk '/^cookie_valid/ {print $2}' <<<"$counters") -gt 0 ]] || fail "no connection opened by a SYN cookie on $prefix-b$i"
        [[ $(awk '/redirected/ {print $2}' <<<"$counters") -gt 0 ]] || fail "nothing redirected on $prefix-b$i"
    done
}

stop_cluster() { stop_cluster_from 0; }

# Stops the running brokers (SIGTERM must end each cleanly) and checks that brokers
# $1..brokers-1 left no program behind.
stop_cluster_from() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" || fail "a broker exited with $? on SIGTERM"; done
    pids=()
    local i
    for ((i = $1; i < brokers; i++)); do
        if ip netns exec "$prefix-broker$i" "$target/xdp-ctl" status "$prefix-b$i" >/dev/null 2>&1; then
            fail "XDP program left on $prefix-b$i"
        fi
    done
}

case_e2e() {
    echo "== e2e: 4 brokers over XDP, order 5, ack 1"
    lab_up
    # No loss here, but a loaded host can delay a batch: the gap rule is not under test.
    start_cluster --hold-timeout-ms 10000
    run_loadgen 64MB
    check_counters
    stop_cluster
    cleanup
}

case_loss() {
    echo "== loss: 1% random loss both ways (nftables in the client namespace)"
    lab_up
    ip netns exec "$prefix-client" nft -f - <<EOF
table inet lossy {
    chain in { type filter hook input priority 0; policy accept; meta l4proto tcp numgen random mod 100 < 1 counter drop; }
    chain out { type filter hook output priority 0; policy accept; meta l4proto tcp numgen random mod 100 < 1 counter drop; }
}
EOF
    # On a lossy link a batch can arrive seconds after its successors (TCP retransmission
    # backs off); the order-5 hold timeout must exceed that, or the gap rule skips batches.
    start_cluster --hold-timeout-ms 10000
    run_loadgen 16MB
    check_counters
    # The run must really have lost packets, in both directions.
    local drops
    drops=$(ip netns exec "$prefix-client" nft -j list table inet lossy |
        jq -c '[.nftables[] | select(.rule) | .rule.expr[] | select(.counter) | .counter.packets]')
    jq -e 'length == 2 and all(. > 0)' <<<"$drops" >/dev/null ||
        fail "nftables did not drop packets in both directions: $drops"
    echo "  nftables dropped (in, out): $drops"
    stop_cluster
    cleanup
}

case_busy_poll() {
    echo "== busy-poll: 4 brokers over XDP in driver mode, preferred busy polling, order 5, ack 1"
    lab_up
    start_cluster --hold-timeout-ms 10000 --xdp-mode driver --xdp-busy-poll-us 50
    run_loadgen 32MB
    check_counters
    stop_cluster
    cleanup
}

case_queues() {
    echo "== queues: 4 brokers over XDP, 2 rx queues per interface (one AF_XDP socket each), order 5, ack 1"
    lab_up --queues 2
    start_cluster --hold-timeout-ms 10000
    # 16 connections per broker: the chance that the client's hash puts them all on one
    # queue is 2^-15.
    run_loadgen 32MB --connections-per-broker 16
    check_counters
    local i stats q0 q1
    for ((i = 0; i < brokers; i++)); do
        stats=$(ip netns exec "$prefix-broker$i" ethtool -S "$prefix-b$i")
        q0=$(awk '/rx_queue_0_xdp_packets/ {print $2}' <<<"$stats")
        q1=$(awk '/rx_queue_1_xdp_packets/ {print $2}' <<<"$stats")
        echo "  $prefix-b$i: queue 0 ${q0:-?} frames, queue 1 ${q1:-?} frames"
        [[ ${q0:-0} -gt 0 && ${q1:-0} -gt 0 ]] || fail "a queue of $prefix-b$i carried nothing"
    done
    stop_cluster
    cleanup
}

case_faults() {
    echo "== faults: broker-side FaultyDevice, 1% each of drop/duplicate/reorder/corrupt, seeded"
    lab_up
    start_cluster --hold-timeout-ms 10000 --debug-inject-faults "drop=1,duplicate=1,reorder=1,corrupt=1,seed=$$"
    run_loadgen 16MB
    stop_cluster
    # Each broker prints a JSON summary of what it injected when it stops: every kind of
    # fault must have happened somewhere, or this case proved nothing.
    local kind total
    for kind in dropped duplicated reordered corrupted; do
        total=$(grep -h '^{"debug_faults"' "$work"/broker*.log | jq -s "map(.debug_faults.$kind) | add // 0")
        [[ $total -gt 0 ]] || fail "no frame was $kind: the fault injector did not run"
        echo "  frames $kind: $total"
    done
    cleanup
}

# Runs a broker that must fail to start (exit 1) with its error on the one line starting
# "broker: --net xdp:"; $1 names the case, $2 the namespace, $3 a phrase of the error.
case_failover() {
    echo "== failover: ack 2 over XDP, the head killed mid-run"
    lab_up
    start_cluster --hold-timeout-ms 10000 --replica-dir "$work/replica-{i}" --replication-factor 2
    local list=() i
    for ((i = 0; i < brokers; i++)); do list+=("10.77.$i.2:$((base_port + i))"); done
    ip netns exec "$prefix-client" timeout 90 "$target/loadgen" --test end-to-end --order 5 --ack 2 \
        --brokers "$(IFS=,; echo "${list[*]}")" --subscriber-broker 3 --duration-s 8 \
        --reconnect-timeout-ms 30000 --drain-timeout-s 60 --json "$work/result.json" \
        >"$work/loadgen.log" 2>&1 &
    local loadgen=$!
    sleep 3
    kill -KILL "${pids[0]}"
    wait "${pids[0]}" 2>/dev/null || true
    pids=("${pids[@]:1}")
    wait "$loadgen" || { tail -n 30 "$work/loadgen.log"; tail -n 5 "$work"/broker*.log; fail "loadgen exited non-zero"; }
    jq -e '.passed == true and .lost == 0 and .duplicates == 0 and .order_violations == 0
        and .messages_acked > 0 and .reconnects > 0' "$work/result.json" >/dev/null ||
        { cat "$work/result.json"; fail "loadgen result"; }
    echo "  loadgen: $(jq -c '{messages_acked, messages_received, lost, duplicates, order_violations, reconnects, batches_resent, ack_gap_max_ms}' "$work/result.json")"
    grep -q "took the sequencer lease over" "$work"/broker[123].log || fail "no standby took the lease over"
    # A killed broker leaves its program attached: the documented way out.
    ip netns exec "$prefix-broker0" "$target/xdp-ctl" detach "$prefix-b0" >/dev/null
    stop_cluster_from 1
    cleanup
}

expect_failure() {
    local name=$1 ns=$2 phrase=$3; shift 3
    local code=0 line
    ip netns exec "$ns" timeout 20 "$target/broker" --net xdp --id 0 --head --format --pool-bytes 128M \
        --pool "$pool" "$@" >"$work/$name.log" 2>&1 || code=$?
    line=$(grep -m1 '^broker: --net xdp:' "$work/$name.log" || true)
    [[ $code -eq 1 && $line == *"$phrase"* ]] || { cat "$work/$name.log"; fail "$name: exit $code, error line '$line'"; }
    echo "  $name: exit $code: $line"
}

case_errors() {
    echo "== errors"
    brokers=1
    lab_up
    expect_failure missing-interface "$prefix-broker0" "does not exist" --iface nosuch0 --listen 10.77.0.2:9300
    ip -n "$prefix-broker0" link set "$prefix-b0" mtu 3700
    ip -n "$prefix-client" link set "$prefix-c0" mtu 3700
    expect_failure attach-refused "$prefix-broker0" "too large" --iface "$prefix-b0" --xdp-mode driver --listen 10.77.0.2:9300
    ip -n "$prefix-broker0" link set "$prefix-b0" mtu 3500
    ip -n "$prefix-client" link set "$prefix-c0" mtu 3500
    start_broker 0
    for _ in $(seq 100); do
        ip netns exec "$prefix-broker0" "$target/xdp-ctl" status "$prefix-b0" >/dev/null 2>&1 && break
        sleep 0.1
    done
    pool=$pool-2 expect_failure queue-taken "$prefix-broker0" "xdp-ctl detach" --iface "$prefix-b0" --listen 10.77.0.2:9301
    rm -f "$pool-2"
    expect_failure two-queues "$prefix-broker0" "has 1 rx queue" --iface "$prefix-b0" --queues 2 --listen 10.77.0.2:9301
    stop_cluster
    ip netns exec "$prefix-broker0" "$target/xdp-ctl" status "$prefix-b0" >/dev/null 2>&1 && fail "program left"
    # Hugepages missing for the UMEM: the pool exists (formatted above), then every free
    # 2 MiB page is reserved by a file on hugetlbfs, so the UMEM cannot get its pages.
    local sysfs=/sys/kernel/mm/hugepages/hugepages-2048kB available hog=/dev/hugepages/$prefix-hog
    # The kernel frees a closed AF_XDP socket's UMEM pages a little later (deferred work):
    # wait until the count of free pages stops moving before taking them all.
    local previous=-1 _
    for _ in $(seq 50); do
        available=$(( $(cat $sysfs/free_hugepages) - $(cat $sysfs/resv_hugepages) ))
        [[ $available -eq $previous ]] && break
        previous=$available
        sleep 0.2
    done
    fallocate -l "$((available * 2))M" "$hog"
    # Pages freed late are taken too: extend the hog until none stays free.
    local taken=$available
    for _ in $(seq 5); do
        sleep 0.2
        available=$(( $(cat $sysfs/free_hugepages) - $(cat $sysfs/resv_hugepages) ))
        [[ $available -gt 0 ]] || continue
        fallocate -o "$((taken * 2))M" -l "$((available * 2))M" "$hog"
        taken=$((taken + available))
    done
    local code=0
    ip netns exec "$prefix-broker0" timeout 20 "$target/broker" --net xdp --id 0 --pool "$pool" \
        --iface "$prefix-b0" --listen 10.77.0.2:9300 >"$work/umem.log" 2>&1 || code=$?
    rm -f "$hog"
    local line
    line=$(grep -m1 '^broker: --net xdp:' "$work/umem.log" || true)
    [[ $code -eq 1 && $line == *"UMEM"* && $line == *"nr_hugepages"* ]] ||
        { cat "$work/umem.log"; fail "umem-without-hugepages: exit $code, error line '$line'"; }
    echo "  umem-without-hugepages: exit $code: $line"
    ip netns exec "$prefix-broker0" "$target/xdp-ctl" status "$prefix-b0" >/dev/null 2>&1 && fail "program left after the UMEM failure"
    cleanup
    brokers=4
}

what=${1:-all}
case $what in
    e2e) case_e2e ;;
    busy-poll) case_busy_poll ;;
    queues) case_queues ;;
    loss) case_loss ;;
    faults) case_faults ;;
    errors) case_errors ;;
    failover) case_failover ;;
    all) case_e2e; case_busy_poll; case_queues; case_loss; case_faults; case_failover; case_errors ;;
    *) echo "unknown case $what (e2e, busy-poll, queues, loss, faults, failover, errors, all)" >&2; exit 2 ;;
esac
echo "PASS: $what"
