#!/usr/bin/env python3
"""Kafka-protocol producer benchmarks with confluent-kafka (librdkafka), for bench-kafka.sh.

    kafka-bench.py ingest  --bootstrap HOST:PORT --topic T --records N --record-bytes B
    kafka-bench.py latency --bootstrap HOST:PORT --topic T --rate R --duration-s S --record-bytes B

ingest: produces N records as fast as the client goes (acks=1, linger 5 ms, batches up to
1 MB) and prints the rate and the process's CPU seconds. latency: produces R records a
second, open loop (each record's latency counts from the time it was due, so a stall is not
hidden), acks=1, no linger, one record per request at that rate, and prints the
produce-to-acknowledgement latency percentiles. One JSON line each.
"""

import argparse
import json
import os
import time

import confluent_kafka


def cpu_seconds():
    times = os.times()
    return times.user + times.system


def percentile(sorted_values, fraction):
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


def ingest(args):
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "acks": "1",
            "linger.ms": 5,
            "batch.size": 1000000,
            "queue.buffering.max.kbytes": 1048576,
            "enable.idempotence": False,
        }
    )
    failed = []

    def report(error, _message):
        if error is not None:
            failed.append(str(error))

    value = b"x" * args.record_bytes
    producer.produce(args.topic, value=value, on_delivery=report)
    producer.flush(10)
    cpu0, start = cpu_seconds(), time.monotonic()
    for _ in range(args.records):
        while True:
            try:
                producer.produce(args.topic, value=value, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.001)
        producer.poll(0)
    producer.flush(60)
    elapsed, cpu = time.monotonic() - start, cpu_seconds() - cpu0
    print(
        json.dumps(
            {
                "records": args.records,
                "seconds": round(elapsed, 3),
                "mb_per_s": round(args.records * args.record_bytes / elapsed / 1e6, 1),
                "client_cpu_s": round(cpu, 3),
                "failed": len(failed),
            }
        )
    )


def latency(args):
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "acks": "1",
            "linger.ms": 0,
            "socket.nagle.disable": True,
            "enable.idempotence": False,
        }
    )
    latencies, failed = [], []
    value = b"x" * args.record_bytes
    producer.produce(args.topic, value=value)
    producer.flush(10)
    interval = 1.0 / args.rate
    total = int(args.rate * args.duration_s)
    start = time.monotonic()
    for i in range(total):
        due = start + i * interval
        while True:
            now = time.monotonic()
            if now >= due:
                break
            producer.poll(min(due - now, 0.0005))

        def report(error, _message, due=due):
            if error is not None:
                failed.append(str(error))
            else:
                latencies.append(time.monotonic() - due)

        producer.produce(args.topic, value=value, on_delivery=report)
        producer.poll(0)
    producer.flush(30)
    latencies.sort()
    us = lambda f: None if percentile(latencies, f) is None else round(percentile(latencies, f) * 1e6)  # noqa: E731
    print(
        json.dumps(
            {
                "rate_records_per_s": args.rate,
                "acked": len(latencies),
                "failed": len(failed),
                "ack_p50_us": us(0.50),
                "ack_p99_us": us(0.99),
                "ack_p999_us": us(0.999),
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["ingest", "latency"])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--records", type=int, default=300000)
    parser.add_argument("--record-bytes", type=int, default=1024)
    parser.add_argument("--rate", type=int, default=10000)
    parser.add_argument("--duration-s", type=float, default=5.0)
    args = parser.parse_args()
    (ingest if args.mode == "ingest" else latency)(args)


if __name__ == "__main__":
    main()
