//! Neighbours for smoltcp from the kernel's neighbour table (sans IO).
//!
//! ARP stays with the kernel (the XDP program passes it), so the host keeps its neighbours
//! and everything else on the broker's address keeps working. smoltcp 0.12 learns
//! neighbours only from ARP packets, so the device intercepts the ARP requests smoltcp
//! sends (they never reach the wire), [`Neighbours`] asks the kernel to resolve the address
//! (`RTM_NEWNEIGH` with `NTF_USE`), and once the kernel's entry has a link-layer address
//! (reachable, stale, delay, probe, permanent) hands smoltcp a synthesized ARP reply built
//! from it. Replies are repeated before smoltcp's cache entry expires (60 s).
//!
//! The netlink messages are built and parsed here; [`super::netlink`] only moves bytes.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use smoltcp::time::{Duration, Instant};

/// Bytes of an Ethernet/IPv4 ARP frame.
pub const ARP_FRAME_BYTES: usize = 42;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

/// How often a wanted address is asked of the kernel again.
const RESOLVE_INTERVAL: Duration = Duration::from_millis(500);
/// How long an address smoltcp asked for is wanted (smoltcp asks again each second while
/// it still needs it).
const WANTED_FOR: Duration = Duration::from_secs(10);
/// How often a neighbour smoltcp uses is told again (smoltcp forgets it after 60 s).
const REFRESH_INTERVAL: Duration = Duration::from_secs(20);
/// How often the whole table is read again (notifications can be lost when the socket's
/// buffer overflows).
const DUMP_INTERVAL: Duration = Duration::from_secs(10);

// Netlink and rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/neighbour.h).
const NLMSG_HEADER: usize = 16;
const NDMSG: usize = 12;
const NLMSG_ERROR: u16 = 2;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_GETNEIGH: u16 = 30;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const AF_INET: u8 = 2;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NTF_USE: u8 = 0x01;
/// States in which the kernel's entry holds a usable link-layer address.
const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

/// One neighbour message from the kernel (a dump answer or a notification).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelNeighbour {
    /// An entry of `ifindex` for `ip`; `mac` is set when its state makes it usable.
    Update {
        /// The interface.
        ifindex: u32,
        /// The neighbour's address.
        ip: Ipv4Addr,
        /// Its link-layer address, if the entry is usable.
        mac: Option<[u8; 6]>,
    },
    /// The entry is gone.
    Delete {
        /// The interface.
        ifindex: u32,
        /// The neighbour's address.
        ip: Ipv4Addr,
    },
    /// The kernel refused a request (`errno`, positive).
    Error {
        /// The errno.
        errno: i32,
    },
}

fn u16_ne(bytes: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]])
}

