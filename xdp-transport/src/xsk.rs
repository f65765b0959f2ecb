//! An AF_XDP socket owned directly: the UMEM (frames of [`FRAME_BYTES`] in a
//! [`hugepages::PrivateBuffer`]), the fill, completion, rx and tx rings mapped with the
//! offsets of `XDP_MMAP_OFFSETS`, bound to one (interface, queue) in copy mode with
//! `XDP_USE_NEED_WAKEUP`. With [`crate::netlink`], the only module of this crate with `unsafe`
//! code.
//!
//! Ownership of frames: a [`Frame`] is a unique token for one UMEM chunk. It is created
//! once per chunk by [`Xsk::new`], or from a descriptor the kernel hands back (rx and
//! completion rings: the kernel gives each chunk back once), and is consumed when its address
//! goes to the kernel (fill and tx rings). Holding the token is what makes
//! [`Umem::frame`]/[`Umem::frame_mut`] sound: nobody else, the kernel included, touches that
//! chunk meanwhile.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use memmap2::{MmapOptions, MmapRaw};

/// Bytes per UMEM frame (chunk): one 4 KiB page, so an MTU up to ~3.5 KB fits.
pub const FRAME_BYTES: usize = 4096;

/// Why an AF_XDP socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    /// The UMEM could not be allocated.
    #[error(
        "cannot allocate the {bytes}-byte AF_XDP UMEM: {source} (reserve 2 MiB hugepages: sysctl vm.nr_hugepages, or scripts/setup-hugepages.sh)"
    )]
    Umem {
        /// Bytes asked for.
        bytes: usize,
        /// The allocator's error.
        source: hugepages::Error,
    },
    /// A socket call failed.
    #[error("AF_XDP socket on {ifname} queue {queue}: {what} failed: {source}{hint}")]
    Socket {
        /// Interface.
        ifname: String,
        /// Queue.
        queue: u32,
        /// The call that failed.
        what: &'static str,
        /// The OS error.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The interface does not exist in this network namespace.
    #[error("{0}")]
    Interface(#[from] xdp_prog::XdpError),
    /// The ring sizes or frame count are unusable.
    #[error(
        "bad AF_XDP geometry: {reason} (ring sizes must be powers of two, frames at least twice the ring size)"
    )]
    Geometry {
        /// What is wrong.
        reason: String,
    },
}

/// Sizes of the socket's UMEM and rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XskGeometry {
    /// UMEM frames.
    pub frames: u32,
    /// Entries of each of the four rings (a power of two).
    pub ring_size: u32,
}

impl Default for XskGeometry {
    /// Rings of 4096 entries: the fill and rx rings are all that buffers frames while the
    /// broker thread is not running (with 1024, brokers sharing a CPU dropped frames).
    fn default() -> XskGeometry {
        XskGeometry {
            frames: 8192,
            ring_size: 4096,
        }
    }
}

/// A unique token for one UMEM frame (see the module documentation).
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    addr: u64,
}

impl Frame {
    /// The frame's offset in the UMEM.
    pub fn addr(&self) -> u64 {
        self.addr
    }
}

/// A fixed-capacity free list of frames; never reallocates after creation.
#[derive(Debug)]
pub struct FramePool {
    free: Vec<Frame>,
}

impl FramePool {
    fn with_frames(frames: u32) -> FramePool {
        let free = (0..u64::from(frames))
            .map(|i| Frame {
                addr: i * FRAME_BYTES as u64,
            })
            .collect();
        FramePool { free }
    }

    /// Takes a free frame.
    pub fn take(&mut self) -> Option<Frame> {
        self.free.pop()
    }

    /// Returns a frame. Every frame has a slot (the capacity is the frame count), so this
    /// never allocates.
    pub fn give(&mut self, frame: Frame) {
        debug_assert!(self.free.len() < self.free.capacity());
        self.free.push(frame);
    }

    /// Free frames.
    pub fn len(&self) -> usize {
        self.free.len()
    }

    /// True when no frame is free.
    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }
}

/// Entries a consumer may read: producer minus consumer, in wrapping u32 arithmetic.
pub fn ring_entries(producer: u32, consumer: u32) -> u32 {
    producer.wrapping_sub(consumer)
}

