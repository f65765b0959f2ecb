//! A simulated client opens a connection with a SYN cookie, is adopted into a smoltcp socket
//! made by [`crate::tcp`] (as the broker's poll loop makes its own), and exchanges data both
//! ways. Where it matters,
//! the client and the wire behave as Linux and veth do: a frame longer than the MTU is
//! dropped, and so is a segment with a bad checksum, a segment without a timestamp once
//! timestamps were agreed on (RFC 7323), and a segment whose tsval is older than the last
//! one taken (PAWS).

use std::cell::Cell;
use std::collections::VecDeque;

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{ChecksumCapabilities, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress, IpAddress,
    IpCidr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    TcpTimestampRepr,
};

use super::*;
use crate::neighbour::arp_reply_frame;
use crate::tcp::{ACK_DELAY, abort_half_open, listen, new_socket};

/// The lab's MTU.
const MTU: usize = 3500;
const BROKER_PORT: u16 = 9700;
const BROKER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const BROKER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const CLIENT_PORT: u16 = 40_000;
/// The broker's socket buffers (its default).
const BUFFER_BYTES: usize = 1 << 20;
/// The window scale the client offers (Linux's with a large receive buffer).
const CLIENT_WINDOW_SHIFT: u8 = 7;
/// How long the client waits for an ACK before it sends everything unacknowledged again.
const CLIENT_RTO_MS: u32 = 200;
/// Bytes the client sends (and the broker echoes back).
const TRANSFER_BYTES: usize = 4 << 20;
/// Simulated time the transfer may take (it needs well under a second when all is well).
const DEADLINE_MS: u32 = 10_000;
/// Sequence numbers and clocks near a wrap, so that wrapping arithmetic is exercised.
const CLIENT_ISN: u32 = 0xffff_ff00;
const COOKIE: u32 = 0xffff_fff0;
const XDP_CLOCK_MS: u32 = 0xffff_f000;
const CLIENT_CLOCK_OFFSET_MS: u32 = 0x8000_0000;

thread_local! {
    /// The simulated time in milliseconds (smoltcp's tsval generator is a plain `fn`).
    static NOW_MS: Cell<u32> = const { Cell::new(0) };
}

fn smoltcp_tsval() -> u32 {
    NOW_MS.get()
}

fn client_tsval() -> u32 {
    NOW_MS.get().wrapping_add(CLIENT_CLOCK_OFFSET_MS)
}

/// Whether sequence number or timestamp `a` comes after `b` (RFC 1982 arithmetic).
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// What the client dropped, by reason.
#[derive(Debug, Default, PartialEq, Eq)]
struct Dropped {
    /// Frames longer than the MTU (veth drops them).
    too_long: u32,
    /// Frames with a bad IPv4 or TCP checksum.
    bad_checksum: u32,
    /// Segments without a timestamp on a connection that agreed on timestamps.
    no_timestamp: u32,
    /// Segments with a timestamp on a connection that did not agree on them.
    unexpected_timestamp: u32,
    /// Segments PAWS rejected: their tsval is older than the last one taken.
    paws: u32,
    /// Segments whose tsecr is no tsval the client ever sent.
    bad_echo: u32,
    /// Resets whose sequence number is not the one expected.
    reset_out_of_window: u32,
}

/// What the client offers in its SYN.
#[derive(Debug, Clone, Copy)]
struct Offer {
    mss: u16,
    window_shift: Option<u8>,
    timestamps: bool,
}

/// A TCP client as far as this test needs one: it sends its data within the broker's window,
/// takes in-order data, acknowledges every segment, and sends everything unacknowledged
/// again after [`CLIENT_RTO_MS`] without progress.
struct Client {
    offer: Offer,
    snd_una: u32,
    snd_nxt: u32,
    /// The broker's window, in bytes.
    snd_wnd: u32,
    rcv_nxt: u32,
    /// The last tsval taken (RFC 7323 TS.Recent).
    ts_recent: u32,
    broker_window_shift: u8,
    /// Most payload bytes per segment: the broker's MSS less the timestamp option.
    payload_max: usize,
    data: Vec<u8>,
    received: Vec<u8>,
    progress_at_ms: u32,
    ack_due: bool,
    /// The broker reset the connection.
    reset: bool,
    dropped: Dropped,
}

