//! Adoption of SYN-cookie connections into smoltcp, and the translation that follows (sans
//! IO: frames in, frames out, time as an input).
//!
//! The XDP program answers every SYN itself with a cookie SYN-ACK and keeps no state; the
//! first ACK that carries a valid cookie opens the flow and reaches us. smoltcp has never
//! seen that connection, so [`CookieFlows`] adopts it: it hands smoltcp a synthesized SYN
//! (the client's ISN and the options the cookie's timestamp encodes), captures smoltcp's
//! SYN-ACK (never sent: the client already has ours), and from then on translates between
//! the two: smoltcp's sequence numbers and timestamps are shifted by the difference between
//! its SYN-ACK and the cookie SYN-ACK, both ways, with the checksums adjusted (RFC 1624).
//!
//! The XDP program never opens a flow itself: an adoption opens it (the caller's
//! `open_flow`), and it is closed ([`CookieFlows::take_closed`]) when the adoption or the
//! connection ends, so the program's table holds exactly the adopted connections.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;

use smoltcp::time::{Duration, Instant};

/// Bytes of an Ethernet header.
const ETHERNET: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const PROTOCOL_TCP: u8 = 6;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
const OPTION_NOP: u8 = 1;
const OPTION_MSS: u8 = 2;
const OPTION_WINDOW: u8 = 3;
const OPTION_TIMESTAMP: u8 = 8;

/// How the XDP program encodes the client's options in its tsval (see steer.bpf.c).
const TS_WSCALE_MASK: u32 = 0xf;
const TS_WSCALE_NONE: u32 = 0xf;
const TS_MSS_SHIFT: u32 = 4;
const TS_MSS_CODE_MASK: u32 = 0x3f;
const TS_MSS_UNIT: u32 = 64;
/// The MSS code of a SYN without an MSS option.
const TS_MSS_NONE: u32 = 0;
/// The MSS every IPv4 host accepts (RFC 1122): what a client that sent no MSS option, or no
/// timestamps to carry it, gets.
const MSS_DEFAULT: u16 = 536;
/// Bytes the timestamp option takes in every segment (NOP, NOP, kind, length, 8 bytes).
const TIMESTAMP_OPTION_BYTES: u16 = 12;

/// Segments of a flow kept while its adoption is under way: the ACK and a first flight of
/// data (Linux sends 10 segments at once) when smoltcp cannot answer the SYN at once (its
/// neighbour is still being asked of the kernel). More are dropped (TCP resends them).
pub const HELD_PER_FLOW: usize = 16;
/// How long an adoption may wait for smoltcp's SYN-ACK before it is given up, and how long
/// the segments of a refused or given-up connection are dropped here.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(3);

/// A client: its address and port (our address and port are the device's).
pub type Remote = (Ipv4Addr, u16);

/// Hashes the flow table's keys: every received and sent frame looks its flow up, and
/// SipHash (the standard map's) cost 7% of the broker core there. The table is bounded
/// (`flows_max`) and holds only connections whose ACK carried a valid cookie, so a
/// multiplicative hash with a random odd key per table is enough.
#[derive(Debug, Clone)]
struct FlowHashing {
    key: u64,
}

impl FlowHashing {
    fn new() -> FlowHashing {
        FlowHashing {
            key: RandomState::new().hash_one(0x5eed_u64) | 1,
        }
    }
}

impl BuildHasher for FlowHashing {
    type Hasher = FlowHasher;

    fn build_hasher(&self) -> FlowHasher {
        FlowHasher {
            state: 0,
            key: self.key,
        }
    }
}

/// See [`FlowHashing`].
#[derive(Debug)]
struct FlowHasher {
    state: u64,
    key: u64,
}

impl FlowHasher {
    fn mix(&mut self, word: u64) {
        self.state = (self.state.rotate_left(5) ^ word).wrapping_mul(self.key);
    }
}

impl Hasher for FlowHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u16(&mut self, value: u16) {
        self.mix(u64::from(value));
    }

    fn write_u32(&mut self, value: u32) {
        self.mix(u64::from(value));
    }

    fn finish(&self) -> u64 {
        // A product's high bits are the well-mixed ones; the map indexes by the low bits, so
        // the high bits are folded down (and mixed once more).
        let folded = (self.state ^ (self.state >> 32)).wrapping_mul(self.key);
        folded ^ (folded >> 29)
    }
}