fn u32_ne(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Parses the netlink messages in `buffer` (one `recv`), appending the IPv4 neighbour
/// entries and errors; other messages, and anything truncated, are skipped.
pub fn parse_messages(buffer: &[u8], out: &mut Vec<KernelNeighbour>) {
    let mut at = 0;
    while at + NLMSG_HEADER <= buffer.len() {
        let len = u32_ne(buffer, at) as usize;
        if len < NLMSG_HEADER || at + len > buffer.len() {
            return;
        }
        let kind = u16_ne(buffer, at + 4);
        let body = &buffer[at + NLMSG_HEADER..at + len];
        match kind {
            RTM_NEWNEIGH | RTM_DELNEIGH => {
                if let Some(message) = parse_neighbour(kind, body) {
                    out.push(message);
                }
            }
            NLMSG_ERROR if body.len() >= 4 => {
                let errno = -(u32_ne(body, 0) as i32);
                if errno != 0 {
                    out.push(KernelNeighbour::Error { errno });
                }
            }
            _ => {}
        }
        at += len.next_multiple_of(4);
    }
}

fn parse_neighbour(kind: u16, body: &[u8]) -> Option<KernelNeighbour> {
    if body.len() < NDMSG || body[0] != AF_INET {
        return None;
    }
    let ifindex = u32_ne(body, 4);
    let state = u16_ne(body, 8);
    let (mut ip, mut mac) = (None, None);
    let mut at = NDMSG;
    while at + 4 <= body.len() {
        let len = usize::from(u16_ne(body, at));
        if len < 4 || at + len > body.len() {
            break;
        }
        let value = &body[at + 4..at + len];
        match u16_ne(body, at + 2) {
            NDA_DST if value.len() == 4 => {
                ip = Some(Ipv4Addr::new(value[0], value[1], value[2], value[3]));
            }
            NDA_LLADDR if value.len() == 6 => {
                let mut bytes = [0u8; 6];
                bytes.copy_from_slice(value);
                mac = Some(bytes);
            }
            _ => {}
        }
        at += len.next_multiple_of(4);
    }
    let ip = ip?;
    if kind == RTM_DELNEIGH {
        return Some(KernelNeighbour::Delete { ifindex, ip });
    }
    let usable = state & NUD_USABLE != 0;
    Some(KernelNeighbour::Update {
        ifindex,
        ip,
        mac: mac.filter(|_| usable),
    })
}

fn message(
    kind: u16,
    flags: u16,
    seq: u32,
    ifindex: u32,
    ndm_flags: u8,
    dst: Option<Ipv4Addr>,
) -> Vec<u8> {
    let len = NLMSG_HEADER + NDMSG + if dst.is_some() { 8 } else { 0 };
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(&(len as u32).to_ne_bytes());
    bytes.extend_from_slice(&kind.to_ne_bytes());
    bytes.extend_from_slice(&flags.to_ne_bytes());
    bytes.extend_from_slice(&seq.to_ne_bytes());
    bytes.extend_from_slice(&0u32.to_ne_bytes());
    bytes.extend_from_slice(&[AF_INET, 0, 0, 0]);
    bytes.extend_from_slice(&ifindex.to_ne_bytes());
    bytes.extend_from_slice(&0u16.to_ne_bytes()); // state: none (NTF_USE resolves)
    bytes.extend_from_slice(&[ndm_flags, 0]);
    if let Some(ip) = dst {
        bytes.extend_from_slice(&8u16.to_ne_bytes());
        bytes.extend_from_slice(&NDA_DST.to_ne_bytes());
        bytes.extend_from_slice(&ip.octets());
    }
    bytes
}

/// `RTM_GETNEIGH` dump of the IPv4 neighbours (of every interface: the answer is filtered).
pub fn dump_request(seq: u32) -> Vec<u8> {
    message(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, 0, None)
}

/// `RTM_NEWNEIGH` with `NTF_USE`: the kernel resolves `ip` on `ifindex` as if it were about
/// to send there (creating the entry if needed).
pub fn resolve_request(seq: u32, ifindex: u32, ip: Ipv4Addr) -> Vec<u8> {
    message(
        RTM_NEWNEIGH,
        NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK,
        seq,
        ifindex,
        NTF_USE,
        Some(ip),
    )
}

/// The target address of an ARP request in `frame`, if it is one.
pub fn arp_request_target(frame: &[u8]) -> Option<Ipv4Addr> {
    if frame.len() < ARP_FRAME_BYTES
        || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_ARP
        || u16::from_be_bytes([frame[20], frame[21]]) != ARP_REQUEST
    {
        return None;
    }
    Some(Ipv4Addr::new(frame[38], frame[39], frame[40], frame[41]))
}

/// Whether `frame` is an ARP packet at all (smoltcp's ARP never goes on the wire).
pub fn is_arp(frame: &[u8]) -> bool {
    frame.len() >= 14 && u16::from_be_bytes([frame[12], frame[13]]) == ETHERTYPE_ARP
}

/// The ARP reply `their_ip` is at `their_mac`, addressed to us.
pub fn arp_reply_frame(
    our_mac: [u8; 6],
    our_ip: Ipv4Addr,
    their_mac: [u8; 6],
    their_ip: Ipv4Addr,
) -> [u8; ARP_FRAME_BYTES] {
    let mut frame = [0u8; ARP_FRAME_BYTES];
    frame[0..6].copy_from_slice(&our_mac);
    frame[6..12].copy_from_slice(&their_mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&ARP_REPLY.to_be_bytes());
    frame[22..28].copy_from_slice(&their_mac);
    frame[28..32].copy_from_slice(&their_ip.octets());
    frame[32..38].copy_from_slice(&our_mac);
    frame[38..42].copy_from_slice(&our_ip.octets());
    frame
}

/// What [`Neighbours::poll`] wants done.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Actions {
    /// ARP replies to hand smoltcp.
    pub replies: Vec<[u8; ARP_FRAME_BYTES]>,
    /// Addresses to ask the kernel to resolve.
    pub resolve: Vec<Ipv4Addr>,
    /// Whether to ask for a dump of the table.
    pub dump: bool,
}

/// What happened, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NeighbourCounts {
    /// ARP requests of smoltcp taken off the wire.
    pub requests: u64,
    /// ARP replies handed to smoltcp.
    pub replies: u64,
    /// Resolutions asked of the kernel.
    pub resolves: u64,
    /// Requests not tracked because [`Neighbours`] was full.
    pub table_full: u64,
}