impl Client {
    /// The client after the XDP program's SYN-ACK (see steer.bpf.c): `cookie` as the
    /// broker's ISN, and with timestamps the client's options in the low bits of the tsval.
    fn after_syn_ack(offer: Offer, broker_mss: u16, broker_window_shift: u8) -> Client {
        let wscale = offer.window_shift.map_or(TS_WSCALE_NONE, u32::from);
        let code = (u32::from(offer.mss) / TS_MSS_UNIT).clamp(1, TS_MSS_CODE_MASK);
        let cookie_tsval = (XDP_CLOCK_MS & !0x3ff) | (code << TS_MSS_SHIFT) | wscale;
        let scaling = offer.window_shift.is_some() && offer.timestamps;
        let options = if offer.timestamps { 12 } else { 0 };
        Client {
            offer,
            snd_una: CLIENT_ISN.wrapping_add(1),
            snd_nxt: CLIENT_ISN.wrapping_add(1),
            snd_wnd: u32::from(u16::try_from(BUFFER_BYTES).unwrap_or(u16::MAX)),
            rcv_nxt: COOKIE.wrapping_add(1),
            ts_recent: cookie_tsval,
            broker_window_shift: if scaling { broker_window_shift } else { 0 },
            payload_max: usize::from(broker_mss) - options,
            data: (0..TRANSFER_BYTES).map(|i| (i % 251) as u8).collect(),
            received: Vec::with_capacity(TRANSFER_BYTES),
            progress_at_ms: NOW_MS.get(),
            ack_due: true,
            reset: false,
            dropped: Dropped::default(),
        }
    }

