//! smoltcp devices: [`XskDevice`] over an AF_XDP socket, and [`FaultyDevice`], a wrapper
//! that drops, duplicates, reorders and corrupts frames for the tests.

use std::cell::{Cell, RefCell};
use std::str::FromStr;

use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

use crate::cookie::{CookieCounts, Remote, Rx, Tx};
use crate::hooks::{Hooks, Peers};
use crate::neighbour::NeighbourCounts;
use crate::xsk::{self, FRAME_BYTES, FramePool, PollEntry, RxFrame, Umem, Xsk, XskStats};

/// Bytes of an Ethernet header (smoltcp's MTU for Ethernet includes it).
const ETHERNET_HEADER: usize = 14;

/// A device that works in bursts: the poll loop calls [`Burst::begin`] before polling the
/// interface and [`Burst::end`] after, once per iteration.
pub trait Burst {
    /// Reaps tx completions, refills the fill ring, and opens a receive budget.
    fn begin(&mut self);
    /// Hands received ring slots back, refills, and flushes (kicks) the frames queued for
    /// transmission.
    fn end(&mut self);
    /// The socket's counters.
    fn stats(&self) -> XskStats;
    /// Blocks until a frame arrives or `timeout` passes: the idle wait of the poll loop,
    /// which unlike a blind sleep lets a frame (a TCP segment, an ACK) wake it at once.
    fn wait_for_frames(&self, timeout: std::time::Duration);
    /// Neighbours and cookie flows (see [`Hooks::housekeeping`]); `peers` says which
    /// clients have a smoltcp socket. Returns the adoptions given up, whose half-open
    /// sockets must be aborted.
    fn housekeeping(&mut self, now: Instant, peers: &Peers) -> Vec<Remote>;
    /// The connection with `remote` ended.
    fn connection_closed(&mut self, remote: Remote);
    /// What the hooks did, for the metrics.
    fn hook_counts(&self) -> (CookieCounts, NeighbourCounts);
}

/// One AF_XDP socket of an [`XskDevice`]: bound to one rx queue, with its own UMEM.
#[derive(Debug)]
pub struct QueueSocket {
    // Declared before `umem` so the socket closes before its UMEM is freed.
    xsk: RefCell<Xsk>,
    umem: Umem,
    pool: RefCell<FramePool>,
    /// Frames kept out of the fill ring for transmission.
    tx_reserve: usize,
}

impl QueueSocket {
    /// A socket with the UMEM and frames [`Xsk::new`] made for it.
    pub fn new(xsk: Xsk, umem: Umem, pool: FramePool) -> QueueSocket {
        let tx_reserve = pool.len() / 4;
        let mut socket = QueueSocket {
            xsk: RefCell::new(xsk),
            umem,
            pool: RefCell::new(pool),
            tx_reserve,
        };
        let (xsk, pool) = (socket.xsk.get_mut(), socket.pool.get_mut());
        xsk.refill(pool, tx_reserve);
        socket
    }

    fn can_transmit(&mut self) -> bool {
        !self.pool.get_mut().is_empty() && self.xsk.get_mut().tx_has_room()
    }
}

/// A smoltcp device over the AF_XDP sockets of one or more rx queues of an interface (the
/// NIC spreads flows over its queues; one loop serves them all, in turn). Received frames
/// are read in place in the UMEM (the rx token borrows the frame and returns it to its
/// socket's pool after smoltcp consumed it); transmitted frames are written in place into
/// a free UMEM frame posted to a tx ring.
#[derive(Debug)]
pub struct XskDevice {
    queues: Vec<QueueSocket>,
    /// Where a frame goes when no UMEM frame or tx slot is free (it is then dropped).
    scratch: RefCell<Vec<u8>>,
    tx_dropped: Cell<u64>,
    mtu: usize,
    rx_burst: u32,
    rx_budget: u32,
    /// The queue the next receive looks at first (round robin, so no queue starves).
    next_rx: usize,
    /// The queue the next transmit tries first.
    next_tx: usize,
    /// What the idle wait polls: every socket (made once; the sockets live as long).
    poll_entries: RefCell<Vec<PollEntry>>,
    hooks: RefCell<Hooks>,
}

