//! The simulated network: TCP-like byte streams between clients and brokers, in order and
//! without loss within a connection, with a latency per connection, partial writes, a
//! bounded send window, and resets.

use std::collections::VecDeque;

use broker::server::connection::ByteStream;

use super::Rng;

/// Bytes one direction of a connection holds in flight before the sender must wait.
const WINDOW_BYTES: usize = 256 << 10;

/// One direction of a connection: chunks in flight, each readable from its arrival time on
/// (arrivals never go back: a stream stays in order).
#[derive(Debug, Default)]
pub(super) struct Pipe {
    chunks: VecDeque<(u64, Vec<u8>)>,
    /// Offset already read in the front chunk.
    read_at: usize,
    in_flight_bytes: usize,
    last_arrival_ns: u64,
    /// The sender closed its end (FIN), arriving at this time.
    closed_at: Option<u64>,
}

impl Pipe {
    /// Sends `bytes`, arriving at `arrival_ns` (or after the previous chunk).
    pub(super) fn push(&mut self, bytes: &[u8], arrival_ns: u64) {
        if bytes.is_empty() {
            return;
        }
        self.last_arrival_ns = self.last_arrival_ns.max(arrival_ns);
        self.in_flight_bytes += bytes.len();
        self.chunks
            .push_back((self.last_arrival_ns, bytes.to_vec()));
    }

    /// Room the sender has in the window.
    pub(super) fn room(&self) -> usize {
        WINDOW_BYTES.saturating_sub(self.in_flight_bytes)
    }

    /// Closes the sending end; the reader sees end of stream after what was sent.
    pub(super) fn close(&mut self, now_ns: u64) {
        if self.closed_at.is_none() {
            self.last_arrival_ns = self.last_arrival_ns.max(now_ns);
            self.closed_at = Some(self.last_arrival_ns);
        }
    }

    /// Whether the sender closed its end.
    pub(super) fn is_closed(&self) -> bool {
        self.closed_at.is_some()
    }

    /// Reads what has arrived by `now_ns`, at most `buf.len()` bytes: `Some(0)` at end of
    /// stream, `None` when nothing is there yet.
    pub(super) fn read(&mut self, buf: &mut [u8], now_ns: u64) -> Option<usize> {
        let mut n = 0;
        while n < buf.len() {
            let Some((arrival, chunk)) = self.chunks.front() else {
                break;
            };
            if *arrival > now_ns {
                break;
            }
            let take = (chunk.len() - self.read_at).min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&chunk[self.read_at..self.read_at + take]);
            n += take;
            self.read_at += take;
            self.in_flight_bytes -= take;
            if self.read_at == chunk.len() {
                self.chunks.pop_front();
                self.read_at = 0;
            }
        }
        if n > 0 {
            return Some(n);
        }
        match self.closed_at {
            Some(at) if at <= now_ns && self.chunks.is_empty() => Some(0),
            _ => None,
        }
    }

    /// Everything that has arrived by `now_ns`, appended to `out`; true at end of stream.
    pub(super) fn drain_into(&mut self, out: &mut Vec<u8>, now_ns: u64) -> bool {
        let mut buf = [0u8; 16 << 10];
        loop {
            match self.read(&mut buf, now_ns) {
                Some(0) => return true,
                Some(n) => out.extend_from_slice(&buf[..n]),
                None => return false,
            }
        }
    }

    /// Drops a run of bytes in flight (the `drop-bytes` fault: a transport that loses data).
    pub(super) fn lose_some(&mut self, rng: &mut Rng) {
        if let Some((_, chunk)) = self.chunks.back_mut()
            && chunk.len() > 1
        {
            let cut = 1 + rng.below(chunk.len() as u64 - 1) as usize;
            self.in_flight_bytes -= chunk.len() - cut;
            chunk.truncate(cut);
        }
    }
}

/// A connection of the simulated network.
#[derive(Debug)]
pub(super) struct Link {
    /// Broker index.
    pub broker: usize,
    pub to_broker: Pipe,
    pub to_client: Pipe,
    /// One-way latency of this connection.
    pub latency_ns: u64,
    /// Reset: both ends get an error from now on.
    pub reset: bool,
    /// The broker's end is gone (it closed, or the broker crashed).
    pub broker_gone: bool,
    /// Partitioned: nothing crosses until then (bytes wait, as TCP retransmits them).
    pub cut_until_ns: u64,
}

impl Link {
    pub(super) fn new(broker: usize, latency_ns: u64) -> Link {
        Link {
            broker,
            to_broker: Pipe::default(),
            to_client: Pipe::default(),
            latency_ns,
            reset: false,
            broker_gone: false,
            cut_until_ns: 0,
        }
    }
}

/// The broker's end of a [`Link`], as the connection state machine sees it.
pub(super) struct BrokerEnd<'a> {
    pub link: &'a mut Link,
    pub now_ns: u64,
    pub rng: &'a mut Rng,
}

impl ByteStream for BrokerEnd<'_> {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.link.reset {
            return Err(std::io::ErrorKind::ConnectionReset.into());
        }
        if self.link.cut_until_ns > self.now_ns {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        // Reads take what arrived, in pieces of random size.
        let want = self.rng.chunk(buf.len());
        match self.link.to_broker.read(&mut buf[..want], self.now_ns) {
            Some(n) => Ok(n),
            None => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }

    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.link.reset {
            return Err(std::io::ErrorKind::ConnectionReset.into());
        }
        let room = self.link.to_client.room();
        if buf.is_empty() {
            return Ok(0);
        }
        if room == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = self.rng.chunk(buf.len().min(room));
        let arrival = self.now_ns.max(self.link.cut_until_ns) + self.link.latency_ns;
        self.link.to_client.push(&buf[..n], arrival);
        Ok(n)
    }
}
