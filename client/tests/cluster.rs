//! End to end against real brokers: four brokers (in this process, real loopback TCP, one
//! shared pool in non-coherent mode) driven by the real `loadgen` binary in end-to-end mode,
//! for every order (0, 1, 2, 5) and ack level (0, 1). A subscriber verifies every message;
//! the assertions read the loadgen's JSON summary, never its log text.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use broker::coherence::CoherenceMode;
use broker::heap::HeapRegion;
use broker::layout::Geometry;
use broker::pool::Pool;
use broker::sequencer::SequencerConfig;
use broker::server::state::BrokerSettings;
use broker::server::{BrokerOptions, IdleStrategy, RunningBroker, start};
use client::summary::Summary;

struct Cluster {
    _region: Arc<HeapRegion>,
    brokers: Vec<RunningBroker>,
}

impl Cluster {
    fn start(brokers: u16, geometry: Geometry) -> Cluster {
        let region = Arc::new(HeapRegion::new(geometry.layout_bytes()));
        let mode = CoherenceMode::NonCoherent;
        Pool::format(region.memory(mode), geometry, 1).expect("format the pool");
        let brokers = (0..brokers)
            .map(|id| {
                let options = BrokerOptions {
                    settings: BrokerSettings {
                        broker_id: id,
                        head: id == 0,
                        auto_create_topics: true,
                        batch_bytes_max: 1 << 20,
                        frame_bytes_max: wire::FRAME_BYTES_DEFAULT,
                    },
                    listen: "127.0.0.1:0".parse().expect("address"),
                    socket_buffer_bytes: 1 << 20,
                    idle: IdleStrategy::Sleep,
                    sequencer: SequencerConfig::default(),
                    metrics_listen: None,
                    net: broker::server::NetBackend::Kernel,
                };
                start(Pool::attach(region.memory(mode)).expect("attach"), options)
                    .expect("start a broker")
            })
            .collect();
        Cluster {
            _region: region,
            brokers,
        }
    }

    fn addresses(&self) -> String {
        let addrs: Vec<SocketAddr> = self.brokers.iter().map(RunningBroker::local_addr).collect();
        addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn assert_nothing_dropped(&self) {
        for broker in &self.brokers {
            let dropped = broker
                .metrics()
                .batches_dropped
                .load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(dropped, 0, "a broker lost track of an accepted batch");
        }
    }
}

fn geometry(ring_slots: u32, blog_bytes: u64) -> Geometry {
    Geometry {
        brokers_max: 4,
        topics_max: 8,
        ring_slots,
        goi_entries: 1 << 16,
        blog_bytes,
    }
}

/// Runs the loadgen binary and returns its summary.
fn loadgen(brokers: &str, extra: &[&str]) -> (Summary, std::process::ExitStatus) {
    let dir = std::env::temp_dir().join(format!("embarcadero-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join(format!(
        "summary-{}.json",
        extra.join("_").replace(['-', ' '], "")
    ));
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--brokers", brokers, "--progress", "none", "--json"])
        .arg(&json)
        .args(extra)
        .output()
        .expect("run loadgen");
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "no summary ({e}); loadgen said:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let summary: Summary = serde_json::from_str(&text).expect("summary JSON");
    (summary, output.status)
}

/// Each test runs four brokers and a loadgen: one at a time on a 2-core machine.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn end_to_end(order: u8, ack: u8) {
    let _serial = serial();
    let cluster = Cluster::start(4, geometry(256, 8 << 20));
    let topic = format!("e2e-{order}-{ack}");
    let (order_text, ack_text) = (order.to_string(), ack.to_string());
    let (summary, status) = loadgen(
        &cluster.addresses(),
        &[
            "--test",
            "end-to-end",
            "--topic",
            &topic,
            "--order",
            &order_text,
            "--ack",
            &ack_text,
            "--message-bytes",
            "1024",
            "--total-bytes",
            "8MiB",
            "--connections-per-broker",
            "2",
            "--drain-timeout-s",
            "20",
        ],
    );
    assert!(status.success(), "loadgen failed: {:?}", summary.errors);
    assert!(summary.passed, "{:?}", summary.errors);
    assert_eq!(
        summary.connections, 8,
        "2 connections to each of 4 brokers, honoured exactly"
    );
    assert_eq!(summary.messages_sent, 8 * 1024 * 1024 / 1024);
    assert_eq!(
        summary.messages_received, summary.messages_sent,
        "every message delivered"
    );
    if ack == 1 {
        assert_eq!(
            summary.messages_acked, summary.messages_sent,
            "every message acknowledged"
        );
    }
    assert_eq!(
        (summary.lost, summary.duplicates, summary.order_violations),
        (0, 0, 0)
    );
    assert_eq!(
        (
            summary.corrupt,
            summary.position_gaps,
            summary.position_duplicates
        ),
        (0, 0, 0)
    );
    cluster.assert_nothing_dropped();
}

#[test]
fn order_0_ack_0() {
    end_to_end(0, 0);
}

#[test]
fn order_0_ack_1() {
    end_to_end(0, 1);
}

#[test]
fn order_1_ack_0() {
    end_to_end(1, 0);
}

#[test]
fn order_1_ack_1() {
    end_to_end(1, 1);
}

#[test]
fn order_2_ack_0() {
    end_to_end(2, 0);
}

#[test]
fn order_2_ack_1() {
    end_to_end(2, 1);
}

#[test]
fn order_5_ack_0() {
    end_to_end(5, 0);
}

#[test]
fn order_5_ack_1() {
    end_to_end(5, 1);
}

#[test]
fn a_pool_that_fills_during_the_run_pushes_back_and_delivers_everything() {
    let _serial = serial();
    // 8 ring slots and 256 KiB payload logs per broker against 16 MiB of traffic.
    let cluster = Cluster::start(4, geometry(8, 256 * 1024));
    let (summary, status) = loadgen(
        &cluster.addresses(),
        &[
            "--test",
            "end-to-end",
            "--topic",
            "tight",
            "--order",
            "5",
            "--ack",
            "1",
            "--message-bytes",
            "1024",
            "--total-bytes",
            "16MiB",
            "--connections-per-broker",
            "1",
            "--drain-timeout-s",
            "30",
        ],
    );
    assert!(status.success() && summary.passed, "{:?}", summary.errors);
    assert_eq!(summary.messages_received, summary.messages_sent);
    assert_eq!(
        (summary.lost, summary.duplicates, summary.order_violations),
        (0, 0, 0)
    );
    let waits: u64 = cluster
        .brokers
        .iter()
        .map(|b| {
            b.metrics()
                .ring_full_waits
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert!(
        waits > 0,
        "the pool never filled: this test would prove nothing"
    );
    cluster.assert_nothing_dropped();
    std::thread::sleep(Duration::from_millis(10));
}