impl XskDevice {
    /// A device over `queues` (at least one) for an interface of IP MTU `mtu`, taking at
    /// most `rx_burst` frames per poll.
    pub fn new(queues: Vec<QueueSocket>, mtu: usize, rx_burst: u32, hooks: Hooks) -> XskDevice {
        assert!(!queues.is_empty(), "a device needs at least one socket");
        let poll_entries = queues.iter().map(|q| q.xsk.borrow().poll_entry()).collect();
        XskDevice {
            hooks: RefCell::new(hooks),
            poll_entries: RefCell::new(poll_entries),
            queues,
            scratch: RefCell::new(vec![0; FRAME_BYTES]),
            tx_dropped: Cell::new(0),
            mtu,
            rx_burst,
            rx_budget: 0,
            next_rx: 0,
            next_tx: 0,
        }
    }

    /// Frames smoltcp sent while no UMEM frame or tx slot was free (dropped; TCP resends).
    pub fn tx_dropped(&self) -> u64 {
        self.tx_dropped.get()
    }

    fn tx_token(&self, queue: usize) -> XskTxToken<'_> {
        let socket = &self.queues[queue];
        XskTxToken {
            xsk: &socket.xsk,
            umem: &socket.umem,
            pool: &socket.pool,
            scratch: &self.scratch,
            dropped: &self.tx_dropped,
            hooks: &self.hooks,
        }
    }

    /// The first queue from `next_tx` on that can take a frame, if any.
    fn queue_for_tx(&mut self) -> Option<usize> {
        let n = self.queues.len();
        let queue = (0..n)
            .map(|i| (self.next_tx + i) % n)
            .find(|&q| self.queues[q].can_transmit())?;
        self.next_tx = (queue + 1) % n;
        Some(queue)
    }
}

impl Burst for XskDevice {
    fn wait_for_frames(&self, timeout: std::time::Duration) {
        xsk::wait_readable(&mut self.poll_entries.borrow_mut(), timeout);
    }

    fn begin(&mut self) {
        for socket in &mut self.queues {
            let (xsk, pool) = (socket.xsk.get_mut(), socket.pool.get_mut());
            xsk.reap_completions(pool);
            xsk.refill(pool, socket.tx_reserve);
            xsk.busy_poll_rx();
        }
        self.rx_budget = self.rx_burst;
    }

    fn end(&mut self) {
        for socket in &mut self.queues {
            let (xsk, pool) = (socket.xsk.get_mut(), socket.pool.get_mut());
            xsk.rx_release();
            xsk.refill(pool, socket.tx_reserve);
            xsk.tx_flush();
            xsk.reap_completions(pool);
        }
    }

    fn stats(&self) -> XskStats {
        self.queues
            .iter()
            .map(|q| q.xsk.borrow().stats())
            .fold(XskStats::default(), XskStats::plus)
    }

    fn housekeeping(&mut self, now: Instant, peers: &Peers) -> Vec<Remote> {
        self.hooks.get_mut().housekeeping(now, peers)
    }

    fn connection_closed(&mut self, remote: Remote) {
        self.hooks.get_mut().connection_closed(remote);
    }

    fn hook_counts(&self) -> (CookieCounts, NeighbourCounts) {
        self.hooks.borrow().counts()
    }
}

impl Device for XskDevice {
    type RxToken<'a> = XskRxToken<'a>;
    type TxToken<'a> = XskTxToken<'a>;