/// Free slots a producer may fill in a ring of `size`.
pub fn ring_free(size: u32, producer: u32, consumer: u32) -> u32 {
    size - producer.wrapping_sub(consumer)
}

/// One of the four rings: shared producer/consumer indices and a power-of-two array of `T`.
#[derive(Debug)]
struct Ring<T> {
    /// The ring's memory, unmapped on drop, when the pointers below go too.
    _map: MmapRaw,
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    descs: *mut T,
    size: u32,
    /// Our copy of the index we own (producer of a producer ring, consumer of a consumer ring).
    local: u32,
    /// Last seen value of the other side's index.
    cached: u32,
}

impl<T: Copy> Ring<T> {
    /// Maps the ring of socket `fd` that the kernel offers at page offset `pgoff`
    /// (`XDP_PGOFF_*`): `MAP_SHARED | MAP_POPULATE`, readable and writable.
    fn map(
        fd: RawFd,
        offsets: &libc::xdp_ring_offset,
        size: u32,
        pgoff: u64,
    ) -> io::Result<Ring<T>> {
        let len = offsets.desc as usize + size as usize * size_of::<T>();
        let map = MmapOptions::new()
            .len(len)
            .offset(pgoff)
            .populate()
            .map_raw(fd)?;
        let at = |offset: u64| map.as_mut_ptr().wrapping_add(offset as usize);
        let field = |offset: u64| NonNull::new(at(offset).cast::<AtomicU32>());
        let (Some(producer), Some(consumer), Some(flags)) = (
            field(offsets.producer),
            field(offsets.consumer),
            field(offsets.flags),
        ) else {
            return Err(io::Error::other("ring mapped at a null address"));
        };
        let descs = at(offsets.desc).cast::<T>();
        let mut ring = Ring {
            _map: map,
            producer,
            consumer,
            flags,
            descs,
            size,
            local: 0,
            cached: 0,
        };
        ring.local = ring.producer().load(Ordering::Relaxed);
        ring.cached = ring.consumer().load(Ordering::Relaxed);
        Ok(ring)
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into the ring mapping, which lives as long as `self`; the kernel
        // accesses it only atomically.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as in `producer`.
        unsafe { self.consumer.as_ref() }
    }

    fn needs_wakeup(&self) -> bool {
        // SAFETY: as in `producer`.
        let flags = unsafe { self.flags.as_ref() };
        flags.load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    fn slot(&self, index: u32) -> *mut T {
        self.descs.wrapping_add((index & (self.size - 1)) as usize)
    }

    // ---- producer side (fill, tx): `local` is our producer, `cached` the kernel's consumer.

    /// Free slots, refreshing the consumer index (Acquire: the kernel is done with the
    /// descriptors it consumed) only when the cached value shows fewer than `want`.
    fn free(&mut self, want: u32) -> u32 {
        let free = ring_free(self.size, self.local, self.cached);
        if free >= want {
            return free;
        }
        self.cached = self.consumer().load(Ordering::Acquire);
        ring_free(self.size, self.local, self.cached)
    }

    /// Writes one entry at the producer position (call only after `free` said there is room).
    fn push(&mut self, value: T) {
        let slot = self.slot(self.local);
        // SAFETY: the slot is inside the mapped array (index masked) and owned by us until the
        // producer index is published: `free` checked the kernel has consumed it.
        unsafe { slot.write(value) };
        self.local = self.local.wrapping_add(1);
    }

    /// Published entries the kernel has not consumed yet (refreshes the consumer index).
    fn unconsumed(&mut self) -> u32 {
        self.cached = self.consumer().load(Ordering::Acquire);
        ring_entries(self.local, self.cached)
    }

    /// Publishes the entries pushed so far (Release: their contents are visible first).
    fn publish(&mut self) {
        self.producer().store(self.local, Ordering::Release);
    }

    // ---- consumer side (rx, completion): `local` is our consumer, `cached` the producer.

    /// Entries available, refreshing the producer index (Acquire: the descriptors behind it
    /// are written) when the cached value shows none.
    fn available(&mut self) -> u32 {
        let entries = ring_entries(self.cached, self.local);
        if entries > 0 {
            return entries;
        }
        self.cached = self.producer().load(Ordering::Acquire);
        ring_entries(self.cached, self.local)
    }

    /// Reads the entry at the consumer position (call only after `available` said there is one).
    fn pop(&mut self) -> T {
        let slot = self.slot(self.local);
        // SAFETY: the slot is inside the mapped array and was published by the kernel's
        // producer index (Acquire in `available`); it stays ours until `release`.
        let value = unsafe { slot.read() };
        self.local = self.local.wrapping_add(1);
        value
    }

    /// Hands consumed entries back to the kernel (Release: we are done reading them).
    fn release(&mut self) {
        self.consumer().store(self.local, Ordering::Release);
    }
}

/// The UMEM: frames the kernel and this process exchange.
#[derive(Debug)]
pub struct Umem {
    buffer: hugepages::PrivateBuffer,
    frames: u32,
}

impl Umem {
    /// A received frame's bytes; `None` (and the frame counted as bad by the caller) when the
    /// kernel's descriptor does not fit in the frame.
    pub fn frame<'a>(&'a self, frame: &'a Frame, offset: usize, len: usize) -> Option<&'a [u8]> {
        let range = self.range(frame, offset, len)?;
        let start = self.buffer.as_ptr().wrapping_add(range.start);
        // SAFETY: the range lies inside the buffer (checked in `range`), and the `Frame` token
        // borrowed for 'a guarantees no one writes to that chunk meanwhile.
        Some(unsafe { std::slice::from_raw_parts(start, range.len()) })
    }

