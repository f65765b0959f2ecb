//! [`Publisher`]: the socket adapter around [`PublisherCore`].
//!
//! Each connection has a writer thread (writes sealed batches, in order, one `write_all`
//! each) and a reader thread (decodes Acks, Errors and Goodbye, and timestamps them on
//! arrival). Both report to the publisher over one channel; the publisher's own thread owns
//! the protocol state and is the only one that changes it.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;
use wire::{Frame, FrameKind, HelloOkRepr, HelloRepr, Role};

use crate::batcher::SealedBatch;
use crate::config::{PublisherConfig, millis};
use crate::error::ClientError;
use crate::net::{FrameReader, Inbound, ReadOutcome, connect_and_hello, write_frame};
use crate::session::{CoreParams, PublisherCore, PublisherEvent};
use crate::stats::PublisherStats;

enum WriteCommand {
    Batch(SealedBatch),
    Goodbye,
}

enum IoEvent {
    Frame {
        connection: usize,
        frame: Frame,
        at: Instant,
    },
    Written {
        connection: usize,
        seq: u64,
        message_count: u32,
        message_bytes: u64,
        buffer: Vec<u8>,
    },
    Ended {
        connection: usize,
        error: Option<ClientError>,
    },
}

#[derive(Debug)]
struct ConnectionIo {
    stream: TcpStream,
    hello_ok: HelloOkRepr,
    commands: Option<Sender<WriteCommand>>,
    writer: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
}

/// A publisher session over `connections_per_broker` connections to each broker.
///
/// Messages are appended to an open batch; sealed batches are numbered 0, 1, 2, ... and
/// sent round-robin over all connections (connection `i` goes to broker `i % brokers`), so
/// consecutive batches land on different brokers. See the [crate docs](crate) for an
/// example. Dropping a publisher without [`close`](Publisher::close) still says Goodbye
/// and closes every socket (without waiting for outstanding acks).
#[derive(Debug)]
pub struct Publisher {
    core: PublisherCore,
    connections: Vec<ConnectionIo>,
    events: Receiver<IoEvent>,
    blocking: bool,
    publish_timeout: Duration,
    flush_timeout: Duration,
    goodbye_timeout: Duration,
    client_id: u64,
    session_epoch: u32,
    closed: bool,
}

impl std::fmt::Debug for IoEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoEvent::Frame {
                connection, frame, ..
            } => {
                write!(f, "Frame({connection}, {:?})", frame.kind())
            }
            IoEvent::Written {
                connection, seq, ..
            } => write!(f, "Written({connection}, {seq})"),
            IoEvent::Ended { connection, error } => write!(f, "Ended({connection}, {error:?})"),
        }
    }
}

