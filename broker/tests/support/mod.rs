//! A minimal blocking client written with the `wire` crate, for the broker's integration
//! tests: it speaks the protocol frame by frame, so tests can send exactly what they mean
//! (bad input included) and assert on each frame the broker answers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use wire::{
    AckLevel, BatchHeaderRepr, CreateTopicRepr, Decoded, ErrorCode, Frame, FrameDecoder, HelloRepr,
    Limits, Order, Retention, Role, Topic,
};

/// A blocking test client that speaks the protocol frame by frame.
pub struct Client {
    pub stream: TcpStream,
    decoder: FrameDecoder,
    buffer: Vec<u8>,
}

pub enum Received {
    Frame(Frame),
    Delivery(wire::DeliveryHeaderRepr, Vec<u8>),
    Closed,
    /// Nothing arrived within the stream's read timeout.
    TimedOut,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            stream,
            decoder: FrameDecoder::new(Limits::default()),
            buffer: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn hello(
        &mut self,
        topic: &str,
        role: Role,
        order: Order,
        ack: AckLevel,
        client_id: u64,
    ) -> Frame {
        let hello = HelloRepr {
            role,
            order,
            ack,
            client_id,
            session_epoch: 1,
            topic: Topic::new(topic).unwrap(),
        };
        self.send(&Frame::Hello(hello).to_bytes());
        self.frame()
    }

    pub fn batch(&mut self, seq: u64, messages: &[&[u8]]) {
        let mut payload = Vec::new();
        for m in messages {
            wire::payload::push_message(&mut payload, m);
        }
        let header =
            BatchHeaderRepr::for_payload(seq, messages.len() as u32, &payload, &Limits::default())
                .unwrap();
        let mut frame = header.frame_prefix().to_vec();
        frame.extend_from_slice(&payload);
        self.send(&frame);
    }

    pub fn receive(&mut self) -> Received {
        let mut payload_header = None;
        let mut payload = Vec::new();
        loop {
            while !self.buffer.is_empty() {
                let (consumed, decoded) = self
                    .decoder
                    .decode(&self.buffer)
                    .expect("broker sends valid frames");
                let decoded = match decoded {
                    Decoded::Payload { bytes, remaining } => {
                        payload.extend_from_slice(bytes);
                        self.buffer.drain(..consumed);
                        if remaining == 0 {
                            return Received::Delivery(payload_header.take().unwrap(), payload);
                        }
                        continue;
                    }
                    Decoded::Frame(frame) => Some(Received::Frame(frame)),
                    Decoded::Delivery(header) => {
                        payload_header = Some(header);
                        None
                    }
                    Decoded::NeedMore(_) => None,
                    Decoded::Batch(_) => panic!("brokers do not send batches"),
                };
                self.buffer.drain(..consumed);
                if let Some(received) = decoded {
                    return received;
                }
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Received::Closed,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Received::Closed;
                }
                Err(e)
                    if payload_header.is_none()
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                {
                    return Received::TimedOut;
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    pub fn frame(&mut self) -> Frame {
        match self.receive() {
            Received::Frame(frame) => frame,
            Received::Delivery(..) => panic!("expected a control frame, got a delivery"),
            Received::Closed => panic!("broker closed the connection"),
            Received::TimedOut => panic!("no frame within the read timeout"),
        }
    }

    pub fn expect_error(&mut self, code: ErrorCode) -> String {
        match self.frame() {
            Frame::Error(error) => {
                assert_eq!(error.code, code, "reason: {}", error.reason());
                error.reason().to_owned()
            }
            other => panic!("expected Error {code:?}, got {other:?}"),
        }
    }

    pub fn expect_closed(&mut self) {
        assert!(
            matches!(self.receive(), Received::Closed),
            "the broker should close the connection"
        );
    }

    /// Reads Acks until `through` is acknowledged; returns every entry.
    pub fn acks_through(&mut self, through: u64) -> Vec<wire::AckEntry> {
        let mut entries = Vec::new();
        loop {
            match self.frame() {
                Frame::Ack(ack) => {
                    entries.extend_from_slice(ack.entries());
                    if ack.acked_through_seq() >= through {
                        return entries;
                    }
                }
                other => panic!("expected an Ack, got {other:?}"),
            }
        }
    }
}

/// Creates `topic` on the head at `head` (order `order`, ack 1, no replicas).
pub fn create_topic(head: SocketAddr, topic: &str, order: Order, retention: Retention) {
    let mut client = Client::connect(head);
    let create = CreateTopicRepr {
        topic: Topic::new(topic).unwrap(),
        order,
        ack: AckLevel::Ordered,
        replication_factor: 0,
        retention,
        history: wire::HistoryRetention::UNLIMITED,
    };
    client.send(&Frame::CreateTopic(create).to_bytes());
    match client.frame() {
        Frame::TopicOk(ok) => assert_eq!(ok.retention, retention),
        other => panic!("expected TopicOk, got {other:?}"),
    }
    client.send(&Frame::Goodbye.to_bytes());
    assert!(matches!(client.frame(), Frame::Goodbye));
}

pub fn publisher(addr: SocketAddr, topic: &str, order: Order, client_id: u64) -> Client {
    let mut client = Client::connect(addr);
    match client.hello(topic, Role::Publish, order, AckLevel::Ordered, client_id) {
        Frame::HelloOk(ok) => assert_eq!(ok.order, order),
        other => panic!("expected HelloOk, got {other:?}"),
    }
    client
}

pub fn subscriber(addr: SocketAddr, topic: &str, order: Order, from_position: u64) -> Client {
    let mut client = Client::connect(addr);
    let role = Role::Subscribe {
        from_position,
        batch_bytes_max: 0,
    };
    match client.hello(topic, role, order, AckLevel::FireAndForget, 999) {
        Frame::HelloOk(_) => client,
        other => panic!("expected HelloOk, got {other:?}"),
    }
}

/// A plain HTTP GET; returns the whole response.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}
