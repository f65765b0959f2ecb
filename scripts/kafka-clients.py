#!/usr/bin/env python3
"""Kafka clients no one here wrote, against Embarcadero-rs brokers' Kafka listeners.

    kafka-clients.py --bootstrap HOST:PORT[,HOST:PORT...] --topic T [--records N]
    kafka-clients.py --bootstrap ... --topic T --failover [--records N]

confluent-kafka (librdkafka) produces N records with acks=all, and N more as an idempotent
producer (enable.idempotence: InitProducerId, sequences, acks=all); kafka-python produces N
with acks=1; all through every broker given in turn; then both libraries read the topic back from its start
(partition 0 assigned by hand: group membership is not served). Then a consumer of a new
group reads half the topic through the first broker and commits, and a second one of the
group, through the last broker, starts at the committed offset. Checked: every
acknowledged record is in the topic exactly once, at the offset its acknowledgement gave,
with its bytes; each producer's records are in the order it sent them; both readers see the
same log. Prints one JSON summary line; exits 1 when a check fails.

With --failover, one idempotent confluent-kafka producer sends N records paced over about
two seconds through the whole bootstrap list (the test kills a broker meanwhile: the
producer must go on through another, and its resends be deduplicated); the same checks
follow, with librdkafka reading back.
"""

import argparse
import json
import sys
import time

import confluent_kafka
import kafka


def produce_confluent(bootstrap, topic, records, prefix, idempotent=False, pace_s=0.0):
    """Produces with librdkafka (acks=all); returns {value: offset} of acknowledged ones."""
    acked, failed = {}, []

    def report(error, message):
        if error is not None:
            failed.append(str(error))
        else:
            acked[message.value()] = message.offset()

    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": idempotent,
            "linger.ms": 5,
            "message.timeout.ms": 30000,
        }
    )
    for i in range(records):
        producer.produce(topic, value=f"{prefix}-{i}".encode(), on_delivery=report)
        producer.poll(0)
        if pace_s:
            time.sleep(pace_s)
    left = producer.flush(30)
    return acked, failed + ([f"{left} records never acknowledged"] if left else [])


def produce_kafka_python(bootstrap, topic, records, prefix):
    """Produces with kafka-python (acks=1); returns {value: offset} of acknowledged ones."""
    producer = kafka.KafkaProducer(
        bootstrap_servers=bootstrap.split(","), acks=1, linger_ms=5, request_timeout_ms=30000
    )
    futures = [
        (f"{prefix}-{i}".encode(), producer.send(topic, value=f"{prefix}-{i}".encode()))
        for i in range(records)
    ]
    acked, failed = {}, []
    for value, future in futures:
        try:
            acked[value] = future.get(timeout=30).offset
        except Exception as error:  # noqa: BLE001 - the library's error is the report
            failed.append(repr(error))
    producer.close(timeout=10)
    return acked, failed


def read_confluent(bootstrap, topic, end):
    """Reads offsets [0, end) with librdkafka; returns [(offset, value)]."""
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "embarcadero-kafka-clients",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.assign([confluent_kafka.TopicPartition(topic, 0, confluent_kafka.OFFSET_BEGINNING)])
    seen = []
    deadline = time.monotonic() + 60
    while len(seen) < end and time.monotonic() < deadline:
        message = consumer.poll(1.0)
        if message is None:
            continue
        if message.error():
            raise RuntimeError(f"confluent-kafka consumer: {message.error()}")
        seen.append((message.offset(), message.value()))
    consumer.close()
    return seen


def read_kafka_python(bootstrap, topic, end):
    """Reads offsets [0, end) with kafka-python; returns [(offset, value)]."""
    consumer = kafka.KafkaConsumer(
        bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False
    )
    partition = kafka.TopicPartition(topic, 0)
    consumer.assign([partition])
    consumer.seek_to_beginning(partition)
    seen = []
    deadline = time.monotonic() + 60
    while len(seen) < end and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=1000).values():
            seen.extend((record.offset, record.value) for record in records)
    consumer.close()
    return seen