    /// A frame's bytes to write into, `len` bytes from `offset`.
    pub fn frame_mut<'a>(
        &'a self,
        frame: &'a mut Frame,
        offset: usize,
        len: usize,
    ) -> Option<&'a mut [u8]> {
        let range = self.range(frame, offset, len)?;
        let start = self.buffer.as_ptr().wrapping_add(range.start);
        // SAFETY: the range lies inside the buffer, and the `Frame` token, borrowed mutably for
        // 'a, guarantees no one else reads or writes that chunk meanwhile.
        Some(unsafe { std::slice::from_raw_parts_mut(start, range.len()) })
    }

    fn range(&self, frame: &Frame, offset: usize, len: usize) -> Option<std::ops::Range<usize>> {
        let base = usize::try_from(frame.addr).ok()?;
        let end = offset.checked_add(len)?;
        if end > FRAME_BYTES || base / FRAME_BYTES >= self.frames as usize {
            return None;
        }
        Some(base + offset..base + end)
    }
}

/// A frame the kernel received: the token, where the packet starts in it, and its length.
#[derive(Debug)]
pub struct RxFrame {
    /// The frame.
    pub frame: Frame,
    /// Offset of the packet in the frame.
    pub offset: usize,
    /// Packet length.
    pub len: usize,
}

/// Counters of one socket (or the sum over a device's sockets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XskStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Frames posted for transmission.
    pub tx_frames: u64,
    /// `sendto` kicks.
    pub tx_kicks: u64,
    /// Kernel: packets dropped for want of a fill-ring frame or because they do not fit a
    /// UMEM frame (in generic mode: GSO/GRO packets).
    pub rx_dropped: u64,
    /// Kernel: packets dropped because the rx ring was full (the broker fell behind).
    pub rx_ring_full: u64,
    /// Kernel: tx descriptors it refused.
    pub tx_invalid: u64,
    /// Kernel: times the fill ring was empty.
    pub fill_ring_empty: u64,
    /// Busy-poll `recvfrom` calls (with busy polling on).
    pub busy_polls: u64,
}

impl XskStats {
    /// The counters of two sockets together.
    pub fn plus(self, other: XskStats) -> XskStats {
        XskStats {
            rx_frames: self.rx_frames + other.rx_frames,
            tx_frames: self.tx_frames + other.tx_frames,
            tx_kicks: self.tx_kicks + other.tx_kicks,
            rx_dropped: self.rx_dropped + other.rx_dropped,
            rx_ring_full: self.rx_ring_full + other.rx_ring_full,
            tx_invalid: self.tx_invalid + other.tx_invalid,
            fill_ring_empty: self.fill_ring_empty + other.fill_ring_empty,
            busy_polls: self.busy_polls + other.busy_polls,
        }
    }
}

