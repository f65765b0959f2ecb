#!/usr/bin/env python3
"""Kafka clients no one here wrote, against Embarcadero-rs brokers' Kafka listeners.

    kafka-clients.py --bootstrap HOST:PORT[,HOST:PORT...] --topic T [--records N]
    kafka-clients.py --bootstrap ... --topic T --failover [--records N]
    kafka-clients.py --bootstrap ... --topic T --group-failover [--records N]

confluent-kafka (librdkafka) produces N records with acks=all, and N more as an idempotent
producer (enable.idempotence: InitProducerId, sequences, acks=all); kafka-python produces N
with acks=1; all through every broker given in turn; then both libraries read the topic back from its start
(partition 0 assigned by hand). Then a consumer of a new group reads half the topic through
the first broker and commits, and a second one of the group, through the last broker,
starts at the committed offset. Then two consumers of another group subscribe through the
first and the last broker: one gets the partition, reads half, commits and leaves, and the
other takes over from the commit (group membership, coordinated by one broker for all);
a kafka-python consumer of the group then subscribes at the end. Checked: every
acknowledged record is in the topic exactly once, at the offset its acknowledgement gave,
with its bytes; each producer's records are in the order it sent them; both readers see the
same log. Prints one JSON summary line; exits 1 when a check fails.

With --failover, one idempotent confluent-kafka producer sends N records paced over about
two seconds through the whole bootstrap list (the test kills a broker meanwhile: the
producer must go on through another, and its resends be deduplicated); the same checks
follow, with librdkafka reading back.

With --group-failover, N records are produced, then one librdkafka consumer of a new group
subscribes and reads them, committing after each batch; halfway it prints "consuming" (the
test kills the group coordinator then). It must find the next coordinator, join again and
resume from its last commit: every record read, the last commit at the end, and any record
read twice read again from a commit.
"""

import argparse
import json
import sys
import time

import confluent_kafka
import confluent_kafka.admin
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


