//! A pair of private network namespaces joined by a veth pair, for the tests of the XDP
//! program here and of the AF_XDP transport (`xdp-transport/tests/steering`, which includes
//! this file and `common/mod.rs` by path).
//!
//! The pair removes what it created in `Drop`, also when the test fails; a namespace left by
//! a killed test run (its pid is gone) is removed by the next run.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::common::{in_netns, ip, run};

/// Prefix of every namespace the tests create.
const PREFIX: &str = "xdpt";

/// The client's address on the test veth.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The broker's steered address on the test veth.
pub const BROKER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// A second broker-side address that is not steered.
pub const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
/// MAC of the client end.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0x99, 0, 1];
/// MAC of the broker end.
pub const BROKER_MAC: [u8; 6] = [0x02, 0, 0, 0x99, 0, 2];

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Removes namespaces left by earlier runs of these tests that were killed.
fn remove_stale_namespaces() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Two namespaces, `client` and `broker`, joined by a veth pair with one rx/tx queue each:
/// `client_if` (CLIENT_IP/24) and `broker_if` (BROKER_IP/24 and OTHER_IP/24). IPv6 is off
/// and both sides have static neighbour entries, so the only packets on the wire are the
/// ones a test sends (and the ARP it provokes on purpose).
#[derive(Debug)]
pub struct Pair {
    /// The client namespace.
    pub client: String,
    /// The broker namespace.
    pub broker: String,
    /// The client end of the veth.
    pub client_if: String,
    /// The broker end of the veth.
    pub broker_if: String,
}

impl Pair {
    /// Creates the namespaces and the veth, with `mtu` on both ends.
    pub fn new(mtu: u32) -> Pair {
        static CLEAN: Once = Once::new();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        CLEAN.call_once(remove_stale_namespaces);
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pair = Pair {
            client: format!("{PREFIX}-{pid}-{n}-c"),
            broker: format!("{PREFIX}-{pid}-{n}-b"),
            client_if: format!("xc{}-{n}", pid % 1_000_000),
            broker_if: format!("xb{}-{n}", pid % 1_000_000),
        };
        // From here on, a failing step still removes what exists (Drop).
        for ns in [&pair.client, &pair.broker] {
            ip(&["netns", "add", ns]);
            run(Command::new("ip").args([
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]));
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let mtu = mtu.to_string();
        ip(&[
            "-n",
            &pair.broker,
            "link",
            "add",
            &pair.broker_if,
            "numrxqueues",
            "1",
            "numtxqueues",
            "1",
            "address",
            &mac_text(BROKER_MAC),
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            &pair.client_if,
            "numrxqueues",
            "1",
            "numtxqueues",
            "1",
            "address",
            &mac_text(CLIENT_MAC),
            "mtu",
            &mtu,
            "netns",
            &pair.client,
        ]);
        let configure = |ns: &str, ifname: &str, addresses: &[Ipv4Addr], peer: Ipv4Addr, mac| {
            for address in addresses {
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{address}/24"),
                    "dev",
                    ifname,
                ]);
            }
            ip(&["-n", ns, "link", "set", ifname, "up"]);
            ip(&[
                "-n",
                ns,
                "neigh",
                "replace",
                &peer.to_string(),
                "lladdr",
                &mac_text(mac),
                "dev",
                ifname,
                "nud",
                "permanent",
            ]);
        };
        configure(
            &pair.broker,
            &pair.broker_if,
            &[BROKER_IP, OTHER_IP],
            CLIENT_IP,
            CLIENT_MAC,
        );
        configure(
            &pair.client,
            &pair.client_if,
            &[CLIENT_IP],
            BROKER_IP,
            BROKER_MAC,
        );
        pair
    }

    /// Connects from the client namespace to `addr`, returning how it ended.
    pub fn connect(&self, addr: SocketAddrV4, timeout: Duration) -> io::ErrorKind {
        in_netns(&self.client, || {
            match TcpStream::connect_timeout(&addr.into(), timeout) {
                Ok(_) => io::ErrorKind::Other,
                Err(error) => error.kind(),
            }
        })
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Deleting the namespaces destroys the veth pair and any XDP program on it.
        for ns in [&self.client, &self.broker] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `addr:port` as a socket address.
pub fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}
