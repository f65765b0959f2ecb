#!/usr/bin/env bash
# Kafka-protocol benchmark: ingest and produce-to-ack latency of Kafka clients against one
# broker, next to our own protocol's measured in the same run.
#
#   ./scripts/bench-kafka.sh [--records N] [--duration-s S] [--pairs K] [--base-port P]
#
# One broker (scripts/cluster.sh, kernel TCP, Kafka listener on P+1000) pinned to CPU 1;
# every client pinned to CPU 0. 1 KiB messages, order 5, ack 1 (acks=1).
#   ingest:  K alternating pairs (default 3; one run of either moves by +-20% here) of our
#            loadgen (`--test publish`, 1 connection, default batching) for S seconds and
#            a C producer on librdkafka for S seconds (scripts/kafka-producer.c, linger
#            5 ms, batches up to 1 MB, no copy of its own; built here with Debian's
#            librdkafka-dev headers and linked against the current librdkafka that the
#            confluent-kafka wheel ships, as an application would use; Debian 12's own is
#            2.0.2, from 2022); kcat -P of N lines (Debian's librdkafka); the
#            confluent-kafka Python producer of N records (scripts/kafka-bench.py ingest).
#            Each with the client's CPU seconds and the broker's, per GB.
#   latency: loadgen `--test latency` at 10,000 msgs/s, one message per batch; the C
#            producer and the confluent-kafka producer at 10,000 records/s, open loop,
#            linger 0: ack p50 / p99 / p99.9 from each message's due time. The C
#            producer's ack is timed where librdkafka's thread takes it (where the loadgen
#            times its own); its delivery reports, one thread hand-off later, beside it.
# Writes target/bench/kafka.json and prints a table. A benchmark, not a test: it reports.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

records=300000
duration=5
pairs=3
base_port=9800
while [[ $# -gt 0 ]]; do
    case "$1" in
        --records) records="$2"; shift 2 ;;
        --duration-s) duration="$2"; shift 2 ;;
        --pairs) pairs="$2"; shift 2 ;;
        --base-port) base_port="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