    fn frame(&self, seq: u32, payload: &[u8]) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: CLIENT_PORT,
            dst_port: BROKER_PORT,
            control: TcpControl::None,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: Some(TcpSeqNumber(self.rcv_nxt as i32)),
            window_len: u16::MAX,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: self
                .offer
                .timestamps
                .then(|| TcpTimestampRepr::new(client_tsval(), self.ts_recent)),
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: CLIENT_IP,
            dst_addr: BROKER_IP,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let ethernet = EthernetRepr {
            src_addr: EthernetAddress(CLIENT_MAC),
            dst_addr: EthernetAddress(BROKER_MAC),
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut bytes = vec![0; ethernet.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
        let mut frame = EthernetFrame::new_unchecked(&mut bytes[..]);
        ethernet.emit(&mut frame);
        let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
        let checksums = ChecksumCapabilities::default();
        ip.emit(&mut packet, &checksums);
        tcp.emit(
            &mut TcpPacket::new_unchecked(packet.payload_mut()),
            &IpAddress::Ipv4(CLIENT_IP),
            &IpAddress::Ipv4(BROKER_IP),
            &checksums,
        );
        bytes
    }

    /// Sends what is due now: the ACK that completes the handshake, data within the
    /// broker's window, and an ACK for data received.
    fn send(&mut self, wire: &mut VecDeque<Vec<u8>>) {
        let now = NOW_MS.get();
        if self.snd_una != self.snd_nxt && now.wrapping_sub(self.progress_at_ms) >= CLIENT_RTO_MS {
            self.snd_nxt = self.snd_una;
            self.progress_at_ms = now;
        }
        if self.ack_due {
            wire.push_back(self.frame(self.snd_nxt, &[]));
            self.ack_due = false;
        }
        loop {
            let sent = self.snd_nxt.wrapping_sub(CLIENT_ISN.wrapping_add(1)) as usize;
            let in_flight = self.snd_nxt.wrapping_sub(self.snd_una) as usize;
            let window = self.snd_wnd as usize;
            if sent >= self.data.len() || in_flight >= window {
                return;
            }
            let len = self
                .payload_max
                .min(self.data.len() - sent)
                .min(window - in_flight);
            wire.push_back(self.frame(self.snd_nxt, &self.data[sent..sent + len]));
            self.snd_nxt = self.snd_nxt.wrapping_add(len as u32);
        }
    }

    /// Takes a frame the broker sent.
    fn receive(&mut self, bytes: &[u8]) {
        // The IP packet must fit the lab's MTU and the client's (its MSS + 40).
        if bytes.len() > 14 + MTU.min(usize::from(self.offer.mss) + 40) {
            self.dropped.too_long += 1;
            return;
        }
        let checksums = ChecksumCapabilities::default();
        let Ok(frame) = EthernetFrame::new_checked(bytes) else {
            return;
        };
        if frame.ethertype() != EthernetProtocol::Ipv4 {
            return;
        }
        let parsed = Ipv4Packet::new_checked(frame.payload()).and_then(|packet| {
            Ipv4Repr::parse(&packet, &checksums)?;
            let segment = TcpPacket::new_checked(packet.payload())?;
            TcpRepr::parse(
                &segment,
                &IpAddress::Ipv4(BROKER_IP),
                &IpAddress::Ipv4(CLIENT_IP),
                &checksums,
            )
        });
        let Ok(segment) = parsed else {
            self.dropped.bad_checksum += 1;
            return;
        };
        if segment.control == TcpControl::Rst {
            // RFC 5961: a reset is taken only at exactly the next expected sequence number.
            if segment.seq_number.0 as u32 == self.rcv_nxt {
                self.reset = true;
            } else {
                self.dropped.reset_out_of_window += 1;
            }
            return;
        }
        match (self.offer.timestamps, segment.timestamp) {
            (true, None) => {
                self.dropped.no_timestamp += 1;
                return;
            }
            (false, Some(_)) => {
                self.dropped.unexpected_timestamp += 1;
                return;
            }
            (true, Some(timestamp)) => {
                if after(self.ts_recent, timestamp.tsval) {
                    self.dropped.paws += 1;
                    return;
                }
                let sent_from = CLIENT_CLOCK_OFFSET_MS;
                if timestamp.tsecr.wrapping_sub(sent_from) > client_tsval().wrapping_sub(sent_from)
                {
                    self.dropped.bad_echo += 1;
                }
            }
            (false, None) => {}
        }
        if let Some(ack) = segment.ack_number {
            let ack = ack.0 as u32;
            if after(ack, self.snd_una) && !after(ack, self.snd_nxt) {
                self.snd_una = ack;
                self.progress_at_ms = NOW_MS.get();
            }
            self.snd_wnd = u32::from(segment.window_len) << self.broker_window_shift;
        }
        let seq = segment.seq_number.0 as u32;
        if seq == self.rcv_nxt {
            if let Some(timestamp) = segment.timestamp {
                self.ts_recent = timestamp.tsval;
            }
            self.received.extend_from_slice(segment.payload);
            self.rcv_nxt = self.rcv_nxt.wrapping_add(segment.payload.len() as u32);
        }
        self.ack_due |= !segment.payload.is_empty();
    }
}

/// The wire between the client and smoltcp, with the cookie hooks where the device has them.
struct Wire {
    to_broker: VecDeque<Vec<u8>>,
    to_client: Vec<Vec<u8>>,
    flows: CookieFlows,
    /// An adoption ended the receive burst (as in the device: see [`Rx::Adopting`]).
    burst_over: bool,
    /// The flows opened in the XDP program's table.
    opened: Vec<Remote>,
    /// Whether the XDP program's table refuses new flows.
    flow_table_full: bool,
}

struct Received(Vec<u8>);

impl RxToken for Received {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct Transmit<'a> {
    to_client: &'a mut Vec<Vec<u8>>,
    flows: &'a mut CookieFlows,
}

impl TxToken for Transmit<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        if self.flows.on_tx(&mut frame) == Tx::Send {
            self.to_client.push(frame);
        }
        result
    }
}

impl Device for Wire {
    type RxToken<'a> = Received;
    type TxToken<'a> = Transmit<'a>;