    fn receive(&mut self, timestamp: Instant) -> Option<(XskRxToken<'_>, XskTxToken<'_>)> {
        if self.rx_budget == 0 {
            return None;
        }
        let n = self.queues.len();
        if let Some(frame) = self.hooks.get_mut().next_injected() {
            self.rx_budget -= 1;
            return Some((XskRxToken::Injected(frame), self.tx_token(self.next_tx % n)));
        }
        let (queue, frame) = loop {
            if self.rx_budget == 0 {
                return None;
            }
            let queue = (0..n)
                .map(|i| (self.next_rx + i) % n)
                .find(|&q| self.queues[q].xsk.get_mut().rx_available() > 0)?;
            self.next_rx = (queue + 1) % n;
            let mut frame = self.queues[queue].xsk.get_mut().rx_take();
            self.rx_budget -= 1;
            let socket = &self.queues[queue];
            let verdict = match socket
                .umem
                .frame_mut(&mut frame.frame, frame.offset, frame.len)
            {
                Some(bytes) => self.hooks.get_mut().on_rx(bytes, timestamp),
                None => Rx::Deliver,
            };
            if verdict == Rx::Deliver {
                break (queue, frame);
            }
            socket.pool.borrow_mut().give(frame.frame);
            if verdict == Rx::Adopting {
                let syn = self.hooks.get_mut().next_injected()?;
                self.rx_budget = 0;
                return Some((XskRxToken::Injected(syn), self.tx_token(queue)));
            }
        };
        let socket = &self.queues[queue];
        let rx = XskRxToken::Frame {
            frame,
            umem: &socket.umem,
            pool: &socket.pool,
        };
        Some((rx, self.tx_token(queue)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<XskTxToken<'_>> {
        let queue = self.queue_for_tx()?;
        Some(self.tx_token(queue))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + ETHERNET_HEADER;
        caps.max_burst_size = Some(self.rx_burst as usize);
        // veth hands frames over with CHECKSUM_PARTIAL: the TCP checksum of a received frame
        // is not filled in, so it cannot be verified. Sent frames get full checksums.
        caps.checksum.ipv4 = Checksum::Both;
        caps.checksum.tcp = Checksum::Tx;
        caps.checksum.udp = Checksum::Tx;
        caps.checksum.icmpv4 = Checksum::Both;
        caps
    }
}

/// A received frame, read in place and back to the pool after smoltcp consumed it; or a
/// frame the hooks made (an ARP reply, a synthesized SYN, a held segment).
#[derive(Debug)]
pub enum XskRxToken<'a> {
    /// A frame of the rx ring.
    Frame {
        /// The frame.
        frame: RxFrame,
        /// Its UMEM.
        umem: &'a Umem,
        /// Where it goes back.
        pool: &'a RefCell<FramePool>,
    },
    /// A frame made by the hooks.
    Injected(Vec<u8>),
}

impl RxToken for XskRxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let (RxFrame { frame, offset, len }, umem, pool) = match self {
            XskRxToken::Frame { frame, umem, pool } => (frame, umem, pool),
            XskRxToken::Injected(bytes) => return f(&bytes),
        };
        match umem.frame(&frame, offset, len) {
            Some(bytes) => {
                let result = f(bytes);
                pool.borrow_mut().give(frame);
                result
            }
            // A descriptor outside its frame: the kernel misbehaved; keep the frame out of
            // circulation and give smoltcp nothing to parse.
            None => f(&[]),
        }
    }
}

/// A frame to send, written in place into a free UMEM frame and posted to the tx ring.
#[derive(Debug)]
pub struct XskTxToken<'a> {
    xsk: &'a RefCell<Xsk>,
    umem: &'a Umem,
    pool: &'a RefCell<FramePool>,
    scratch: &'a RefCell<Vec<u8>>,
    dropped: &'a Cell<u64>,
    hooks: &'a RefCell<Hooks>,
}

impl TxToken for XskTxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let frame = if len <= FRAME_BYTES && self.xsk.borrow_mut().tx_has_room() {
            self.pool.borrow_mut().take()
        } else {
            None
        };
        if let Some(mut frame) = frame {
            let (result, verdict) = match self.umem.frame_mut(&mut frame, 0, len) {
                Some(bytes) => {
                    let result = f(bytes);
                    (result, self.hooks.borrow_mut().on_tx(bytes))
                }
                None => return self.drop_frame(len, f),
            };
            match verdict {
                Tx::Send => self.xsk.borrow_mut().tx_post(frame, len),
                Tx::Swallow => self.pool.borrow_mut().give(frame),
            }
            return result;
        }
        self.drop_frame(len, f)
    }
}

impl XskTxToken<'_> {
    fn drop_frame<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut scratch = self.scratch.borrow_mut();
        if scratch.len() < len {
            scratch.resize(len, 0);
        }
        let result = f(&mut scratch[..len]);
        // The hooks see it all the same: a captured SYN-ACK or an ARP request never goes
        // on the wire anyway.
        if self.hooks.borrow_mut().on_tx(&mut scratch[..len]) == Tx::Send {
            self.dropped.set(self.dropped.get() + 1);
        }
        result
    }
}

/// Fault rates of a [`FaultyDevice`], each in percent of frames, and the RNG seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultConfig {
    /// Received and sent frames dropped.
    pub drop: u8,
    /// Received frames delivered twice.
    pub duplicate: u8,
    /// Received frames held back and delivered after the next one.
    pub reorder: u8,
    /// Received and sent frames with one bit of the IPv4 header flipped (the IPv4 checksum
    /// catches it: TCP checksums of received frames cannot be verified on veth, see
    /// docs/xdp.md, so payload corruption would not be caught by anybody).
    pub corrupt: u8,
    /// Seed of the deterministic RNG.
    pub seed: u64,
}

