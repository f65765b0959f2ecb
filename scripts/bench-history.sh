#!/usr/bin/env bash
# History read throughput: one subscriber reading old positions from a replica's segment
# files on disk, then recent ones from the pool, and the files' own read rate, all in the
# same run.
#
#   ./scripts/bench-history.sh [--publish-bytes SIZE] [--read-bytes SIZE] [--base-port P]
#
# 4 brokers on a 256 MiB pool (so the pool holds about the last quarter of a 1 GiB log);
# brokers 1 and 3 keep replicas. The load generator publishes --publish-bytes (default
# 1GiB) of 1 KiB messages at order 5, ack 2 (rf 2), then a subscriber on broker 1 reads
# --read-bytes (default 128MiB):
#   disk  from position 0: every batch from broker 1's segment files (O_DIRECT-written, so
#         not in the page cache unless the kernel kept it);
#   pool  from the last --read-bytes of the log: every batch from the pool;
#   files the segment files themselves read with cat after the page cache is dropped (the
#         disk's sequential read rate through a pipe: a floor).
# Nothing is pinned (2 CPUs: the subscriber and the broker share them). Writes
# target/bench/history.json: entries with source (disk / pool / files), mb_per_s, bytes,
# seconds, and ratio_to_pool. A benchmark: it reports, it asserts only that the reads
# completed intact (the loadgen checks every message it reads).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

publish_bytes=1GiB
read_bytes=128MiB
base_port=9300
while [[ $# -gt 0 ]]; do
    case $1 in
        --publish-bytes) publish_bytes=$2; shift 2 ;;
        --read-bytes) read_bytes=$2; shift 2 ;;
        --base-port) base_port=$2; shift 2 ;;
        -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-history: unknown option $1" >&2; exit 2 ;;
    esac
done

ensure_cargo
ensure_packages python3 coreutils
prepare_hugepages 300
cargo build --release -q -p broker -p client

out=target/bench
dir=$out/history-cluster
mkdir -p "$out"
rm -rf "$dir"
cleanup() { ./scripts/cluster.sh stop --dir "$dir" >/dev/null 2>&1 || true; }
trap cleanup EXIT
./scripts/cluster.sh start --brokers 4 --pool-bytes 256M --base-port "$base_port" --dir "$dir" \
    --hold-timeout-ms 10000 --replicas --replica-brokers "1 3" >/dev/null
brokers=$(cat "$dir/brokers")

echo "publishing $publish_bytes at ack 2 (rf 2)"
./target/release/loadgen --brokers "$brokers" --test publish --order 5 --ack 2 \
    --message-bytes 1024 --total-bytes "$publish_bytes" --topic history-bench --progress none \
    --json "$dir/publish.json" > "$dir/publish.log" 2>&1 ||
    { tail -20 "$dir/publish.log"; exit 1; }
messages=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["messages_acked"])' "$dir/publish.json")
read_messages=$(python3 -c 'import sys
units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
text = sys.argv[1].lower().rstrip("b").rstrip("i")
number = text.rstrip("kmg")
print(int(float(number) * units[text[len(number):]]) // 1024)' "$read_bytes")
(( read_messages * 2 < messages )) || { echo "--read-bytes must be under half of --publish-bytes" >&2; exit 2; }

subscribe() { # $1 name, $2 from position
    ./target/release/loadgen --brokers "$brokers" --subscriber-broker 1 --test subscribe \
        --topic history-bench --order 5 --from-position "$2" --total-bytes "$read_bytes" \
        --message-bytes 1024 --progress none --json "$dir/$1.json" > "$dir/$1.log" 2>&1 ||
        { tail -20 "$dir/$1.log"; exit 1; }
}
echo "reading $read_bytes from position 0 (disk) and from position $((messages - read_messages)) (pool)"
subscribe disk 0
subscribe pool $((messages - read_messages))
served=$(curl -s "http://127.0.0.1:$((base_port + 101))/metrics" |
    awk '/^embarcadero_history_batches_delivered_total/ {print $2}')
# The disk's own sequential read rate, on the same files (after the page cache is dropped,
# when this runs as root).
sync
[[ -w /proc/sys/vm/drop_caches ]] && echo 3 > /proc/sys/vm/drop_caches || true
files_start=$(date +%s%N)
# (cat stops with SIGPIPE once head has its bytes.)
files_bytes=$( (cat "$dir"/replica-1/topic-*-*.log 2>/dev/null || true) | head -c "$((read_messages * 1100))" | wc -c)
files_ns=$(( $(date +%s%N) - files_start ))

python3 - "$dir" "$out/history.json" "${served:-0}" "$files_bytes" "$files_ns" <<'PY'
import json, sys
dir, path, served, files_bytes, files_ns = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
entries = []
for source in ("disk", "pool"):
    s = json.load(open(f"{dir}/{source}.json"))
    entries.append({"source": source, "mb_per_s": s["mb_per_s"], "bytes": s["bytes_received"],
                    "seconds": s["seconds"], "passed": s.get("passed")})
entries.append({"source": "files", "mb_per_s": files_bytes / (files_ns / 1e9) / 1e6 if files_ns else None,
                "bytes": files_bytes, "seconds": files_ns / 1e9, "passed": True})
pool = entries[1]["mb_per_s"]
for e in entries:
    e["ratio_to_pool"] = round(e["mb_per_s"] / pool, 2) if pool and e["mb_per_s"] else None
json.dump({"entries": entries, "history_batches_served_by_broker_1": served}, open(path, "w"), indent=1)
print(f"{'source':<6} {'MB/s':>8} {'x pool':>7}")
for e in entries:
    print(f"{e['source']:<6} {e['mb_per_s']:>8.0f} {e['ratio_to_pool']:>7}")
print(f"batches broker 1 served from disk: {served}")
if served == 0:
    sys.exit("the disk read was served from the pool: nothing measured")
PY