    fn receive(&mut self, now: Instant) -> Option<(Received, Transmit<'_>)> {
        if self.burst_over {
            return None;
        }
        let frame = loop {
            if let Some(frame) = self.flows.next_injected() {
                break frame;
            }
            let mut frame = self.to_broker.pop_front()?;
            let (opened, full) = (&mut self.opened, self.flow_table_full);
            let mut open_flow = |remote| {
                if !full {
                    opened.push(remote);
                }
                !full
            };
            match self.flows.on_rx(&mut frame, now, &mut open_flow) {
                Rx::Deliver => break frame,
                Rx::Consumed => {}
                Rx::Adopting => {
                    self.burst_over = true;
                    break self.flows.next_injected()?;
                }
            }
        };
        let transmit = Transmit {
            to_client: &mut self.to_client,
            flows: &mut self.flows,
        };
        Some((Received(frame), transmit))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Transmit<'_>> {
        Some(Transmit {
            to_client: &mut self.to_client,
            flows: &mut self.flows,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU + 14;
        caps
    }
}

/// smoltcp with one socket on the broker port (listening or not), behind a [`Wire`].
struct Broker {
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    wire: Wire,
}

/// The ARP reply with which the hooks tell smoltcp the client's MAC in production.
fn client_neighbour() -> Vec<u8> {
    arp_reply_frame(BROKER_MAC, BROKER_IP, CLIENT_MAC, CLIENT_IP).to_vec()
}

impl Broker {
    fn new(listening: bool) -> Broker {
        Broker::with_wire(listening, VecDeque::from([client_neighbour()]))
    }

    /// A broker whose smoltcp has frames `to_broker` waiting for it.
    fn with_wire(listening: bool, to_broker: VecDeque<Vec<u8>>) -> Broker {
        let mss = u16::try_from(MTU - 40).unwrap_or(u16::MAX);
        let mut wire = Wire {
            to_broker,
            to_client: Vec::new(),
            flows: CookieFlows::new(BROKER_PORT, mss, 4),
            burst_over: false,
            opened: Vec::new(),
            flow_table_full: false,
        };
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(BROKER_MAC)));
        let mut iface = Interface::new(config, &mut wire, Instant::ZERO);
        iface.update_ip_addrs(|addresses| {
            addresses
                .push(IpCidr::new(IpAddress::Ipv4(BROKER_IP), 24))
                .expect("room for one address");
        });
        let mut socket = new_socket(BUFFER_BYTES);
        socket.set_tsval_generator(Some(smoltcp_tsval));
        if listening {
            socket.listen(BROKER_PORT).expect("the port is free");
        }
        let mut sockets = SocketSet::new(Vec::new());
        let handle = sockets.add(socket);
        Broker {
            iface,
            sockets,
            handle,
            wire,
        }
    }

    /// Polls smoltcp and echoes what the socket received, as long as anything happens.
    fn serve(&mut self) {
        let now = Instant::from_millis(i64::from(NOW_MS.get()));
        for _ in 0..1000 {
            self.wire.burst_over = false;
            let sent = self.iface.poll(now, &mut self.wire, &mut self.sockets) != PollResult::None;
            if !self.echo() && !sent {
                return;
            }
        }
    }

    /// Sends back what the socket received, as much as its send buffer takes. Returns
    /// whether there was anything.
    fn echo(&mut self) -> bool {
        let socket = self.sockets.get_mut::<tcp::Socket<'_>>(self.handle);
        let room = socket.send_capacity() - socket.send_queue();
        if !socket.can_recv() || room == 0 {
            return false;
        }
        let mut echo = vec![0; room];
        let n = socket.recv_slice(&mut echo).expect("the socket is open");
        assert_eq!(socket.send_slice(&echo[..n]), Ok(n), "room was checked");
        n > 0
    }
}

/// The counts of a connection adopted without trouble.
const ADOPTED_ONCE: CookieCounts = CookieCounts {
    adopted: 1,
    refused: 0,
    table_full: 0,
    flow_open_failed: 0,
    held_dropped: 0,
    timed_out: 0,
    dropped_after_refusal: 0,
    unsound: 0,
};

/// What a run came to.
#[derive(Debug)]
struct Outcome {
    echoed_bytes: usize,
    elapsed_ms: u32,
    dropped: Dropped,
    counts: CookieCounts,
}