/// An AF_XDP socket bound to one interface queue. Its UMEM is a separate [`Umem`] (so
/// received frames can be read while frames are posted for transmission); keep the `Xsk`
/// alive no longer than the `Umem` (declare it first in a struct holding both).
#[derive(Debug)]
pub struct Xsk {
    // Declared before the rings and the UMEM so the socket is closed first.
    fd: OwnedFd,
    fill: Ring<u64>,
    completion: Ring<u64>,
    rx: Ring<libc::xdp_desc>,
    tx: Ring<libc::xdp_desc>,
    /// Frames posted to tx whose completion has not come back.
    tx_in_flight: u32,
    stats: XskStats,
    ifname: String,
    queue: u32,
    /// Preferred busy polling is on (see [`Xsk::enable_busy_poll`]).
    busy_poll: bool,
}

// SAFETY: the ring pointers point into mappings owned by the Xsk, used by one thread at a
// time (the Xsk moves to the poll thread as a whole).
unsafe impl Send for Xsk {}

/// `SO_PREFER_BUSY_POLL` and `SO_BUSY_POLL_BUDGET` (asm-generic/socket.h, Linux 5.11); the
/// libc crate does not export them on every target.
const SO_PREFER_BUSY_POLL: i32 = 69;
const SO_BUSY_POLL_BUDGET: i32 = 70;

fn setsockopt<T>(fd: RawFd, option: i32, value: &T) -> io::Result<()> {
    set_option(fd, libc::SOL_XDP, option, value)
}

fn set_option<T>(fd: RawFd, level: i32, option: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the size given.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (value as *const T).cast(),
            size_of::<T>() as u32,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt<T>(fd: RawFd, option: i32, value: &mut T) -> io::Result<()> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and describe a buffer of `len` bytes.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_XDP,
            option,
            (value as *mut T).cast(),
            &mut len,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The IPv4 addresses of `ifname`, with their prefix lengths.
pub fn interface_ipv4(ifname: &str) -> io::Result<Vec<(Ipv4Addr, u8)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a valid out pointer; the result is freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_netmask.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) };
        if name.to_bytes() != ifname.as_bytes() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr of the list.
        let family = unsafe { (*entry.ifa_addr).sa_family };
        if i32::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let addr = unsafe { *entry.ifa_addr.cast::<libc::sockaddr_in>() };
        // SAFETY: the netmask of an AF_INET address is a sockaddr_in too.
        let mask = unsafe { *entry.ifa_netmask.cast::<libc::sockaddr_in>() };
        found.push((
            Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            u32::from_be(mask.sin_addr.s_addr).count_ones() as u8,
        ));
    }
    // SAFETY: `list` came from getifaddrs and is freed once; no reference into it remains.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

