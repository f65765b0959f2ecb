//! The publisher's I/O thread: one event-driven thread (`epoll` through mio) for all of a
//! publisher's connections. It writes the batches and Goodbyes it is handed, in order per
//! connection, without blocking on any one socket, and decodes what the brokers send
//! (Acks, Errors, Goodbye), timestamping each frame as it is read. It reports to the
//! publisher over the publisher's event channel and never touches protocol state.
//!
//! One thread instead of a reader and a writer per connection: an ack crosses one thread
//! hand-off (this thread to the caller's), and a publisher with many connections does not
//! keep two parked threads per connection.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use units::Timestamp;
use wire::{Frame, FrameKind};

use crate::error::ClientError;
use crate::net::{FrameReader, Inbound, ReadOutcome};
use crate::publisher_core::{ConnId, Transmit};

/// What a connection has to write, in order.
pub(crate) enum WriteCommand {
    /// A batch, of which the first `from` bytes are already written.
    Batch { batch: Transmit, from: usize },
    /// The last thing the connection writes.
    Goodbye,
}

/// What a connection's I/O reports to the publisher.
pub(crate) enum ConnectionEvent {
    /// A frame from the broker, read at `at`.
    Frame {
        conn: ConnId,
        frame: Frame,
        at: Timestamp,
    },
    /// A batch was written whole.
    Written { conn: ConnId, seq: u64 },
    /// The connection is over: the broker closed it (`None`) or I/O failed. Its last
    /// event; the I/O thread has let go of the socket.
    Ended {
        conn: ConnId,
        error: Option<ClientError>,
    },
}

enum IoCommand {
    Add {
        conn: ConnId,
        addr: SocketAddr,
        stream: TcpStream,
        reader: Box<FrameReader>,
    },
    Write {
        conn: ConnId,
        command: WriteCommand,
    },
    Remove {
        conn: ConnId,
    },
}

/// The handle the publisher keeps: commands in, then a wake-up of the thread.
#[derive(Debug)]
pub(crate) struct IoThread {
    commands: Option<Sender<IoCommand>>,
    waker: Arc<Waker>,
    /// Set by the thread before it waits for events: only then does a command need a
    /// wake-up (a system call), not while the thread is busy and takes commands anyway.
    waiting: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

const WAKER: Token = Token(usize::MAX);
/// The Goodbye frame, encoded once.
static GOODBYE: std::sync::LazyLock<Vec<u8>> =
    std::sync::LazyLock::new(|| Frame::Goodbye.to_bytes());
/// Readiness events taken per `epoll_wait`.
const EVENTS_CAPACITY: usize = 256;

impl IoThread {
    /// Starts the thread; it reports on `events` until [`IoThread::stop`].
    pub fn start<E>(events: Sender<E>) -> io::Result<IoThread>
    where
        E: From<ConnectionEvent> + Send + 'static,
    {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (commands, queue) = crossbeam_channel::unbounded();
        let waiting = Arc::new(AtomicBool::new(false));
        let io_loop = IoLoop::new(poll, queue, events, Arc::clone(&waiting));
        let handle = thread::Builder::new()
            .name("pub-io".into())
            .spawn(move || io_loop.run())?;
        Ok(IoThread {
            commands: Some(commands),
            waker,
            waiting,
            handle: Some(handle),
        })
    }

    /// Hands a connection that completed its handshake to the thread.
    pub fn add(&self, conn: ConnId, addr: SocketAddr, stream: TcpStream, reader: FrameReader) {
        self.command(IoCommand::Add {
            conn,
            addr,
            stream,
            reader: Box::new(reader),
        });
    }

    /// Queues `command` behind what `conn` has still to write.
    pub fn write(&self, conn: ConnId, command: WriteCommand) {
        self.command(IoCommand::Write { conn, command });
    }

    /// Lets go of `conn`'s socket; once the thread has taken this, it reports nothing more
    /// about it (what it reported before may still be in the channel).
    pub fn remove(&self, conn: ConnId) {
        self.command(IoCommand::Remove { conn });
    }

