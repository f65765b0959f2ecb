//! A minimal **test peer** that speaks the broker side of the wire protocol on loopback, so
//! the client's socket adapters can be tested before the real broker exists. It is not a
//! broker: one thread per connection, a shared in-memory "log" standing in for the pool,
//! positions handed out under a mutex, no sequencer. The real end-to-end tests run against
//! the real brokers.

#![allow(dead_code)] // Each test binary uses a different part of the peer.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use wire::{
    AckEntry, AckLevel, AckRepr, AckStatus, BatchHeaderRepr, Decoded, DeliveryHeaderRepr,
    ErrorCode, ErrorFrameRepr, Frame, FrameDecoder, HelloOkRepr, Limits, Order, Role, TopicOkRepr,
    verify_payload,
};

/// One batch in the shared log.
#[derive(Debug, Clone)]
pub struct Entry {
    pub global_start: u64,
    pub message_count: u32,
    pub client_id: u64,
    pub session_epoch: u32,
    pub batch_seq: u64,
    pub broker_id: u16,
    pub payload: Vec<u8>,
}

/// The log shared by the test peers of one "cluster", and what they observed.
#[derive(Debug, Default)]
pub struct Shared {
    pub log: Vec<Entry>,
    pub next_position: u64,
    pub topics: HashMap<String, (u8, u8, u8)>,
    /// Batches received per (broker id, connection number on that broker).
    pub batches_per_connection: HashMap<(u16, usize), u64>,
    pub hellos: usize,
    pub goodbyes_received: usize,
    pub connections_closed: usize,
}

/// How a test peer misbehaves (or not).
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub broker_id: u16,
    pub batch_bytes_max: u32,
    /// Send Acks at all (false: hold every ack, to fill the client's window).
    pub ack: bool,
    /// Refuse every Hello with this code.
    pub refuse_hello: Option<ErrorCode>,
    /// Do not order this batch; send SessionGapSkipped for it instead.
    pub gap_skip: Option<u64>,
    /// Answer this batch with this closing error and close the connection.
    pub fail_batch: Option<(u64, ErrorCode)>,
    /// Acknowledge this batch but never store it (a lost batch).
    pub drop_batch: Option<u64>,
    /// Answer Goodbye with Goodbye.
    pub answer_goodbye: bool,
}

impl Behaviour {
    pub fn new(broker_id: u16) -> Self {
        Behaviour {
            broker_id,
            batch_bytes_max: 1 << 20,
            ack: true,
            refuse_hello: None,
            gap_skip: None,
            fail_batch: None,
            drop_batch: None,
            answer_goodbye: true,
        }
    }
}

/// A test peer listening on an ephemeral loopback port.
pub struct TestPeer {
    pub addr: SocketAddr,
    pub shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl TestPeer {
    pub fn start(behaviour: Behaviour, shared: Arc<Mutex<Shared>>) -> TestPeer {
        Self::start_at("127.0.0.1:0".parse().unwrap(), behaviour, shared)
    }

    /// A peer on `addr` (e.g. the address of a peer that was dropped: a restart).
    pub fn start_at(
        addr: SocketAddr,
        behaviour: Behaviour,
        shared: Arc<Mutex<Shared>>,
    ) -> TestPeer {
        let listener = TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (shared, stop) = (shared.clone(), stop.clone());
            thread::spawn(move || accept_loop(&listener, &behaviour, &shared, &stop))
        };
        TestPeer {
            addr,
            shared,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// A cluster of `count` peers sharing one log.
    pub fn cluster(count: u16, configure: impl Fn(&mut Behaviour)) -> Vec<TestPeer> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        (0..count)
            .map(|id| {
                let mut behaviour = Behaviour::new(id);
                configure(&mut behaviour);
                TestPeer::start(behaviour, shared.clone())
            })
            .collect()
    }

    pub fn state<T>(&self, read: impl FnOnce(&Shared) -> T) -> T {
        read(&self.shared.lock().unwrap())
    }

    /// Waits up to `timeout` for a condition on the shared state.
    pub fn wait_for(&self, timeout: Duration, condition: impl Fn(&Shared) -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.state(&condition) {
                return true;
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.state(condition)
    }
}

impl Drop for TestPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    behaviour: &Behaviour,
    shared: &Arc<Mutex<Shared>>,
    stop: &Arc<AtomicBool>,
) {
    let mut connections = Vec::new();
    let mut number = 0;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (behaviour, shared, stop) = (behaviour.clone(), shared.clone(), stop.clone());
                let connection = number;
                number += 1;
                connections.push(thread::spawn(move || {
                    let mut peer =
                        Connection::new(stream, behaviour, shared.clone(), stop, connection);
                    let _ = peer.serve();
                    let _ = peer.stream.shutdown(Shutdown::Both);
                    shared.lock().unwrap().connections_closed += 1;
                }));
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(_) => break,
        }
    }
    for connection in connections {
        let _ = connection.join();
    }
}