impl Xsk {
    /// Creates the UMEM and rings and binds to `queue` of `ifname` in copy mode. With
    /// `allow_small_pages`, a UMEM on 4 KiB pages is used (with a warning) when hugepages are
    /// short.
    pub fn new(
        ifname: &str,
        queue: u32,
        geometry: XskGeometry,
        allow_small_pages: bool,
    ) -> Result<(Xsk, Umem, FramePool), XskError> {
        let XskGeometry { frames, ring_size } = geometry;
        if !ring_size.is_power_of_two() || frames < 2 * ring_size {
            return Err(XskError::Geometry {
                reason: format!("{frames} frames, rings of {ring_size}"),
            });
        }
        let index = xdp_prog::ifindex(ifname)?;
        let fail = |what: &'static str, hint: &'static str| {
            let source = io::Error::last_os_error();
            move |_: ()| XskError::Socket {
                ifname: ifname.to_owned(),
                queue,
                what,
                source,
                hint,
            }
        };
        let with = |what: &'static str, hint: &'static str| {
            move |source: io::Error| XskError::Socket {
                ifname: ifname.to_owned(),
                queue,
                what,
                source,
                hint,
            }
        };
        let bytes = frames as usize * FRAME_BYTES;
        let options = hugepages::RegionOptions {
            page_size: hugepages::PageSize::Huge2M,
            allow_fallback: allow_small_pages,
            prefault: true,
        };
        let buffer = hugepages::PrivateBuffer::new(bytes, &options)
            .map_err(|source| XskError::Umem { bytes, source })?;
        // SAFETY: plain socket(2) call.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(fail(
                "socket(AF_XDP)",
                " (AF_XDP needs root or CAP_NET_RAW, and a kernel with CONFIG_XDP_SOCKETS)",
            )(()));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let reg = libc::xdp_umem_reg {
            addr: buffer.as_ptr() as u64,
            len: buffer.len() as u64,
            chunk_size: FRAME_BYTES as u32,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(fd.as_raw_fd(), libc::XDP_UMEM_REG, &reg)
            .map_err(with("XDP_UMEM_REG", " (is RLIMIT_MEMLOCK too low?)"))?;
        for option in [
            libc::XDP_UMEM_FILL_RING,
            libc::XDP_UMEM_COMPLETION_RING,
            libc::XDP_RX_RING,
            libc::XDP_TX_RING,
        ] {
            setsockopt(fd.as_raw_fd(), option, &ring_size)
                .map_err(with("setting a ring size", ""))?;
        }
        let mut offsets = libc::xdp_mmap_offsets {
            rx: zero_offsets(),
            tx: zero_offsets(),
            fr: zero_offsets(),
            cr: zero_offsets(),
        };
        getsockopt(fd.as_raw_fd(), libc::XDP_MMAP_OFFSETS, &mut offsets)
            .map_err(with("XDP_MMAP_OFFSETS", ""))?;
        let raw = fd.as_raw_fd();
        let fill = Ring::map(raw, &offsets.fr, ring_size, libc::XDP_UMEM_PGOFF_FILL_RING)
            .map_err(with("mapping the fill ring", ""))?;
        let completion = Ring::map(
            raw,
            &offsets.cr,
            ring_size,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING,
        )
        .map_err(with("mapping the completion ring", ""))?;
        let rx = Ring::map(raw, &offsets.rx, ring_size, libc::XDP_PGOFF_RX_RING as u64)
            .map_err(with("mapping the rx ring", ""))?;
        let tx = Ring::map(raw, &offsets.tx, ring_size, libc::XDP_PGOFF_TX_RING as u64)
            .map_err(with("mapping the tx ring", ""))?;
        let address = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: libc::XDP_COPY | libc::XDP_USE_NEED_WAKEUP,
            sxdp_ifindex: index,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        // SAFETY: `address` is a valid sockaddr_xdp of the size given.
        let ret = unsafe {
            libc::bind(
                raw,
                (&raw const address).cast(),
                size_of::<libc::sockaddr_xdp>() as u32,
            )
        };
        if ret != 0 {
            return Err(fail(
                "bind",
                " (EBUSY: another AF_XDP socket has this queue, e.g. a second broker on the same interface; EINVAL: no such queue)",
            )(()));
        }
        let xsk = Xsk {
            fd,
            fill,
            completion,
            rx,
            tx,
            tx_in_flight: 0,
            stats: XskStats::default(),
            ifname: ifname.to_owned(),
            queue,
            busy_poll: false,
        };
        Ok((xsk, Umem { buffer, frames }, FramePool::with_frames(frames)))
    }

    /// The socket's descriptor (for the XSKMAP).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Preferred busy polling (Linux 5.11): `recvfrom`, `sendto` and `poll` on this socket
    /// then run the queue's NAPI in the calling thread for up to `timeout_us` (at most
    /// `budget` packets a time) instead of leaving it to softirqs on whichever CPU. Useful in
    /// driver mode (generic mode has no NAPI to poll); on a NIC pair it with the interface's
    /// `napi_defer_hard_irqs` and `gro_flush_timeout`.
    pub fn enable_busy_poll(&mut self, timeout_us: u32, budget: u32) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        let (prefer, timeout, budget) = (1i32, timeout_us as i32, budget as i32);
        set_option(fd, libc::SOL_SOCKET, SO_PREFER_BUSY_POLL, &prefer)?;
        set_option(fd, libc::SOL_SOCKET, libc::SO_BUSY_POLL, &timeout)?;
        set_option(fd, libc::SOL_SOCKET, SO_BUSY_POLL_BUDGET, &budget)?;
        self.busy_poll = true;
        Ok(())
    }

    /// With busy polling on and nothing in the rx ring: a non-blocking `recvfrom`, which
    /// polls the queue's NAPI in this thread (the kernel's way to drive it, see
    /// Documentation/networking/af_xdp.rst).
    pub fn busy_poll_rx(&mut self) {
        if !self.busy_poll || self.rx.available() > 0 {
            return;
        }
        self.stats.busy_polls += 1;
        self.wake_rx();
    }

    /// What [`wait_readable`] polls for this socket.
    pub fn poll_entry(&self) -> PollEntry {
        PollEntry(libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
    }

    /// Moves free frames to the fill ring, keeping `reserve` in the pool for transmission;
    /// one publish for the whole batch. Returns how many were posted.
    pub fn refill(&mut self, pool: &mut FramePool, reserve: usize) -> u32 {
        let spare = pool.len().saturating_sub(reserve);
        if spare == 0 {
            return 0;
        }
        let want = u32::try_from(spare).unwrap_or(u32::MAX);
        let n = self.fill.free(want).min(want);
        for _ in 0..n {
            if let Some(frame) = pool.take() {
                self.fill.push(frame.addr);
            }
        }
        if n > 0 {
            self.fill.publish();
            if self.fill.needs_wakeup() {
                self.wake_rx();
            }
        }
        n
    }

    /// Received descriptors ready to be taken (refreshes the producer index when needed).
    pub fn rx_available(&mut self) -> u32 {
        self.rx.available()
    }

    /// Takes the next received frame (call only after `rx_available` > 0). The ring slot is
    /// handed back by [`Xsk::rx_release`].
    pub fn rx_take(&mut self) -> RxFrame {
        let desc = self.rx.pop();
        self.stats.rx_frames += 1;
        let offset = (desc.addr % FRAME_BYTES as u64) as usize;
        RxFrame {
            frame: Frame {
                addr: desc.addr - offset as u64,
            },
            offset,
            len: desc.len as usize,
        }
    }

    /// Hands the rx ring slots taken so far back to the kernel (one store for a burst).
    pub fn rx_release(&mut self) {
        self.rx.release();
    }

    /// True when the tx ring has a free slot.
    pub fn tx_has_room(&mut self) -> bool {
        self.tx.free(1) > 0
    }

    /// Posts a frame of `len` bytes for transmission (published by [`Xsk::tx_flush`]). Call
    /// only after `tx_has_room`.
    pub fn tx_post(&mut self, frame: Frame, len: usize) {
        self.tx.push(libc::xdp_desc {
            addr: frame.addr,
            len: len as u32,
            options: 0,
        });
        self.tx_in_flight += 1;
        self.stats.tx_frames += 1;
    }

    /// Publishes posted frames and kicks the kernel with `sendto` when the ring holds frames
    /// it has not consumed and asks for a wakeup. Frames already consumed but not yet
    /// completed need no kick: re-kicking for them cost a syscall and a hypervisor wake-up
    /// per loop iteration.
    pub fn tx_flush(&mut self) {
        self.tx.publish();
        if self.tx.unconsumed() > 0 && self.tx.needs_wakeup() {
            self.stats.tx_kicks += 1;
            // SAFETY: a zero-length sendto on our socket: the AF_XDP tx wakeup.
            let ret = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if ret < 0 {
                let error = io::Error::last_os_error();
                // Busy or out of buffers: the next flush kicks again.
                if !matches!(
                    error.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS | libc::EINTR)
                ) {
                    log::warn!(
                        "AF_XDP {} queue {}: tx kick failed: {error}",
                        self.ifname,
                        self.queue
                    );
                }
            }
        }
    }

    /// Returns completed tx frames to the pool (one consumer update for the batch).
    pub fn reap_completions(&mut self, pool: &mut FramePool) -> u32 {
        let n = self.completion.available();
        for _ in 0..n {
            let addr = self.completion.pop();
            pool.give(Frame {
                addr: addr - addr % FRAME_BYTES as u64,
            });
        }
        if n > 0 {
            self.completion.release();
            self.tx_in_flight = self.tx_in_flight.saturating_sub(n);
        }
        n
    }

    /// A zero-length non-blocking `recvfrom`: the rx wakeup the kernel asks for with
    /// need_wakeup, and the call that runs a busy poll when that is on.
    fn wake_rx(&self) {
        // SAFETY: a zero-length, non-blocking recvfrom on our socket: the AF_XDP rx wakeup.
        let ret = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        let _ = ret;
    }

    /// This process's counters and the kernel's `XDP_STATISTICS`.
    pub fn stats(&self) -> XskStats {
        let mut kernel = libc::xdp_statistics {
            rx_dropped: 0,
            rx_invalid_descs: 0,
            tx_invalid_descs: 0,
            rx_ring_full: 0,
            rx_fill_ring_empty_descs: 0,
            tx_ring_empty_descs: 0,
        };
        let mut stats = self.stats;
        if getsockopt(self.fd.as_raw_fd(), libc::XDP_STATISTICS, &mut kernel).is_ok() {
            stats.rx_dropped = kernel.rx_dropped;
            stats.rx_ring_full = kernel.rx_ring_full;
            stats.tx_invalid = kernel.tx_invalid_descs;
            stats.fill_ring_empty = kernel.rx_fill_ring_empty_descs;
        }
        stats
    }
}

