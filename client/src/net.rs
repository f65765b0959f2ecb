//! Thin socket adapters: opening a configured TCP connection, reading frames from a stream
//! with [`FrameReader`], and the Hello/HelloOk exchange.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, TcpKeepalive, Type};
use units::Timestamp;
use wire::{
    AckLevel, Decoded, DeliveryHeaderRepr, Frame, FrameDecoder, FrameKind, HelloOkRepr, HelloRepr,
    Limits, Order,
};

use crate::error::ClientError;

/// Opens a TCP connection with `TCP_NODELAY` and explicit `SO_SNDBUF`/`SO_RCVBUF`, set
/// before connecting so the window scale negotiated in the handshake can use them.
pub(crate) fn open_stream(
    addr: SocketAddr,
    timeout: Duration,
    buffer_bytes: usize,
) -> Result<TcpStream, ClientError> {
    let connect_error = |source| ClientError::Connect {
        addr,
        source: Arc::new(source),
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(connect_error)?;
    socket
        .set_send_buffer_size(buffer_bytes)
        .map_err(connect_error)?;
    socket
        .set_recv_buffer_size(buffer_bytes)
        .map_err(connect_error)?;
    socket.set_tcp_nodelay(true).map_err(connect_error)?;
    match socket.connect_timeout(&SockAddr::from(addr), timeout) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::TimedOut => {
            return Err(ClientError::handshake_timeout(addr, "TCP connect", timeout));
        }
        Err(error) => return Err(connect_error(error)),
    }
    // The kernel caps the sizes at net.core.{w,r}mem_max (and doubles what it grants).
    if let (Ok(send), Ok(recv)) = (socket.send_buffer_size(), socket.recv_buffer_size())
        && (send < buffer_bytes || recv < buffer_bytes)
    {
        log::debug!(
            "{addr}: asked for {buffer_bytes}-byte socket buffers, got send {send} / receive {recv}; raise net.core.wmem_max / rmem_max for more"
        );
    }
    Ok(socket.into())
}

/// Shortest time [`detect_dead_peer`] gives a silent peer.
const DEAD_PEER_TIMEOUT_MIN: Duration = Duration::from_secs(1);

/// Makes a vanished peer (host down, network cut) end the connection instead of leaving
/// reads and writes blocked forever: keep-alive probes every second while the connection is
/// idle, and `TCP_USER_TIMEOUT`, so that data or probes left unacknowledged for `timeout` (at
/// least 1 s) make the kernel fail the socket with `ETIMEDOUT`. A peer that merely stops
/// reading (zero window, backpressure) still acknowledges probes and is not affected.
pub(crate) fn detect_dead_peer(
    stream: &TcpStream,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), ClientError> {
    let socket = SockRef::from(stream);
    let keepalive = TcpKeepalive::new()
        .with_time(DEAD_PEER_TIMEOUT_MIN)
        .with_interval(DEAD_PEER_TIMEOUT_MIN);
    socket
        .set_tcp_keepalive(&keepalive)
        .and_then(|()| socket.set_tcp_user_timeout(Some(timeout.max(DEAD_PEER_TIMEOUT_MIN))))
        .map_err(|error| ClientError::io(addr, "setting keep-alive and TCP_USER_TIMEOUT", error))
}

/// Writes a whole control frame.
pub(crate) fn write_frame(
    mut stream: impl Write,
    frame: &Frame,
    addr: SocketAddr,
    doing: &'static str,
) -> Result<(), ClientError> {
    stream
        .write_all(&frame.to_bytes())
        .map_err(|error| ClientError::io(addr, doing, error))
}

/// What a broker sends: a control frame, or a Delivery with its whole payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// A control frame.
    Frame(Frame),
    /// A Delivery header and its payload (not yet verified).
    Delivery(DeliveryHeaderRepr, Vec<u8>),
}

/// The result of one [`FrameReader::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadOutcome {
    /// A complete frame.
    Item(Inbound),
    /// The stream's read timeout passed; partial input stays buffered.
    TimedOut,
    /// The peer closed the stream at a frame boundary.
    Eof,
}

#[derive(Debug)]
struct PendingDelivery {
    header: DeliveryHeaderRepr,
    payload: Vec<u8>,
    filled: usize,
}

/// Reads frames from a byte stream through [`FrameDecoder`], keeping partial input across
/// read timeouts. Delivery payloads are read straight into their own buffer once the
/// staging buffer is drained.
#[derive(Debug)]
pub(crate) struct FrameReader {
    addr: SocketAddr,
    decoder: FrameDecoder,
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
    pending: Option<PendingDelivery>,
}