/// An address smoltcp needs.
#[derive(Debug, Clone, Copy)]
struct Wanted {
    since: Instant,
    asked_at: Option<Instant>,
}

/// The kernel's neighbours of one interface, and what smoltcp asked for.
#[derive(Debug)]
pub struct Neighbours {
    ifindex: u32,
    our_mac: [u8; 6],
    our_ip: Ipv4Addr,
    /// Usable kernel entries.
    known: HashMap<Ipv4Addr, [u8; 6]>,
    /// Addresses smoltcp asked for and has not been told.
    wanted: HashMap<Ipv4Addr, Wanted>,
    /// Addresses smoltcp was told, and when.
    told: HashMap<Ipv4Addr, Instant>,
    entries_max: usize,
    dumped_at: Option<Instant>,
    counts: NeighbourCounts,
}

impl Neighbours {
    /// Neighbours of interface `ifindex`, for a smoltcp interface at `our_mac`/`our_ip`;
    /// each table holds at most `entries_max` addresses.
    pub fn new(ifindex: u32, our_mac: [u8; 6], our_ip: Ipv4Addr, entries_max: usize) -> Neighbours {
        Neighbours {
            ifindex,
            our_mac,
            our_ip,
            known: HashMap::new(),
            wanted: HashMap::new(),
            told: HashMap::new(),
            entries_max,
            dumped_at: None,
            counts: NeighbourCounts::default(),
        }
    }

    /// What happened so far.
    pub fn counts(&self) -> NeighbourCounts {
        self.counts
    }

    /// Takes a message from the kernel. Returns whether a table was full.
    pub fn on_kernel(&mut self, message: KernelNeighbour) -> bool {
        match message {
            KernelNeighbour::Update { ifindex, ip, mac } if ifindex == self.ifindex => match mac {
                Some(mac) => {
                    if self.known.len() >= self.entries_max && !self.known.contains_key(&ip) {
                        self.counts.table_full += 1;
                        return true;
                    }
                    if self.known.insert(ip, mac) != Some(mac) {
                        // A new or changed address: tell smoltcp again if it uses it.
                        self.told.remove(&ip);
                    }
                }
                None => {
                    self.known.remove(&ip);
                }
            },
            KernelNeighbour::Delete { ifindex, ip } if ifindex == self.ifindex => {
                self.known.remove(&ip);
            }
            _ => {}
        }
        false
    }

    /// smoltcp asked who has `ip`. Returns whether a table was full.
    pub fn on_arp_request(&mut self, ip: Ipv4Addr, now: Instant) -> bool {
        self.counts.requests += 1;
        self.told.remove(&ip);
        if self.wanted.contains_key(&ip) {
            return false;
        }
        if self.wanted.len() >= self.entries_max {
            self.counts.table_full += 1;
            return true;
        }
        self.wanted.insert(
            ip,
            Wanted {
                since: now,
                asked_at: None,
            },
        );
        false
    }

    /// What to do at `now`: replies for wanted addresses the kernel knows and for told ones
    /// due a refresh, resolutions for the others, and a dump when one is due.
    pub fn poll(&mut self, now: Instant) -> Actions {
        let mut actions = Actions::default();
        let (our_mac, our_ip) = (self.our_mac, self.our_ip);
        let known = &self.known;
        let told = &mut self.told;
        let counts = &mut self.counts;
        self.wanted.retain(|ip, wanted| {
            if let Some(mac) = known.get(ip) {
                actions
                    .replies
                    .push(arp_reply_frame(our_mac, our_ip, *mac, *ip));
                counts.replies += 1;
                told.insert(*ip, now);
                return false;
            }
            if now - wanted.since >= WANTED_FOR {
                return false;
            }
            if wanted
                .asked_at
                .is_none_or(|at| now - at >= RESOLVE_INTERVAL)
            {
                wanted.asked_at = Some(now);
                actions.resolve.push(*ip);
                counts.resolves += 1;
            }
            true
        });
        self.told.retain(|ip, at| {
            let Some(mac) = known.get(ip) else {
                return false;
            };
            if now - *at >= REFRESH_INTERVAL {
                actions
                    .replies
                    .push(arp_reply_frame(our_mac, our_ip, *mac, *ip));
                counts.replies += 1;
                *at = now;
            }
            true
        });
        if self.dumped_at.is_none_or(|at| now - at >= DUMP_INTERVAL) {
            self.dumped_at = Some(now);
            actions.dump = true;
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IFINDEX: u32 = 7;
    const OUR_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const OUR_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

    /// An RTM_NEWNEIGH message as the kernel sends it.
    fn kernel_message(
        kind: u16,
        ifindex: u32,
        state: u16,
        ip: Ipv4Addr,
        mac: Option<[u8; 6]>,
    ) -> Vec<u8> {
        let mut body = vec![AF_INET, 0, 0, 0];
        body.extend_from_slice(&ifindex.to_ne_bytes());
        body.extend_from_slice(&state.to_ne_bytes());
        body.extend_from_slice(&[0, 1]);
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&NDA_DST.to_ne_bytes());
        body.extend_from_slice(&ip.octets());
        if let Some(mac) = mac {
            body.extend_from_slice(&10u16.to_ne_bytes());
            body.extend_from_slice(&NDA_LLADDR.to_ne_bytes());
            body.extend_from_slice(&mac);
            body.extend_from_slice(&[0, 0]);
        }
        let mut message = ((NLMSG_HEADER + body.len()) as u32).to_ne_bytes().to_vec();
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&0u16.to_ne_bytes());
        message.extend_from_slice(&[0; 8]);
        message.extend_from_slice(&body);
        message
    }