/// One socket's entry for [`wait_readable`] (made by [`Xsk::poll_entry`]).
#[derive(Debug, Clone, Copy)]
#[repr(transparent)]
pub struct PollEntry(libc::pollfd);

/// Blocks until the rx ring of one of the sockets in `entries` has a frame or `timeout`
/// passes (`ppoll`, so sub-millisecond timeouts are honoured; the kernel also services a
/// pending need-wakeup).
pub fn wait_readable(entries: &mut [PollEntry], timeout: std::time::Duration) {
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: the pointer and length come from a live, exclusively borrowed slice of
    // `PollEntry`, which is `repr(transparent)` over `pollfd`, so ppoll reads and writes (only
    // `revents`) inside it; `timeout` is a live timespec and the signal mask is null. The
    // descriptors are plain integers to the kernel: a closed one yields POLLNVAL, never a
    // memory access. An error (EINTR) just ends the wait early.
    unsafe {
        libc::ppoll(
            entries.as_mut_ptr().cast::<libc::pollfd>(),
            entries.len() as libc::nfds_t,
            &timeout,
            std::ptr::null(),
        )
    };
}

fn zero_offsets() -> libc::xdp_ring_offset {
    libc::xdp_ring_offset {
        producer: 0,
        consumer: 0,
        desc: 0,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_arithmetic_wraps_around_u32() {
        assert_eq!(ring_entries(5, 3), 2);
        assert_eq!(ring_entries(2, u32::MAX - 1), 4);
        assert_eq!(ring_free(8, 5, 3), 6);
        assert_eq!(ring_free(8, 1, u32::MAX - 6), 0);
        assert_eq!(ring_free(8, u32::MAX, u32::MAX), 8);
    }

    #[test]
    fn frame_pool_hands_out_each_frame_once_and_never_grows() {
        let mut pool = FramePool::with_frames(4);
        let capacity = pool.free.capacity();
        let mut taken: Vec<u64> = std::iter::from_fn(|| pool.take().map(|f| f.addr)).collect();
        taken.sort_unstable();
        assert_eq!(taken, [0, 4096, 8192, 12288]);
        assert!(pool.is_empty());
        for addr in taken {
            pool.give(Frame { addr });
        }
        assert_eq!(pool.len(), 4);
        assert_eq!(pool.free.capacity(), capacity);
    }

    #[test]
    fn umem_refuses_ranges_outside_a_frame() {
        let options = hugepages::RegionOptions {
            page_size: hugepages::PageSize::Huge2M,
            allow_fallback: true,
            prefault: false,
        };
        let umem = Umem {
            buffer: hugepages::PrivateBuffer::new(2 * FRAME_BYTES, &options).unwrap(),
            frames: 2,
        };
        let frame = Frame { addr: 4096 };
        assert_eq!(umem.frame(&frame, 256, 100).map(<[u8]>::len), Some(100));
        assert!(umem.frame(&frame, 4000, 100).is_none());
        assert!(umem.frame(&Frame { addr: 8192 }, 0, 1).is_none());
        let mut frame = Frame { addr: 0 };
        assert_eq!(
            umem.frame_mut(&mut frame, 0, 4096).map(|s| s.len()),
            Some(4096)
        );
    }
}