/// The offsets of a TCP segment in an Ethernet frame.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Start of the TCP header.
    tcp: usize,
    /// Length of the TCP header.
    tcp_len: usize,
    source: Remote,
    destination: Remote,
    flags: u8,
}

fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

fn be32(frame: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]])
}

fn ipv4(frame: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3])
}

/// The TCP segment in `frame`, if it is one (IPv4, not fragmented, headers complete).
fn parse_segment(frame: &[u8]) -> Option<Segment> {
    if frame.len() < ETHERNET + 20 || be16(frame, 12) != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = ETHERNET;
    let ihl = usize::from(frame[ip] & 0x0f) * 4;
    if frame[ip] >> 4 != 4 || ihl < 20 || frame[ip + 9] != PROTOCOL_TCP {
        return None;
    }
    if be16(frame, ip + 6) & 0x3fff != 0 {
        return None;
    }
    let tcp = ip + ihl;
    if frame.len() < tcp + 20 {
        return None;
    }
    let tcp_len = usize::from(frame[tcp + 12] >> 4) * 4;
    if tcp_len < 20 || frame.len() < tcp + tcp_len {
        return None;
    }
    Some(Segment {
        tcp,
        tcp_len,
        source: (ipv4(frame, ip + 12), be16(frame, tcp)),
        destination: (ipv4(frame, ip + 16), be16(frame, tcp + 2)),
        flags: frame[tcp + 13],
    })
}

/// Offset of the timestamp option's tsval in the segment's TCP header, if it has one.
fn timestamp_at(frame: &[u8], segment: &Segment) -> Option<usize> {
    let end = segment.tcp + segment.tcp_len;
    let mut at = segment.tcp + 20;
    while at < end {
        match frame[at] {
            0 => return None,
            OPTION_NOP => at += 1,
            kind => {
                let len = usize::from(*frame.get(at + 1)?);
                if len < 2 || at + len > end {
                    return None;
                }
                if kind == OPTION_TIMESTAMP && len == 10 {
                    return Some(at + 2);
                }
                at += len;
            }
        }
    }
    None
}