/// Size of the staging buffer for control frames and delivery headers.
const READ_BUFFER_BYTES: usize = 64 << 10;

impl FrameReader {
    /// A reader at the start of the stream from `addr`.
    pub fn new(addr: SocketAddr, limits: Limits) -> Self {
        FrameReader {
            addr,
            decoder: FrameDecoder::new(limits),
            buffer: vec![0u8; READ_BUFFER_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            pending: None,
        }
    }

    /// Replaces the limits; only valid between frames (after the handshake).
    pub fn set_limits(&mut self, limits: Limits) {
        if self.decoder.at_frame_boundary() && self.pending.is_none() {
            self.decoder = FrameDecoder::new(limits);
        }
    }

    fn protocol(&self, source: wire::Error) -> ClientError {
        ClientError::Protocol {
            addr: self.addr,
            source,
        }
    }

    /// Returns the next frame, reading from `source` as needed.
    pub fn next(&mut self, source: &mut impl Read) -> Result<ReadOutcome, ClientError> {
        loop {
            while self.start < self.end {
                if let Some(done) = self.fill_pending_from_buffer()? {
                    return Ok(ReadOutcome::Item(done));
                }
                if self.start == self.end {
                    break;
                }
                let (used, decoded) = self
                    .decoder
                    .decode(&self.buffer[self.start..self.end])
                    .map_err(|e| self.protocol(e))?;
                self.start += used;
                match decoded {
                    Decoded::NeedMore(_) => {}
                    Decoded::Frame(frame) => return Ok(ReadOutcome::Item(Inbound::Frame(frame))),
                    Decoded::Delivery(header) => {
                        self.pending = Some(PendingDelivery {
                            header,
                            payload: vec![0u8; header.payload_bytes as usize],
                            filled: 0,
                        });
                    }
                    Decoded::Batch(_) => {
                        return Err(ClientError::UnexpectedFrame {
                            addr: self.addr,
                            got: FrameKind::Batch,
                            expected: "a broker frame (brokers never send Batch)",
                        });
                    }
                    // The decoder passes payload bytes back only when decode() is called
                    // inside a payload, which this reader never does: it receives payloads
                    // itself via payload_received().
                    Decoded::Payload { .. } => {
                        return Err(self.protocol(wire::Error::PayloadOverrun {
                            received: used,
                            remaining: 0,
                        }));
                    }
                }
            }
            self.start = 0;
            self.end = 0;
            if let Some(done) = self.read_into(source)? {
                return Ok(done);
            }
        }
    }

    /// Moves buffered bytes into the pending delivery; returns it when complete.
    fn fill_pending_from_buffer(&mut self) -> Result<Option<Inbound>, ClientError> {
        let Some(pending) = self.pending.as_mut() else {
            return Ok(None);
        };
        let take = (pending.payload.len() - pending.filled).min(self.end - self.start);
        pending.payload[pending.filled..pending.filled + take]
            .copy_from_slice(&self.buffer[self.start..self.start + take]);
        pending.filled += take;
        self.start += take;
        self.decoder
            .payload_received(take)
            .map_err(|e| ClientError::Protocol {
                addr: self.addr,
                source: e,
            })?;
        Ok(self.take_complete_delivery())
    }

    fn take_complete_delivery(&mut self) -> Option<Inbound> {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.filled == p.payload.len())
        {
            self.pending
                .take()
                .map(|p| Inbound::Delivery(p.header, p.payload))
        } else {
            None
        }
    }

    /// One read: straight into a large pending payload, else into the staging buffer.
    fn read_into(&mut self, source: &mut impl Read) -> Result<Option<ReadOutcome>, ClientError> {
        let direct = self
            .pending
            .as_ref()
            .is_some_and(|p| p.payload.len() - p.filled >= READ_BUFFER_BYTES / 2);
        let result = match self.pending.as_mut() {
            Some(p) if direct => source.read(&mut p.payload[p.filled..]),
            _ => source.read(&mut self.buffer),
        };
        let read = match result {
            Ok(read) => read,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Some(ReadOutcome::TimedOut));
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => return Ok(None),
            Err(error) => return Err(ClientError::io(self.addr, "reading", error)),
        };
        if read == 0 {
            if self.decoder.at_frame_boundary() {
                return Ok(Some(ReadOutcome::Eof));
            }
            return Err(ClientError::io(
                self.addr,
                "reading",
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "stream ended inside a frame ({} bytes of the current step missing)",
                        self.decoder.wanted()
                    ),
                ),
            ));
        }
        if direct {
            if let Some(p) = self.pending.as_mut() {
                p.filled += read;
            }
            self.decoder
                .payload_received(read)
                .map_err(|e| self.protocol(e))?;
            return Ok(self.take_complete_delivery().map(ReadOutcome::Item));
        }
        self.end = read;
        Ok(None)
    }
}

