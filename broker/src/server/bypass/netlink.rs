//! A non-blocking rtnetlink socket for the neighbour table: sends the requests
//! [`super::neighbour`] builds and receives what the kernel says. The socket belongs to the
//! network namespace of the thread that opens it (open it where the interface is).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::neighbour::{self, KernelNeighbour};

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
        // SAFETY: sockaddr_nl is plain data; all zeroes addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `message` and `kernel` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                std::ptr::from_ref(&kernel).cast(),
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

    /// Asks the kernel to resolve `ip` on interface `ifindex`.
    pub fn request_resolve(&mut self, ifindex: u32, ip: std::net::Ipv4Addr) -> io::Result<()> {
        let seq = self.next_seq();
        self.send(&neighbour::resolve_request(seq, ifindex, ip))
    }

    /// Appends what the kernel sent since the last call (never blocks).
    pub fn receive(&mut self, out: &mut Vec<KernelNeighbour>) -> io::Result<()> {
        for _ in 0..RECEIVES_PER_CALL {
            // SAFETY: the buffer is valid for writes of its length.
            let received = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buffer.as_mut_ptr().cast(),
                    self.buffer.len(),
                    0,
                )
            };
            if received < 0 {
                let error = io::Error::last_os_error();
                return match error.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    _ => Err(error),
                };
            }
            let received = received as usize;
            neighbour::parse_messages(&self.buffer[..received], out);
        }
        Ok(())
    }
}