    fn command(&self, command: IoCommand) {
        let Some(commands) = &self.commands else {
            return;
        };
        // The thread only ends when told to (the channel closed) or when the publisher's
        // event channel is gone: either way the publisher is going away.
        if commands.send(command).is_ok()
            && self.waiting.swap(false, Ordering::SeqCst)
            && let Err(error) = self.waker.wake()
        {
            log::error!("waking the publisher's I/O thread: {error}");
        }
    }

    /// Ends the thread (dropping every socket it holds) and waits for it.
    pub fn stop(&mut self) {
        if self.handle.is_none() {
            return;
        }
        self.commands = None;
        if let Err(error) = self.waker.wake() {
            log::error!("waking the publisher's I/O thread to stop it: {error}");
        }
        if let Some(handle) = self.handle.take()
            && handle.join().is_err()
        {
            log::error!("the publisher's I/O thread panicked");
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Connection {
    addr: SocketAddr,
    stream: TcpStream,
    reader: FrameReader,
    /// What is still to be written, each with the bytes of it already written.
    writes: VecDeque<(WriteCommand, usize)>,
    /// Goodbye went out: nothing more is written.
    write_closed: bool,
}

/// Why a connection's I/O stopped.
enum Stop {
    /// The broker closed the stream, or said something a publisher cannot take.
    Ended(Option<ClientError>),
    /// The publisher's event channel is gone.
    Gone,
}

struct IoLoop<E> {
    poll: Poll,
    commands: Receiver<IoCommand>,
    events: Sender<E>,
    waiting: Arc<AtomicBool>,
    /// By id; a connection's mio token is its id (ids are never reused, so an event
    /// still pending for a dropped connection cannot reach another).
    connections: HashMap<ConnId, Connection>,
}

impl<E: From<ConnectionEvent>> IoLoop<E> {
    fn new(
        poll: Poll,
        commands: Receiver<IoCommand>,
        events: Sender<E>,
        waiting: Arc<AtomicBool>,
    ) -> Self {
        IoLoop {
            poll,
            commands,
            events,
            waiting,
            connections: HashMap::new(),
        }
    }

    fn run(mut self) {
        let mut ready = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            // Announce the wait, then look once more: a command sent before the flag was
            // up is seen here, one sent after it wakes the wait.
            self.waiting.store(true, Ordering::SeqCst);
            let timeout = if self.commands.is_empty() {
                None
            } else {
                Some(Duration::ZERO)
            };
            let polled = self.poll.poll(&mut ready, timeout);
            self.waiting.store(false, Ordering::SeqCst);
            match polled {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    log::error!("the publisher's I/O thread cannot wait for its sockets: {error}");
                    self.fail_all(&error);
                    return;
                }
            }
            for event in &ready {
                if event.token() == WAKER {
                    continue;
                }
                // An error or a hang-up shows up in the next read or write. With the peer's
                // end already in, the reads go on to it: a short read may be followed by the
                // end of the stream, which raises no new edge.
                let trouble = event.is_error() || event.is_read_closed() || event.is_write_closed();
                let reading = if trouble {
                    Reading::UntilBlocked
                } else if event.is_readable() {
                    Reading::UntilShort
                } else {
                    Reading::No
                };
                let write = event.is_writable() || trouble;
                if !self.service(event.token().0 as ConnId, reading, write) {
                    return;
                }
            }
            if !self.take_commands() {
                return;
            }
        }
    }

    /// Carries out every queued command; false once the publisher is gone.
    fn take_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(IoCommand::Add {
                    conn,
                    addr,
                    stream,
                    reader,
                }) => {
                    let added = match self.add(conn, addr, stream, *reader) {
                        // What the handshake's reader already holds, or what arrived
                        // before the socket was watched.
                        Ok(()) => self.service(conn, Reading::UntilBlocked, true),
                        Err(error) => self.report(ConnectionEvent::Ended {
                            conn,
                            error: Some(ClientError::io(addr, "watching the connection", error)),
                        }),
                    };
                    if !added {
                        return false;
                    }
                }
                Ok(IoCommand::Write { conn, command }) => {
                    if let Some(connection) = self.connections.get_mut(&conn) {
                        let written = match &command {
                            WriteCommand::Batch { from, .. } => *from,
                            WriteCommand::Goodbye => 0,
                        };
                        connection.writes.push_back((command, written));
                        if !self.service(conn, Reading::No, true) {
                            return false;
                        }
                    }
                }
                Ok(IoCommand::Remove { conn }) => self.drop_connection(conn),
                Err(crossbeam_channel::TryRecvError::Empty) => return true,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn add(
        &mut self,
        conn: ConnId,
        addr: SocketAddr,
        stream: TcpStream,
        reader: FrameReader,
    ) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        self.poll.registry().register(
            &mut SourceFd(&stream.as_raw_fd()),
            Token(conn as usize),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.connections.insert(
            conn,
            Connection {
                addr,
                stream,
                reader,
                writes: VecDeque::new(),
                write_closed: false,
            },
        );
        Ok(())
    }

    /// Writes what is queued (when `write`) and reads what arrived (as `reading` says);
    /// false once the publisher is gone.
    fn service(&mut self, conn: ConnId, reading: Reading, write: bool) -> bool {
        let Some(connection) = self.connections.get_mut(&conn) else {
            return true;
        };
        let mut outcome = Ok(());
        // Frames that came before the peer's end (an Error, acks, Goodbye) are reported
        // before the end itself: read first when the event says the end is in, and read on
        // when a write fails (a reset; the kernel still hands out what arrived before it).
        if reading == Reading::UntilBlocked {
            outcome = connection.read_available(conn, reading, &self.events);
        }
        if write && outcome.is_ok() {
            outcome = connection.write_queued(conn, &self.events);
            if outcome.is_err()
                && let Err(Stop::Gone) =
                    connection.read_available(conn, Reading::UntilBlocked, &self.events)
            {
                return false;
            }
        }
        if reading == Reading::UntilShort && outcome.is_ok() {
            outcome = connection.read_available(conn, reading, &self.events);
        }
        match outcome {
            Ok(()) => true,
            Err(Stop::Gone) => false,
            Err(Stop::Ended(error)) => {
                self.drop_connection(conn);
                self.report(ConnectionEvent::Ended { conn, error })
            }
        }
    }

    fn drop_connection(&mut self, conn: ConnId) {
        if let Some(connection) = self.connections.remove(&conn) {
            // Deregistering a socket that is about to close cannot matter if it fails.
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&connection.stream.as_raw_fd()));
        }
    }

