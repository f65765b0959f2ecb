//! Writes a few valid inputs for each fuzz target into `<corpus>/<target>/seed-<name>`, the
//! starting corpora of `scripts/fuzz.sh`. Existing files are left alone.
//!
//!     write-seeds <corpus-dir>

use std::path::Path;

use fuzz_input::{ConnectionInput, Prefixed, REPAIR_BATCHES};
use wire::{
    AckEntry, AckLevel, AckRepr, AckStatus, BatchHeaderRepr, CreateTopicRepr, DeliveryHeaderRepr,
    ErrorCode, ErrorFrameRepr, FROM_END, Frame, HelloOkRepr, HelloRepr, Limits, Order, Retention,
    Role, Topic, TopicOkRepr,
};

fn topic() -> Topic {
    Topic::new("orders").expect("valid topic name")
}

fn payload(messages: &[&[u8]]) -> Vec<u8> {
    let mut payload = Vec::new();
    for message in messages {
        wire::payload::push_message(&mut payload, message);
    }
    payload
}

fn publisher_hello(client_id: u64, order: Order) -> HelloRepr {
    HelloRepr {
        role: Role::Publish,
        order,
        ack: AckLevel::Ordered,
        client_id,
        session_epoch: 1,
        topic: topic(),
    }
}

fn subscriber_hello(order: Order, from_position: u64) -> HelloRepr {
    HelloRepr {
        role: Role::Subscribe {
            from_position,
            batch_bytes_max: 16,
        },
        order,
        ack: AckLevel::FireAndForget,
        client_id: 99,
        session_epoch: 0,
        topic: topic(),
    }
}

fn create_topic(order: Order) -> CreateTopicRepr {
    CreateTopicRepr {
        topic: topic(),
        order,
        ack: AckLevel::Ordered,
        replication_factor: 1,
        retention: Retention::StallLimited,
        history: wire::HistoryRetention::UNLIMITED,
    }
}

/// Batch frames `seqs`, each of two or three small messages.
fn batches(seqs: impl IntoIterator<Item = u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for seq in seqs {
        let tag = [seq as u8; 5];
        let messages: Vec<&[u8]> = if seq % 2 == 0 {
            vec![b"hello", &tag]
        } else {
            vec![b"a", b"", &tag]
        };
        let payload = payload(&messages);
        let header =
            BatchHeaderRepr::for_payload(seq, messages.len() as u32, &payload, &Limits::default())
                .expect("small batch");
        out.extend_from_slice(&header.frame_prefix());
        out.extend_from_slice(&payload);
    }
    out
}

fn frames(frames: &[Frame]) -> Vec<u8> {
    frames.iter().flat_map(Frame::to_bytes).collect()
}

fn ack() -> AckRepr {
    let entry = |batch_seq, global_start, status| AckEntry {
        batch_seq,
        global_start,
        message_count: 2,
        status,
    };
    AckRepr::new(
        5,
        vec![
            entry(1, Some(10), AckStatus::Ordered),
            entry(2, None, AckStatus::Duplicate),
            entry(4, Some(12), AckStatus::Duplicate),
        ],
    )
    .expect("valid ack")
}

fn hello_ok() -> HelloOkRepr {
    HelloOkRepr {
        broker_id: 1,
        batch_bytes_max: 16 << 20,
        order: Order::Total,
        ack: AckLevel::Ordered,
        next_batch_seq: 3,
        log_start: 0,
        log_end: 40,
    }
}

fn topic_ok() -> TopicOkRepr {
    TopicOkRepr {
        broker_id: 0,
        topic: topic(),
        order: Order::TotalSessionFifo,
        ack: AckLevel::Ordered,
        replication_factor: 1,
        created: true,
        retention: Retention::HoldForSubscribers,
        history: wire::HistoryRetention::UNLIMITED,
    }
}

fn error() -> ErrorFrameRepr {
    ErrorFrameRepr::new(ErrorCode::SessionGapSkipped, Some(7), "gap given up")
}

fn delivery() -> Vec<u8> {
    let payload = payload(&[b"one", b"two"]);
    let header = DeliveryHeaderRepr {
        global_start: Some(40),
        message_count: 2,
        payload_bytes: payload.len() as u32,
        checksum: wire::payload::checksum(&payload),
        broker_id: 2,
        client_id: 7,
        session_epoch: 1,
        batch_seq: 9,
    };
    [&header.frame_prefix()[..], &payload].concat()
}