/// Runs a client that offers `offer` against `broker` until the echo is complete, the
/// broker reset the connection, or `deadline_ms` passed.
fn run(offer: Offer, broker: &mut Broker, deadline_ms: u32) -> (Outcome, Client) {
    let mss = u16::try_from(MTU - 40).unwrap_or(u16::MAX);
    let mut client = Client::after_syn_ack(offer, mss, window_shift(BUFFER_BYTES));
    let start = NOW_MS.get();
    while NOW_MS.get() - start < deadline_ms
        && client.received.len() < TRANSFER_BYTES
        && !client.reset
    {
        client.send(&mut broker.wire.to_broker);
        broker.serve();
        for frame in std::mem::take(&mut broker.wire.to_client) {
            client.receive(&frame);
        }
        NOW_MS.set(NOW_MS.get() + 1);
    }
    let outcome = Outcome {
        echoed_bytes: client.received.len(),
        elapsed_ms: NOW_MS.get() - start,
        dropped: std::mem::take(&mut client.dropped),
        counts: broker.wire.flows.counts(),
    };
    (outcome, client)
}

fn assert_clean_echo(offer: Offer) {
    NOW_MS.set(1);
    let (outcome, client) = run(offer, &mut Broker::new(true), DEADLINE_MS);
    assert_eq!(
        outcome.dropped,
        Dropped::default(),
        "the client dropped segments: {outcome:?}"
    );
    assert_eq!(
        outcome.echoed_bytes, TRANSFER_BYTES,
        "the echo is incomplete: {outcome:?}"
    );
    assert!(
        client.received == client.data,
        "the echo differs from the data"
    );
    assert!(!client.reset);
    assert_eq!(outcome.counts, ADOPTED_ONCE, "{outcome:?}");
    // Nothing was lost, so nothing waited for the client's retransmission timeout.
    assert!(outcome.elapsed_ms < CLIENT_RTO_MS, "{outcome:?}");
}

#[test]
fn a_cookie_connection_with_timestamps_carries_data_both_ways() {
    assert_clean_echo(Offer {
        mss: u16::try_from(MTU - 40).unwrap_or(u16::MAX),
        window_shift: Some(CLIENT_WINDOW_SHIFT),
        timestamps: true,
    });
}

#[test]
fn a_client_with_a_smaller_mss_gets_segments_that_fit() {
    // An MSS that is a multiple of 64 comes back from the cookie whole: smoltcp must still
    // leave room for the timestamp option, or a full segment does not fit the client's MTU.
    assert_clean_echo(Offer {
        mss: 1472,
        window_shift: Some(CLIENT_WINDOW_SHIFT),
        timestamps: true,
    });
}

#[test]
fn a_cookie_connection_without_timestamps_or_scaling_carries_data_both_ways() {
    assert_clean_echo(Offer {
        mss: 1460,
        window_shift: None,
        timestamps: false,
    });
}

#[test]
fn a_client_without_window_scaling_is_sent_unscaled_windows() {
    assert_clean_echo(Offer {
        mss: 1460,
        window_shift: None,
        timestamps: true,
    });
}

#[test]
fn the_pool_sockets_send_timestamps() {
    let mut socket = new_socket(BUFFER_BYTES);
    listen(&mut socket, BROKER_PORT);
    assert!(socket.timestamp_enabled());
}

const TIMESTAMPS: Offer = Offer {
    mss: 1460,
    window_shift: Some(CLIENT_WINDOW_SHIFT),
    timestamps: true,
};

#[test]
fn a_cookie_connection_without_a_free_socket_is_reset_in_the_clients_numbers() {
    NOW_MS.set(1);
    let mut broker = Broker::new(false);
    let (outcome, client) = run(TIMESTAMPS, &mut broker, 100);
    assert!(client.reset, "{outcome:?}");
    assert_eq!(outcome.dropped, Dropped::default());
    assert_eq!(outcome.counts.refused, 1, "{outcome:?}");
    assert!(
        outcome.counts.dropped_after_refusal > 0,
        "the data sent with the ACK is dropped, not adopted again: {outcome:?}"
    );
    let flows = &mut broker.wire.flows;
    let refused_at = Instant::from_millis(1);
    flows.expire(
        refused_at + PENDING_TIMEOUT - Duration::from_millis(1),
        |_| false,
    );
    assert!(flows.take_closed().is_empty(), "kept a while");
    flows.expire(refused_at + PENDING_TIMEOUT, |_| false);
    assert_eq!(
        flows.take_closed(),
        vec![(CLIENT_IP, CLIENT_PORT)],
        "then the XDP program's flow is removed"
    );
    assert!(flows.is_empty());
}