    fn fail_all(&mut self, error: &io::Error) {
        let open: Vec<ConnId> = self.connections.keys().copied().collect();
        for conn in open {
            let addr = self.connections[&conn].addr;
            self.drop_connection(conn);
            let error = ClientError::io(addr, "waiting for socket events", clone_error(error));
            if !self.report(ConnectionEvent::Ended {
                conn,
                error: Some(error),
            }) {
                return;
            }
        }
    }

    fn report(&self, event: ConnectionEvent) -> bool {
        self.events.send(event.into()).is_ok()
    }
}

fn clone_error(error: &io::Error) -> io::Error {
    io::Error::new(error.kind(), error.to_string())
}

impl Connection {
    fn write_queued<E: From<ConnectionEvent>>(
        &mut self,
        conn: ConnId,
        events: &Sender<E>,
    ) -> Result<(), Stop> {
        while !self.write_closed {
            let Some((command, written)) = self.writes.front_mut() else {
                return Ok(());
            };
            let (bytes, doing): (&[u8], _) = match command {
                WriteCommand::Batch { batch, .. } => (&batch.bytes, "writing a batch"),
                WriteCommand::Goodbye => (GOODBYE.as_slice(), "sending Goodbye"),
            };
            match (&self.stream).write(&bytes[*written..]) {
                Ok(0) => {
                    let error = io::Error::new(io::ErrorKind::WriteZero, "the socket took 0 bytes");
                    return Err(Stop::Ended(Some(ClientError::io(self.addr, doing, error))));
                }
                Ok(n) => *written += n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    return Err(Stop::Ended(Some(ClientError::io(self.addr, doing, error))));
                }
            }
            if *written < bytes.len() {
                continue;
            }
            match self.writes.pop_front() {
                Some((WriteCommand::Batch { batch, .. }, _)) => {
                    let seq = batch.seq;
                    // The bytes go back to the core's pool only once nobody else holds them.
                    drop(batch);
                    if events
                        .send(ConnectionEvent::Written { conn, seq }.into())
                        .is_err()
                    {
                        return Err(Stop::Gone);
                    }
                }
                Some((WriteCommand::Goodbye, _)) => self.write_closed = true,
                None => {}
            }
        }
        // After Goodbye nothing more goes out.
        self.writes.clear();
        Ok(())
    }

    fn read_available<E: From<ConnectionEvent>>(
        &mut self,
        conn: ConnId,
        reading: Reading,
        events: &Sender<E>,
    ) -> Result<(), Stop> {
        let mut source = SocketReads {
            stream: &self.stream,
            drained: false,
            stop_short: reading == Reading::UntilShort,
        };
        loop {
            let event = match self.reader.next(&mut source) {
                Ok(ReadOutcome::Item(Inbound::Frame(frame))) => ConnectionEvent::Frame {
                    conn,
                    frame,
                    at: Timestamp::now(),
                },
                Ok(ReadOutcome::TimedOut) => return Ok(()),
                Ok(ReadOutcome::Item(Inbound::Delivery(..))) => {
                    return Err(Stop::Ended(Some(ClientError::UnexpectedFrame {
                        addr: self.addr,
                        got: FrameKind::Delivery,
                        expected: "Ack, Error or Goodbye",
                    })));
                }
                Ok(ReadOutcome::Eof) => return Err(Stop::Ended(None)),
                Err(error) => return Err(Stop::Ended(Some(error))),
            };
            if events.send(event.into()).is_err() {
                return Err(Stop::Gone);
            }
        }
    }
}