def resume_from_commit(first, second, topic, end):
    """A consumer of a new group reads half of [0, end) through `first` and commits; a
    second consumer of the group, through `second`, starts where the commit says (the
    commit is in the shared log, not in one broker). Returns what both saw."""
    group = f"embarcadero-resume-{time.time_ns()}"

    def consumer(bootstrap):
        c = confluent_kafka.Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        c.assign([confluent_kafka.TopicPartition(topic, 0)])  # from the committed offset
        return c

    def next_message(c):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = c.poll(1.0)
            if message is not None and not message.error():
                return message
        raise RuntimeError("no message within 30 s")

    reader = consumer(first)
    half = max(1, end // 2)
    first_offset = next_message(reader).offset()
    last = first_offset
    while last < half - 1:
        last = next_message(reader).offset()
    committed = last + 1
    reader.commit(
        offsets=[confluent_kafka.TopicPartition(topic, 0, committed)], asynchronous=False
    )
    reader.close()
    resumed = consumer(second)
    read_back = resumed.committed([confluent_kafka.TopicPartition(topic, 0)], timeout=10)[0]
    resumed_at = next_message(resumed).offset()
    resumed.close()
    python_reader = kafka.KafkaConsumer(
        bootstrap_servers=second.split(","), group_id=group, enable_auto_commit=False
    )
    python_committed = python_reader.committed(kafka.TopicPartition(topic, 0))
    python_reader.close()
    return {
        "started_at": first_offset,
        "committed": committed,
        "committed_read_back": read_back.offset,
        "resumed_at": resumed_at,
        "kafka_python_committed": python_committed,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--failover", action="store_true")
    args = parser.parse_args()
    brokers = [] if args.failover else args.bootstrap.split(",")
    problems = []
    acked = {}
    producers = []
    if args.failover:
        print("producing", flush=True)
        prefix = "confluent-kafka-idempotent-failover"
        got, failed = produce_confluent(
            args.bootstrap, args.topic, args.records, prefix, True, 2.0 / args.records
        )
        problems += [f"{prefix}: {failure}" for failure in failed[:5]]
        acked.update(got)
        producers.append((prefix, got))
    for index, broker in enumerate(brokers):
        for library, produce in (
            ("confluent-kafka", produce_confluent),
            (
                "confluent-kafka-idempotent",
                lambda *a: produce_confluent(*a, idempotent=True),
            ),
            ("kafka-python", produce_kafka_python),
        ):
            prefix = f"{library}-via-{index}"
            got, failed = produce(broker, args.topic, args.records, prefix)
            problems += [f"{prefix}: {failure}" for failure in failed[:5]]
            acked.update(got)
            producers.append((prefix, got))
    end = max(acked.values(), default=-1) + 1
    readers = {"confluent-kafka": read_confluent(args.bootstrap, args.topic, end)}
    if not args.failover:
        readers["kafka-python"] = read_kafka_python(args.bootstrap, args.topic, end)
    summary = {"sent": len(producers) * args.records, "acknowledged": len(acked)}
    for reader, seen in readers.items():
        offsets = [offset for offset, _ in seen]
        values = [value for _, value in seen]
        at = dict(seen)
        lost = [v for v, offset in acked.items() if at.get(offset) != v]
        ours = [value for value in values if value in acked]
        duplicates = len(ours) - len(set(ours))
        gaps = sum(1 for a, b in zip(offsets, offsets[1:]) if b != a + 1)
        order_violations = 0
        for prefix, got in producers:
            mine = [offset for offset, value in seen if value.startswith(prefix.encode() + b"-")]
            sent_order = [got[v] for v in sorted(got, key=lambda v: int(v.rsplit(b"-", 1)[1]))]
            order_violations += int(mine != sorted(mine)) + int(sent_order != sorted(sent_order))
        summary[reader] = {
            "read": len(seen),
            "acknowledged_missing_or_wrong": len(lost),
            "duplicates": duplicates,
            "offset_gaps": gaps,
            "order_violations": order_violations,
        }
        if len(seen) < end:
            problems.append(f"{reader} read {len(seen)} of {end} records")
        if lost or duplicates or gaps or order_violations:
            problems.append(f"{reader}: {summary[reader]}")
    if not args.failover and len(brokers) >= 2:
        resume = resume_from_commit(brokers[0], brokers[-1], args.topic, end)
        summary["group_resume"] = resume
        if not (
            resume["started_at"] == 0
            and resume["committed_read_back"] == resume["committed"]
            and resume["resumed_at"] == resume["committed"]
            and resume["kafka_python_committed"] == resume["committed"]
        ):
            problems.append(f"a group did not resume from its commit: {resume}")
    if len(readers) == 2 and readers["confluent-kafka"] != readers["kafka-python"]:
        problems.append("the two readers saw different logs")
    if len(acked) != summary["sent"]:
        problems.append(f"{summary['sent'] - len(acked)} records not acknowledged")
    summary["problems"] = problems
    print(json.dumps(summary))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