impl Publisher {
    /// Opens `connections_per_broker` connections to every broker (`TCP_NODELAY`, explicit
    /// socket buffers) and performs Hello/HelloOk on each. If any connection fails, the
    /// ones already open are closed with Goodbye and the error is returned.
    ///
    /// The effective batch limit is the smallest of `batch_bytes_max` and every broker's
    /// HelloOk limit. Batch numbering starts at the largest HelloOk `next_batch_seq` (0 for
    /// a new session).
    pub fn connect(config: PublisherConfig) -> Result<Publisher, ClientError> {
        let valid = config.validate()?;
        let hello = HelloRepr {
            role: Role::Publish,
            order: valid.order,
            ack: valid.ack,
            client_id: config.client_id,
            session_epoch: config.session_epoch,
            topic: valid.topic,
        };
        let timeout = millis(config.connect_timeout_ms);
        // Slot-major order, so connection i belongs to broker i % brokers and round-robin
        // over connections alternates brokers.
        let mut opened = Vec::new();
        for _slot in 0..config.connections_per_broker {
            for &addr in &config.brokers {
                match connect_and_hello(addr, &hello, timeout, config.socket_buffer_bytes) {
                    Ok(connection) => opened.push((addr, connection)),
                    Err(error) => {
                        for (addr, (stream, _, _)) in &opened {
                            say_goodbye_and_close(*addr, stream);
                        }
                        return Err(error);
                    }
                }
            }
        }
        let batch_bytes_max = opened
            .iter()
            .map(|(_, (_, _, ok))| ok.batch_bytes_max as usize)
            .fold(config.batch_bytes_max, usize::min);
        let first_seq = opened
            .iter()
            .map(|(_, (_, _, ok))| ok.next_batch_seq)
            .max()
            .unwrap_or(0);
        let core = PublisherCore::new(CoreParams {
            connections: opened.iter().map(|(addr, _)| *addr).collect(),
            batch_bytes_max,
            linger: Duration::from_micros(config.linger_us),
            in_flight_batches_max: config.in_flight_batches_max,
            ack: valid.ack,
            first_seq,
            report_acks: config.report_acks,
        });
        let (event_sender, events) = crossbeam_channel::unbounded();
        let mut publisher = Publisher {
            core,
            connections: Vec::with_capacity(opened.len()),
            events,
            blocking: config.blocking,
            publish_timeout: millis(config.publish_timeout_ms),
            flush_timeout: millis(config.flush_timeout_ms),
            goodbye_timeout: millis(config.goodbye_timeout_ms),
            client_id: config.client_id,
            session_epoch: config.session_epoch,
            closed: false,
        };
        let mut spawn_error = None;
        for (index, (addr, (stream, reader, hello_ok))) in opened.into_iter().enumerate() {
            let mut connection = ConnectionIo {
                stream,
                hello_ok,
                commands: None,
                writer: None,
                reader: None,
            };
            if spawn_error.is_none()
                && let Err(error) = start_io(index, addr, &mut connection, reader, &event_sender)
            {
                spawn_error = Some(error);
            }
            publisher.connections.push(connection);
        }
        match spawn_error {
            // Dropping the publisher says Goodbye and joins what was started.
            Some(error) => Err(error),
            None => Ok(publisher),
        }
    }

    /// Number of open connections: `connections_per_broker` times the number of brokers.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// The effective batch payload limit (after capping by the brokers' HelloOk).
    pub fn batch_bytes_max(&self) -> usize {
        self.core.batch_bytes_max()
    }

    /// The client id sent in Hello.
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// The session epoch sent in Hello.
    pub fn session_epoch(&self) -> u32 {
        self.session_epoch
    }

    /// The HelloOk each connection received, in connection order.
    pub fn hello_oks(&self) -> Vec<HelloOkRepr> {
        self.connections.iter().map(|c| c.hello_ok).collect()
    }

    /// When the open batch's linger time ends, if it holds messages: a caller that stops
    /// publishing should call [`poll`](Self::poll) by then.
    pub fn linger_deadline(&self) -> Option<Instant> {
        self.core.linger_deadline()
    }

    /// Batches sent on `connection` and not yet acknowledged.
    pub fn in_flight(&self, connection: usize) -> usize {
        self.core.in_flight(connection)
    }