/// Why a fault specification was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "bad fault specification {spec:?}: {reason} (expected e.g. drop=1,duplicate=1,reorder=1,corrupt=1,seed=7; rates in percent, 0 to 100)"
)]
pub struct FaultSpecError {
    spec: String,
    reason: String,
}

impl FromStr for FaultConfig {
    type Err = FaultSpecError;

    fn from_str(spec: &str) -> Result<FaultConfig, FaultSpecError> {
        let fail = |reason: String| FaultSpecError {
            spec: spec.to_owned(),
            reason,
        };
        let mut config = FaultConfig::default();
        for item in spec.split(',').filter(|item| !item.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| fail(format!("{item:?} has no '='")))?;
            if key == "seed" {
                config.seed = value
                    .parse()
                    .map_err(|_| fail(format!("seed {value:?} is not a number")))?;
                continue;
            }
            let rate: u8 = value
                .parse()
                .ok()
                .filter(|rate| *rate <= 100)
                .ok_or_else(|| fail(format!("{key} rate {value:?} is not 0 to 100")))?;
            match key {
                "drop" => config.drop = rate,
                "duplicate" | "dup" => config.duplicate = rate,
                "reorder" => config.reorder = rate,
                "corrupt" => config.corrupt = rate,
                other => return Err(fail(format!("unknown fault {other:?}"))),
            }
        }
        Ok(config)
    }
}

/// Frames held by a [`FaultyDevice`]: what it did, for the tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Frames dropped (both directions).
    pub dropped: u64,
    /// Frames delivered twice.
    pub duplicated: u64,
    /// Frames delivered after their successor.
    pub reordered: u64,
    /// Frames corrupted (both directions).
    pub corrupted: u64,
}

/// What the held frame is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Nothing held.
    Empty,
    /// Deliver it on the next receive (a duplicate).
    Next,
    /// Deliver it after one more frame (reordering).
    AfterNext,
}

/// A device wrapper that injects faults with a seeded, deterministic RNG. Only reachable
/// through the broker's hidden `--debug-inject-faults` flag (see docs/xdp.md).
#[derive(Debug)]
pub struct FaultyDevice<D> {
    inner: D,
    config: FaultConfig,
    rng: u64,
    held: Vec<u8>,
    held_state: Held,
    scratch: Vec<u8>,
    counts: Cell<FaultCounts>,
    rng_tx: Cell<u64>,
}

impl<D> FaultyDevice<D> {
    /// Wraps `inner`.
    pub fn new(inner: D, config: FaultConfig) -> FaultyDevice<D> {
        FaultyDevice {
            inner,
            config,
            rng: config.seed | 1,
            held: Vec::with_capacity(FRAME_BYTES),
            held_state: Held::Empty,
            scratch: Vec::with_capacity(FRAME_BYTES),
            counts: Cell::new(FaultCounts::default()),
            rng_tx: Cell::new(config.seed.rotate_left(17) | 1),
        }
    }

    /// What was done so far.
    pub fn counts(&self) -> FaultCounts {
        self.counts.get()
    }
}

/// xorshift64*: a percentage roll in 0..100.
fn roll(state: &mut u64) -> u8 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32).wrapping_rem(100) as u8
}

/// Flips one bit of the IPv4 header of an Ethernet frame (or of the frame's last byte when
/// it is too short to have one).
fn corrupt(frame: &mut [u8], bit: u8) {
    const IPV4: std::ops::Range<usize> = ETHERNET_HEADER..ETHERNET_HEADER + 20;
    let index = if frame.len() >= IPV4.end {
        IPV4.start + usize::from(bit) % IPV4.len()
    } else {
        frame.len().wrapping_sub(1)
    };
    if let Some(byte) = frame.get_mut(index) {
        *byte ^= 1 << (bit % 8);
    }
}

fn copy_into(buffer: &mut Vec<u8>, frame: &[u8]) {
    buffer.clear();
    buffer.extend_from_slice(frame);
}

impl<D: Burst> Burst for FaultyDevice<D> {
    fn begin(&mut self) {
        self.inner.begin();
    }

    fn wait_for_frames(&self, timeout: std::time::Duration) {
        self.inner.wait_for_frames(timeout);
    }

