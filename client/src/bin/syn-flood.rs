//! `syn-flood`: spoofed TCP SYNs as fast as one core sends them, for the SYN-flood test of
//! the XDP backend (`scripts/test-bypass.sh syn-flood`). See `syn-flood --help`.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

const ABOUT: &str = "Sends TCP SYNs from random spoofed addresses and ports of --source-prefix \
to --target as fast as one core can (a raw IPv4 socket, sendmmsg batches) for --duration-s, \
then prints a JSON report. For test labs only.";

const AFTER_HELP: &str = "\
SAFETY
  The SYNs carry forged source addresses. syn-flood runs only in a named network namespace
  (one that `ip netns add` made, under /run/netns), never in the host's: run it with
  `ip netns exec NS` in a namespace a test made, towards a broker of that lab
  (scripts/test-bypass.sh syn-flood does). Needs root (CAP_NET_RAW for the raw socket).

PACKETS
  IPv4 with DF, TCP SYN with the options Linux sends (MSS 1460, SACK permitted, timestamps,
  window scale 7), correct checksums; source address uniform over --source-prefix, source
  port over 1024-65535, sequence number and tsval random (seeded, --seed).

JSON (stdout, and --json FILE)
  namespace (the named network namespace it ran in), target, source_prefix, batch, packets_sent (taken by the kernel), send_errors (refused
  by it, e.g. ENOBUFS when the peer's queue is full, or not taken by a call that sent
  nothing; counted, not retried), seconds, pps (packets_sent / seconds).

EXIT CODE
  0 when the flood ran; 1 when it could not (no root, not in a named namespace, socket
  errors); 2 for bad flags.";

/// Bytes of a SYN: a 20-byte IPv4 header and a 40-byte TCP header with options.
const SYN_BYTES: usize = 60;
const IPV4_HEADER: usize = 20;
const PROTOCOL_TCP: u8 = 6;

#[derive(Debug, Parser)]
#[command(name = "syn-flood", version, about = ABOUT, after_long_help = AFTER_HELP)]
struct Cli {
    /// The address and port to flood (IPV4:PORT).
    #[arg(long)]
    target: SocketAddrV4,
    /// Where the forged sources come from: an IPv4 prefix (A.B.C.D/N, N from 8 to 32).
    #[arg(long)]
    source_prefix: Prefix,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
    duration_s: f64,
    /// SYNs per sendmmsg call.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    batch: u16,
    /// Seed of the random sources, sequence numbers and timestamps.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds <= 3600.0 => Ok(seconds),
        _ => Err(format!(
            "{text:?} is not a duration in seconds (more than 0, at most 3600)"
        )),
    }
}

/// An IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prefix {
    base: u32,
    len: u8,
}

impl Prefix {
    /// The address at `index` (taken modulo the prefix's size).
    fn address(self, index: u64) -> Ipv4Addr {
        let host_bits = 32 - u32::from(self.len);
        let host = index & ((1u64 << host_bits) - 1);
        Ipv4Addr::from(self.base | host as u32)
    }
}

impl FromStr for Prefix {
    type Err = String;

    fn from_str(text: &str) -> Result<Prefix, String> {
        let bad = || format!("{text:?} is not an IPv4 prefix A.B.C.D/N with N from 8 to 32");
        let (address, len) = text.split_once('/').ok_or_else(bad)?;
        let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        if !(8..=32).contains(&len) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - u32::from(len));
        Ok(Prefix {
            base: u32::from(address) & mask,
            len,
        })
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.len)
    }
}

