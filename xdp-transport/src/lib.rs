//! The AF_XDP transport of the Embarcadero-rs broker: everything between the XDP program
//! (crate `xdp_prog`, which answers SYNs with cookies and steers the broker's connections
//! into AF_XDP sockets) and a userspace TCP stack (smoltcp) that a poll loop drives.
//!
//! - [`xsk`]: an AF_XDP socket owned directly: the UMEM, the fill, completion, rx and tx
//!   rings, bound to one interface queue in copy mode. With [`netlink`], the only module
//!   with `unsafe` code.
//! - [`device`]: the smoltcp device over the sockets of an interface's queues
//!   ([`device::XskDevice`], driven in bursts through [`device::Burst`]), with the
//!   sans-IO [`faults`] on its wire for the tests.
//! - [`hooks`]: what the device does to frames besides moving them, over the sans-IO
//!   [`cookie`] (the adoption of the program's SYN-cookie connections into smoltcp, and the
//!   translation that follows) and [`neighbour`] (smoltcp's neighbours from the kernel's
//!   table, asked over the [`netlink`] socket; ARP stays with the kernel).
//! - [`tcp`]: smoltcp's TCP sockets set up as the cookies need them.
//!
//! The crate knows nothing of the broker: its settings come in as plain structs
//! ([`xsk::XskGeometry`], [`hooks::HookConfig`]) and its counts go out as plain structs
//! ([`xsk::XskStats`], [`cookie::CookieCounts`], [`neighbour::NeighbourCounts`]) that the
//! broker copies into its metrics. See docs/xdp.md.

pub mod cookie;
pub mod device;
pub mod faults;
pub mod hooks;
pub mod neighbour;
pub mod netlink;
pub mod tcp;
pub mod xsk;
