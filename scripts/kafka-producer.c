/*
 * A lean librdkafka producer for scripts/bench-kafka.sh: what a C application that produces
 * with librdkafka costs, without kcat's line parsing or a Python layer.
 *
 *   kafka-producer ingest  BOOTSTRAP TOPIC SECONDS RECORD_BYTES
 *   kafka-producer latency BOOTSTRAP TOPIC RATE_PER_S SECONDS RECORD_BYTES
 *
 * ingest: records of RECORD_BYTES for SECONDS as fast as librdkafka takes them, then a flush;
 * acks=1, linger 5 ms, batches up to 1 MB, every record pointing at one buffer (librdkafka
 * copies it into its batch once; no copy here), handed over 1,024 at a time with
 * rd_kafka_produce_batch() (librdkafka's call for this: one enqueue per 1,024 records). The clock starts after a first record's ack
 * (connection and metadata are set up) and stops when the last ack is in.
 * latency: records paced open loop at RATE_PER_S (each due at start + i / rate), as our
 * loadgen paces: timer slack 1 ns, a sleep until 50 us before the due time and a spin for the
 * rest (late: sends at once); acks=1, linger 0. Two latencies per record, both from its due
 * time (so a stall is not hidden): `ack_*` when librdkafka's broker thread took the answer
 * (the produce call's lag behind the due time plus rd_kafka_message_latency(), librdkafka's
 * own produce-to-ack time: the point where our loadgen times its acks), and `report_*` when
 * the application's delivery-report callback ran (a second thread serves them as they come,
 * one more hand-off between threads). p50 / p99 / p99.9 of each.
 * Prints one JSON line; exits 1 when a record is not acknowledged.
 */
#include <librdkafka/rdkafka.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

static _Atomic uint64_t acked, failed;
/* Per record, in order of delivery: from the due time to the delivery report, and to the
 * ack as librdkafka's broker thread took it. */
static uint64_t *reports_ns, *acks_ns;
static _Atomic uint64_t latency_count;
/* The produce call's lag behind each record's due time, indexed by record. */
static uint64_t *produce_lag_ns;
static _Atomic int producing_done;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t start_ns;
static double rate_per_s;

static uint64_t due_ns(uint64_t record) {
    return start_ns + (uint64_t)((double)record * 1e9 / rate_per_s);
}

static void delivered(rd_kafka_t *rk, const rd_kafka_message_t *message, void *opaque) {
    (void)rk;
    (void)opaque;
    if (message->err) {
        if (failed++ < 5)
            fprintf(stderr, "kafka-producer: %s\n", rd_kafka_err2str(message->err));
        return;
    }
    acked++;
    if (reports_ns && message->_private) {
        /* _private holds the record's index + 1 (0: not a timed record). */
        uint64_t record = (uint64_t)(uintptr_t)message->_private - 1;
        uint64_t n = latency_count++;
        reports_ns[n] = now_ns() - due_ns(record);
        acks_ns[n] = produce_lag_ns[record] + (uint64_t)rd_kafka_message_latency(message) * 1000;
    }
}

/* Serves delivery reports as they come (latency mode), so that an ack is timed when it
 * arrives, not when the sending thread next looks. */
static void *serve_reports(void *rk) {
    while (!producing_done)
        rd_kafka_poll(rk, 10);
    return NULL;
}

static rd_kafka_t *producer(const char *bootstrap, const char *linger_ms) {
    char error[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    const char *settings[][2] = {
        {"bootstrap.servers", bootstrap},
        {"acks", "1"},
        {"linger.ms", linger_ms},
        {"batch.size", "1000000"},
        {"queue.buffering.max.kbytes", "1048576"},
        {"queue.buffering.max.messages", "1000000"},
        {"compression.type", "none"},
        {"socket.nagle.disable", "true"},
    };
    for (size_t i = 0; i < sizeof settings / sizeof settings[0]; i++) {
        if (rd_kafka_conf_set(conf, settings[i][0], settings[i][1], error, sizeof error)) {
            fprintf(stderr, "kafka-producer: %s\n", error);
            exit(2);
        }
    }
    rd_kafka_conf_set_dr_msg_cb(conf, delivered);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, error, sizeof error);
    if (!rk) {
        fprintf(stderr, "kafka-producer: %s\n", error);
        exit(2);
    }
    return rk;
}

static int compare(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double percentile_us(const uint64_t *sorted_ns, double p) {
    if (!latency_count)
        return -1;
    uint64_t index = (uint64_t)(p * (double)(latency_count - 1));
    return (double)sorted_ns[index] / 1000.0;
}

/* Waits until `due`: a sleep to 50 us before it (timer slack 1 ns), then a spin. */
static void wait_until(uint64_t due) {
    const uint64_t spin_ns = 50000;
    if (due > now_ns() + spin_ns) {
        uint64_t wake = due - spin_ns;
        struct timespec at = {.tv_sec = (time_t)(wake / 1000000000ull),
                              .tv_nsec = (long)(wake % 1000000000ull)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL) != 0) {
        }
    }
    while (now_ns() < due) {
    }
}