    fn parse(bytes: &[u8]) -> Vec<KernelNeighbour> {
        let mut out = Vec::new();
        parse_messages(bytes, &mut out);
        out
    }

    #[test]
    fn kernel_messages_parse_by_state_and_kind() {
        let mut bytes = kernel_message(RTM_NEWNEIGH, IFINDEX, 0x04, CLIENT_IP, Some(CLIENT_MAC));
        bytes.extend(kernel_message(RTM_NEWNEIGH, IFINDEX, 0x01, OUR_IP, None));
        bytes.extend(kernel_message(
            RTM_NEWNEIGH,
            IFINDEX,
            0x20,
            OUR_IP,
            Some(CLIENT_MAC),
        ));
        bytes.extend(kernel_message(
            RTM_DELNEIGH,
            3,
            0,
            CLIENT_IP,
            Some(CLIENT_MAC),
        ));
        // An error answer (-ENODEV) and a truncated message at the end.
        let mut error = 36u32.to_ne_bytes().to_vec();
        error.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error.extend_from_slice(&[0; 10]);
        error.extend_from_slice(&(-19i32).to_ne_bytes());
        error.extend_from_slice(&[0; 16]);
        bytes.extend(error);
        bytes.extend_from_slice(&[200, 0, 0, 0, 28, 0]);
        assert_eq!(
            parse(&bytes),
            vec![
                KernelNeighbour::Update {
                    ifindex: IFINDEX,
                    ip: CLIENT_IP,
                    mac: Some(CLIENT_MAC)
                },
                KernelNeighbour::Update {
                    ifindex: IFINDEX,
                    ip: OUR_IP,
                    mac: None
                },
                KernelNeighbour::Update {
                    ifindex: IFINDEX,
                    ip: OUR_IP,
                    mac: None
                },
                KernelNeighbour::Delete {
                    ifindex: 3,
                    ip: CLIENT_IP
                },
                KernelNeighbour::Error { errno: 19 },
            ]
        );
    }

    #[test]
    fn requests_are_well_formed() {
        let resolve = resolve_request(5, IFINDEX, CLIENT_IP);
        assert_eq!(resolve.len(), 36);
        assert_eq!(u32_ne(&resolve, 0), 36);
        assert_eq!(u16_ne(&resolve, 4), RTM_NEWNEIGH);
        assert_eq!(
            u16_ne(&resolve, 6),
            NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK
        );
        assert_eq!(u32_ne(&resolve, 8), 5);
        assert_eq!(u32_ne(&resolve, 20), IFINDEX);
        assert_eq!(resolve[26], NTF_USE);
        assert_eq!(&resolve[32..36], &CLIENT_IP.octets());
        let dump = dump_request(6);
        assert_eq!(dump.len(), 28);
        assert_eq!(u16_ne(&dump, 4), RTM_GETNEIGH);
        assert_eq!(u16_ne(&dump, 6), NLM_F_REQUEST | NLM_F_DUMP);
    }

