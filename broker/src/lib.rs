//! The Embarcadero-rs broker: the servers that put the log core (`shared_log`) on a network.
//! Both network backends (kernel TCP, and XDP + AF_XDP + smoltcp) drive one sans-IO
//! connection state machine ([`server::connection`]); around it live the broker's state, the
//! deadlines and limits, replication, broker-id ownership, metrics and the `broker` binary.
//! See docs/architecture.md.

pub mod metrics;
pub mod region;
pub mod server;
