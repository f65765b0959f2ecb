#!/usr/bin/env bash
# Kafka-protocol benchmark: ingest and produce-to-ack latency of Kafka clients against one
# broker, next to our own protocol's measured in the same run.
#
#   ./scripts/bench-kafka.sh [--records N] [--duration-s S] [--base-port P]
#
# One broker (scripts/cluster.sh, kernel TCP, Kafka listener on P+1000) pinned to CPU 1;
# every client pinned to CPU 0. 1 KiB messages, order 5, ack 1 (acks=1).
#   ingest:  our loadgen (`--test publish`, 1 connection, default batching) for S seconds;
#            a C producer on librdkafka of 4N records (scripts/kafka-producer.c, built here
#            against Debian's librdkafka-dev: linger 5 ms, batches up to 1 MB, no copy of
#            its own); kcat -P of N lines (librdkafka); the confluent-kafka Python producer
#            of N records (scripts/kafka-bench.py ingest). Each with the client's CPU
#            seconds and the broker's, per GB.
#   latency: loadgen `--test latency` at 10,000 msgs/s, one message per batch; the C
#            producer and the confluent-kafka producer at 10,000 records/s, open loop,
#            linger 0: ack p50 / p99 / p99.9 from each message's due time.
# Writes target/bench/kafka.json and prints a table. A benchmark, not a test: it reports.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

records=300000
duration=5
base_port=9800
while [[ $# -gt 0 ]]; do
    case "$1" in
        --records) records="$2"; shift 2 ;;
        --duration-s) duration="$2"; shift 2 ;;
        --base-port) base_port="$2"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

ensure_cargo
ensure_packages build-essential pkg-config util-linux kcat time librdkafka-dev
ensure_kafka_clients
. scripts/lab.sh
ensure_xdp_build_deps
prepare_hugepages 600
cargo build --release -q -p broker -p client
mkdir -p target/bench
cc -O2 -Wall -Wextra -pthread -o target/bench/kafka-producer scripts/kafka-producer.c -lrdkafka

out=target/bench/kafka
mkdir -p "$out"
kafka_port=$((base_port + 1000))
input="$out/records.txt"
python3 -c "
import sys
line = b'x' * 1023 + b'\n'
with open('$input', 'wb') as f:
    f.write(line * $records)
"
steps="$out/steps.sh"
cat > "$steps" <<EOF
#!/usr/bin/env bash
set -euo pipefail
kafka=127.0.0.1:$kafka_port
broker_pid=\$(head -1 $out/cluster/pids)
cpu_ticks() { awk '{print \$14 + \$15}' /proc/\$broker_pid/stat; }
tick=\$(getconf CLK_TCK)
measure() {  # NAME COMMAND...: runs it, writes $out/NAME.broker (broker CPU s) and .time
    local name=\$1; shift
    local before after
    before=\$(cpu_ticks)
    /usr/bin/time -f '%e %U %S' -o $out/\$name.time "\$@"
    after=\$(cpu_ticks)
    python3 -c "print((\$after - \$before) / \$tick)" > $out/\$name.broker
}
echo "== our protocol: loadgen publish, $duration s"
measure loadgen taskset -c 0 ./target/release/loadgen --brokers "\$BROKERS" --topic bench \\
    --test publish --order 5 --ack 1 --message-bytes 1024 --connections-per-broker 1 \\
    --duration-s $duration --json $out/loadgen.json > $out/loadgen.log
echo "== C producer (librdkafka), $((records * 4)) records"
measure cproducer taskset -c 0 ./target/bench/kafka-producer ingest "\$kafka" bench \
    $((records * 4)) 1024 > $out/cproducer.json
echo "== kcat -P, $records records"
measure kcat taskset -c 0 kcat -P -b "\$kafka" -t bench \\
    -X linger.ms=5 -X batch.size=1000000 -X queue.buffering.max.kbytes=1048576 < $input
echo "== confluent-kafka (Python) producer, $records records"
measure confluent taskset -c 0 "$KAFKA_PYTHON" scripts/kafka-bench.py ingest \\
    --bootstrap "\$kafka" --topic bench --records $records > $out/confluent.json
metrics_url=http://127.0.0.1:$((base_port + 100))/metrics
scrape() { curl -sf --max-time 5 "\$metrics_url" > $out/\$1.metrics; }
echo "== latency at 10,000 msgs/s: loadgen"
scrape loadgen-latency.before
taskset -c 0 ./target/release/loadgen --brokers "\$BROKERS" --topic bench-latency --test latency \\
    --order 5 --ack 1 --message-bytes 1024 --rate-msgs-per-s 10000 --duration-s $duration \\
    --messages-per-batch 1 --json $out/loadgen-latency.json > $out/loadgen-latency.log
scrape loadgen-latency.after
echo "== latency at 10,000 records/s: C producer (librdkafka)"
scrape cproducer-latency.before
taskset -c 0 ./target/bench/kafka-producer latency "\$kafka" bench-latency 10000 $duration 1024 \\
    > $out/cproducer-latency.json
scrape cproducer-latency.after
echo "== latency at 10,000 records/s: confluent-kafka"
scrape confluent-latency.before
taskset -c 0 "$KAFKA_PYTHON" scripts/kafka-bench.py latency --bootstrap "\$kafka" \\
    --topic bench-latency --rate 10000 --duration-s $duration > $out/confluent-latency.json
scrape confluent-latency.after
EOF
chmod +x "$steps"
./scripts/cluster.sh run --brokers 1 --cpus 1 --base-port "$base_port" \
    --dir "$out/cluster" --kafka-base-port "$kafka_port" -- "$steps"

