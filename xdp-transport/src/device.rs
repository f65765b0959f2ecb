//! The smoltcp device over AF_XDP sockets ([`XskDevice`]), optionally with faults on its
//! wire for the tests ([`crate::faults`]).

use std::cell::{Cell, RefCell};

use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

use crate::cookie::{CookieCounts, Remote, Rx, Tx};
use crate::faults::{FaultConfig, FaultCounts, WireFaults};
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
    /// The connection with `remote` on our `local_port` ended.
    fn connection_closed(&mut self, remote: Remote, local_port: u16);
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
    /// Faults on the wire, for the tests (`--debug-inject-faults`).
    faults: RefCell<Option<WireFaults>>,
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
            faults: RefCell::new(None),
        }
    }

    /// The same device with faults on its wire: frames from the rx ring and for the tx
    /// ring are dropped, duplicated, reordered and corrupted at the rates of `config`.
    pub fn with_faults(self, config: FaultConfig) -> XskDevice {
        XskDevice {
            faults: RefCell::new(Some(WireFaults::new(config))),
            ..self
        }
    }

    /// What the faults did, if there are any.
    pub fn fault_counts(&self) -> Option<FaultCounts> {
        self.faults.borrow().as_ref().map(WireFaults::counts)
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
            faults: &self.faults,
        }
    }

    /// Hands smoltcp the SYN an adoption synthesized, and ends the receive burst so that
    /// smoltcp answers it before the flow's next segments are read (see [`Rx::Adopting`]).
    fn receive_adoption(&mut self, queue: usize) -> Option<(XskRxToken<'_>, XskTxToken<'_>)> {
        let syn = self.hooks.get_mut().next_injected()?;
        self.rx_budget = 0;
        Some((XskRxToken::Injected(syn), self.tx_token(queue)))
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

    fn connection_closed(&mut self, remote: Remote, local_port: u16) {
        self.hooks.get_mut().connection_closed(remote, local_port);
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
            if let Some(mut copy) = self
                .faults
                .get_mut()
                .as_mut()
                .and_then(WireFaults::take_due)
            {
                self.rx_budget -= 1;
                let queue = self.next_tx % n;
                match self.hooks.get_mut().on_rx(&mut copy, timestamp) {
                    Rx::Deliver => {
                        return Some((XskRxToken::Injected(copy), self.tx_token(queue)));
                    }
                    Rx::Consumed => continue,
                    Rx::Adopting => return self.receive_adoption(queue),
                }
            }
            let Some(queue) = (0..n)
                .map(|i| (self.next_rx + i) % n)
                .find(|&q| self.queues[q].xsk.get_mut().rx_available() > 0)
            else {
                if let Some(faults) = self.faults.get_mut() {
                    faults.on_rx_idle();
                }
                return None;
            };
            self.next_rx = (queue + 1) % n;
            let mut frame = self.queues[queue].xsk.get_mut().rx_take();
            self.rx_budget -= 1;
            let socket = &self.queues[queue];
            let verdict = match socket
                .umem
                .frame_mut(&mut frame.frame, frame.offset, frame.len)
            {
                Some(bytes) => {
                    let arrived = self
                        .faults
                        .get_mut()
                        .as_mut()
                        .is_none_or(|faults| faults.on_rx(bytes));
                    if arrived {
                        self.hooks.get_mut().on_rx(bytes, timestamp)
                    } else {
                        Rx::Consumed
                    }
                }
                None => Rx::Deliver,
            };
            if verdict == Rx::Deliver {
                break (queue, frame);
            }
            socket.pool.borrow_mut().give(frame.frame);
            if verdict == Rx::Adopting {
                return self.receive_adoption(queue);
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
    faults: &'a RefCell<Option<WireFaults>>,
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
            let (result, send) = match self.umem.frame_mut(&mut frame, 0, len) {
                Some(bytes) => {
                    let result = f(bytes);
                    let send = self.hooks.borrow_mut().on_tx(bytes) == Tx::Send
                        && self
                            .faults
                            .borrow_mut()
                            .as_mut()
                            .is_none_or(|faults| faults.on_tx(bytes));
                    (result, send)
                }
                None => return self.drop_frame(len, f),
            };
            if send {
                self.xsk.borrow_mut().tx_post(frame, len);
            } else {
                self.pool.borrow_mut().give(frame);
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