    #[test]
    fn arp_replies_are_what_smoltcp_accepts() {
        use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetFrame};
        let frame = arp_reply_frame(OUR_MAC, OUR_IP, CLIENT_MAC, CLIENT_IP);
        let ethernet = EthernetFrame::new_checked(&frame[..]).unwrap();
        let arp = ArpRepr::parse(&ArpPacket::new_checked(ethernet.payload()).unwrap()).unwrap();
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = arp
        else {
            panic!("not Ethernet/IPv4: {arp:?}");
        };
        assert_eq!(operation, ArpOperation::Reply);
        assert_eq!(source_hardware_addr.0, CLIENT_MAC);
        assert_eq!(source_protocol_addr, CLIENT_IP);
        assert_eq!(target_protocol_addr, OUR_IP);
        assert!(is_arp(&frame));
        assert_eq!(arp_request_target(&frame), None, "a reply is not a request");
        let mut request = frame;
        request[20..22].copy_from_slice(&ARP_REQUEST.to_be_bytes());
        assert_eq!(arp_request_target(&request), Some(OUR_IP));
    }

    #[test]
    fn an_unknown_neighbour_is_resolved_then_answered_and_refreshed() {
        let mut table = Neighbours::new(IFINDEX, OUR_MAC, OUR_IP, 8);
        let at = Instant::from_millis;
        assert!(table.poll(at(0)).dump, "the first poll reads the table");
        assert!(!table.on_arp_request(CLIENT_IP, at(10)));
        let actions = table.poll(at(10));
        assert_eq!(actions.resolve, vec![CLIENT_IP]);
        assert!(actions.replies.is_empty() && !actions.dump);
        // Asked again only after the interval.
        assert!(table.poll(at(100)).resolve.is_empty());
        assert_eq!(table.poll(at(510)).resolve, vec![CLIENT_IP]);
        // Incomplete, then on another interface: still nothing to tell.
        table.on_kernel(KernelNeighbour::Update {
            ifindex: IFINDEX,
            ip: CLIENT_IP,
            mac: None,
        });
        table.on_kernel(KernelNeighbour::Update {
            ifindex: 9,
            ip: CLIENT_IP,
            mac: Some(CLIENT_MAC),
        });
        assert!(table.poll(at(600)).replies.is_empty());
        table.on_kernel(KernelNeighbour::Update {
            ifindex: IFINDEX,
            ip: CLIENT_IP,
            mac: Some(CLIENT_MAC),
        });
        let actions = table.poll(at(700));
        assert_eq!(
            actions.replies,
            vec![arp_reply_frame(OUR_MAC, OUR_IP, CLIENT_MAC, CLIENT_IP)]
        );
        assert!(actions.resolve.is_empty());
        let actions = table.poll(at(10_000));
        assert!(actions.replies.is_empty());
        assert!(actions.dump, "the table is read again every 10 s");
        assert_eq!(
            table.poll(at(20_700)).replies.len(),
            1,
            "refreshed before smoltcp forgets it"
        );
        assert!(!table.poll(at(20_800)).dump, "not read again before 10 s");
        // Gone from the kernel: no more refreshes.
        table.on_kernel(KernelNeighbour::Delete {
            ifindex: IFINDEX,
            ip: CLIENT_IP,
        });
        assert!(table.poll(at(60_000)).replies.is_empty());
        assert_eq!(table.counts().requests, 1);
        assert_eq!(table.counts().replies, 2);
    }

    #[test]
    fn a_known_neighbour_is_answered_at_once_and_wanted_ones_expire() {
        let mut table = Neighbours::new(IFINDEX, OUR_MAC, OUR_IP, 1);
        table.on_kernel(KernelNeighbour::Update {
            ifindex: IFINDEX,
            ip: CLIENT_IP,
            mac: Some(CLIENT_MAC),
        });
        table.on_arp_request(CLIENT_IP, Instant::from_millis(0));
        assert_eq!(table.poll(Instant::from_millis(0)).replies.len(), 1);
        // The limit: one wanted address at a time, one known entry.
        let other = Ipv4Addr::new(10, 77, 0, 9);
        assert!(!table.on_arp_request(other, Instant::from_millis(1)));
        assert!(table.on_arp_request(Ipv4Addr::new(10, 77, 0, 8), Instant::from_millis(1)));
        assert!(table.on_kernel(KernelNeighbour::Update {
            ifindex: IFINDEX,
            ip: other,
            mac: Some(CLIENT_MAC)
        }));
        assert_eq!(table.counts().table_full, 2);
        assert_eq!(table.poll(Instant::from_millis(2)).resolve, vec![other]);
        // Never resolved: given up after a while.
        table.poll(Instant::from_secs(11));
        assert!(table.poll(Instant::from_secs(12)).resolve.is_empty());
    }
}