/// Shortest read timeout set: a zero read timeout means "block forever" to the OS.
const READ_TIMEOUT_MIN: Duration = Duration::from_millis(1);

/// Makes reads on `stream` give up after `remaining` (at least [`READ_TIMEOUT_MIN`]).
pub(crate) fn set_read_timeout(
    stream: &TcpStream,
    addr: SocketAddr,
    remaining: Duration,
) -> Result<(), ClientError> {
    stream
        .set_read_timeout(Some(remaining.max(READ_TIMEOUT_MIN)))
        .map_err(|error| ClientError::io(addr, "setting the read timeout", error))
}

/// The read timeout a loop that reads until a deadline last set on its stream. Setting it
/// is a system call, and a subscriber that reads one delivery per call would otherwise pay
/// one per delivery: the timeout is kept in whole milliseconds (the kernel keeps it in
/// jiffies anyway) and set only when that value changes. Every read timeout of a
/// subscriber's stream after the handshake is set through it (`next_batch`, `close`), so the
/// value it remembers is the stream's.
#[derive(Debug, Default)]
pub(crate) struct ReadTimeout {
    set: Option<Duration>,
}

impl ReadTimeout {
    /// Makes reads on `stream` give up after `remaining`, rounded down to whole
    /// milliseconds and at least [`READ_TIMEOUT_MIN`], which the kernel rounds up to its
    /// tick (1-10 ms): a read ends at most a millisecond early (the caller's loop reads
    /// again), or up to a tick late near the deadline.
    pub(crate) fn ensure(
        &mut self,
        stream: &TcpStream,
        addr: SocketAddr,
        remaining: Duration,
    ) -> Result<(), ClientError> {
        let wanted = Duration::from_millis(remaining.as_millis() as u64).max(READ_TIMEOUT_MIN);
        if self.set != Some(wanted) {
            set_read_timeout(stream, addr, wanted)?;
            self.set = Some(wanted);
        }
        Ok(())
    }
}

/// The end of a bounded step, and the time the step was given (which its timeout error
/// reports).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepDeadline {
    at: Timestamp,
    allowed: Duration,
}

impl StepDeadline {
    /// A step that may take `allowed` from now.
    pub(crate) fn after(allowed: Duration) -> Self {
        StepDeadline {
            at: Timestamp::now() + allowed,
            allowed,
        }
    }

    /// The time left.
    pub(crate) fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Timestamp::now())
    }
}

/// Reads the next frame from a TCP stream before `deadline`; `what` names the step in a
/// timeout error.
pub(crate) fn read_before(
    reader: &mut FrameReader,
    stream: &TcpStream,
    deadline: StepDeadline,
    addr: SocketAddr,
    what: &'static str,
) -> Result<Option<Inbound>, ClientError> {
    loop {
        let remaining = deadline.remaining();
        if remaining.is_zero() {
            return Err(ClientError::handshake_timeout(addr, what, deadline.allowed));
        }
        set_read_timeout(stream, addr, remaining)?;
        match reader.next(&mut &*stream)? {
            ReadOutcome::Item(item) => return Ok(Some(item)),
            ReadOutcome::Eof => return Ok(None),
            ReadOutcome::TimedOut => {}
        }
    }
}

/// Checks a broker's answer to Hello: HelloOk with the order and ack asked for, or the
/// broker's Error.
pub(crate) fn check_hello_answer(
    addr: SocketAddr,
    answer: Option<Inbound>,
    order: Order,
    ack: AckLevel,
) -> Result<HelloOkRepr, ClientError> {
    match answer {
        Some(Inbound::Frame(Frame::HelloOk(ok))) => {
            if ok.order != order {
                return Err(ClientError::HandshakeMismatch {
                    addr,
                    field: "order",
                    asked: order as u64,
                    got: ok.order as u64,
                });
            }
            if ok.ack != ack {
                return Err(ClientError::HandshakeMismatch {
                    addr,
                    field: "ack",
                    asked: ack as u64,
                    got: ok.ack as u64,
                });
            }
            Ok(ok)
        }
        Some(Inbound::Frame(Frame::Error(error))) => Err(ClientError::broker(addr, &error)),
        Some(Inbound::Frame(Frame::Redirect(redirect))) => Err(ClientError::Redirected {
            addr,
            brokers: redirect
                .brokers()
                .iter()
                .map(|(broker, _)| SocketAddr::V4(*broker))
                .collect(),
        }),
        Some(Inbound::Frame(other)) => Err(ClientError::UnexpectedFrame {
            addr,
            got: other.kind(),
            expected: "HelloOk or Error",
        }),
        Some(Inbound::Delivery(..)) => Err(ClientError::UnexpectedFrame {
            addr,
            got: FrameKind::Delivery,
            expected: "HelloOk or Error",
        }),
        None => Err(ClientError::ConnectionClosed {
            addr,
            how: "end of stream before HelloOk",
            outstanding_batches: 0,
        }),
    }
}

