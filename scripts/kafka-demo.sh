#!/usr/bin/env bash
# Kafka clients against Embarcadero-rs, installing what is missing first.
#
#   ./scripts/kafka-demo.sh [--records N]
#
# Starts a local cluster of 4 brokers, each with a Kafka listener (127.0.0.1:19092+i), and:
#   1. our own load generator publishes about 1,000 messages to topic kafka-demo (order 5);
#   2. kcat (librdkafka) produces N lines through broker 0 and reads them back;
#   3. confluent-kafka (librdkafka, plain and idempotent) and kafka-python each produce N
#      records through every broker, and both read the topic back; a consumer group commits
#      through broker 0 and resumes through broker 3 (scripts/kafka-clients.py).
# Prints what each step sent, had acknowledged and read, with duplicates and order
# violations, and leaves the summary at target/kafka-demo/summary.json. Exits non-zero when
# a record was lost, duplicated or misordered. See docs/kafka.md for what is served.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

records=1000
while [[ $# -gt 0 ]]; do
    case "$1" in
        --records) records="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

ensure_cargo
ensure_packages build-essential pkg-config util-linux curl kcat
ensure_kafka_clients
. scripts/lab.sh
ensure_xdp_build_deps
prepare_hugepages 600

echo "== building (release)"
cargo build --release -q -p broker -p client

out=target/kafka-demo
mkdir -p "$out"
kafka_port=19092
steps="$out/steps.sh"
cat > "$steps" <<EOF
#!/usr/bin/env bash
set -euo pipefail
kafka=127.0.0.1:$kafka_port
all=127.0.0.1:$kafka_port,127.0.0.1:$((kafka_port + 1)),127.0.0.1:$((kafka_port + 2)),127.0.0.1:$((kafka_port + 3))
echo "== 1. our load generator publishes to kafka-demo"
./target/release/loadgen --brokers "\$BROKERS" --topic kafka-demo --test publish --order 5 \\
    --ack 1 --message-bytes 100 --total-bytes 100KiB --connections-per-broker 1 \\
    --json $out/loadgen.json > $out/loadgen.log
native=\$(python3 -c 'import json; print(json.load(open("$out/loadgen.json"))["messages_acked"])')
echo "   \$native messages acknowledged"
echo "== 2. kcat produces $records lines through broker 0, then reads them back (from offset \$native, after the load generator's binary messages)"
seq -f "kcat-%g" 0 $((records - 1)) | kcat -P -b "\$kafka" -t kafka-demo
kcat -C -b "\$kafka" -t kafka-demo -o "\$native" -e -q -f '%o %s\n' > $out/kcat-read.txt
python3 - "$out/kcat-read.txt" "$records" "\$native" > $out/kcat.json <<'PY'
import json, sys
path, records, native = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lines = [line.split(" ", 1) for line in open(path).read().splitlines()]
offsets = [int(o) for o, _ in lines]
first_ok = not offsets or offsets[0] == native
mine = [v for _, v in lines if v.startswith("kcat-")]
print(json.dumps({
    "read": len(lines),
    "expected": records,
    "starts_after_native": first_ok,
    "offset_gaps": sum(1 for a, b in zip(offsets, offsets[1:]) if b != a + 1),
    "kcat_records": len(mine),
    "kcat_duplicates": len(mine) - len(set(mine)),
    "kcat_in_order": mine == [f"kcat-{i}" for i in range(records)],
}))
PY
cat $out/kcat.json
echo "== 3. confluent-kafka and kafka-python through every broker"
"$KAFKA_PYTHON" scripts/kafka-clients.py --bootstrap "\$all" --topic kafka-demo \\
    --records $records | tee $out/libraries.json
EOF
chmod +x "$steps"
echo "== 4 brokers with Kafka listeners on 127.0.0.1:$kafka_port-$((kafka_port + 3))"
./scripts/cluster.sh run --brokers 4 --dir "$out/cluster" --kafka-base-port "$kafka_port" -- \
    "$steps"

python3 - "$out" "$records" <<'PY'
import json, sys
out, records = sys.argv[1], int(sys.argv[2])
kcat = json.load(open(f"{out}/kcat.json"))
libraries = json.load(open(f"{out}/libraries.json"))
summary = {"kcat": kcat, "libraries": libraries}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
problems = list(libraries["problems"])
if (kcat["read"] != kcat["expected"] or kcat["offset_gaps"] or kcat["kcat_duplicates"]
        or not kcat["starts_after_native"]):
    problems.append(f"kcat: {kcat}")
if not kcat["kcat_in_order"] or kcat["kcat_records"] != records:
    problems.append("kcat's records are not all there in the order sent")
print("== summary (target/kafka-demo/summary.json)")
print(f"   kcat: {records} produced, {kcat['read']} read back ({kcat['expected']} expected), "
      f"{kcat['kcat_duplicates']} duplicates, in order: {kcat['kcat_in_order']}")
for reader in ("confluent-kafka", "kafka-python"):
    r = libraries[reader]
    print(f"   libraries, read by {reader}: {libraries['sent']} sent, "
          f"{libraries['acknowledged']} acknowledged, {r['read']} read, "
          f"{r['acknowledged_missing_or_wrong']} missing, {r['duplicates']} duplicates, "
          f"{r['order_violations']} order violations")
resume = libraries.get("group_resume")
if resume:
    print(f"   a group committed offset {resume['committed']} through broker 0 and resumed at "
          f"{resume['resumed_at']} through broker 3 (read back: confluent-kafka "
          f"{resume['committed_read_back']}, kafka-python {resume['kafka_python_committed']})")
subscribed = libraries.get("group_subscribe")
if subscribed:
    print(f"   two consumers of a group subscribed through brokers 0 and 3: one read "
          f"{subscribed['first_holder_read']} and committed {subscribed['committed']}, the other "
          f"took over at {subscribed['resumed_at']} and read {subscribed['other_read']} to the "
          f"end; a kafka-python member then started at {subscribed['kafka_python_position']}")
if problems:
    print("PROBLEMS:", *problems, sep="\n  ")
    sys.exit(1)
print("   every acknowledged record once, in order, bytes intact")
PY