# The librdkafka of the confluent-kafka wheel; Debian's when the wheel brings none.
librdkafka=$("$KAFKA_PYTHON" -c 'import confluent_kafka, glob, os
print(*glob.glob(os.path.dirname(confluent_kafka.__file__) + ".libs/librdkafka*.so*")[:1])')
if [[ -n "$librdkafka" ]]; then
    link=("$librdkafka" -Wl,-rpath,"$(dirname "$librdkafka")")
else
    link=(-lrdkafka)
fi
cc -O2 -Wall -Wextra -pthread -o target/bench/kafka-producer scripts/kafka-producer.c "${link[@]}"
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
for pair in \$(seq $pairs); do
    echo "== pair \$pair of $pairs: our protocol, loadgen publish, $duration s"
    measure loadgen-\$pair taskset -c 0 ./target/release/loadgen --brokers "\$BROKERS" \\
        --topic bench --test publish --order 5 --ack 1 --message-bytes 1024 \\
        --connections-per-broker 1 --duration-s $duration --json $out/loadgen-\$pair.json \\
        > $out/loadgen-\$pair.log
    echo "== pair \$pair of $pairs: C producer (librdkafka), $duration s"
    measure cproducer-\$pair taskset -c 0 ./target/bench/kafka-producer ingest "\$kafka" \\
        bench $duration 1024 > $out/cproducer-\$pair.json
done
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

python3 - "$out" "$records" "$pairs" <<'PY'
import json, statistics, sys
out, records, pairs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def read_time(name):
    elapsed, user, system = map(float, open(f"{out}/{name}.time").read().split()[-3:])
    return elapsed, user + system, float(open(f"{out}/{name}.broker").read())
entries = []
for pair in range(1, pairs + 1):
    loadgen = json.load(open(f"{out}/loadgen-{pair}.json"))
    elapsed, client_cpu, broker_cpu = read_time(f"loadgen-{pair}")
    gb = loadgen["bytes_acked"] / 1e9
    entries.append({"test": "ingest", "pair": pair, "client": "loadgen (our protocol)",
                    "mb_per_s": round(loadgen["mb_per_s"], 1),
                    "client_cpu_s_per_gb": round(client_cpu / gb, 2),
                    "broker_cpu_s_per_gb": round(broker_cpu / gb, 2)})
    cproducer = json.load(open(f"{out}/cproducer-{pair}.json"))
    gb = cproducer["acked"] * 1024 / 1e9
    elapsed, client_cpu, broker_cpu = read_time(f"cproducer-{pair}")
    entries.append({"test": "ingest", "pair": pair,
                    "client": f"C producer (librdkafka {cproducer['librdkafka']})",
                    "mb_per_s": cproducer["mb_per_s"],
                    "ratio_to_loadgen": round(cproducer["mb_per_s"] / entries[-1]["mb_per_s"], 2),
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
entries.append({"test": "latency", "client": f"C producer (librdkafka {c_latency['librdkafka']})",
                "rate_per_s": 10000,
                "ack_p50_us": c_latency["ack_p50_us"], "ack_p99_us": c_latency["ack_p99_us"],
                "ack_p999_us": c_latency["ack_p999_us"],
                "report_p50_us": c_latency["report_p50_us"],
                "report_p99_us": c_latency["report_p99_us"],
                "report_p999_us": c_latency["report_p999_us"], **broker_side("cproducer-latency")})
kafka = json.load(open(f"{out}/confluent-latency.json"))
entries.append({"test": "latency", "client": "confluent-kafka (Python)", "rate_per_s": 10000,
                "ack_p50_us": kafka["ack_p50_us"], "ack_p99_us": kafka["ack_p99_us"],
                "ack_p999_us": kafka["ack_p999_us"], **broker_side("confluent-latency")})
ratios = [e["ratio_to_loadgen"] for e in entries if "ratio_to_loadgen" in e]
json.dump({"pinning": "broker on CPU 1, clients on CPU 0", "entries": entries,
           "c_producer_ingest_ratio_median": statistics.median(ratios)},
          open("target/bench/kafka.json", "w"), indent=2)
base = statistics.median(e["mb_per_s"] for e in entries if e["client"].startswith("loadgen")
                         and e["test"] == "ingest")
base_p50 = next(e["ack_p50_us"] for e in entries if e["test"] == "latency")
print("pinning: broker on CPU 1, clients on CPU 0; 1 KiB, order 5, ack 1")
for e in entries:
    if e["test"] == "ingest":
        pair = f"pair {e['pair']} " if "pair" in e else "       "
        ratio = e.get("ratio_to_loadgen", e["mb_per_s"] / base)
        print(f"ingest   {pair}{e['client']:36} {e['mb_per_s']:8.1f} MB/s  {ratio:4.2f}x  "
              f"client {e['client_cpu_s_per_gb']:5.2f} s/GB  broker {e['broker_cpu_s_per_gb']:5.2f} s/GB")
    else:
        ratio = e["ack_p50_us"] / base_p50 if e["ack_p50_us"] and base_p50 else float("nan")
        print(f"latency  {e['client']:36} p50 {e['ack_p50_us']} us ({ratio:.2f}x)  p99 {e['ack_p99_us']} us  "
              f"p99.9 {e['ack_p999_us']} us  (broker side: p50 <= {e['broker_p50_us_at_most']} us, "
              f"p99 <= {e['broker_p99_us_at_most']} us, {e['broker_acks']} answers)")
        if "report_p50_us" in e:
            print(f"         {'  its delivery reports':36} p50 {e['report_p50_us']} us  "
                  f"p99 {e['report_p99_us']} us  p99.9 {e['report_p999_us']} us")
print(f"C producer / loadgen ingest, median of {pairs} pairs: {statistics.median(ratios):.2f}x; "
      "kcat and Python against the loadgen's median")
print("target/bench/kafka.json")
PY