#[test]
fn flows_without_a_socket_and_stuck_adoptions_expire() {
    NOW_MS.set(1);
    let mut broker = Broker::new(true);
    let (outcome, _) = run(TIMESTAMPS, &mut broker, 5);
    assert_eq!(outcome.counts.adopted, 1, "{outcome:?}");
    let flows = &mut broker.wire.flows;
    let at = Instant::from_millis(10);
    flows.expire(at, |remote| *remote == (CLIENT_IP, CLIENT_PORT));
    assert_eq!(flows.len(), 1, "a flow with a socket stays");
    flows.expire(at, |_| false);
    assert!(flows.is_empty());
    assert_eq!(flows.take_closed(), vec![(CLIENT_IP, CLIENT_PORT)]);

    // An adoption whose SYN smoltcp never answers.
    let client = Client::after_syn_ack(TIMESTAMPS, 1460, 0);
    let mut ack = client.frame(CLIENT_ISN.wrapping_add(1), &[]);
    let open_flow = &mut |_| true;
    assert_eq!(flows.on_rx(&mut ack, at, open_flow), Rx::Adopting);
    assert!(flows.next_injected().is_some(), "the synthesized SYN");
    let mut data = client.frame(CLIENT_ISN.wrapping_add(1), &[7; 100]);
    for _ in 0..HELD_PER_FLOW {
        assert_eq!(flows.on_rx(&mut data, at, open_flow), Rx::Consumed);
    }
    assert_eq!(flows.counts().held_dropped, 1, "one more than is held");
    flows.expire(at + PENDING_TIMEOUT - Duration::from_millis(1), |_| true);
    assert_eq!(flows.len(), 1);
    assert!(flows.take_aborted().is_empty());
    // Given up: its half-open socket is to be aborted; the flow goes a while later.
    let given_up_at = at + PENDING_TIMEOUT;
    flows.expire(given_up_at, |_| true);
    assert_eq!(flows.counts().timed_out, 1);
    assert_eq!(flows.take_aborted(), vec![(CLIENT_IP, CLIENT_PORT)]);
    assert!(flows.take_closed().is_empty());
    assert_eq!(flows.on_rx(&mut data, given_up_at, open_flow), Rx::Consumed);
    flows.expire(given_up_at + PENDING_TIMEOUT, |_| true);
    assert!(flows.is_empty());
    assert_eq!(flows.counts().timed_out, 1);
    assert_eq!(flows.take_closed(), vec![(CLIENT_IP, CLIENT_PORT)]);
}

#[test]
fn a_corrupted_first_ack_starts_no_adoption_and_the_next_one_does() {
    let mut flows = CookieFlows::new(BROKER_PORT, 1460, 4);
    let client = Client::after_syn_ack(TIMESTAMPS, 1460, 0);
    let at = Instant::from_millis(1);
    let opened = std::cell::Cell::new(0);
    let open_flow = &mut |_| {
        opened.set(opened.get() + 1);
        true
    };
    let mut ack = client.frame(CLIENT_ISN.wrapping_add(1), &[]);
    let sound = ack.clone();
    // A bit of the client's address flipped on the way.
    ack[ETHERNET + 13] ^= 0x08;
    assert_eq!(flows.on_rx(&mut ack, at, open_flow), Rx::Deliver);
    assert!(flows.is_empty() && flows.next_injected().is_none());
    assert_eq!((flows.counts().unsound, opened.get()), (1, 0));
    let mut ack = sound;
    assert_eq!(flows.on_rx(&mut ack, at, open_flow), Rx::Adopting);
    let syn = flows.next_injected().expect("the synthesized SYN");
    let segment = parse_segment(&syn).expect("a segment");
    assert_eq!(segment.source, (CLIENT_IP, CLIENT_PORT));
    assert!(ipv4_header_sound(&syn, &segment));
    assert_eq!(opened.get(), 1);
}