enum Incoming {
    Frame(Frame),
    Batch(BatchHeaderRepr, Vec<u8>),
}

struct Connection {
    stream: TcpStream,
    behaviour: Behaviour,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    number: usize,
    decoder: FrameDecoder,
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    pending: Option<(BatchHeaderRepr, Vec<u8>)>,
}

impl Connection {
    fn new(
        stream: TcpStream,
        behaviour: Behaviour,
        shared: Arc<Mutex<Shared>>,
        stop: Arc<AtomicBool>,
        number: usize,
    ) -> Self {
        stream.set_nonblocking(false).unwrap();
        // Without it, Nagle holds small Acks behind the client's delayed TCP ack (~40 ms).
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        Connection {
            stream,
            behaviour,
            shared,
            stop,
            number,
            decoder: FrameDecoder::new(Limits::default()),
            buffer: vec![0; 64 << 10],
            start: 0,
            end: 0,
            pending: None,
        }
    }

    fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.stream.write_all(&frame.to_bytes())
    }

    /// The next frame; `Ok(None)` on a read timeout; an error at end of stream.
    fn next(&mut self) -> io::Result<Option<Incoming>> {
        loop {
            while self.start < self.end {
                let (used, decoded) = self
                    .decoder
                    .decode(&self.buffer[self.start..self.end])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                self.start += used;
                match decoded {
                    Decoded::NeedMore(_) => {}
                    Decoded::Frame(frame) => return Ok(Some(Incoming::Frame(frame))),
                    Decoded::Batch(header) => {
                        self.pending =
                            Some((header, Vec::with_capacity(header.payload_bytes as usize)));
                    }
                    Decoded::Payload { bytes, remaining } => {
                        let (_, payload) = self.pending.as_mut().unwrap();
                        payload.extend_from_slice(bytes);
                        if remaining == 0 {
                            let (header, payload) = self.pending.take().unwrap();
                            return Ok(Some(Incoming::Batch(header, payload)));
                        }
                    }
                    Decoded::Delivery(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "delivery from a client",
                        ));
                    }
                }
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            match self.stream.read(&mut self.buffer) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(read) => {
                    self.start = 0;
                    self.end = read;
                }
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn serve(&mut self) -> io::Result<()> {
        let first = loop {
            if let Some(incoming) = self.next()? {
                break incoming;
            }
        };
        match first {
            Incoming::Frame(Frame::Hello(hello)) => {
                self.shared.lock().unwrap().hellos += 1;
                if let Some(code) = self.behaviour.refuse_hello {
                    return self.send(&Frame::Error(ErrorFrameRepr::new(
                        code,
                        None,
                        "refused by the test peer",
                    )));
                }
                let log_end = self.shared.lock().unwrap().next_position;
                self.send(&Frame::HelloOk(HelloOkRepr {
                    broker_id: self.behaviour.broker_id,
                    batch_bytes_max: self.behaviour.batch_bytes_max,
                    order: hello.order,
                    ack: hello.ack,
                    next_batch_seq: 0,
                    log_start: 0,
                    log_end,
                }))?;
                match hello.role {
                    Role::Publish => {
                        self.serve_publisher(hello.client_id, hello.session_epoch, hello.ack)
                    }
                    Role::Subscribe { from_position, .. } => {
                        let from = if from_position == u64::MAX {
                            log_end
                        } else {
                            from_position
                        };
                        self.serve_subscriber(from, hello.order)
                    }
                }
            }
            Incoming::Frame(Frame::CreateTopic(create)) => {
                let settings = (
                    create.order as u8,
                    create.ack as u8,
                    create.replication_factor,
                );
                let existing = {
                    let mut shared = self.shared.lock().unwrap();
                    let existing = shared.topics.get(create.topic.as_str()).copied();
                    shared
                        .topics
                        .entry(create.topic.as_str().to_owned())
                        .or_insert(settings);
                    existing
                };
                if existing.is_some_and(|e| e != settings) {
                    return self.send(&Frame::Error(ErrorFrameRepr::new(
                        ErrorCode::TopicExists,
                        None,
                        "exists with other settings",
                    )));
                }
                self.send(&Frame::TopicOk(TopicOkRepr {
                    broker_id: self.behaviour.broker_id,
                    topic: create.topic,
                    order: create.order,
                    ack: create.ack,
                    replication_factor: create.replication_factor,
                    created: existing.is_none(),
                    retention: create.retention,
                    history: create.history,
                }))?;
                self.until_goodbye()
            }
            _ => self.send(&Frame::Error(ErrorFrameRepr::new(
                ErrorCode::UnexpectedFrame,
                None,
                "hello first",
            ))),
        }
    }

    fn goodbye(&mut self) -> io::Result<()> {
        self.shared.lock().unwrap().goodbyes_received += 1;
        if self.behaviour.answer_goodbye {
            self.send(&Frame::Goodbye)?;
        }
        Ok(())
    }

    fn until_goodbye(&mut self) -> io::Result<()> {
        loop {
            if let Some(Incoming::Frame(Frame::Goodbye)) = self.next()? {
                return self.goodbye();
            }
        }
    }

    fn serve_publisher(
        &mut self,
        client_id: u64,
        session_epoch: u32,
        ack: AckLevel,
    ) -> io::Result<()> {
        loop {
            let Some(incoming) = self.next()? else {
                continue;
            };
            let (header, payload) = match incoming {
                Incoming::Frame(Frame::Goodbye) => return self.goodbye(),
                Incoming::Batch(header, payload) => (header, payload),
                Incoming::Frame(_) => {
                    return self.send(&Frame::Error(ErrorFrameRepr::new(
                        ErrorCode::UnexpectedFrame,
                        None,
                        "publishers send batches",
                    )));
                }
            };
            if verify_payload(&header, &payload).is_err() {
                return self.send(&Frame::Error(ErrorFrameRepr::new(
                    ErrorCode::ChecksumMismatch,
                    Some(header.batch_seq),
                    "bad payload",
                )));
            }
            let seq = header.batch_seq;
            if let Some((failing, code)) = self.behaviour.fail_batch
                && failing == seq
            {
                return self.send(&Frame::Error(ErrorFrameRepr::new(
                    code,
                    Some(seq),
                    "failed by the test peer",
                )));
            }
            *self
                .shared
                .lock()
                .unwrap()
                .batches_per_connection
                .entry((self.behaviour.broker_id, self.number))
                .or_default() += 1;
            if self.behaviour.gap_skip == Some(seq) {
                self.send(&Frame::Error(ErrorFrameRepr::new(
                    ErrorCode::SessionGapSkipped,
                    Some(seq),
                    "gap timed out",
                )))?;
                if ack != AckLevel::FireAndForget && self.behaviour.ack {
                    self.send(&Frame::Ack(AckRepr::new(seq, vec![]).unwrap()))?;
                }
                continue;
            }
            let global_start = {
                let mut shared = self.shared.lock().unwrap();
                let start = shared.next_position;
                shared.next_position += u64::from(header.message_count);
                if self.behaviour.drop_batch != Some(seq) {
                    shared.log.push(Entry {
                        global_start: start,
                        message_count: header.message_count,
                        client_id,
                        session_epoch,
                        batch_seq: seq,
                        broker_id: self.behaviour.broker_id,
                        payload,
                    });
                }
                start
            };
            if ack != AckLevel::FireAndForget && self.behaviour.ack {
                let entry = AckEntry {
                    batch_seq: seq,
                    global_start: Some(global_start),
                    message_count: header.message_count,
                    status: AckStatus::Ordered,
                };
                self.send(&Frame::Ack(AckRepr::new(seq, vec![entry]).unwrap()))?;
            }
        }
    }

    fn serve_subscriber(&mut self, from: u64, order: Order) -> io::Result<()> {
        let mut next = from;
        loop {
            let ready: Vec<Entry> = {
                let shared = self.shared.lock().unwrap();
                let mut entries: Vec<Entry> = shared
                    .log
                    .iter()
                    .filter(|e| e.global_start >= next)
                    .cloned()
                    .collect();
                entries.sort_by_key(|e| e.global_start);
                entries
            };
            for entry in ready {
                let header = DeliveryHeaderRepr {
                    global_start: (order != Order::Unordered).then_some(entry.global_start),
                    message_count: entry.message_count,
                    payload_bytes: entry.payload.len() as u32,
                    checksum: wire::payload::checksum(&entry.payload),
                    broker_id: entry.broker_id,
                    client_id: entry.client_id,
                    session_epoch: entry.session_epoch,
                    batch_seq: entry.batch_seq,
                };
                self.stream.write_all(&header.frame_prefix())?;
                self.stream.write_all(&entry.payload)?;
                next = entry.global_start + u64::from(entry.message_count);
            }
            if let Some(Incoming::Frame(Frame::Goodbye)) = self.next()? {
                return self.goodbye();
            }
        }
    }
}