    fn end(&mut self) {
        self.inner.end();
    }

    fn stats(&self) -> XskStats {
        self.inner.stats()
    }

    fn housekeeping(&mut self, now: Instant, peers: &Peers) -> Vec<Remote> {
        self.inner.housekeeping(now, peers)
    }

    fn connection_closed(&mut self, remote: Remote) {
        self.inner.connection_closed(remote);
    }

    fn hook_counts(&self) -> (CookieCounts, NeighbourCounts) {
        self.inner.hook_counts()
    }
}

impl<D: Device> Device for FaultyDevice<D> {
    type RxToken<'a>
        = FaultyRxToken<'a, D>
    where
        D: 'a;
    type TxToken<'a>
        = FaultyTxToken<'a, D>
    where
        D: 'a;

    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.held_state == Held::Next {
            self.held_state = Held::Empty;
            let tx = self.inner.transmit(timestamp)?;
            return Some((
                FaultyRxToken::Copy(&self.held),
                FaultyTxToken::wrap(tx, &self.config, &self.rng_tx, &self.counts),
            ));
        }
        let (rx, tx) = match self.inner.receive(timestamp) {
            Some(tokens) => tokens,
            None => {
                // Nothing came after a held frame: deliver it on the next receive rather
                // than never.
                if self.held_state == Held::AfterNext {
                    self.held_state = Held::Next;
                }
                return None;
            }
        };
        if self.held_state == Held::AfterNext {
            self.held_state = Held::Next;
            return Some((
                FaultyRxToken::Inner(rx),
                FaultyTxToken::wrap(tx, &self.config, &self.rng_tx, &self.counts),
            ));
        }
        let config = self.config;
        let mut counts = self.counts.get();
        let token = if roll(&mut self.rng) < config.drop {
            rx.consume(|_| ());
            counts.dropped += 1;
            self.counts.set(counts);
            return None;
        } else if roll(&mut self.rng) < config.duplicate {
            rx.consume(|frame| copy_into(&mut self.held, frame));
            self.held_state = Held::Next;
            counts.duplicated += 1;
            FaultyRxToken::Copy(&self.held)
        } else if roll(&mut self.rng) < config.reorder {
            rx.consume(|frame| copy_into(&mut self.held, frame));
            self.held_state = Held::AfterNext;
            counts.reordered += 1;
            self.counts.set(counts);
            return None;
        } else if roll(&mut self.rng) < config.corrupt {
            let bit = roll(&mut self.rng);
            rx.consume(|frame| copy_into(&mut self.scratch, frame));
            corrupt(&mut self.scratch, bit);
            counts.corrupted += 1;
            FaultyRxToken::Copy(&self.scratch)
        } else {
            FaultyRxToken::Inner(rx)
        };
        self.counts.set(counts);
        Some((
            token,
            FaultyTxToken::wrap(tx, &self.config, &self.rng_tx, &self.counts),
        ))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        let tx = self.inner.transmit(timestamp)?;
        Some(FaultyTxToken::wrap(
            tx,
            &self.config,
            &self.rng_tx,
            &self.counts,
        ))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.inner.capabilities()
    }
}

/// A received frame of a [`FaultyDevice`]: the inner device's, or a copy it made.
#[derive(Debug)]
pub enum FaultyRxToken<'a, D: Device + 'a> {
    /// Passed through untouched.
    Inner(D::RxToken<'a>),
    /// A duplicated, reordered or corrupted copy.
    Copy(&'a [u8]),
}

impl<'a, D: Device + 'a> RxToken for FaultyRxToken<'a, D> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        match self {
            FaultyRxToken::Inner(token) => token.consume(f),
            FaultyRxToken::Copy(frame) => f(frame),
        }
    }
}

/// A frame to send through a [`FaultyDevice`]: maybe dropped, maybe corrupted.
#[derive(Debug)]
pub struct FaultyTxToken<'a, D: Device + 'a> {
    inner: D::TxToken<'a>,
    config: &'a FaultConfig,
    rng: &'a Cell<u64>,
    counts: &'a Cell<FaultCounts>,
}

impl<'a, D: Device + 'a> FaultyTxToken<'a, D> {
    fn wrap(
        inner: D::TxToken<'a>,
        config: &'a FaultConfig,
        rng: &'a Cell<u64>,
        counts: &'a Cell<FaultCounts>,
    ) -> FaultyTxToken<'a, D> {
        FaultyTxToken {
            inner,
            config,
            rng,
            counts,
        }
    }
}

