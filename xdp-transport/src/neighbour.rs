//! Neighbours for smoltcp from the kernel's neighbour table (sans IO).
//!
//! ARP stays with the kernel (the XDP program passes it), so the host keeps its neighbours
//! and everything else on the broker's address keeps working. smoltcp 0.12 learns
//! neighbours only from ARP packets, so the device intercepts the ARP requests smoltcp
//! sends (they never reach the wire), [`Neighbours`] asks the kernel for its entry
//! (`RTM_GETNEIGH` for that address) and to resolve the address (`RTM_NEWNEIGH` with
//! `NTF_USE`), and once the kernel's entry has a link-layer address (reachable, stale,
//! delay, probe, permanent) hands smoltcp a synthesized ARP reply built from it. Replies are
//! repeated before smoltcp's cache entry expires (60 s) for the addresses a socket uses.
//!
//! Only the addresses smoltcp asked for or was told are kept: the kernel's table of a host
//! can hold far more neighbours than smoltcp will ever talk to.
//!
//! The netlink messages are built and parsed here; [`crate::netlink`] only moves bytes.

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
/// How often a neighbour a socket uses is told again (smoltcp forgets it after 60 s without
/// a packet from it).
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

/// `RTM_GETNEIGH` for the kernel's entry of `ip` on `ifindex`: answered at once with the
/// entry (`RTM_NEWNEIGH`), or with `ENOENT`. A resolution request alone says nothing when
/// the entry is already usable, and the next dump may be 10 s away.
pub fn lookup_request(seq: u32, ifindex: u32, ip: Ipv4Addr) -> Vec<u8> {
    message(RTM_GETNEIGH, NLM_F_REQUEST, seq, ifindex, 0, Some(ip))
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
    /// Addresses to ask the kernel about: its entry, and a resolution.
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
    /// Requests not tracked because [`Neighbours`] had as many wanted addresses as it holds.
    pub table_full: u64,
    /// Neighbours told but not tracked because sockets used as many addresses as smoltcp's
    /// neighbour cache holds (smoltcp then evicts one in use).
    pub cache_full: u64,
}

/// An address smoltcp needs.
#[derive(Debug, Clone, Copy)]
struct Wanted {
    since: Instant,
    asked_at: Option<Instant>,
}

/// The kernel's neighbours of one interface, as far as smoltcp needs them.
#[derive(Debug)]
pub struct Neighbours {
    ifindex: u32,
    our_mac: [u8; 6],
    our_ip: Ipv4Addr,
    /// Usable kernel entries of the addresses in `wanted` or `told`, and of no others.
    known: HashMap<Ipv4Addr, [u8; 6]>,
    /// Addresses smoltcp asked for and has not been told.
    wanted: HashMap<Ipv4Addr, Wanted>,
    /// Addresses smoltcp was told, and when (`None`: due again, the kernel's address
    /// changed).
    told: HashMap<Ipv4Addr, Option<Instant>>,
    wanted_max: usize,
    /// smoltcp's neighbour cache size: telling it more addresses evicts others.
    told_max: usize,
    dumped_at: Option<Instant>,
    counts: NeighbourCounts,
}

impl Neighbours {
    /// Neighbours of interface `ifindex`, for a smoltcp interface at `our_mac`/`our_ip`
    /// whose neighbour cache holds `told_max` addresses; at most `wanted_max` addresses are
    /// looked for at a time.
    pub fn new(
        ifindex: u32,
        our_mac: [u8; 6],
        our_ip: Ipv4Addr,
        wanted_max: usize,
        told_max: usize,
    ) -> Neighbours {
        Neighbours {
            ifindex,
            our_mac,
            our_ip,
            known: HashMap::new(),
            wanted: HashMap::new(),
            told: HashMap::new(),
            wanted_max,
            told_max,
            dumped_at: None,
            counts: NeighbourCounts::default(),
        }
    }