def confluent_consumer(bootstrap, group, member=False):
    """A librdkafka consumer of `group` that commits by hand and starts at the earliest
    offset when the group has no commit; a `member` (one that subscribes) with a short
    session, so that a member that leaves or dies is noticed within seconds."""
    config = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    }
    if member:
        config.update({"session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    return confluent_kafka.Consumer(config)


def read_confluent(bootstrap, topic, end):
    """Reads offsets [0, end) with librdkafka; returns [(offset, value)]."""
    consumer = confluent_consumer(bootstrap, "embarcadero-kafka-clients")
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
        c = confluent_consumer(bootstrap, group)
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


def subscribed_group(first, second, topic, end):
    """Two librdkafka consumers of a new group subscribe to the topic, through different
    brokers: exactly one gets its partition. It reads half, commits and leaves; the other
    one is given the partition and goes on from the commit to the end, commits and leaves.
    Then a kafka-python consumer of the group subscribes and is placed at the end. Returns
    what they saw."""
    group = f"embarcadero-subscribe-{time.time_ns()}"

    def consumer(bootstrap):
        c = confluent_consumer(bootstrap, group, member=True)
        c.subscribe([topic])
        return c

    members = [consumer(first), consumer(second)]
    seen = [[], []]
    half = max(1, end // 2)
    deadline = time.monotonic() + 60
    while sum(map(len, seen)) < half and time.monotonic() < deadline:
        for index, member in enumerate(members):
            room = half - sum(map(len, seen))
            for message in member.consume(num_messages=max(1, room), timeout=0.1):
                if not message.error():
                    seen[index].append(message.offset())
    holder = 0 if seen[0] else 1
    other = 1 - holder
    # An admin client sees the group and both members (ListGroups, DescribeGroups).
    admin = confluent_kafka.admin.AdminClient({"bootstrap.servers": second})
    listed = admin.list_consumer_groups().result(timeout=10)
    described = admin.describe_consumer_groups([group])[group].result(timeout=10)
    committed = seen[holder][-1] + 1 if seen[holder] else 0
    members[holder].commit(
        offsets=[confluent_kafka.TopicPartition(topic, 0, committed)], asynchronous=False
    )
    members[holder].close()
    before_handover = len(seen[other])
    deadline = time.monotonic() + 60
    while (not seen[other] or seen[other][-1] < end - 1) and time.monotonic() < deadline:
        for message in members[other].consume(num_messages=500, timeout=0.5):
            if not message.error():
                seen[other].append(message.offset())
    resumed_at = seen[other][before_handover] if len(seen[other]) > before_handover else None
    members[other].commit(
        offsets=[confluent_kafka.TopicPartition(topic, 0, end)], asynchronous=False
    )
    members[other].close()
    late = kafka.KafkaConsumer(
        bootstrap_servers=second.split(","),
        group_id=group,
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )
    late.subscribe([topic])
    deadline = time.monotonic() + 30
    while not late.assignment() and time.monotonic() < deadline:
        late.poll(timeout_ms=200)
    partition = kafka.TopicPartition(topic, 0)
    late_position = late.position(partition) if partition in late.assignment() else None
    late.close()
    return {
        "first_holder_read": len(seen[holder]),
        "first_holder_started_at": seen[holder][0] if seen[holder] else None,
        "other_read_before_handover": before_handover,
        "committed": committed,
        "resumed_at": resumed_at,
        "other_read": len(seen[other]) - before_handover,
        "other_last": seen[other][-1] if seen[other] else None,
        "kafka_python_position": late_position,
        "admin_listed": group in [g.group_id for g in listed.valid],
        "admin_members": len(described.members),
        "admin_state": str(described.state),
    }


def group_failover(bootstrap, topic, records):
    """Produces `records`, then one librdkafka consumer of a new group subscribes and reads
    them, committing after each batch; halfway it prints "consuming" (the test then kills
    the group coordinator) and goes on: it must find the new coordinator, join again, and
    resume from its last commit. Returns what it saw."""
    acked, failed = produce_confluent(bootstrap, topic, records, "group-failover")
    group = f"embarcadero-failover-{time.time_ns()}"
    assignments = []
    consumer = confluent_consumer(bootstrap, group, member=True)
    consumer.subscribe(
        [topic], on_assign=lambda _, parts: assignments.append([p.offset for p in parts])
    )
    seen, commits, attempted, commit_failures, told = [], [], set(), 0, False
    deadline = time.monotonic() + 90
    while not (commits and commits[-1] == records) and time.monotonic() < deadline:
        batch = [m for m in consumer.consume(num_messages=100, timeout=0.5) if not m.error()]
        if not batch:
            if seen and seen[-1] == records - 1 and (not commits or commits[-1] != records):
                batch_end = records
            else:
                continue
        else:
            seen.extend(m.offset() for m in batch)
            batch_end = batch[-1].offset() + 1
        attempted.add(batch_end)  # a commit whose answer was lost may still have landed
        try:
            consumer.commit(
                offsets=[confluent_kafka.TopicPartition(topic, 0, batch_end)], asynchronous=False
            )
            commits.append(batch_end)
        except confluent_kafka.KafkaException:
            commit_failures += 1
        if not told and len(seen) >= records // 2:
            print("consuming", flush=True)
            told = True
            time.sleep(0.2)
    committed = consumer.committed([confluent_kafka.TopicPartition(topic, 0)], timeout=10)[0]
    consumer.close()
    # A step back in what was read must start at a commit (at-least-once, from the commit).
    rereads_from = [b for a, b in zip(seen, seen[1:]) if b <= a]
    return {
        "acknowledged": len(acked),
        "produce_failures": failed[:5],
        "read": len(seen),
        "distinct": len(set(seen)),
        "rereads_from": rereads_from,
        "rereads_not_at_a_commit": [b for b in rereads_from if b not in attempted],
        "commits": len(commits),
        "commit_failures": commit_failures,
        "committed": committed.offset,
        "assignments": len(assignments),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--failover", action="store_true")
    parser.add_argument("--group-failover", action="store_true")
    args = parser.parse_args()
    if args.group_failover:
        summary = group_failover(args.bootstrap, args.topic, args.records)
        problems = []
        if summary["acknowledged"] != args.records or summary["produce_failures"]:
            problems.append("records not acknowledged")
        if summary["distinct"] != args.records or summary["committed"] != args.records:
            problems.append("the group did not read and commit every record")
        if summary["rereads_not_at_a_commit"]:
            problems.append("a record was read again from elsewhere than the last commit")
        summary["problems"] = problems
        print(json.dumps(summary))
        return 1 if problems else 0
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
        subscribed = subscribed_group(brokers[0], brokers[-1], args.topic, end)
        summary["group_subscribe"] = subscribed
        if not (
            subscribed["first_holder_started_at"] == 0
            and subscribed["other_read_before_handover"] == 0
            and subscribed["resumed_at"] == subscribed["committed"]
            and subscribed["other_last"] == end - 1
            and subscribed["other_read"] == end - subscribed["committed"]
            and subscribed["kafka_python_position"] == end
            and subscribed["admin_listed"]
            and subscribed["admin_members"] == 2
        ):
            problems.append(f"a subscribed group did not share its partition: {subscribed}")
    if len(readers) == 2 and readers["confluent-kafka"] != readers["kafka-python"]:
        problems.append("the two readers saw different logs")
    if len(acked) != summary["sent"]:
        problems.append(f"{summary['sent'] - len(acked)} records not acknowledged")
    summary["problems"] = problems
    print(json.dumps(summary))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