/// How far a service reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Not at all.
    No,
    /// Until a read returns less than asked for: the receive queue was then empty, and data
    /// that arrives later raises a new edge, so the read that would only say `WouldBlock`
    /// (a system call per wake-up, one ack at a time) is skipped.
    UntilShort,
    /// Until the socket would block or the stream ends.
    UntilBlocked,
}

/// A socket read as [`Reading`] says.
struct SocketReads<'a> {
    stream: &'a TcpStream,
    drained: bool,
    stop_short: bool,
}

impl io::Read for SocketReads<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.drained {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let read = (&mut &*self.stream).read(buf)?;
        // 0 is the end of the stream, which the reader must see as such.
        self.drained = self.stop_short && read > 0 && read < buf.len();
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpListener;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// A connected pair on loopback: (the publisher's end, the broker's end).
    fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    fn add(io: &IoThread, conn: ConnId, stream: TcpStream) {
        let addr = stream.peer_addr().unwrap();
        io.add(
            conn,
            addr,
            stream,
            FrameReader::new(addr, wire::Limits::default()),
        );
    }

    fn batch(conn: ConnId, seq: u64, bytes: Vec<u8>) -> WriteCommand {
        WriteCommand::Batch {
            batch: Transmit {
                conn,
                seq,
                bytes: Arc::new(bytes),
            },
            from: 0,
        }
    }