    /// Appends a message to the open batch (copying it). Seals the batch when the message
    /// would overflow `batch_bytes_max` or when the linger time has passed.
    ///
    /// When the next connection's window is full: in blocking mode waits for acks (up to
    /// `publish_timeout_ms`); in non-blocking mode returns [`ClientError::WouldBlock`]
    /// without taking the message, so the caller publishes it again later.
    pub fn publish(&mut self, message: &[u8]) -> Result<(), ClientError> {
        self.ensure_open()?;
        self.drain_events();
        let mut deadline = None;
        loop {
            let now = Instant::now();
            match self.core.publish(message, now) {
                Ok(()) => {
                    self.dispatch();
                    return Ok(());
                }
                Err(error) if error.is_would_block() && self.blocking => {
                    let deadline = *deadline.get_or_insert(now + self.publish_timeout);
                    if !self.wait_event(deadline) {
                        return Err(ClientError::Timeout {
                            what: "blocking publish waiting for window space",
                            timeout_ms: self.publish_timeout.as_millis() as u64,
                            outstanding_batches: self.core.outstanding_batches(),
                        });
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Processes what the connections reported and seals the open batch if its linger time
    /// has passed. Call it when not publishing for a while, so lingering messages go out.
    pub fn poll(&mut self) -> Result<(), ClientError> {
        self.ensure_open()?;
        self.drain_events();
        self.core.poll(Instant::now());
        self.dispatch();
        self.failure()
    }

    /// Seals the open batch and waits until every batch is acknowledged or rejected (at ack
    /// 0: written), up to `flush_timeout_ms`.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.ensure_open()?;
        self.flush_within(self.flush_timeout)
    }

    /// Flushes, sends Goodbye on every connection, waits for the brokers' Goodbye (up to
    /// `goodbye_timeout_ms`) and closes the sockets. Returns the flush's result; the
    /// sockets are closed in any case. Closing twice does nothing.
    pub fn close(&mut self) -> Result<(), ClientError> {
        if self.closed {
            return Ok(());
        }
        let flushed = self.flush_within(self.flush_timeout);
        self.shut_down();
        flushed
    }

    /// A snapshot of the counters and ack latency percentiles.
    pub fn stats(&self) -> PublisherStats {
        self.core.stats()
    }

    /// The ack latency histogram (microseconds), for merging across publishers.
    pub fn ack_latency_histogram(&self) -> &Histogram<u64> {
        self.core.latency_histogram()
    }

    /// Messages acknowledged so far: a counter read, cheap enough for progress reporting
    /// (unlike [`Self::stats`], which computes latency percentiles).
    pub fn messages_acked(&self) -> u64 {
        self.core.messages_acked()
    }

    /// Drains the events recorded so far (rejected batches, pool-full notices and, with
    /// `report_acks`, every acknowledged batch).
    pub fn take_events(&mut self) -> Vec<PublisherEvent> {
        self.drain_events();
        self.core.take_events()
    }

    fn ensure_open(&self) -> Result<(), ClientError> {
        if self.closed {
            return Err(ClientError::Closed { what: "publisher" });
        }
        self.failure()
    }

    fn failure(&self) -> Result<(), ClientError> {
        match self.core.failure() {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    fn flush_within(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        self.drain_events();
        loop {
            match self.core.seal(Instant::now()) {
                Ok(()) => {}
                Err(error) if error.is_would_block() => {}
                Err(error) => return Err(error),
            }
            self.dispatch();
            if self.core.is_flushed() {
                return self.failure();
            }
            if !self.wait_event(deadline) {
                return Err(ClientError::Timeout {
                    what: "flush",
                    timeout_ms: timeout.as_millis() as u64,
                    outstanding_batches: self.core.outstanding_batches(),
                });
            }
        }
    }

    /// Hands sealed batches to their connection's writer.
    fn dispatch(&mut self) {
        while let Some(batch) = self.core.take_transmit() {
            let connection = batch.connection;
            let sent = self.connections[connection]
                .commands
                .as_ref()
                .is_some_and(|commands| commands.send(WriteCommand::Batch(batch)).is_ok());
            if !sent {
                // The writer is gone; it reported why (or the publisher is shutting down).
                self.core.on_connection_ended(
                    connection,
                    Some(ClientError::Closed { what: "publisher" }),
                );
            }
        }
    }

    fn handle(&mut self, event: IoEvent) {
        match event {
            IoEvent::Frame {
                connection,
                frame,
                at,
            } => self.core.on_frame(connection, frame, at),
            IoEvent::Written {
                connection,
                seq,
                message_count,
                message_bytes,
                buffer,
            } => {
                self.core
                    .on_written(connection, seq, message_count, message_bytes);
                self.core.recycle(buffer);
            }
            IoEvent::Ended { connection, error } => {
                self.core.on_connection_ended(connection, error);
            }
        }
    }

    fn drain_events(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.handle(event);
        }
    }

    /// Waits for at least one event until `deadline`; false when none came.
    fn wait_event(&mut self, deadline: Instant) -> bool {
        match self.events.recv_deadline(deadline) {
            Ok(event) => {
                self.handle(event);
                self.drain_events();
                true
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => false,
        }
    }

    /// Goodbye on every connection, a bounded wait for the brokers' Goodbye, then close the
    /// sockets (which also wakes threads blocked in reads or writes) and join the threads.
    fn shut_down(&mut self) {
        self.closed = true;
        for (index, connection) in self.connections.iter_mut().enumerate() {
            if let Some(commands) = connection.commands.take()
                && commands.send(WriteCommand::Goodbye).is_ok()
            {
                self.core.on_goodbye_sent(index);
            }
        }
        let deadline = Instant::now() + self.goodbye_timeout;
        while !(0..self.connections.len()).all(|i| self.core.connection_finished(i)) {
            if !self.wait_event(deadline) {
                log::warn!(
                    "not every broker answered Goodbye within {} ms; closing anyway",
                    self.goodbye_timeout.as_millis()
                );
                break;
            }
        }
        for connection in &mut self.connections {
            // Already closed by the peer is fine: the goal is that nothing stays open.
            let _ = connection.stream.shutdown(Shutdown::Both);
            for handle in [connection.writer.take(), connection.reader.take()]
                .into_iter()
                .flatten()
            {
                if handle.join().is_err() {
                    log::error!("a publisher I/O thread panicked");
                }
            }
        }
        self.drain_events();
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if !self.closed {
            self.shut_down();
        }
    }
}

/// Sends Goodbye and closes a connection that never became part of a publisher.
fn say_goodbye_and_close(addr: SocketAddr, stream: &TcpStream) {
    if let Err(error) = write_frame(stream, &Frame::Goodbye, addr, "sending Goodbye") {
        log::debug!("{error}");
    }
    let _ = stream.shutdown(Shutdown::Both);
}

fn start_io(
    index: usize,
    addr: SocketAddr,
    connection: &mut ConnectionIo,
    reader: FrameReader,
    events: &Sender<IoEvent>,
) -> Result<(), ClientError> {
    let spawn_error = |error| ClientError::io(addr, "starting a connection thread", error);
    let write_stream = connection.stream.try_clone().map_err(spawn_error)?;
    let read_stream = connection.stream.try_clone().map_err(spawn_error)?;
    let (commands, queue) = crossbeam_channel::unbounded();
    let writer_events = events.clone();
    connection.writer = Some(
        thread::Builder::new()
            .name(format!("pub-write-{index}"))
            .spawn(move || write_loop(index, addr, write_stream, &queue, &writer_events))
            .map_err(spawn_error)?,
    );
    connection.commands = Some(commands);
    let reader_events = events.clone();
    connection.reader = Some(
        thread::Builder::new()
            .name(format!("pub-read-{index}"))
            .spawn(move || read_loop(index, addr, reader, &read_stream, &reader_events))
            .map_err(spawn_error)?,
    );
    Ok(())
}

fn write_loop(
    connection: usize,
    addr: SocketAddr,
    mut stream: TcpStream,
    queue: &Receiver<WriteCommand>,
    events: &Sender<IoEvent>,
) {
    let goodbye = Frame::Goodbye.to_bytes();
    for command in queue {
        let (bytes, doing): (&[u8], _) = match &command {
            WriteCommand::Batch(batch) => (&batch.bytes, "writing a batch"),
            WriteCommand::Goodbye => (&goodbye, "sending Goodbye"),
        };
        if let Err(error) = stream.write_all(bytes) {
            let _ = events.send(IoEvent::Ended {
                connection,
                error: Some(ClientError::io(addr, doing, error)),
            });
            return;
        }
        match command {
            WriteCommand::Batch(batch) => {
                let written = IoEvent::Written {
                    connection,
                    seq: batch.seq,
                    message_count: batch.message_count,
                    message_bytes: batch.message_bytes,
                    buffer: batch.bytes,
                };
                if events.send(written).is_err() {
                    return;
                }
            }
            WriteCommand::Goodbye => return,
        }
    }
}

fn read_loop(
    connection: usize,
    addr: SocketAddr,
    mut reader: FrameReader,
    stream: &TcpStream,
    events: &Sender<IoEvent>,
) {
    loop {
        let event = match reader.next(&mut &*stream) {
            Ok(ReadOutcome::Item(Inbound::Frame(frame))) => IoEvent::Frame {
                connection,
                frame,
                at: Instant::now(),
            },
            // No read timeout is set after the handshake, so this does not happen; reading
            // on is right if it does.
            Ok(ReadOutcome::TimedOut) => continue,
            Ok(ReadOutcome::Item(Inbound::Delivery(..))) => IoEvent::Ended {
                connection,
                error: Some(ClientError::UnexpectedFrame {
                    addr,
                    got: FrameKind::Delivery,
                    expected: "Ack, Error or Goodbye",
                }),
            },
            Ok(ReadOutcome::Eof) => IoEvent::Ended {
                connection,
                error: None,
            },
            Err(error) => IoEvent::Ended {
                connection,
                error: Some(error),
            },
        };
        let last = matches!(event, IoEvent::Ended { .. });
        if events.send(event).is_err() || last {
            return;
        }
    }
}