/// Body of a frame (without its 8-byte frame header).
fn body(frame: Frame) -> Vec<u8> {
    frame.to_bytes()[wire::FRAME_HEADER_BYTES..].to_vec()
}

/// Two record batches back to back, as a Kafka producer's Produce may carry them.
fn record_batches() -> Vec<u8> {
    let mut out = Vec::new();
    wire::record_batch::encode(&mut out, 0, [&b"first"[..], b""].into_iter());
    wire::record_batch::encode(&mut out, 0, [&[7u8; 40][..]].into_iter());
    out
}

fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let publisher = [
        Frame::Hello(publisher_hello(7, Order::TotalSessionFifo)).to_bytes(),
        batches(0..3),
        Frame::Goodbye.to_bytes(),
    ]
    .concat();
    let admin = frames(&[
        Frame::CreateTopic(create_topic(Order::Total)),
        Frame::Goodbye,
    ]);
    let to_publisher = [
        frames(&[Frame::HelloOk(hello_ok()), Frame::Ack(ack())]),
        frames(&[Frame::Error(error()), Frame::Goodbye]),
    ]
    .concat();
    let to_subscriber = [
        Frame::HelloOk(hello_ok()).to_bytes(),
        delivery(),
        delivery(),
    ]
    .concat();
    let total_publisher = [
        Frame::Hello(publisher_hello(8, Order::Total)).to_bytes(),
        batches(0..4),
        Frame::Goodbye.to_bytes(),
    ]
    .concat();
    let subscriber = Frame::Hello(subscriber_hello(Order::Total, 0)).to_bytes();
    let resend = [
        Frame::Hello(publisher_hello(7, Order::TotalSessionFifo)).to_bytes(),
        batches([1, 2, 4]),
        Frame::Goodbye.to_bytes(),
    ]
    .concat();
    let batch_frame = batches([3]);
    vec![
        (
            "frame_decoder",
            "publisher",
            Prefixed::encode(0, 0, &publisher),
        ),
        ("frame_decoder", "admin", Prefixed::encode(1, 0, &admin)),
        (
            "frame_decoder",
            "to-publisher",
            Prefixed::encode(2, 0, &to_publisher),
        ),
        (
            "frame_decoder",
            "to-subscriber",
            Prefixed::encode(3, 0, &to_subscriber),
        ),
        (
            "hello",
            "publisher",
            body(Frame::Hello(publisher_hello(7, Order::Total))),
        ),
        (
            "hello",
            "subscriber",
            body(Frame::Hello(subscriber_hello(
                Order::TotalSessionFifo,
                FROM_END,
            ))),
        ),
        ("hello", "hello-ok", body(Frame::HelloOk(hello_ok()))),
        ("control", "error", body(Frame::Error(error()))),
        (
            "control",
            "create-topic",
            body(Frame::CreateTopic(create_topic(Order::PerBrokerFifo))),
        ),
        ("control", "topic-ok", body(Frame::TopicOk(topic_ok()))),
        ("ack", "three-entries", body(Frame::Ack(ack()))),
        (
            "batch",
            "three-messages",
            batch_frame[wire::FRAME_HEADER_BYTES..].to_vec(),
        ),
        ("record_batch", "two-batches", record_batches()),
        (
            "delivery",
            "two-messages",
            delivery()[wire::FRAME_HEADER_BYTES..].to_vec(),
        ),
        (
            "connection",
            "publisher",
            ConnectionInput::encode(0, REPAIR_BATCHES, std::slice::from_ref(&publisher)),
        ),
        (
            "connection",
            "admin-then-publisher",
            ConnectionInput::encode(1, 0, &[admin, total_publisher.clone()]),
        ),
        (
            "connection",
            "publisher-and-subscriber",
            ConnectionInput::encode(2, REPAIR_BATCHES, &[total_publisher, subscriber]),
        ),
        (
            "connection",
            "resend-after-reconnect",
            ConnectionInput::encode(3, REPAIR_BATCHES, &[publisher, resend]),
        ),
    ]
}

fn main() -> std::io::Result<()> {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: write-seeds <corpus-dir>");
        std::process::exit(2);
    };
    let dir = Path::new(&dir);
    let mut written = 0;
    for (target, name, bytes) in seeds() {
        let target_dir = dir.join(target);
        std::fs::create_dir_all(&target_dir)?;
        let path = target_dir.join(format!("seed-{name}"));
        if !path.exists() {
            std::fs::write(&path, bytes)?;
            written += 1;
        }
    }
    println!(
        "write-seeds: {written} new seed inputs in {}",
        dir.display()
    );
    Ok(())
}
