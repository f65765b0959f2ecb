//! Thin safe wrappers around the C calls this crate makes (libbpf's XDP netlink calls and
//! `if_nametoindex`), and the routing of libbpf's messages to the `log` crate.
//!
//! Everything here acts in the calling thread's network namespace.

use std::cell::RefCell;
use std::ffi::{CString, c_int};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Once;

use libbpf_rs::{PrintLevel, libbpf_sys};

use crate::AttachedMode;

/// The index of interface `name`, or `None` when it does not exist here.
pub(crate) fn ifindex(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call, which only
    // reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The interfaces of the calling thread's network namespace, comma separated.
pub(crate) fn interface_names() -> String {
    // /proc/thread-self/net/dev shows the namespace of the calling thread (not of the process,
    // nor of whoever mounted /sys).
    match std::fs::read_to_string("/proc/thread-self/net/dev") {
        Ok(text) => {
            let names: Vec<&str> = text
                .lines()
                .skip(2)
                .filter_map(|line| line.split(':').next())
                .map(str::trim)
                .collect();
            if names.is_empty() {
                "(none)".into()
            } else {
                names.join(", ")
            }
        }
        Err(error) => format!("(cannot list them: /proc/thread-self/net/dev: {error})"),
    }
}

fn c_ifindex(ifindex: u32) -> c_int {
    // Kernel interface indexes are positive C ints; an impossible value makes the kernel
    // answer ENODEV instead of acting on another interface.
    c_int::try_from(ifindex).unwrap_or(c_int::MAX)
}

fn attach_opts(old_prog_fd: c_int) -> libbpf_sys::bpf_xdp_attach_opts {
    libbpf_sys::bpf_xdp_attach_opts {
        sz: size_of::<libbpf_sys::bpf_xdp_attach_opts>() as libbpf_sys::size_t,
        old_prog_fd,
        ..Default::default()
    }
}

/// What the kernel says is attached to an interface.
#[derive(Debug, Clone, Copy)]
pub(crate) struct XdpQuery {
    /// The program id (the driver-mode one when several are attached).
    pub(crate) prog_id: u32,
    /// How it is attached; `None` when nothing is.
    pub(crate) mode: Option<AttachedMode>,
    /// The driver-mode program, 0 if none.
    pub(crate) drv_prog_id: u32,
    /// The generic-mode program, 0 if none.
    pub(crate) skb_prog_id: u32,
    /// The offloaded program, 0 if none.
    pub(crate) hw_prog_id: u32,
}

/// Asks the kernel which XDP programs `ifindex` has.
pub(crate) fn xdp_query(ifindex: u32) -> io::Result<XdpQuery> {
    let mut opts = libbpf_sys::bpf_xdp_query_opts {
        sz: size_of::<libbpf_sys::bpf_xdp_query_opts>() as libbpf_sys::size_t,
        ..Default::default()
    };
    // SAFETY: `opts` is a properly sized, initialised bpf_xdp_query_opts that libbpf fills
    // in and that outlives the call.
    let ret = unsafe { libbpf_sys::bpf_xdp_query(c_ifindex(ifindex), 0, &mut opts) };
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret));
    }
    let mode = match u32::from(opts.attach_mode) {
        libbpf_sys::XDP_ATTACHED_DRV => Some(AttachedMode::Driver),
        libbpf_sys::XDP_ATTACHED_SKB => Some(AttachedMode::Generic),
        libbpf_sys::XDP_ATTACHED_HW => Some(AttachedMode::Offload),
        libbpf_sys::XDP_ATTACHED_MULTI => Some(AttachedMode::Multiple),
        _ => None,
    };
    let prog_id = match opts.prog_id {
        0 => opts.drv_prog_id.max(opts.skb_prog_id).max(opts.hw_prog_id),
        id => id,
    };
    Ok(XdpQuery {
        prog_id,
        mode,
        drv_prog_id: opts.drv_prog_id,
        skb_prog_id: opts.skb_prog_id,
        hw_prog_id: opts.hw_prog_id,
    })
}

/// Why an attach failed: the errno and, when the kernel gave one, its explanation.
#[derive(Debug)]
pub(crate) struct AttachFailure {
    /// The errno.
    pub(crate) errno: io::Error,
    /// The kernel's extended ack message (e.g. "veth: Peer MTU is too large to set XDP").
    pub(crate) kernel: Option<String>,
}

impl fmt::Display for AttachFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.errno)?;
        if let Some(kernel) = &self.kernel {
            write!(f, " (kernel: {kernel})")?;
        }
        Ok(())
    }
}

/// Attaches `prog` to `ifindex` with the XDP_FLAGS_* in `flags`.
pub(crate) fn xdp_attach(
    ifindex: u32,
    prog: BorrowedFd<'_>,
    flags: u32,
) -> Result<(), AttachFailure> {
    route_libbpf_messages();
    KERNEL_MESSAGE.with(|message| message.borrow_mut().take());
    let opts = attach_opts(0);
    // SAFETY: `prog` is an open program fd for the duration of the call and `opts` is a
    // properly sized bpf_xdp_attach_opts that outlives it.
    let ret =
        unsafe { libbpf_sys::bpf_xdp_attach(c_ifindex(ifindex), prog.as_raw_fd(), flags, &opts) };
    if ret < 0 {
        return Err(AttachFailure {
            errno: io::Error::from_raw_os_error(-ret),
            kernel: KERNEL_MESSAGE.with(|message| message.borrow_mut().take()),
        });
    }
    Ok(())
}

/// Removes the XDP program of mode `mode_flag` (an XDP_FLAGS_*_MODE) from `ifindex`; with
/// `expected`, only if that is the program attached (XDP_FLAGS_REPLACE semantics).
pub(crate) fn xdp_detach(
    ifindex: u32,
    mode_flag: u32,
    expected: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    route_libbpf_messages();
    let (flags, opts) = match expected {
        Some(fd) => (
            mode_flag | libbpf_sys::XDP_FLAGS_REPLACE,
            attach_opts(fd.as_raw_fd()),
        ),
        None => (mode_flag, attach_opts(0)),
    };
    // SAFETY: `opts` is a properly sized bpf_xdp_attach_opts that outlives the call; the fd
    // in it (if any) is borrowed for the call.
    let ret = unsafe { libbpf_sys::bpf_xdp_detach(c_ifindex(ifindex), flags, &opts) };
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret));
    }
    Ok(())
}

thread_local! {
    /// The last "Kernel error message" libbpf printed on this thread.
    static KERNEL_MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

const KERNEL_MESSAGE_MARK: &str = "Kernel error message: ";

fn forward_libbpf_message(level: PrintLevel, message: String) {
    let message = message.trim_end();
    if let Some(at) = message.find(KERNEL_MESSAGE_MARK) {
        let kernel = message[at + KERNEL_MESSAGE_MARK.len()..].to_string();
        KERNEL_MESSAGE.with(|slot| *slot.borrow_mut() = Some(kernel));
        // It ends up in the error (or the fallback warning) of the caller.
        log::debug!(target: "libbpf", "{message}");
        return;
    }
    match level {
        PrintLevel::Warn => log::warn!(target: "libbpf", "{message}"),
        PrintLevel::Info => log::info!(target: "libbpf", "{message}"),
        PrintLevel::Debug => log::debug!(target: "libbpf", "{message}"),
    }
}

/// Routes libbpf's messages (process-wide) to the `log` crate, target `libbpf`, once.
pub(crate) fn route_libbpf_messages() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        libbpf_rs::set_print(Some((PrintLevel::Debug, forward_libbpf_message)));
    });
}