/// The frames smoltcp sent to the client that are TCP segments with SYN set.
fn syns(frames: &[Vec<u8>]) -> usize {
    frames
        .iter()
        .filter_map(|frame| parse_segment(frame))
        .filter(|segment| segment.flags & SYN != 0)
        .count()
}

#[test]
fn a_given_up_adoption_aborts_its_half_open_socket() {
    NOW_MS.set(1);
    // smoltcp does not know the client yet: it cannot answer the SYN.
    let mut broker = Broker::with_wire(true, VecDeque::new());
    let (outcome, mut client) = run(TIMESTAMPS, &mut broker, 5);
    assert_eq!(outcome.counts.adopted, 0, "{outcome:?}");
    let remote = (CLIENT_IP, CLIENT_PORT);
    {
        let socket = broker.sockets.get::<tcp::Socket<'_>>(broker.handle);
        assert_eq!(socket.state(), tcp::State::SynReceived);
    }
    // The poll loop's housekeeping after the timeout.
    NOW_MS.set(NOW_MS.get() + PENDING_TIMEOUT.total_millis() as u32);
    let now = Instant::from_millis(i64::from(NOW_MS.get()));
    broker.wire.flows.expire(now, |_| true);
    for aborted in broker.wire.flows.take_aborted() {
        let socket = broker.sockets.get_mut::<tcp::Socket<'_>>(broker.handle);
        assert!(abort_half_open(socket, aborted), "{aborted:?}");
    }
    // The neighbour arrives late; smoltcp's retransmission timer has long expired.
    broker.wire.to_broker.push_back(client_neighbour());
    NOW_MS.set(NOW_MS.get() + 2_000);
    broker.serve();
    let sent = std::mem::take(&mut broker.wire.to_client);
    assert_eq!(syns(&sent), 0, "no SYN-ACK of a connection given up");
    for frame in &sent {
        client.receive(frame);
    }
    assert!(
        client.reset,
        "the abort's RST reaches the client in its numbers"
    );
    assert_eq!(client.dropped, Dropped::default());
    let socket = broker.sockets.get::<tcp::Socket<'_>>(broker.handle);
    assert_eq!(socket.state(), tcp::State::Closed, "free to listen again");
    assert!(!abort_half_open(
        broker.sockets.get_mut::<tcp::Socket<'_>>(broker.handle),
        remote
    ));
}

#[test]
fn an_adoption_opens_its_flow_and_a_flow_the_table_refuses_is_reset() {
    NOW_MS.set(1);
    let mut broker = Broker::new(true);
    let (outcome, _) = run(TIMESTAMPS, &mut broker, 5);
    assert_eq!(outcome.counts.adopted, 1, "{outcome:?}");
    assert_eq!(broker.wire.opened, vec![(CLIENT_IP, CLIENT_PORT)]);

    NOW_MS.set(1);
    let mut broker = Broker::new(true);
    broker.wire.flow_table_full = true;
    let (outcome, client) = run(TIMESTAMPS, &mut broker, 100);
    assert!(
        client.reset,
        "smoltcp resets the unknown connection: {outcome:?}"
    );
    assert_eq!(outcome.dropped, Dropped::default());
    assert_eq!(outcome.counts.adopted, 0, "{outcome:?}");
    assert!(outcome.counts.flow_open_failed > 0, "{outcome:?}");
    let flows = &mut broker.wire.flows;
    assert!(flows.is_empty(), "nothing to remove from the table later");
    flows.expire(Instant::from_secs(60), |_| false);
    assert!(flows.take_closed().is_empty());
}

#[test]
fn the_mss_of_the_cookie_is_the_clients_or_536_without_one() {
    // The synthesized SYN's MSS for the MSS code in the cookie's tsval (timestamps on: 12
    // bytes less, see synthesize_syn).
    let mss_for = |code: u32| {
        let mut client = Client::after_syn_ack(TIMESTAMPS, 1460, 0);
        client.ts_recent = (code << TS_MSS_SHIFT) | TS_WSCALE_NONE;
        let ack = client.frame(CLIENT_ISN.wrapping_add(1), &[]);
        let segment = parse_segment(&ack).expect("a segment");
        let syn = synthesize_syn(&ack, &segment, 3460);
        let syn_segment = parse_segment(&syn).expect("a segment");
        let options = syn_segment.tcp + 20;
        assert_eq!(syn[options], OPTION_MSS);
        be16(&syn, options + 2)
    };
    assert_eq!(mss_for(TS_MSS_NONE), 536 - 12, "no MSS option: 536");
    assert_eq!(mss_for(4), 256 - 12, "a small MSS is kept");
    assert_eq!(mss_for(22), 1408 - 12);
}