/// Opens a connection and performs the Hello/HelloOk exchange within `timeout`. Returns the
/// stream, the reader (which may already hold bytes that followed HelloOk) and HelloOk.
pub(crate) fn connect_and_hello(
    addr: SocketAddr,
    hello: &HelloRepr,
    timeout: Duration,
    socket_buffer_bytes: usize,
) -> Result<(TcpStream, FrameReader, HelloOkRepr), ClientError> {
    let deadline = StepDeadline::after(timeout);
    let stream = open_stream(addr, timeout, socket_buffer_bytes)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|error| ClientError::io(addr, "setting the write timeout", error))?;
    write_frame(&stream, &Frame::Hello(*hello), addr, "sending Hello")?;
    let mut reader = FrameReader::new(addr, Limits::default());
    let answer = read_before(
        &mut reader,
        &stream,
        deadline,
        addr,
        "Hello/HelloOk exchange",
    )?;
    let ok = check_hello_answer(addr, answer, hello.order, hello.ack)?;
    // No socket timeouts after the handshake: the publisher's I/O thread never blocks on a
    // socket, and a subscriber sets a read timeout per call from its own deadline.
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(|error| ClientError::io(addr, "clearing the handshake timeouts", error))?;
    Ok((stream, reader, ok))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{DeliveryHeaderRepr, ErrorCode, ErrorFrameRepr, payload};

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    /// A source that returns its chunks one per read, then a timeout, then end of stream.
    struct Chunks {
        chunks: Vec<Vec<u8>>,
        timeouts_left: usize,
    }

    impl Read for Chunks {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.chunks.is_empty() {
                if self.timeouts_left > 0 {
                    self.timeouts_left -= 1;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                return Ok(0);
            }
            let chunk = &mut self.chunks[0];
            let n = chunk.len().min(out.len());
            out[..n].copy_from_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                self.chunks.remove(0);
            }
            Ok(n)
        }
    }

    fn delivery(payload_len: usize) -> (DeliveryHeaderRepr, Vec<u8>) {
        let mut body = Vec::new();
        let message = vec![0xab; payload_len - 4];
        payload::push_message(&mut body, &message);
        let header = DeliveryHeaderRepr {
            global_start: Some(10),
            message_count: 1,
            payload_bytes: body.len() as u32,
            checksum: payload::checksum(&body),
            broker_id: 2,
            client_id: 77,
            session_epoch: 1,
            batch_seq: 4,
        };
        (header, body)
    }

    #[test]
    fn frames_across_odd_chunks_and_a_timeout() {
        let (small, small_body) = delivery(100);
        let (large, large_body) = delivery(200_000);
        let mut stream = Frame::Goodbye.to_bytes();
        stream.extend_from_slice(&small.frame_prefix());
        stream.extend_from_slice(&small_body);
        stream.extend_from_slice(&large.frame_prefix());
        stream.extend_from_slice(&large_body);
        let error = Frame::Error(ErrorFrameRepr::new(ErrorCode::PoolFull, None, "full"));
        stream.extend_from_slice(&error.to_bytes());
        let chunks: Vec<Vec<u8>> = stream.chunks(7_777).map(<[u8]>::to_vec).collect();
        let mut source = Chunks {
            chunks,
            timeouts_left: 1,
        };
        let mut reader = FrameReader::new(addr(), Limits::default());
        let mut items = Vec::new();
        loop {
            match reader.next(&mut source).unwrap() {
                ReadOutcome::Item(item) => items.push(item),
                ReadOutcome::TimedOut => items.push(Inbound::Frame(Frame::Goodbye)),
                ReadOutcome::Eof => break,
            }
        }
        assert_eq!(
            items,
            [
                Inbound::Frame(Frame::Goodbye),
                Inbound::Delivery(small, small_body),
                Inbound::Delivery(large, large_body),
                Inbound::Frame(error),
                Inbound::Frame(Frame::Goodbye),
            ]
        );
    }

    #[test]
    fn garbage_truncation_and_batches_are_errors_not_panics() {
        let mut reader = FrameReader::new(addr(), Limits::default());
        let mut source = Chunks {
            chunks: vec![vec![42, 0, 0, 0, 0, 0, 0, 0]],
            timeouts_left: 0,
        };
        assert!(matches!(
            reader.next(&mut source),
            Err(ClientError::Protocol { .. })
        ));

        let mut reader = FrameReader::new(addr(), Limits::default());
        let mut source = Chunks {
            chunks: vec![Frame::Goodbye.to_bytes()[..5].to_vec()],
            timeouts_left: 0,
        };
        let error = reader.next(&mut source).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("3 bytes of the current step missing"),
            "{error}"
        );

        let header = wire::BatchHeaderRepr {
            batch_seq: 0,
            message_count: 1,
            payload_bytes: 4,
            checksum: 0,
        };
        let mut reader = FrameReader::new(addr(), Limits::default());
        let mut source = Chunks {
            chunks: vec![header.frame_prefix().to_vec()],
            timeouts_left: 0,
        };
        assert!(matches!(
            reader.next(&mut source),
            Err(ClientError::UnexpectedFrame {
                got: FrameKind::Batch,
                ..
            })
        ));
    }

    fn hello_ok(order: Order, ack: AckLevel) -> Option<Inbound> {
        Some(Inbound::Frame(Frame::HelloOk(HelloOkRepr {
            broker_id: 1,
            batch_bytes_max: 1 << 20,
            order,
            ack,
            next_batch_seq: 0,
            log_start: 0,
            log_end: 0,
        })))
    }

    #[test]
    fn hello_answers() {
        let (order, ack) = (Order::TotalSessionFifo, AckLevel::Ordered);
        assert!(check_hello_answer(addr(), hello_ok(order, ack), order, ack).is_ok());
        let error = check_hello_answer(addr(), hello_ok(Order::Total, ack), order, ack);
        assert_eq!(
            error.unwrap_err().to_string(),
            "127.0.0.1:9 answered order = 2 but the client asked for 5"
        );
        let error = check_hello_answer(addr(), hello_ok(order, AckLevel::Replicated), order, ack);
        assert!(matches!(
            error,
            Err(ClientError::HandshakeMismatch { field: "ack", .. })
        ));
        let refused = Some(Inbound::Frame(Frame::Error(ErrorFrameRepr::new(
            ErrorCode::UnknownTopic,
            None,
            "no topic orders",
        ))));
        let error = check_hello_answer(addr(), refused, order, ack).unwrap_err();
        assert_eq!(error.broker_code(), Some(ErrorCode::UnknownTopic));
        assert_eq!(
            error.to_string(),
            "127.0.0.1:9 refused: unknown topic (9): no topic orders"
        );
        assert!(matches!(
            check_hello_answer(addr(), Some(Inbound::Frame(Frame::Goodbye)), order, ack),
            Err(ClientError::UnexpectedFrame { .. })
        ));
        assert!(matches!(
            check_hello_answer(addr(), None, order, ack),
            Err(ClientError::ConnectionClosed { .. })
        ));
    }

    #[test]
    fn a_read_timeout_is_set_in_whole_milliseconds_and_only_when_it_changes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let ms = Duration::from_millis;
        // Multiples of 20 ms read back as set whatever the kernel's tick (1, 4 or 10 ms).
        let marker = ms(60);
        let mut timeout = ReadTimeout::default();
        timeout
            .ensure(&stream, addr(), Duration::from_micros(100_900))
            .unwrap();
        assert_eq!(stream.read_timeout().unwrap(), Some(ms(100)));
        // Set elsewhere behind its back: the same whole millisecond is not set again...
        stream.set_read_timeout(Some(marker)).unwrap();
        timeout
            .ensure(&stream, addr(), Duration::from_micros(100_100))
            .unwrap();
        assert_eq!(stream.read_timeout().unwrap(), Some(marker));
        // ...another is.
        timeout
            .ensure(&stream, addr(), Duration::from_micros(80_999))
            .unwrap();
        assert_eq!(stream.read_timeout().unwrap(), Some(ms(80)));
        // Under a millisecond left (zero included, which the OS takes as "forever"): the
        // shortest timeout, which the kernel rounds up to its tick.
        timeout.ensure(&stream, addr(), Duration::ZERO).unwrap();
        let shortest = stream.read_timeout().unwrap().unwrap();
        assert!(
            shortest >= READ_TIMEOUT_MIN && shortest <= ms(10),
            "{shortest:?}"
        );
    }
}
