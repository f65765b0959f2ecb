//! The one error type of this crate.

use crate::AttachMode;

/// Everything that can go wrong when loading, attaching, configuring or inspecting the
/// steering program. Every message names the interface, queue or file involved and says
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// The interface does not exist in the calling thread's network namespace.
    #[error(
        "network interface {name:?} does not exist in this network namespace; \
         interfaces here: {existing}; check the name, or run inside the namespace that \
         holds it (e.g. `ip netns exec emb-broker ...` for the lab)"
    )]
    InterfaceMissing {
        /// The name that was asked for.
        name: String,
        /// The interfaces that do exist here, comma separated.
        existing: String,
    },

    /// The steering configuration cannot be used.
    #[error(
        "unusable steering config: {reason}; give 1 to {max_ports} non-zero TCP ports and \
         1 to {max_ips} IPv4 addresses",
        max_ports = crate::MAX_PORTS,
        max_ips = crate::MAX_IPS
    )]
    InvalidConfig {
        /// What is wrong with it.
        reason: String,
    },

    /// The interface already has an XDP program (ours from a crashed broker, or another).
    #[error(
        "interface {ifname} already has an XDP program attached (id {prog_id}, name \
         {prog_name:?}, {mode} mode); only one program per interface is possible. If it is \
         the leftover of a crashed broker, remove it with `xdp-ctl detach {ifname}` (or \
         `ip link set dev {ifname} xdp off`) and attach again"
    )]
    AlreadyAttached {
        /// The interface.
        ifname: String,
        /// The kernel id of the program already there.
        prog_id: u32,
        /// Its name as the kernel reports it (empty if it could not be read).
        prog_name: String,
        /// How it is attached.
        mode: AttachedMode,
    },

    /// The kernel refused to attach the program.
    #[error("{}", attach_refused(ifname, *asked, driver.as_deref(), generic.as_deref()))]
    AttachRefused {
        /// The interface.
        ifname: String,
        /// The mode that was asked for.
        asked: AttachMode,
        /// Why driver mode failed (errno text and kernel message), if it was tried.
        driver: Option<String>,
        /// Why generic mode failed, if it was tried.
        generic: Option<String>,
    },

    /// libbpf could not open or load the BPF object (verifier, permissions, kernel support).
    #[error(
        "loading the XDP steering program into the kernel failed while {stage}: {source}; \
         this needs root (CAP_BPF and CAP_NET_ADMIN) and a kernel with XDP and XSKMAP \
         support (the verifier log, if any, is in the log output of target `libbpf`)"
    )]
    Load {
        /// What was being done.
        stage: &'static str,
        /// libbpf's error.
        source: libbpf_rs::Error,
    },

    /// A BPF map operation failed.
    #[error("{op} on BPF map {map} failed: {source}")]
    Map {
        /// The map.
        map: &'static str,
        /// What was being done.
        op: String,
        /// libbpf's error.
        source: libbpf_rs::Error,
    },

    /// The `flows` map has no room for another flow.
    #[error(
        "cannot open flow {flow}: the XDP program's flows map is full ({max} flows); \
         flows of ended connections were not removed, or more connections are open than \
         SteerConfig::flows_max allows: raise it"
    )]
    FlowTableFull {
        /// The flow.
        flow: String,
        /// The map's size.
        max: u32,
    },

    /// The rx queue already has an AF_XDP socket in the socket map.
    #[error(
        "rx queue {queue} of {ifname} already has an AF_XDP socket registered (a second \
         broker on the same queue?); call unregister_socket({queue}) or close that socket \
         first, or bind this socket to another queue"
    )]
    QueueTaken {
        /// The interface.
        ifname: String,
        /// The rx queue.
        queue: u32,
    },

    /// The rx queue index does not fit the socket map.
    #[error(
        "rx queue {queue} is outside the socket map of this program (queues 0 to {}); \
         use a queue that {ifname} has (see queue_count)",
        crate::MAX_QUEUES - 1
    )]
    QueueOutOfRange {
        /// The interface.
        ifname: String,
        /// The rx queue asked for.
        queue: u32,
    },

    /// The kernel did not accept the file descriptor as an AF_XDP socket.
    #[error(
        "registering fd {fd} for rx queue {queue} of {ifname} failed: {source}; the fd must \
         be an open AF_XDP socket (socket(AF_XDP, SOCK_RAW, 0))"
    )]
    RegisterSocket {
        /// The interface.
        ifname: String,
        /// The rx queue.
        queue: u32,
        /// The file descriptor passed in.
        fd: i32,
        /// libbpf's error.
        source: libbpf_rs::Error,
    },

    /// Asking the kernel which XDP program an interface has failed.
    #[error("querying the XDP program of {ifname} failed: {source}; this needs CAP_NET_ADMIN")]
    Query {
        /// The interface.
        ifname: String,
        /// The errno.
        source: std::io::Error,
    },

    /// Removing an XDP program failed.
    #[error(
        "detaching the XDP program ({mode} mode) from {ifname} failed: {source}; try \
         `ip link set dev {ifname} xdp off` (or `xdpgeneric off`) as root"
    )]
    Detach {
        /// The interface.
        ifname: String,
        /// The mode that was being removed.
        mode: AttachedMode,
        /// The errno.
        source: std::io::Error,
    },

    /// A sysfs file could not be read or parsed.
    #[error("reading {path} failed: {reason}")]
    Sysfs {
        /// The file or directory.
        path: String,
        /// What went wrong.
        reason: String,
    },

    /// `/sys/class/net` shows another network namespace than the calling thread's.
    #[error(
        "/sys/class/net does not show {ifname} of this network namespace (sysfs was mounted \
         in another namespace); run the command with `ip netns exec NAMESPACE ...`, which \
         mounts the namespace's own sysfs"
    )]
    SysfsOtherNamespace {
        /// The interface.
        ifname: String,
    },

    /// The program attached to the interface is not this crate's steering program.
    #[error(
        "the XDP program on {ifname} is {prog_name:?} (id {prog_id}), not the Embarcadero \
         steering program {expected:?}, so its counters cannot be read here",
        expected = crate::PROGRAM_NAME
    )]
    ForeignProgram {
        /// The interface.
        ifname: String,
        /// The attached program's id.
        prog_id: u32,
        /// The attached program's name.
        prog_name: String,
    },

    /// The interface has no XDP program.
    #[error("interface {ifname} has no XDP program attached")]
    NotAttached {
        /// The interface.
        ifname: String,
    },

    /// The counters map does not have the layout this crate expects.
    #[error(
        "the counters map holds {got} bytes per CPU, expected {expected}; the program and \
         this tool come from different builds: rebuild and reattach"
    )]
    CounterLayout {
        /// Bytes per CPU found.
        got: usize,
        /// Bytes per CPU expected.
        expected: usize,
    },
}

/// How an XDP program is attached to an interface, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachedMode {
    /// Native (driver) mode.
    Driver,
    /// Generic (skb) mode.
    Generic,
    /// Offloaded to the NIC.
    Offload,
    /// More than one program in different modes at once.
    Multiple,
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachedMode::Driver => "driver",
            AttachedMode::Generic => "generic",
            AttachedMode::Offload => "offload",
            AttachedMode::Multiple => "multiple",
        })
    }
}

fn attach_refused(
    ifname: &str,
    asked: AttachMode,
    driver: Option<&str>,
    generic: Option<&str>,
) -> String {
    let mut text =
        format!("the kernel refused to attach the XDP program to {ifname} ({asked} mode asked)");
    if let Some(driver) = driver {
        text.push_str(&format!("; driver mode: {driver}"));
    }
    if let Some(generic) = generic {
        text.push_str(&format!("; generic mode: {generic}"));
    }
    text.push_str(match asked {
        AttachMode::Driver => {
            "; generic mode was not tried: ask for generic or auto mode to allow it"
        }
        AttachMode::Auto => "; generic mode was tried as the fallback and failed too",
        AttachMode::Generic => "",
    });
    text
}