#[test]
fn a_client_with_an_mss_below_536_gets_segments_that_fit() {
    assert_clean_echo(Offer {
        mss: 320,
        window_shift: Some(CLIENT_WINDOW_SHIFT),
        timestamps: true,
    });
}

#[test]
fn the_flow_hash_spreads_one_hosts_ports_over_the_low_bits() {
    // The map picks buckets by the low bits: one client with many connections (ports in a
    // row) must not pile them into a few buckets.
    let hashing = FlowHashing::new();
    let host = Ipv4Addr::new(10, 0, 0, 2);
    let buckets: std::collections::HashSet<u64> = (40_000u16..41_024)
        .map(|port| hashing.hash_one((host, port)) & 1023)
        .collect();
    assert!(buckets.len() > 600, "{} of 1024 buckets", buckets.len());
    let hosts: std::collections::HashSet<u64> = (0..1024u32)
        .map(|n| hashing.hash_one((Ipv4Addr::from(0x0a00_0000 + n), 5555u16)) & 1023)
        .collect();
    assert!(hosts.len() > 600, "{} of 1024 buckets", hosts.len());
}

impl Broker {
    /// Polls smoltcp at the current time until nothing happens, reading nothing.
    fn poll_only(&mut self) {
        let now = Instant::from_millis(i64::from(NOW_MS.get()));
        for _ in 0..1000 {
            self.wire.burst_over = false;
            if self.iface.poll(now, &mut self.wire, &mut self.sockets) == PollResult::None {
                return;
            }
        }
    }
}

#[test]
fn the_broker_acknowledges_every_other_full_segment_and_a_lone_one_after_the_delay() {
    NOW_MS.set(1);
    let offer = Offer {
        mss: u16::try_from(MTU - 40).unwrap_or(u16::MAX),
        window_shift: Some(CLIENT_WINDOW_SHIFT),
        timestamps: true,
    };
    let mss = u16::try_from(MTU - 40).unwrap_or(u16::MAX);
    let mut client = Client::after_syn_ack(offer, mss, window_shift(BUFFER_BYTES));
    let mut broker = Broker::new(true);
    // The handshake's last ACK: the hooks adopt the connection.
    let handshake = client.frame(client.snd_nxt, &[]);
    broker.wire.to_broker.push_back(handshake);
    broker.poll_only();
    for frame in std::mem::take(&mut broker.wire.to_client) {
        client.receive(&frame);
    }
    assert_eq!(broker.wire.flows.counts(), ADOPTED_ONCE);
    let send = |client: &mut Client, broker: &mut Broker, segments: usize| {
        for _ in 0..segments {
            let offset = client.snd_nxt.wrapping_sub(CLIENT_ISN.wrapping_add(1)) as usize;
            let segment = client.data[offset..offset + client.payload_max].to_vec();
            broker
                .wire
                .to_broker
                .push_back(client.frame(client.snd_nxt, &segment));
            client.snd_nxt = client.snd_nxt.wrapping_add(segment.len() as u32);
        }
        broker.poll_only();
        let frames = std::mem::take(&mut broker.wire.to_client);
        for frame in &frames {
            client.receive(frame);
        }
        frames.len()
    };
    // Two full segments: one ACK, for both.
    assert_eq!(send(&mut client, &mut broker, 2), 1);
    assert_eq!(client.snd_una, client.snd_nxt);
    // A lone one waits for the delay...
    assert_eq!(send(&mut client, &mut broker, 1), 0);
    assert_ne!(client.snd_una, client.snd_nxt);
    // ...and is acknowledged once it has passed.
    NOW_MS.set(NOW_MS.get() + ACK_DELAY.total_millis() as u32);
    assert_eq!(send(&mut client, &mut broker, 0), 1);
    assert_eq!(client.snd_una, client.snd_nxt);
}