    fn pattern(len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ salt)
            .collect()
    }

    #[test]
    fn a_peer_that_stops_reading_holds_back_no_other_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (stalled_client, mut stalled_server) = pair(&listener);
        let (live_client, mut live_server) = pair(&listener);
        let (events_in, events) = crossbeam_channel::unbounded::<ConnectionEvent>();
        let io = IoThread::start(events_in).unwrap();
        add(&io, 1, stalled_client);
        add(&io, 2, live_client);
        // Far more than the socket buffers of a connection whose peer reads nothing.
        let stalled_bytes = pattern(64 << 20, 7);
        io.write(1, batch(1, 0, stalled_bytes.clone()));
        io.write(1, batch(1, 1, pattern(1000, 9)));
        let live_bytes = [pattern(70_000, 1), pattern(3, 2), pattern(200_000, 3)];
        for (seq, bytes) in live_bytes.iter().enumerate() {
            io.write(2, batch(2, seq as u64, bytes.clone()));
        }
        let mut received = vec![0u8; live_bytes.iter().map(Vec::len).sum()];
        live_server.set_read_timeout(Some(WAIT)).unwrap();
        live_server.read_exact(&mut received).unwrap();
        assert_eq!(
            received,
            live_bytes.concat(),
            "the live connection's bytes, in order"
        );
        let mut written = Vec::new();
        while written.len() < live_bytes.len() {
            match events
                .recv_timeout(WAIT)
                .expect("Written for every live batch")
            {
                ConnectionEvent::Written { conn: 2, seq } => written.push(seq),
                ConnectionEvent::Written { conn: 1, seq } => {
                    panic!("batch {seq} of the stalled connection cannot be written yet")
                }
                ConnectionEvent::Frame { .. } | ConnectionEvent::Written { .. } => {}
                ConnectionEvent::Ended { conn, error } => panic!("{conn} ended: {error:?}"),
            }
        }
        assert_eq!(written, vec![0, 1, 2]);
        // A frame from the live broker is reported while the other socket is still full.
        live_server.write_all(&Frame::Goodbye.to_bytes()).unwrap();
        match events.recv_timeout(WAIT).unwrap() {
            ConnectionEvent::Frame {
                conn: 2,
                frame: Frame::Goodbye,
                ..
            } => {}
            _ => panic!("expected the live connection's Goodbye"),
        }
        // Once its peer reads, the stalled connection's batches go out whole and in order.
        let mut stalled_received = vec![0u8; stalled_bytes.len() + 1000];
        stalled_server.set_read_timeout(Some(WAIT)).unwrap();
        stalled_server.read_exact(&mut stalled_received).unwrap();
        assert!(stalled_received[..stalled_bytes.len()] == stalled_bytes[..]);
        assert_eq!(
            stalled_received[stalled_bytes.len()..],
            pattern(1000, 9)[..]
        );
        for expected in [0, 1] {
            match events.recv_timeout(WAIT).unwrap() {
                ConnectionEvent::Written { conn: 1, seq } => assert_eq!(seq, expected),
                _ => panic!("expected Written for the stalled connection's batch {expected}"),
            }
        }
        // A peer that closes ends its connection with no error, and only that one.
        drop(live_server);
        match events.recv_timeout(WAIT).unwrap() {
            ConnectionEvent::Ended {
                conn: 2,
                error: None,
            } => {}
            _ => panic!("expected the live connection to end cleanly"),
        }
        drop(io);
    }

    #[test]
    fn frames_that_came_before_a_reset_are_reported_before_the_end() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (client, server) = pair(&listener);
        let (events_in, events) = crossbeam_channel::unbounded::<ConnectionEvent>();
        let io = IoThread::start(events_in).unwrap();
        add(&io, 9, client);
        // Writes pile up (the peer reads nothing), then the peer says Goodbye and resets.
        io.write(9, batch(9, 0, pattern(16 << 20, 3)));
        std::thread::sleep(Duration::from_millis(100));
        (&server).write_all(&Frame::Goodbye.to_bytes()).unwrap();
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server);
        let mut goodbye = false;
        loop {
            match events.recv_timeout(WAIT).expect("the connection ends") {
                ConnectionEvent::Frame {
                    conn: 9,
                    frame: Frame::Goodbye,
                    ..
                } => goodbye = true,
                ConnectionEvent::Ended { conn: 9, .. } => break,
                _ => {}
            }
        }
        assert!(goodbye, "the Goodbye sent before the reset was reported");
    }

    #[test]
    fn goodbye_is_the_last_thing_written_and_a_torn_frame_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (client, mut server) = pair(&listener);
        let (events_in, events) = crossbeam_channel::unbounded::<ConnectionEvent>();
        let io = IoThread::start(events_in).unwrap();
        add(&io, 5, client);
        io.write(5, WriteCommand::Goodbye);
        io.write(5, batch(5, 0, pattern(100, 1)));
        let goodbye = Frame::Goodbye.to_bytes();
        let mut received = vec![0u8; goodbye.len()];
        server.set_read_timeout(Some(WAIT)).unwrap();
        server.read_exact(&mut received).unwrap();
        assert_eq!(received, goodbye);
        // Half a frame, then the end of the stream: an error naming the connection.
        server.write_all(&goodbye[..goodbye.len() / 2]).unwrap();
        server.shutdown(std::net::Shutdown::Write).unwrap();
        match events.recv_timeout(WAIT).unwrap() {
            ConnectionEvent::Ended {
                conn: 5,
                error: Some(error),
            } => assert!(error.to_string().contains("inside a frame"), "{error}"),
            _ => panic!("expected an error for the torn frame"),
        }
        // Nothing was written after Goodbye.
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{} bytes after Goodbye", rest.len());
    }
}