python3 - "$out" "$records" <<'PY'
import json, sys
out, records = sys.argv[1], int(sys.argv[2])
def read_time(name):
    elapsed, user, system = map(float, open(f"{out}/{name}.time").read().split()[-3:])
    return elapsed, user + system, float(open(f"{out}/{name}.broker").read())
loadgen = json.load(open(f"{out}/loadgen.json"))
entries = []
elapsed, client_cpu, broker_cpu = read_time("loadgen")
gb = loadgen["bytes_acked"] / 1e9
entries.append({"test": "ingest", "client": "loadgen (our protocol)",
                "mb_per_s": round(loadgen["mb_per_s"], 1),
                "client_cpu_s_per_gb": round(client_cpu / gb, 2),
                "broker_cpu_s_per_gb": round(broker_cpu / gb, 2)})
cproducer = json.load(open(f"{out}/cproducer.json"))
gb = cproducer["acked"] * 1024 / 1e9
elapsed, client_cpu, broker_cpu = read_time("cproducer")
entries.append({"test": "ingest", "client": "C producer (librdkafka)",
                "mb_per_s": cproducer["mb_per_s"],
                "client_cpu_s_per_gb": round(client_cpu / gb, 2),
                "broker_cpu_s_per_gb": round(broker_cpu / gb, 2)})
gb = records * 1024 / 1e9
elapsed, client_cpu, broker_cpu = read_time("kcat")
entries.append({"test": "ingest", "client": "kcat -P (librdkafka)",
                "mb_per_s": round(gb * 1e3 / elapsed, 1),
                "client_cpu_s_per_gb": round(client_cpu / gb, 2),
                "broker_cpu_s_per_gb": round(broker_cpu / gb, 2)})
confluent = json.load(open(f"{out}/confluent.json"))
elapsed, client_cpu, broker_cpu = read_time("confluent")
entries.append({"test": "ingest", "client": "confluent-kafka (Python)",
                "mb_per_s": confluent["mb_per_s"],
                "client_cpu_s_per_gb": round(client_cpu / gb, 2),
                "broker_cpu_s_per_gb": round(broker_cpu / gb, 2)})
def broker_side(name):
    # The broker's own ack latency (received to answered, embarcadero_ack_latency_us) over
    # the run: the histogram's buckets after less before; a percentile is reported as the
    # upper bound of the bucket it falls in.
    def buckets(path):
        found = {}
        for line in open(path):
            if line.startswith("embarcadero_ack_latency_us_bucket"):
                bound = line.split('le="')[1].split('"')[0]
                found[bound] = float(line.rsplit(" ", 1)[1])
        return found
    before = buckets(f"{out}/{name}.before.metrics")
    after = buckets(f"{out}/{name}.after.metrics")
    counts = sorted(((float("inf") if b == "+Inf" else float(b)), after[b] - before.get(b, 0))
                    for b in after)
    total = counts[-1][1] if counts else 0
    def at(p):
        for bound, cumulative in counts:
            if total and cumulative >= p * total:
                return None if bound == float("inf") else int(bound)
        return None
    return {"broker_acks": int(total), "broker_p50_us_at_most": at(0.5),
            "broker_p99_us_at_most": at(0.99)}
ours = json.load(open(f"{out}/loadgen-latency.json"))
ack = ours["ack_latency_from_intended_us"]
entries.append({"test": "latency", "client": "loadgen (our protocol)", "rate_per_s": 10000,
                "ack_p50_us": ack.get("p50"), "ack_p99_us": ack.get("p99"),
                "ack_p999_us": ack.get("p999"), **broker_side("loadgen-latency")})
c_latency = json.load(open(f"{out}/cproducer-latency.json"))
entries.append({"test": "latency", "client": "C producer (librdkafka)", "rate_per_s": 10000,
                "ack_p50_us": c_latency["ack_p50_us"], "ack_p99_us": c_latency["ack_p99_us"],
                "ack_p999_us": c_latency["ack_p999_us"], **broker_side("cproducer-latency")})
kafka = json.load(open(f"{out}/confluent-latency.json"))
entries.append({"test": "latency", "client": "confluent-kafka (Python)", "rate_per_s": 10000,
                "ack_p50_us": kafka["ack_p50_us"], "ack_p99_us": kafka["ack_p99_us"],
                "ack_p999_us": kafka["ack_p999_us"], **broker_side("confluent-latency")})
json.dump({"pinning": "broker on CPU 1, clients on CPU 0", "entries": entries},
          open("target/bench/kafka.json", "w"), indent=2)
base = entries[0]["mb_per_s"]
print("pinning: broker on CPU 1, clients on CPU 0; 1 KiB, order 5, ack 1")
for e in entries:
    if e["test"] == "ingest":
        print(f"ingest   {e['client']:28} {e['mb_per_s']:8.1f} MB/s  {e['mb_per_s'] / base:4.2f}x  "
              f"client {e['client_cpu_s_per_gb']:5.2f} s/GB  broker {e['broker_cpu_s_per_gb']:5.2f} s/GB")
    else:
        print(f"latency  {e['client']:28} p50 {e['ack_p50_us']} us  p99 {e['ack_p99_us']} us  "
              f"p99.9 {e['ack_p999_us']} us  (broker side: p50 <= {e['broker_p50_us_at_most']} us, "
              f"p99 <= {e['broker_p99_us_at_most']} us, {e['broker_acks']} answers)")
print("target/bench/kafka.json")
PY