impl<'a, D: Device + 'a> TxToken for FaultyTxToken<'a, D> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut state = self.rng.get();
        let (drop, corrupt_it, bit) = (
            roll(&mut state) < self.config.drop,
            roll(&mut state) < self.config.corrupt,
            roll(&mut state),
        );
        self.rng.set(state);
        let mut counts = self.counts.get();
        if drop {
            counts.dropped += 1;
        } else if corrupt_it {
            counts.corrupted += 1;
        }
        self.counts.set(counts);
        self.inner.consume(len, |frame| {
            let result = f(frame);
            if drop {
                // An invalid Ethernet frame (zero destination and type): nobody accepts it.
                frame.fill(0);
            } else if corrupt_it {
                corrupt(frame, bit);
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::{Loopback, Medium};

    #[test]
    fn fault_specs_parse_and_refuse_nonsense() {
        let config: FaultConfig = "drop=1,dup=2,reorder=3,corrupt=4,seed=9".parse().unwrap();
        assert_eq!(
            config,
            FaultConfig {
                drop: 1,
                duplicate: 2,
                reorder: 3,
                corrupt: 4,
                seed: 9
            }
        );
        assert!("drop=101".parse::<FaultConfig>().is_err());
        assert!("melt=1".parse::<FaultConfig>().is_err());
        assert!("drop".parse::<FaultConfig>().is_err());
    }

    #[test]
    fn the_rng_is_deterministic_and_roughly_uniform() {
        let (mut a, mut b) = (7u64, 7u64);
        let rolls: Vec<u8> = (0..10_000).map(|_| roll(&mut a)).collect();
        assert!(rolls.iter().all(|r| *r < 100));
        assert_eq!(rolls, (0..10_000).map(|_| roll(&mut b)).collect::<Vec<_>>());
        let below_10 = rolls.iter().filter(|r| **r < 10).count();
        assert!((800..1200).contains(&below_10), "{below_10}");
    }

    #[test]
    fn corruption_flips_one_bit_of_the_ipv4_header() {
        let mut frame = [0u8; 60];
        corrupt(&mut frame, 42);
        let flipped: Vec<usize> = (0..60).filter(|i| frame[*i] != 0).collect();
        assert_eq!(flipped.len(), 1);
        assert!((14..34).contains(&flipped[0]));
        assert_eq!(frame[flipped[0]].count_ones(), 1);
    }

    fn send(device: &mut impl Device, byte: u8) {
        let token = device.transmit(Instant::ZERO).unwrap();
        token.consume(60, |frame| frame.fill(byte));
    }

    fn receive_all(device: &mut impl Device) -> Vec<u8> {
        let mut got = Vec::new();
        for _ in 0..1000 {
            if let Some((rx, _tx)) = device.receive(Instant::ZERO) {
                rx.consume(|frame| got.push(frame[0]));
            }
        }
        got
    }

    #[test]
    fn duplicates_and_reordering_deliver_every_frame() {
        let config = FaultConfig {
            duplicate: 30,
            reorder: 30,
            seed: 3,
            ..FaultConfig::default()
        };
        let mut device = FaultyDevice::new(Loopback::new(Medium::Ethernet), config);
        for byte in 1..=50 {
            send(&mut device.inner, byte);
        }
        let got = receive_all(&mut device);
        let counts = device.counts();
        assert!(counts.duplicated > 0 && counts.reordered > 0, "{counts:?}");
        assert_eq!(got.len() as u64, 50 + counts.duplicated);
        let mut unique = got.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique, (1..=50).collect::<Vec<u8>>());
        assert_ne!(got, unique, "some frames are out of order");
    }

    #[test]
    fn drops_lose_frames_in_both_directions() {
        let config = FaultConfig {
            drop: 50,
            seed: 5,
            ..FaultConfig::default()
        };
        let mut device = FaultyDevice::new(Loopback::new(Medium::Ethernet), config);
        for byte in 1..=40 {
            send(&mut device, byte);
        }
        let got = receive_all(&mut device);
        let zeroed = got.iter().filter(|b| **b == 0).count() as u64;
        let counts = device.counts();
        assert!(counts.dropped > 0);
        assert!(zeroed > 0, "dropped tx frames are blanked");
        assert!((got.len() as u64) < 40);
    }
}