int main(int argc, char **argv) {
    if (argc == 6 && !strcmp(argv[1], "ingest")) {
        uint64_t duration_ns = (uint64_t)(strtod(argv[4], NULL) * 1e9);
        size_t record_bytes = strtoull(argv[5], NULL, 10);
        char *value = malloc(record_bytes);
        memset(value, 'x', record_bytes);
        rd_kafka_t *rk = producer(argv[2], "5");
        rd_kafka_topic_t *topic = rd_kafka_topic_new(rk, argv[3], NULL);
        rd_kafka_produce(topic, 0, 0, value, record_bytes, NULL, 0, NULL);
        rd_kafka_flush(rk, 10000);
        acked = 0;
        uint64_t records = 0;
        uint64_t start = now_ns();
        enum { batch_records = 1024 };
        rd_kafka_message_t *batch = calloc(batch_records, sizeof *batch);
        while (now_ns() - start < duration_ns) {
            int sent = 0;
            while (sent < batch_records) {
                for (int i = sent; i < batch_records; i++) {
                    memset(&batch[i], 0, sizeof batch[i]);
                    batch[i].payload = value;
                    batch[i].len = record_bytes;
                }
                sent += rd_kafka_produce_batch(topic, 0, 0, batch + sent, batch_records - sent);
                rd_kafka_poll(rk, sent < batch_records ? 1 : 0);
            }
            records += batch_records;
        }
        rd_kafka_flush(rk, 60000);
        double seconds = (double)(now_ns() - start) / 1e9;
        printf("{\"librdkafka\": \"%s\", \"records\": %llu, \"acked\": %llu, "
               "\"failed\": %llu, \"seconds\": %.3f, \"mb_per_s\": %.1f}\n",
               rd_kafka_version_str(), (unsigned long long)records, (unsigned long long)acked,
               (unsigned long long)failed, seconds,
               (double)acked * (double)record_bytes / 1e6 / seconds);
        rd_kafka_topic_destroy(topic);
        rd_kafka_destroy(rk);
        return acked == records ? 0 : 1;
    }
    if (argc == 7 && !strcmp(argv[1], "latency")) {
        rate_per_s = strtod(argv[4], NULL);
        double duration = strtod(argv[5], NULL);
        size_t record_bytes = strtoull(argv[6], NULL, 10);
        uint64_t records = (uint64_t)(rate_per_s * duration);
        reports_ns = calloc(records + 1, sizeof *reports_ns);
        acks_ns = calloc(records + 1, sizeof *acks_ns);
        produce_lag_ns = calloc(records + 1, sizeof *produce_lag_ns);
        char *value = malloc(record_bytes);
        memset(value, 'x', record_bytes);
        /* The default slack (50 us) would make every sleep late by up to that much. */
        prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
        rd_kafka_t *rk = producer(argv[2], "0");
        rd_kafka_topic_t *topic = rd_kafka_topic_new(rk, argv[3], NULL);
        /* A first record and its ack: the connection is up before the clock starts. */
        rd_kafka_produce(topic, 0, 0, value, record_bytes, NULL, 0, NULL);
        rd_kafka_flush(rk, 10000);
        acked = 0;
        pthread_t reports;
        pthread_create(&reports, NULL, serve_reports, rk);
        start_ns = now_ns();
        for (uint64_t i = 0; i < records; i++) {
            uint64_t due = due_ns(i);
            wait_until(due);
            produce_lag_ns[i] = now_ns() - due;
            while (rd_kafka_produce(topic, 0, 0, value, record_bytes, NULL, 0,
                                    (void *)(uintptr_t)(i + 1)) == -1) {
                struct timespec pause = {.tv_sec = 0, .tv_nsec = 100000};
                nanosleep(&pause, NULL);
            }
        }
        while (acked + failed < records && now_ns() - start_ns < (uint64_t)(duration + 30) * 1000000000ull) {
            struct timespec pause = {.tv_sec = 0, .tv_nsec = 1000000};
            nanosleep(&pause, NULL);
        }
        producing_done = 1;
        pthread_join(reports, NULL);
        rd_kafka_flush(rk, 30000);
        uint64_t count = latency_count;
        qsort(reports_ns, count, sizeof *reports_ns, compare);
        qsort(acks_ns, count, sizeof *acks_ns, compare);
        printf("{\"librdkafka\": \"%s\", \"records\": %llu, \"acked\": %llu, \"failed\": %llu, "
               "\"ack_p50_us\": %.0f, \"ack_p99_us\": %.0f, \"ack_p999_us\": %.0f, "
               "\"report_p50_us\": %.0f, \"report_p99_us\": %.0f, \"report_p999_us\": %.0f}\n",
               rd_kafka_version_str(), (unsigned long long)records, (unsigned long long)acked,
               (unsigned long long)failed, percentile_us(acks_ns, 0.5),
               percentile_us(acks_ns, 0.99), percentile_us(acks_ns, 0.999),
               percentile_us(reports_ns, 0.5), percentile_us(reports_ns, 0.99),
               percentile_us(reports_ns, 0.999));
        rd_kafka_topic_destroy(topic);
        rd_kafka_destroy(rk);
        return acked == records ? 0 : 1;
    }
    fprintf(stderr, "usage: kafka-producer ingest BOOTSTRAP TOPIC SECONDS RECORD_BYTES\n"
                    "       kafka-producer latency BOOTSTRAP TOPIC RATE_PER_S SECONDS "
                    "RECORD_BYTES\n");
    return 2;
}