/// Why the flood did not run.
#[derive(Debug, thiserror::Error)]
enum FloodError {
    #[error(
        "refusing to run outside a named network namespace (none under {NAMED_NAMESPACES} is this one): syn-flood forges source addresses and is for test labs only; run it with `ip netns exec NS` in a namespace the test made"
    )]
    NotNamed,
    #[error(
        "cannot tell which network namespace this is ({path}: {source}); syn-flood runs only in a named namespace it can recognise"
    )]
    Namespace { path: String, source: io::Error },
    #[error("cannot open a raw IPv4 socket ({0}): syn-flood needs root (CAP_NET_RAW)")]
    Socket(io::Error),
    #[error("sendmmsg to {target} failed: {source}")]
    Send {
        target: SocketAddrV4,
        source: io::Error,
    },
    #[error("cannot write the JSON report to {path}: {source}")]
    Json { path: PathBuf, source: io::Error },
}

/// The report.
#[derive(Debug, Serialize)]
struct Report {
    namespace: String,
    target: String,
    source_prefix: String,
    batch: u16,
    packets_sent: u64,
    send_errors: u64,
    seconds: f64,
    pps: f64,
}

/// xorshift64*: fast and good enough for forged headers.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The one's complement sum of `bytes` (16-bit big-endian words) added to `sum`, folded.
fn sum16(bytes: &[u8], mut sum: u32) -> u16 {
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([
            pair[0],
            pair.get(1).copied().unwrap_or(0),
        ]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// A SYN from `source` to `target`, as Linux would send it.
fn syn_packet(source: SocketAddrV4, target: SocketAddrV4, seq: u32, tsval: u32) -> [u8; SYN_BYTES] {
    let mut packet = [0u8; SYN_BYTES];
    let (ip, tcp) = packet.split_at_mut(IPV4_HEADER);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(SYN_BYTES as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = PROTOCOL_TCP;
    ip[12..16].copy_from_slice(&source.ip().octets());
    ip[16..20].copy_from_slice(&target.ip().octets());
    let check = !sum16(ip, 0);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    tcp[0..2].copy_from_slice(&source.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&target.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = ((SYN_BYTES - IPV4_HEADER) / 4) as u8 * 16;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    // MSS 1460, SACK permitted, timestamps, NOP, window scale 7.
    tcp[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
    tcp[24..26].copy_from_slice(&[4, 2]);
    tcp[26..28].copy_from_slice(&[8, 10]);
    tcp[28..32].copy_from_slice(&tsval.to_be_bytes());
    tcp[36..40].copy_from_slice(&[1, 3, 3, 7]);
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&source.ip().octets());
    pseudo[4..8].copy_from_slice(&target.ip().octets());
    pseudo[9] = PROTOCOL_TCP;
    pseudo[10..12].copy_from_slice(&((SYN_BYTES - IPV4_HEADER) as u16).to_be_bytes());
    let check = !sum16(tcp, u32::from(sum16(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    packet
}

/// Fills `batch` with SYNs from random sources of `prefix`.
fn fill_batch(batch: &mut [[u8; SYN_BYTES]], rng: &mut Rng, prefix: Prefix, target: SocketAddrV4) {
    for packet in batch {
        let (a, b) = (rng.next(), rng.next());
        let port = 1024 + (a >> 48) as u16 % (u16::MAX - 1023);
        let source = SocketAddrV4::new(prefix.address(a), port);
        *packet = syn_packet(source, target, b as u32, (b >> 32) as u32);
    }
}

/// Where `ip netns add` mounts the namespaces it makes.
const NAMED_NAMESPACES: &str = "/run/netns";

/// The name of the named network namespace this process runs in (see [`NAMED_NAMESPACES`]).
fn named_namespace() -> Result<String, FloodError> {
    let identity = |path: &std::path::Path| {
        std::fs::metadata(path)
            .map(|meta| (meta.dev(), meta.ino()))
            .map_err(|source| FloodError::Namespace {
                path: path.display().to_string(),
                source,
            })
    };
    let ours = identity("/proc/self/ns/net".as_ref())?;
    let Ok(entries) = std::fs::read_dir(NAMED_NAMESPACES) else {
        return Err(FloodError::NotNamed);
    };
    for entry in entries.flatten() {
        if identity(&entry.path()).is_ok_and(|named| named == ours) {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Err(FloodError::NotNamed)
}

/// Makes the kernel say ENOBUFS when a SYN is dropped on the way out (the veth peer's queue
/// is full); a raw socket swallows that error unless IP_RECVERR is on.
fn report_queue_drops(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the option value is a live c_int and its exact size is passed.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What one sendmmsg call did to the rest of a batch.
#[derive(Debug, PartialEq, Eq)]
struct Step {
    /// Packets the kernel took.
    sent: u64,
    /// Packets lost: refused by the kernel, or not taken by a call that sent nothing.
    errors: u64,
    /// How many packets of the batch are done with.
    done: usize,
}

/// Accounts for a sendmmsg `result`: every packet is sent or counted as an error, and the
/// batch always moves on. Errors other than a full queue end the flood.
fn step(result: io::Result<usize>) -> io::Result<Step> {
    match result {
        Ok(0) => Ok(Step {
            sent: 0,
            errors: 1,
            done: 1,
        }),
        Ok(sent) => Ok(Step {
            sent: sent as u64,
            errors: 0,
            done: sent,
        }),
        // The peer's queue was full (veth drops, the stack says ENOBUFS): that SYN is lost;
        // count it and go on with the next.
        Err(error)
            if matches!(
                error.raw_os_error(),
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR)
            ) =>
        {
            Ok(Step {
                sent: 0,
                errors: 1,
                done: 1,
            })
        }
        Err(error) => Err(error),
    }
}

/// Sends `packets` to `target` in one sendmmsg call: returns how many the kernel took, or
/// the error that stopped the first.
fn send_batch(
    socket: &Socket,
    target: SocketAddrV4,
    packets: &mut [[u8; SYN_BYTES]],
) -> io::Result<usize> {
    let mut address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: target.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*target.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut iovecs: Vec<libc::iovec> = packets
        .iter_mut()
        .map(|packet| libc::iovec {
            iov_base: packet.as_mut_ptr().cast(),
            iov_len: SYN_BYTES,
        })
        .collect();
    let mut messages: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iovec| {
            // SAFETY: msghdr is a plain C struct for which all zeroes is a valid value (no
            // name, no iovecs, no control data); the fields that matter are set below.
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_name = (&raw mut address).cast();
            header.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            header.msg_iov = iovec;
            header.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: header,
                msg_len: 0,
            }
        })
        .collect();
    // SAFETY: every mmsghdr points at `address`, one iovec and its packet, all alive and
    // unmoved until the call returns; the length passed is the vector's.
    let sent = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            messages.as_mut_ptr(),
            messages.len() as libc::c_uint,
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

fn flood(cli: &Cli) -> Result<Report, FloodError> {
    let namespace = named_namespace()?;
    let socket = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .map_err(FloodError::Socket)?;
    report_queue_drops(&socket).map_err(FloodError::Socket)?;
    let mut rng = Rng::new(cli.seed);
    let mut batch = vec![[0u8; SYN_BYTES]; usize::from(cli.batch)];
    let (mut packets_sent, mut send_errors) = (0u64, 0u64);
    let duration = Duration::from_secs_f64(cli.duration_s);
    let started = Instant::now();
    while started.elapsed() < duration {
        fill_batch(&mut batch, &mut rng, cli.source_prefix, cli.target);
        let mut next = 0;
        while next < batch.len() {
            let result = send_batch(&socket, cli.target, &mut batch[next..]);
            let done = step(result).map_err(|source| FloodError::Send {
                target: cli.target,
                source,
            })?;
            packets_sent += done.sent;
            send_errors += done.errors;
            next += done.done;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Report {
        namespace,
        target: cli.target.to_string(),
        source_prefix: cli.source_prefix.to_string(),
        batch: cli.batch,
        packets_sent,
        send_errors,
        seconds,
        pps: packets_sent as f64 / seconds,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let report = match flood(&cli) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("syn-flood: {error}");
            return ExitCode::from(1);
        }
    };
    let json = serde_json::to_string(&report).unwrap_or_default();
    println!("{json}");
    if let Some(path) = &cli.json {
        if let Err(source) = std::fs::write(path, format!("{json}\n")) {
            eprintln!(
                "syn-flood: {}",
                FloodError::Json {
                    path: path.clone(),
                    source
                }
            );
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), 9700);

    #[test]
    fn every_packet_is_sent_or_counted_as_an_error() {
        let step = |result| step(result).expect("not fatal");
        assert_eq!(
            step(Ok(5)),
            Step {
                sent: 5,
                errors: 0,
                done: 5
            }
        );
        // A call that took nothing: the packet is counted, and the batch moves on.
        assert_eq!(
            step(Ok(0)),
            Step {
                sent: 0,
                errors: 1,
                done: 1
            }
        );
        assert_eq!(
            step(Err(io::Error::from_raw_os_error(libc::ENOBUFS))),
            Step {
                sent: 0,
                errors: 1,
                done: 1
            }
        );
        let fatal = super::step(Err(io::Error::from_raw_os_error(libc::EPERM)));
        assert_eq!(fatal.map_err(|e| e.raw_os_error()), Err(Some(libc::EPERM)));
    }

    #[test]
    fn prefixes_parse_and_nonsense_does_not() {
        let prefix: Prefix = "10.77.0.77/26".parse().unwrap();
        assert_eq!(prefix.to_string(), "10.77.0.64/26");
        assert_eq!(prefix.address(0), Ipv4Addr::new(10, 77, 0, 64));
        assert_eq!(prefix.address(63 + 64 * 5), Ipv4Addr::new(10, 77, 0, 127));
        let single: Prefix = "10.1.2.3/32".parse().unwrap();
        assert_eq!(single.address(u64::MAX), Ipv4Addr::new(10, 1, 2, 3));
        for bad in [
            "10.0.0.0",
            "10.0.0.0/7",
            "10.0.0.0/33",
            "ten/24",
            "10.0.0/24",
        ] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
    }

    #[test]
    fn syns_have_valid_checksums_and_linux_options() {
        let source = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 99), 40_000);
        let packet = syn_packet(source, TARGET, 0x1234_5678, 0x9abc_def0);
        assert_eq!(sum16(&packet[..IPV4_HEADER], 0), 0xffff, "IPv4 checksum");
        // Source and destination addresses, zero, protocol, TCP length.
        let mut pseudo = [0u8; 12];
        pseudo[0..8].copy_from_slice(&packet[12..20]);
        pseudo[9] = PROTOCOL_TCP;
        pseudo[11] = 40;
        let tcp = &packet[IPV4_HEADER..];
        assert_eq!(
            sum16(tcp, u32::from(sum16(&pseudo, 0))),
            0xffff,
            "TCP checksum"
        );
        assert_eq!(tcp[13], 0x02, "SYN only");
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 40_000);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 9700);
        assert_eq!(&tcp[28..32], &0x9abc_def0u32.to_be_bytes(), "tsval");
    }

    #[test]
    fn sources_stay_in_the_prefix_and_vary() {
        let prefix: Prefix = "10.77.0.64/26".parse().unwrap();
        let mut batch = vec![[0u8; SYN_BYTES]; 256];
        fill_batch(&mut batch, &mut Rng::new(7), prefix, TARGET);
        let sources: std::collections::HashSet<_> = batch
            .iter()
            .map(|packet| {
                let ip = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
                assert_eq!(u32::from(ip) & !63, u32::from(Ipv4Addr::new(10, 77, 0, 64)));
                let port = u16::from_be_bytes([packet[20], packet[21]]);
                assert!(port >= 1024);
                (ip, port)
            })
            .collect();
        assert!(sources.len() > 250, "{} distinct sources", sources.len());
    }
}
