//! A non-blocking rtnetlink socket for the neighbour table: sends the requests
//! [`crate::neighbour`] builds and receives what the kernel says. The socket belongs to the
//! network namespace of the thread that opens it (open it where the interface is).
//!
//! Only the kernel's messages are taken: any local process with `CAP_NET_ADMIN` can
//! unicast to the socket's port, and a forged `RTM_NEWNEIGH` would steer a client's
//! segments to another MAC address.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::neighbour::{self, KernelNeighbour};

/// `RTMGRP_NEIGH`: the multicast group of neighbour table changes.
const RTMGRP_NEIGH: u32 = 0x4;
/// Receive buffer: a dump of a few hundred entries fits.
const RECEIVE_BUFFER_BYTES: usize = 64 * 1024;
/// Most `recv` calls per [`NeighbourSocket::receive`], so a chatty table cannot hold the loop.
const RECEIVES_PER_CALL: usize = 16;

/// The rtnetlink socket of the poll loop.
#[derive(Debug)]
pub struct NeighbourSocket {
    fd: OwnedFd,
    seq: u32,
    buffer: Vec<u8>,
}

impl NeighbourSocket {
    /// Opens a route netlink socket subscribed to neighbour changes.
    pub fn open() -> io::Result<NeighbourSocket> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all zeroes is a valid value.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        address.nl_groups = RTMGRP_NEIGH;
        // SAFETY: `address` is a valid sockaddr_nl of the size given.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&address).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NeighbourSocket {
            fd,
            seq: 0,
            buffer: vec![0; RECEIVE_BUFFER_BYTES],
        })
    }

    fn send(&mut self, message: &[u8]) -> io::Result<()> {
        self.send_to(message, 0)
    }

    /// Sends `message` to netlink port `port` (0: the kernel).
    fn send_to(&self, message: &[u8], port: u32) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain data; all zeroes addresses the kernel.
        let mut target: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        target.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        target.nl_pid = port;
        // SAFETY: `message` and `target` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                std::ptr::from_ref(&target).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Asks for the IPv4 neighbour table.
    pub fn request_dump(&mut self) -> io::Result<()> {
        let seq = self.next_seq();
        self.send(&neighbour::dump_request(seq))
    }

    /// Asks the kernel for its entry of `ip` on interface `ifindex`, and to resolve it.
    pub fn request_resolve(&mut self, ifindex: u32, ip: std::net::Ipv4Addr) -> io::Result<()> {
        let seq = self.next_seq();
        self.send(&neighbour::lookup_request(seq, ifindex, ip))?;
        let seq = self.next_seq();
        self.send(&neighbour::resolve_request(seq, ifindex, ip))
    }

    /// Appends what the kernel sent since the last call (never blocks). Returns how many
    /// datagrams came from elsewhere than the kernel (dropped).
    pub fn receive(&mut self, out: &mut Vec<KernelNeighbour>) -> io::Result<u64> {
        let mut foreign = 0;
        for _ in 0..RECEIVES_PER_CALL {
            // SAFETY: sockaddr_nl is plain data; all zeroes is a valid value.
            let mut sender: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut sender_len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: the buffer is valid for writes of its length, `sender` for writes of
            // `sender_len` bytes.
            let received = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    self.buffer.as_mut_ptr().cast(),
                    self.buffer.len(),
                    0,
                    std::ptr::from_mut(&mut sender).cast(),
                    &mut sender_len,
                )
            };
            if received < 0 {
                let error = io::Error::last_os_error();
                return match error.kind() {
                    io::ErrorKind::WouldBlock => Ok(foreign),
                    _ => Err(error),
                };
            }
            if sender.nl_pid != 0 {
                foreign += 1;
                continue;
            }
            let received = received as usize;
            neighbour::parse_messages(&self.buffer[..received], out);
        }
        Ok(foreign)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This socket's netlink port id.
    fn port_id(socket: &NeighbourSocket) -> u32 {
        // SAFETY: sockaddr_nl is plain data; all zeroes is a valid value.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `address` is valid for writes of `len` bytes.
        let done = unsafe {
            libc::getsockname(
                socket.fd.as_raw_fd(),
                std::ptr::from_mut(&mut address).cast(),
                &mut len,
            )
        };
        assert_eq!(done, 0, "getsockname: {}", io::Error::last_os_error());
        address.nl_pid
    }

    /// An RTM_NEWNEIGH for `ip` at `mac` on `ifindex`, reachable, as the kernel sends it.
    fn new_neighbour(ifindex: u32, ip: std::net::Ipv4Addr, mac: [u8; 6]) -> Vec<u8> {
        let mut body = vec![libc::AF_INET as u8, 0, 0, 0];
        body.extend_from_slice(&ifindex.to_ne_bytes());
        body.extend_from_slice(&2u16.to_ne_bytes()); // NUD_REACHABLE
        body.extend_from_slice(&[0, 1]);
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&1u16.to_ne_bytes()); // NDA_DST
        body.extend_from_slice(&ip.octets());
        body.extend_from_slice(&10u16.to_ne_bytes());
        body.extend_from_slice(&2u16.to_ne_bytes()); // NDA_LLADDR
        body.extend_from_slice(&mac);
        body.extend_from_slice(&[0, 0]);
        let mut message = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
        message.extend_from_slice(&libc::RTM_NEWNEIGH.to_ne_bytes());
        message.extend_from_slice(&[0; 10]);
        message.extend_from_slice(&body);
        message
    }

    #[test]
    fn messages_from_other_processes_are_dropped() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Unicast between netlink sockets needs CAP_NET_ADMIN.
            let _ = io::Write::write_all(&mut io::stderr(), b"skipped: needs root\n");
            return;
        }
        let mut broker = NeighbourSocket::open().expect("a netlink socket");
        let forger = NeighbourSocket::open().expect("another netlink socket");
        let forged_ip = std::net::Ipv4Addr::new(192, 0, 2, 77);
        let forged = new_neighbour(1, forged_ip, [2, 0, 0, 0, 0, 66]);
        forger
            .send_to(&forged, port_id(&broker))
            .expect("a unicast to the broker's socket");
        // The kernel's answer to a request for an interface that does not exist comes
        // after the forged message: once it is in, the forged one was seen.
        broker
            .request_resolve(u32::MAX - 1, forged_ip)
            .expect("a request");
        let mut messages = Vec::new();
        let mut foreign = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !messages.contains(&KernelNeighbour::Error {
            errno: libc::ENODEV,
        }) {
            assert!(std::time::Instant::now() < deadline, "{messages:?}");
            foreign += broker.receive(&mut messages).expect("receive");
        }
        assert_eq!(foreign, 1, "{messages:?}");
        let forged_taken = messages.iter().any(
            |message| matches!(message, KernelNeighbour::Update { ip, .. } if *ip == forged_ip),
        );
        assert!(!forged_taken, "{messages:?}");
    }
}