    /// What happened so far.
    pub fn counts(&self) -> NeighbourCounts {
        self.counts
    }

    /// Takes a message from the kernel (entries of addresses smoltcp does not need are
    /// ignored).
    pub fn on_kernel(&mut self, message: KernelNeighbour) {
        match message {
            KernelNeighbour::Update { ifindex, ip, mac } if ifindex == self.ifindex => match mac {
                Some(mac) => {
                    if !self.wanted.contains_key(&ip) && !self.told.contains_key(&ip) {
                        return;
                    }
                    let previous = self.known.insert(ip, mac);
                    if previous.is_some_and(|previous| previous != mac) {
                        // smoltcp must learn the new address at once.
                        if let Some(at) = self.told.get_mut(&ip) {
                            *at = None;
                        }
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
    }

    /// smoltcp asked who has `ip`. Returns whether the table of wanted addresses was full.
    pub fn on_arp_request(&mut self, ip: Ipv4Addr, now: Instant) -> bool {
        self.counts.requests += 1;
        // smoltcp lost it (expired or evicted): it is wanted again.
        self.told.remove(&ip);
        if self.wanted.contains_key(&ip) {
            return false;
        }
        if self.wanted.len() >= self.wanted_max {
            self.counts.table_full += 1;
            self.known.remove(&ip);
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
    /// due a refresh that a socket uses (`in_use`), requests to the kernel for the other
    /// wanted ones, and a dump when one is due. The second value says whether smoltcp's
    /// neighbour cache was full (a told address is then not refreshed).
    pub fn poll(&mut self, now: Instant, in_use: impl Fn(Ipv4Addr) -> bool) -> (Actions, bool) {
        let mut actions = Actions::default();
        let (our_mac, our_ip) = (self.our_mac, self.our_ip);
        let known = &self.known;
        let counts = &mut self.counts;
        let mut answered = Vec::new();
        self.wanted.retain(|ip, wanted| {
            if let Some(mac) = known.get(ip) {
                actions
                    .replies
                    .push(arp_reply_frame(our_mac, our_ip, *mac, *ip));
                counts.replies += 1;
                answered.push(*ip);
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
        let mut cache_full = false;
        for ip in answered {
            cache_full |= self.tell(ip, now, &in_use);
        }
        let (known, counts) = (&self.known, &mut self.counts);
        self.told.retain(|ip, at| {
            let Some(mac) = known.get(ip) else {
                return false;
            };
            match at {
                Some(told_at) if now - *told_at < REFRESH_INTERVAL => return true,
                // No socket uses it: smoltcp may forget it (refreshing it would evict one
                // that is in use when its cache is full).
                Some(_) if !in_use(*ip) => return false,
                _ => {}
            }
            actions
                .replies
                .push(arp_reply_frame(our_mac, our_ip, *mac, *ip));
            counts.replies += 1;
            *at = Some(now);
            true
        });
        let (wanted, told) = (&self.wanted, &self.told);
        self.known
            .retain(|ip, _| wanted.contains_key(ip) || told.contains_key(ip));
        if self.dumped_at.is_none_or(|at| now - at >= DUMP_INTERVAL) {
            self.dumped_at = Some(now);
            actions.dump = true;
        }
        (actions, cache_full)
    }

    /// smoltcp was told `ip`: it is refreshed from now on, in place of one no socket uses
    /// when as many are told as smoltcp's cache holds. Returns whether none could make
    /// room (counted; `ip` is then not refreshed).
    fn tell(&mut self, ip: Ipv4Addr, now: Instant, in_use: &impl Fn(Ipv4Addr) -> bool) -> bool {
        if self.told.len() >= self.told_max && !self.told.contains_key(&ip) {
            let unused = self.told.keys().copied().find(|told| !in_use(*told));
            match unused {
                Some(unused) => {
                    self.told.remove(&unused);
                }
                None => {
                    self.counts.cache_full += 1;
                    return true;
                }
            }
        }
        self.told.insert(ip, Some(now));
        false
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

    /// A kernel entry of `ip` with `mac` on our interface.
    fn usable(ip: Ipv4Addr, mac: [u8; 6]) -> KernelNeighbour {
        KernelNeighbour::Update {
            ifindex: IFINDEX,
            ip,
            mac: Some(mac),
        }
    }

    /// Polls with every address in use.
    fn poll(table: &mut Neighbours, at: Instant) -> Actions {
        table.poll(at, |_| true).0
    }

    #[test]
    fn requests_for_one_entry_are_well_formed() {
        let lookup = lookup_request(9, IFINDEX, CLIENT_IP);
        assert_eq!(lookup.len(), 36);
        assert_eq!(u16_ne(&lookup, 4), RTM_GETNEIGH);
        assert_eq!(u16_ne(&lookup, 6), NLM_F_REQUEST, "one entry, not a dump");
        assert_eq!(u32_ne(&lookup, 20), IFINDEX);
        // The kernel refuses a get with a state, flags or type set.
        assert_eq!(&lookup[24..28], &[0; 4]);
        assert_eq!(&lookup[32..36], &CLIENT_IP.octets());
    }

    #[test]
    fn an_unknown_neighbour_is_resolved_then_answered_and_refreshed() {
        let mut table = Neighbours::new(IFINDEX, OUR_MAC, OUR_IP, 8, 8);
        let at = Instant::from_millis;
        assert!(
            poll(&mut table, at(0)).dump,
            "the first poll reads the table"
        );
        assert!(!table.on_arp_request(CLIENT_IP, at(10)));
        let actions = poll(&mut table, at(10));
        assert_eq!(actions.resolve, vec![CLIENT_IP]);
        assert!(actions.replies.is_empty() && !actions.dump);
        // Asked again only after the interval.
        assert!(poll(&mut table, at(100)).resolve.is_empty());
        assert_eq!(poll(&mut table, at(510)).resolve, vec![CLIENT_IP]);
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
        assert!(poll(&mut table, at(600)).replies.is_empty());
        table.on_kernel(usable(CLIENT_IP, CLIENT_MAC));
        let actions = poll(&mut table, at(700));
        assert_eq!(
            actions.replies,
            vec![arp_reply_frame(OUR_MAC, OUR_IP, CLIENT_MAC, CLIENT_IP)]
        );
        assert!(actions.resolve.is_empty());
        let actions = poll(&mut table, at(10_000));
        assert!(actions.replies.is_empty());
        assert!(actions.dump, "the table is read again every 10 s");
        assert_eq!(
            poll(&mut table, at(20_700)).replies.len(),
            1,
            "refreshed before smoltcp forgets it"
        );
        assert!(
            !poll(&mut table, at(20_800)).dump,
            "not read again before 10 s"
        );
        // A new address is told at once.
        let moved = [2, 0, 0, 0, 0, 7];
        table.on_kernel(usable(CLIENT_IP, moved));
        assert_eq!(
            poll(&mut table, at(20_900)).replies,
            vec![arp_reply_frame(OUR_MAC, OUR_IP, moved, CLIENT_IP)]
        );
        // Gone from the kernel: no more refreshes.
        table.on_kernel(KernelNeighbour::Delete {
            ifindex: IFINDEX,
            ip: CLIENT_IP,
        });
        assert!(poll(&mut table, at(60_000)).replies.is_empty());
        assert_eq!(table.counts().requests, 1);
        assert_eq!(table.counts().replies, 3);
    }

    #[test]
    fn a_neighbour_is_found_among_more_kernel_entries_than_the_table_holds() {
        // The periodic dump of a host with many neighbours: none of them is kept, so the
        // one smoltcp asks for later still is.
        let mut table = Neighbours::new(IFINDEX, OUR_MAC, OUR_IP, 2, 2);
        for host in 10..=200u8 {
            table.on_kernel(usable(
                Ipv4Addr::new(10, 77, 0, host),
                [2, 0, 0, 0, 1, host],
            ));
        }
        let at = Instant::from_millis;
        assert!(!table.on_arp_request(CLIENT_IP, at(0)));
        let actions = poll(&mut table, at(0));
        assert_eq!(actions.resolve, vec![CLIENT_IP], "the kernel is asked");
        // Its answer (to the lookup, or the next dump) is taken.
        table.on_kernel(usable(CLIENT_IP, CLIENT_MAC));
        assert_eq!(
            poll(&mut table, at(1)).replies,
            vec![arp_reply_frame(OUR_MAC, OUR_IP, CLIENT_MAC, CLIENT_IP)]
        );
        // An address the dump had is answered too, once it is wanted.
        let other = Ipv4Addr::new(10, 77, 0, 42);
        assert!(!table.on_arp_request(other, at(2)));
        assert_eq!(poll(&mut table, at(2)).resolve, vec![other]);
        table.on_kernel(usable(other, [2, 0, 0, 0, 1, 42]));
        assert_eq!(poll(&mut table, at(3)).replies.len(), 1);
        assert_eq!(table.counts().table_full, 0);
        assert_eq!(table.counts().cache_full, 0);
    }

    #[test]
    fn wanted_addresses_are_limited_and_expire() {
        let mut table = Neighbours::new(IFINDEX, OUR_MAC, OUR_IP, 1, 8);
        let other = Ipv4Addr::new(10, 77, 0, 9);
        assert!(!table.on_arp_request(other, Instant::from_millis(1)));
        assert!(table.on_arp_request(Ipv4Addr::new(10, 77, 0, 8), Instant::from_millis(1)));
        assert_eq!(table.counts().table_full, 1);
        assert_eq!(
            poll(&mut table, Instant::from_millis(2)).resolve,
            vec![other]
        );
        // Never resolved: given up after a while.
        poll(&mut table, Instant::from_secs(11));
        assert!(poll(&mut table, Instant::from_secs(12)).resolve.is_empty());
    }

    #[test]
    fn only_addresses_in_use_are_refreshed_and_no_more_than_smoltcp_holds() {
        let mut table = Neighbours::new(IFINDEX, OUR_MAC, OUR_IP, 8, 2);
        let host = |n| Ipv4Addr::new(10, 77, 0, n);
        let mac = |n| [2, 0, 0, 0, 1, n];
        let tell = |table: &mut Neighbours, n, at, in_use: &dyn Fn(Ipv4Addr) -> bool| {
            table.on_arp_request(host(n), at);
            table.on_kernel(usable(host(n), mac(n)));
            table.poll(at, in_use)
        };
        let at = Instant::from_millis;
        let every = |_: Ipv4Addr| true;
        assert!(!tell(&mut table, 1, at(0), &every).1);
        assert!(!tell(&mut table, 2, at(0), &every).1);
        // smoltcp's cache is full of addresses in use: the third one is told (smoltcp
        // evicts one), and counted.
        let (actions, cache_full) = tell(&mut table, 3, at(0), &every);
        assert_eq!(actions.replies.len(), 1);
        assert!(cache_full);
        assert_eq!(table.counts().cache_full, 1);
        // Host 2's connections ended: a new host takes its place.
        let not_two = |ip: Ipv4Addr| ip != host(2);
        assert!(!tell(&mut table, 4, at(1), &not_two).1);
        // At the refresh, only the hosts in use are told again: host 1 (host 4 was told
        // later), not host 2 (evicted from the table) nor host 3 (never tracked).
        let (actions, _) = table.poll(at(20_000), not_two);
        assert_eq!(
            actions.replies,
            vec![arp_reply_frame(OUR_MAC, OUR_IP, mac(1), host(1))]
        );
        // A host no socket uses any more is not refreshed.
        let only_four = |ip: Ipv4Addr| ip == host(4);
        let (actions, _) = table.poll(at(20_001), only_four);
        assert_eq!(
            actions.replies,
            vec![arp_reply_frame(OUR_MAC, OUR_IP, mac(4), host(4))]
        );
        let (actions, _) = table.poll(at(40_001), only_four);
        assert_eq!(actions.replies.len(), 1, "host 4 only");
        assert_eq!(table.counts().cache_full, 1);
    }

    /// A smoltcp device that keeps what is sent and hands over what is queued.
    #[derive(Default)]
    struct Wire {
        received: std::collections::VecDeque<Vec<u8>>,
        sent: Vec<Vec<u8>>,
    }

    struct Frame(Vec<u8>);

    impl smoltcp::phy::RxToken for Frame {
        fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
            f(&self.0)
        }
    }

    struct Transmit<'a>(&'a mut Vec<Vec<u8>>);

    impl smoltcp::phy::TxToken for Transmit<'_> {
        fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
            let mut frame = vec![0; len];
            let result = f(&mut frame);
            self.0.push(frame);
            result
        }
    }

    impl smoltcp::phy::Device for Wire {
        type RxToken<'a> = Frame;
        type TxToken<'a> = Transmit<'a>;

        fn receive(&mut self, _: Instant) -> Option<(Frame, Transmit<'_>)> {
            let frame = self.received.pop_front()?;
            Some((Frame(frame), Transmit(&mut self.sent)))
        }

        fn transmit(&mut self, _: Instant) -> Option<Transmit<'_>> {
            Some(Transmit(&mut self.sent))
        }

        fn capabilities(&self) -> smoltcp::phy::DeviceCapabilities {
            let mut caps = smoltcp::phy::DeviceCapabilities::default();
            caps.medium = smoltcp::phy::Medium::Ethernet;
            caps.max_transmission_unit = 1514;
            caps
        }
    }

    #[test]
    fn smoltcp_keeps_every_neighbour_the_sockets_of_the_default_pool_can_use() {
        use smoltcp::iface::{Config, Interface, SocketSet};
        use smoltcp::socket::tcp;
        use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
        // One client host per socket of a pool as large as the hooks track neighbours
        // for by default (max(--xdp-sockets, 64)); smoltcp 0.12's own default cache holds 8.
        let hosts: u8 = 64;
        let mut wire = Wire::default();
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(OUR_MAC)));
        let mut iface = Interface::new(config, &mut wire, Instant::ZERO);
        iface.update_ip_addrs(|addresses| {
            addresses
                .push(IpCidr::new(IpAddress::Ipv4(OUR_IP), 24))
                .expect("room for one address");
        });
        let host = |n: u8| Ipv4Addr::new(10, 77, 0, 100 + n);
        for n in 0..hosts {
            let reply = arp_reply_frame(OUR_MAC, OUR_IP, [2, 0, 0, 0, 1, n], host(n));
            wire.received.push_back(reply.to_vec());
        }
        let mut sockets = SocketSet::new(Vec::new());
        let now = Instant::from_millis(1);
        iface.poll(now, &mut wire, &mut sockets);
        for n in 0..hosts {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 64]),
                tcp::SocketBuffer::new(vec![0; 64]),
            );
            let remote = (IpAddress::Ipv4(host(n)), 9000);
            socket
                .connect(iface.context(), remote, 40_000 + u16::from(n))
                .expect("a free socket connects");
            sockets.add(socket);
        }
        iface.poll(now, &mut wire, &mut sockets);
        let arp_requests = wire.sent.iter().filter(|frame| is_arp(frame)).count();
        let syns = wire.sent.len() - arp_requests;
        assert_eq!(
            (syns, arp_requests),
            (usize::from(hosts), 0),
            "every SYN found its neighbour (smoltcp's cache holds {})",
            smoltcp::config::IFACE_NEIGHBOR_CACHE_COUNT
        );
    }
}