/// Adds `new - old` to a one's complement checksum (RFC 1624, eqn. 3), 16 bits at a time.
fn adjust_checksum(check: u16, old: u32, new: u32) -> u16 {
    let mut sum = u32::from(!check);
    for (o, n) in [(old >> 16, new >> 16), (old & 0xffff, new & 0xffff)] {
        sum += (!o & 0xffff) + n;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Replaces the 32-bit field at `at` with `f(old)`, adjusting the TCP checksum.
fn rewrite32(frame: &mut [u8], segment: &Segment, at: usize, f: impl Fn(u32) -> u32) {
    let old = be32(frame, at);
    let new = f(old);
    frame[at..at + 4].copy_from_slice(&new.to_be_bytes());
    let check_at = segment.tcp + 16;
    let check = adjust_checksum(be16(frame, check_at), old, new);
    frame[check_at..check_at + 2].copy_from_slice(&check.to_be_bytes());
}

/// The one's complement sum of `bytes`, folded to 16 bits.
fn sum16(bytes: &[u8], mut sum: u32) -> u32 {
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// Whether the IPv4 header checksum of a frame holds. A frame corrupted on its way must not
/// start an adoption: the synthesized SYN gets fresh checksums, so smoltcp would take the
/// corrupted addresses and numbers for the client's (the frame itself it drops).
fn ipv4_header_sound(frame: &[u8], segment: &Segment) -> bool {
    sum16(&frame[ETHERNET..segment.tcp], 0) == 0xffff
}

/// Fills in the IPv4 header checksum and the TCP checksum of a frame.
fn fill_checksums(frame: &mut [u8], segment: &Segment) {
    let ip = ETHERNET;
    frame[ip + 10..ip + 12].fill(0);
    let check = !(sum16(&frame[ip..segment.tcp], 0) as u16);
    frame[ip + 10..ip + 12].copy_from_slice(&check.to_be_bytes());
    let tcp_bytes = frame.len() - segment.tcp;
    frame[segment.tcp + 16..segment.tcp + 18].fill(0);
    let pseudo = sum16(
        &frame[ip + 12..ip + 20],
        u32::from(PROTOCOL_TCP) + tcp_bytes as u32,
    );
    let check = !(sum16(&frame[segment.tcp..], pseudo) as u16);
    frame[segment.tcp + 16..segment.tcp + 18].copy_from_slice(&check.to_be_bytes());
}

/// The SYN the client would have sent, rebuilt from its first ACK: ISN = seq - 1, and the
/// MSS and window scale the cookie's timestamp (echoed in the ACK) encodes (536 when the
/// client sent no MSS option; a smaller MSS it did send is kept).
///
/// The MSS given to smoltcp is at most `mss_max` (ours), less the timestamp option when
/// the client uses timestamps: smoltcp 0.12 fills a segment up to the peer's MSS and its
/// own MTU without counting TCP options (RFC 6691 says the sender must count them), so a
/// full segment would be up to 12 bytes over the MTU: smoltcp then silently never sends it
/// (without its fragmentation feature; the socket believes it sent it and retransmits it,
/// unsent, for ever), or a client whose MTU is smaller drops it. Either way the connection
/// stalls at its first full-size segment.
fn synthesize_syn(ack: &[u8], segment: &Segment, mss_max: u16) -> Vec<u8> {
    let timestamp = timestamp_at(ack, segment).map(|at| (be32(ack, at), be32(ack, at + 4)));
    let (mss, wscale) = match timestamp {
        Some((_, echo)) => {
            let mss = match (echo >> TS_MSS_SHIFT) & TS_MSS_CODE_MASK {
                TS_MSS_NONE => MSS_DEFAULT,
                code => u16::try_from(code * TS_MSS_UNIT).unwrap_or(u16::MAX),
            };
            let wscale = echo & TS_WSCALE_MASK;
            (mss, (wscale != TS_WSCALE_NONE).then_some(wscale as u8))
        }
        None => (MSS_DEFAULT, None),
    };
    let mss = match timestamp {
        Some(_) => mss.min(mss_max).saturating_sub(TIMESTAMP_OPTION_BYTES),
        None => mss.min(mss_max),
    };
    let mut options = vec![OPTION_MSS, 4];
    options.extend_from_slice(&mss.to_be_bytes());
    if let Some(shift) = wscale {
        options.extend_from_slice(&[OPTION_NOP, OPTION_WINDOW, 3, shift]);
    }
    if let Some((tsval, _)) = timestamp {
        options.extend_from_slice(&[OPTION_NOP, OPTION_NOP, OPTION_TIMESTAMP, 10]);
        options.extend_from_slice(&tsval.to_be_bytes());
        options.extend_from_slice(&[0; 4]);
    }
    let tcp = ETHERNET + 20;
    let tcp_len = 20 + options.len();
    let mut syn = vec![0u8; tcp + tcp_len];
    syn[..ETHERNET].copy_from_slice(&ack[..ETHERNET]);
    let ip = ETHERNET;
    syn[ip] = 0x45;
    syn[ip + 2..ip + 4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    syn[ip + 6] = 0x40; // don't fragment
    syn[ip + 8] = 64;
    syn[ip + 9] = PROTOCOL_TCP;
    syn[ip + 12..ip + 20].copy_from_slice(&ack[ip + 12..ip + 20]);
    syn[tcp..tcp + 4].copy_from_slice(&ack[segment.tcp..segment.tcp + 4]);
    let isn = be32(ack, segment.tcp + 4).wrapping_sub(1);
    syn[tcp + 4..tcp + 8].copy_from_slice(&isn.to_be_bytes());
    syn[tcp + 12] = ((tcp_len / 4) as u8) << 4;
    syn[tcp + 13] = SYN;
    syn[tcp + 14..tcp + 16].copy_from_slice(&ack[segment.tcp + 14..segment.tcp + 16]);
    syn[tcp + 20..].copy_from_slice(&options);
    let synthesized = Segment {
        tcp,
        tcp_len,
        source: segment.source,
        destination: segment.destination,
        flags: SYN,
    };
    fill_checksums(&mut syn, &synthesized);
    syn
}

/// One adopted connection.
#[derive(Debug)]
enum Flow {
    /// The synthesized SYN is with smoltcp; its SYN-ACK has not been seen yet.
    Pending {
        /// The cookie: our ISN as the client knows it.
        cookie_isn: u32,
        /// Our tsval in the cookie SYN-ACK, as the client echoed it.
        cookie_tsval: Option<u32>,
        /// When the adoption started.
        since: Instant,
        /// The client's segments that arrived meanwhile.
        held: Vec<Vec<u8>>,
    },
    /// smoltcp has the connection; sequence numbers and timestamps are translated.
    Open {
        /// Client's view minus smoltcp's view of our sequence numbers.
        seq_delta: u32,
        /// Client's view minus smoltcp's view of our timestamps.
        ts_delta: u32,
    },
    /// smoltcp did not answer the SYN within [`PENDING_TIMEOUT`]: its half-open socket is
    /// to be aborted ([`CookieFlows::take_aborted`]), and the RST that sends goes to the
    /// client in its numbers.
    GivenUp {
        /// The cookie: our ISN as the client knows it.
        cookie_isn: u32,
        /// When.
        since: Instant,
    },
    /// smoltcp refused the adoption and the client got a RST; the segments it sent before
    /// it saw the RST are dropped here (each would start a new adoption, refused again).
    Refused {
        /// When.
        since: Instant,
    },
}

/// What to do with a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rx {
    /// Hand it to smoltcp (translated in place if its flow is open).
    Deliver,
    /// It was kept (copied) or dropped: do not hand it to smoltcp.
    Consumed,
    /// It was kept and opened an adoption: hand smoltcp the synthesized SYN
    /// ([`CookieFlows::next_injected`]) and end the receive burst there, so that smoltcp
    /// answers it (the SYN-ACK the adoption waits for) before the flow's next segments are
    /// read; they would only be held meanwhile.
    Adopting,
}

/// What to do with a frame smoltcp sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tx {
    /// Put it on the wire (translated in place if its flow is open).
    Send,
    /// Never send it (smoltcp's SYN-ACK of an adoption).
    Swallow,
}

/// What happened to adoptions, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CookieCounts {
    /// Connections adopted (smoltcp's SYN-ACK captured).
    pub adopted: u64,
    /// Adoptions smoltcp refused (no listening socket free): the client got a RST.
    pub refused: u64,
    /// Segments of an unknown flow passed on untranslated because the table was full
    /// (smoltcp answers them with a RST).
    pub table_full: u64,
    /// Segments of an unknown flow passed on untranslated because the XDP program's flow
    /// table refused the flow (smoltcp answers them with a RST).
    pub flow_open_failed: u64,
    /// Segments of an unknown flow with a wrong IPv4 header checksum, passed on unadopted
    /// (smoltcp drops them).
    pub unsound: u64,
    /// Segments dropped while their adoption was under way (more than [`HELD_PER_FLOW`]).
    pub held_dropped: u64,
    /// Adoptions given up after [`PENDING_TIMEOUT`].
    pub timed_out: u64,
    /// Segments of refused or given-up connections dropped (sent before the client saw the
    /// RST).
    pub dropped_after_refusal: u64,
}

impl CookieCounts {
    /// The counts of two sets of flows together.
    pub fn plus(self, other: CookieCounts) -> CookieCounts {
        CookieCounts {
            adopted: self.adopted + other.adopted,
            refused: self.refused + other.refused,
            table_full: self.table_full + other.table_full,
            flow_open_failed: self.flow_open_failed + other.flow_open_failed,
            unsound: self.unsound + other.unsound,
            held_dropped: self.held_dropped + other.held_dropped,
            timed_out: self.timed_out + other.timed_out,
            dropped_after_refusal: self.dropped_after_refusal + other.dropped_after_refusal,
        }
    }
}

/// The (source, destination) ports of a frame's TCP segment over IPv4, if it is one.
pub fn segment_ports(frame: &[u8]) -> Option<(u16, u16)> {
    parse_segment(frame).map(|segment| (segment.source.1, segment.destination.1))
}

/// The adopted connections of one listening port.
#[derive(Debug)]
pub struct CookieFlows {
    port: u16,
    /// Our MSS (the interface's MTU - 40).
    mss_max: u16,
    flows: HashMap<Remote, Flow, FlowHashing>,
    flows_max: usize,
    /// Frames for smoltcp, oldest first: synthesized SYNs and held segments.
    inject: VecDeque<Vec<u8>>,
    /// Flows that ended; the XDP program's table must forget them.
    closed: Vec<Remote>,
    /// Adoptions given up: smoltcp's half-open sockets for them must be aborted.
    aborted: Vec<Remote>,
    counts: CookieCounts,
    /// The time of the last received frame.
    now: Instant,
}

impl CookieFlows {
    /// Flows to `port` of an interface whose MSS is `mss_max` (its MTU - 40), at most
    /// `flows_max` at a time (pending and open).
    pub fn new(port: u16, mss_max: u16, flows_max: usize) -> CookieFlows {
        CookieFlows {
            port,
            mss_max,
            flows: HashMap::with_capacity_and_hasher(flows_max, FlowHashing::new()),
            flows_max,
            inject: VecDeque::with_capacity(flows_max),
            closed: Vec::new(),
            aborted: Vec::new(),
            counts: CookieCounts::default(),
            now: Instant::ZERO,
        }
    }

    /// What happened so far.
    pub fn counts(&self) -> CookieCounts {
        self.counts
    }

    /// The next frame to hand smoltcp before any received one.
    pub fn next_injected(&mut self) -> Option<Vec<u8>> {
        self.inject.pop_front()
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Flows that ended since the last call (to remove from the XDP program's table).
    pub fn take_closed(&mut self) -> Vec<Remote> {
        std::mem::take(&mut self.closed)
    }

    /// Adoptions given up since the last call: abort smoltcp's half-open socket for each
    /// (it would hold a listening socket, and send its SYN-ACK untranslated once it could).
    pub fn take_aborted(&mut self) -> Vec<Remote> {
        std::mem::take(&mut self.aborted)
    }

    /// Takes a received frame: translates it, or starts an adoption, which opens the flow
    /// in the XDP program's table with `open_flow` first (when that fails, the frame goes
    /// to smoltcp untranslated, which resets the connection).
    pub fn on_rx(
        &mut self,
        frame: &mut [u8],
        now: Instant,
        open_flow: &mut dyn FnMut(Remote) -> bool,
    ) -> Rx {
        self.now = now;
        let Some(segment) = parse_segment(frame) else {
            return Rx::Deliver;
        };
        if segment.destination.1 != self.port {
            return Rx::Deliver;
        }
        match self.flows.get_mut(&segment.source) {
            Some(Flow::Open {
                seq_delta,
                ts_delta,
            }) => {
                translate_rx(frame, &segment, *seq_delta, *ts_delta);
                Rx::Deliver
            }
            Some(Flow::Pending { held, .. }) => {
                if held.len() < HELD_PER_FLOW {
                    held.push(frame.to_vec());
                } else {
                    self.counts.held_dropped += 1;
                }
                Rx::Consumed
            }
            Some(Flow::Refused { .. } | Flow::GivenUp { .. }) => {
                self.counts.dropped_after_refusal += 1;
                Rx::Consumed
            }
            None if segment.flags & (ACK | SYN | RST) == ACK => {
                if !ipv4_header_sound(frame, &segment) {
                    self.counts.unsound += 1;
                    return Rx::Deliver;
                }
                if self.flows.len() >= self.flows_max {
                    self.counts.table_full += 1;
                    return Rx::Deliver;
                }
                if !open_flow(segment.source) {
                    self.counts.flow_open_failed += 1;
                    return Rx::Deliver;
                }
                let cookie_tsval = timestamp_at(frame, &segment).map(|at| be32(frame, at + 4));
                self.inject
                    .push_back(synthesize_syn(frame, &segment, self.mss_max));
                self.flows.insert(
                    segment.source,
                    Flow::Pending {
                        cookie_isn: be32(frame, segment.tcp + 8).wrapping_sub(1),
                        cookie_tsval,
                        since: now,
                        held: vec![frame.to_vec()],
                    },
                );
                Rx::Adopting
            }
            None => Rx::Deliver,
        }
    }

    /// Takes a frame smoltcp sent: translates it, or completes an adoption.
    pub fn on_tx(&mut self, frame: &mut [u8]) -> Tx {
        let Some(segment) = parse_segment(frame) else {
            return Tx::Send;
        };
        if segment.source.1 != self.port {
            return Tx::Send;
        }
        let remote = segment.destination;
        match self.flows.get(&remote) {
            None => Tx::Send,
            Some(Flow::Open {
                seq_delta,
                ts_delta,
            }) => {
                translate_tx(frame, &segment, *seq_delta, *ts_delta);
                Tx::Send
            }
            Some(Flow::Pending { .. }) if segment.flags & (SYN | ACK) == SYN | ACK => {
                let Some(Flow::Pending {
                    cookie_isn,
                    cookie_tsval,
                    held,
                    ..
                }) = self.flows.remove(&remote)
                else {
                    return Tx::Swallow;
                };
                let seq_delta = cookie_isn.wrapping_sub(be32(frame, segment.tcp + 4));
                let ts_delta = match (cookie_tsval, timestamp_at(frame, &segment)) {
                    (Some(cookie), Some(at)) => cookie.wrapping_sub(be32(frame, at)),
                    _ => 0,
                };
                for mut held in held {
                    if let Some(parsed) = parse_segment(&held) {
                        translate_rx(&mut held, &parsed, seq_delta, ts_delta);
                    }
                    self.inject.push_back(held);
                }
                self.flows.insert(
                    remote,
                    Flow::Open {
                        seq_delta,
                        ts_delta,
                    },
                );
                self.counts.adopted += 1;
                Tx::Swallow
            }
            Some(Flow::Pending { cookie_isn, .. }) if segment.flags & RST != 0 => {
                // smoltcp had no socket for the SYN: tell the client, in its numbers.
                reset_in_client_numbers(frame, &segment, *cookie_isn);
                self.flows.insert(remote, Flow::Refused { since: self.now });
                self.counts.refused += 1;
                Tx::Send
            }
            Some(Flow::GivenUp { cookie_isn, .. }) if segment.flags & RST != 0 => {
                // The aborted socket's RST.
                reset_in_client_numbers(frame, &segment, *cookie_isn);
                self.flows.insert(remote, Flow::Refused { since: self.now });
                Tx::Send
            }
            Some(Flow::Pending { .. } | Flow::GivenUp { .. } | Flow::Refused { .. }) => Tx::Swallow,
        }
    }

    /// The connection with `remote` ended (its socket listens again).
    pub fn close(&mut self, remote: Remote) {
        if self.flows.remove(&remote).is_some() {
            self.closed.push(remote);
        }
    }

    /// Forgets open flows without a socket (`has_socket` false) and refused or given-up
    /// connections older than [`PENDING_TIMEOUT`]; gives up adoptions older than that
    /// (see [`CookieFlows::take_aborted`]). Call it now and then.
    pub fn expire(&mut self, now: Instant, has_socket: impl Fn(&Remote) -> bool) {
        let closed = &mut self.closed;
        let aborted = &mut self.aborted;
        let counts = &mut self.counts;
        self.flows.retain(|remote, flow| {
            let keep = match flow {
                Flow::Open { .. } => has_socket(remote),
                Flow::Pending {
                    since, cookie_isn, ..
                } => {
                    if now - *since >= PENDING_TIMEOUT {
                        counts.timed_out += 1;
                        aborted.push(*remote);
                        *flow = Flow::GivenUp {
                            cookie_isn: *cookie_isn,
                            since: now,
                        };
                    }
                    true
                }
                Flow::GivenUp { since, .. } | Flow::Refused { since } => {
                    now - *since < PENDING_TIMEOUT
                }
            };
            if !keep {
                closed.push(*remote);
            }
            keep
        });
    }

    /// Flows pending, open or refused.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

/// Turns smoltcp's RST for a connection it never answered into the client's numbers: the
/// sequence number the cookie SYN-ACK promised, no acknowledgement.
fn reset_in_client_numbers(frame: &mut [u8], segment: &Segment, cookie_isn: u32) {
    frame[segment.tcp + 4..segment.tcp + 8]
        .copy_from_slice(&cookie_isn.wrapping_add(1).to_be_bytes());
    frame[segment.tcp + 8..segment.tcp + 12].fill(0);
    frame[segment.tcp + 13] = RST;
    fill_checksums(frame, segment);
}

/// Client -> smoltcp: the client acknowledges and echoes our numbers in its view.
fn translate_rx(frame: &mut [u8], segment: &Segment, seq_delta: u32, ts_delta: u32) {
    if segment.flags & ACK != 0 {
        rewrite32(frame, segment, segment.tcp + 8, |ack| {
            ack.wrapping_sub(seq_delta)
        });
    }
    if let Some(at) = timestamp_at(frame, segment) {
        rewrite32(frame, segment, at + 4, |echo| echo.wrapping_sub(ts_delta));
    }
}

/// smoltcp -> client: our sequence numbers and timestamps in the client's view.
fn translate_tx(frame: &mut [u8], segment: &Segment, seq_delta: u32, ts_delta: u32) {
    rewrite32(frame, segment, segment.tcp + 4, |seq| {
        seq.wrapping_add(seq_delta)
    });
    if let Some(at) = timestamp_at(frame, segment) {
        rewrite32(frame, segment, at, |tsval| tsval.wrapping_add(ts_delta));
    }
}

/// smoltcp's window shift for a receive buffer of `buffer_bytes` (smoltcp 0.12: log2 of the
/// capacity, rounded up as it counts bits, minus 16): the XDP program must offer the same.
pub fn window_shift(buffer_bytes: usize) -> u8 {
    let bits = usize::BITS - buffer_bytes.leading_zeros();
    bits.saturating_sub(16).min(14) as u8
}

#[cfg(test)]
mod tests;
