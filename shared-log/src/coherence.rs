//! The coherence interface: every access to the shared pool goes through [`SharedMemory`].
//!
//! CXL 2.0 memory shared between hosts is not cache-coherent. A writer's stores sit in its
//! own cache until it writes them back; a reader keeps serving a line from its cache until it
//! drops it. The discipline (docs/memory-layout.md) is therefore, on every path:
//!
//! * writer: store the data, [`SharedMemory::flush`] it, [`SharedMemory::fence`], then store
//!   the ready flag (last) and flush its line;
//! * reader: [`SharedMemory::invalidate`] the lines, [`SharedMemory::fence`], then read the
//!   flag and, when it says ready, the data. Every time, with no "skip it for N polls".
//!
//! Three implementations of the one interface:
//! * [`PoolMemory`] in [`CoherenceMode::Coherent`]: flush and invalidate are no-ops (one
//!   host, or CXL 3 with hardware coherence);
//! * [`PoolMemory`] in [`CoherenceMode::NonCoherent`] (the default): `clwb` to write back,
//!   `clflushopt` to invalidate, `mfence` to order them;
//! * [`crate::sim::SimAgent`]: a software model in which each agent reads its own stale copy
//!   of a line until it invalidates, and others see its writes only after it flushes. The
//!   simulation uses it to prove that no path forgets a flush or an invalidation.

use std::fmt;

/// Bytes in one cache line, the unit of flushing and invalidation.
pub const CACHE_LINE_BYTES: u64 = 64;

/// One agent's (a broker thread's, the sequencer's, a reader's) access to the shared pool.
///
/// Offsets are relative to the start of the pool; callers stay in bounds (the pool layout
/// checks every offset it computes). Methods take `&self`: an agent is single-threaded,
/// and implementations with private state use interior mutability.
pub trait SharedMemory {
    /// Size of the pool in bytes.
    fn len_bytes(&self) -> u64;

    /// Copies `out.len()` bytes at `offset` into `out`, from this agent's view.
    fn read(&self, offset: u64, out: &mut [u8]);

    /// Stores `data` at `offset` into this agent's view; others see it after [`Self::flush`].
    fn write(&self, offset: u64, data: &[u8]);

    /// Stores a large `data` (a payload) at `offset`. Returns true when the bytes went
    /// straight to memory (streaming stores), so that a fence alone publishes them and the
    /// flush may be skipped; false when the caller must flush as after [`Self::write`].
    fn write_bulk(&self, offset: u64, data: &[u8]) -> bool {
        self.write(offset, data);
        false
    }

    /// Loads an aligned `u64` (a flag or a frontier) from this agent's view.
    fn load_u64(&self, offset: u64) -> u64;

    /// Stores an aligned `u64` (a flag or a frontier) into this agent's view.
    fn store_u64(&self, offset: u64, value: u64);

    /// Calls `f` with the `len` bytes at `offset` as seen by this agent, without copying where
    /// the implementation allows it. The bytes are only as fresh as the lines are (invalidate
    /// first) and may change under a concurrent writer: callers re-validate afterwards.
    fn with_bytes<R>(&self, offset: u64, len: u64, f: impl FnOnce(&[u8]) -> R) -> R;

    /// Like [`Self::with_bytes`] for several `(offset, len)` ranges at once (a vectored send
    /// straight from the pool). By default each range is copied out through [`Self::read`].
    fn with_byte_ranges<R>(&self, ranges: &[(u64, u64)], f: impl FnOnce(&[&[u8]]) -> R) -> R {
        let copies: Vec<Vec<u8>> = ranges
            .iter()
            .map(|&(offset, len)| {
                let mut copy = vec![0; len as usize];
                self.read(offset, &mut copy);
                copy
            })
            .collect();
        let slices: Vec<&[u8]> = copies.iter().map(Vec::as_slice).collect();
        f(&slices)
    }

    /// Calls `f` to fill the `len` bytes at `offset` in place (the receive path writes network
    /// payload straight into the pool this way). Flush afterwards to publish.
    fn fill_bytes<R>(&self, offset: u64, len: u64, f: impl FnOnce(&mut [u8]) -> R) -> R;

    /// Writes the lines covering `[offset, offset + len)` back to memory so others can see them.
    fn flush(&self, offset: u64, len: u64);

    /// Drops this agent's cached copies of the lines covering `[offset, offset + len)` so the
    /// next read fetches what memory holds now.
    fn invalidate(&self, offset: u64, len: u64);

    /// Orders every flush, invalidation, load and store before it against those after it.
    fn fence(&self);

    /// Atomically replaces the `u64` at `offset` in memory (not a cached copy) with `new` if
    /// it equals `current`; returns the value found. Only the sequencer lease uses it, to
    /// let exactly one standby take over. Across hosts on CXL 2.0 this needs the device's
    /// atomics (or a lease service outside the pool); on one host it is `lock cmpxchg`.
    fn compare_exchange_u64(&self, offset: u64, current: u64, new: u64) -> Result<u64, u64>;
}

/// How the pool memory behaves, chosen per deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CoherenceMode {
    /// Hardware keeps caches coherent (one host, CXL 3): flush and invalidate are no-ops.
    Coherent,
    /// Caches are not coherent (CXL 2.0 across hosts): real `clwb`/`clflushopt`/`mfence`.
    #[default]
    NonCoherent,
}

impl fmt::Display for CoherenceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoherenceMode::Coherent => f.write_str("coherent"),
            CoherenceMode::NonCoherent => f.write_str("noncoherent"),
        }
    }
}

impl std::str::FromStr for CoherenceMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "coherent" => Ok(CoherenceMode::Coherent),
            "noncoherent" => Ok(CoherenceMode::NonCoherent),
            other => Err(format!(
                "unknown coherence mode {other:?}: expected \"coherent\" or \"noncoherent\""
            )),
        }
    }
}

/// Memory that holds a pool: a mapping that stays put while the value lives. The I/O that
/// made it (a hugetlbfs file, a dax device, a heap buffer) is the implementor's; a view can
/// hand the region back by its type ([`PoolMemory::region`]).
pub trait MappedRegion: std::any::Any + Send + Sync + std::fmt::Debug {
    /// First byte, page aligned.
    fn base(&self) -> *mut u8;
    /// Size in bytes.
    fn len_bytes(&self) -> u64;
}

/// The mapped pool, accessed with real instructions.
///
/// Holds a raw pointer into a mapping and, when made by [`PoolMemory::from_region`], a
/// reference that keeps the mapping alive for as long as any clone of this view exists.
#[derive(Debug, Clone)]
pub struct PoolMemory {
    base: *mut u8,
    len_bytes: u64,
    mode: CoherenceMode,
    /// Large writes use AVX2 streaming stores (non-coherent mode only, where readers fetch
    /// from memory anyway): they go straight to memory at about twice memcpy's rate.
    stream_writes: bool,
    owner: Option<std::sync::Arc<dyn MappedRegion>>,
}

// SAFETY: `PoolMemory` is an address, a length and an owner that is Send + Sync; all accesses go through the methods
// below, which use raw-pointer copies and atomics, never references that assume exclusivity.
// Cross-thread visibility is what the coherence discipline (flags, fences) provides.
unsafe impl Send for PoolMemory {}
// SAFETY: as above; `&PoolMemory` exposes no interior state besides the mapped memory.
unsafe impl Sync for PoolMemory {}

impl PoolMemory {
    /// Wraps a mapping of `len_bytes` bytes at `base`, 64-byte aligned.
    ///
    /// # Safety
    /// `base` must point to `len_bytes` bytes that stay mapped and writable for as long as this
    /// value or any copy of it is used, and that are only ever accessed through the coherence
    /// discipline (no Rust references held across concurrent writers).
    ///
    /// # Panics
    /// When `base` is not cache-line aligned, or non-coherent mode is asked for on a CPU
    /// without `clflushopt` and `clwb` (checked once here, so the hot path never checks).
    pub unsafe fn new(base: *mut u8, len_bytes: u64, mode: CoherenceMode) -> PoolMemory {
        assert_eq!(
            base as u64 % CACHE_LINE_BYTES,
            0,
            "pool base must be cache-line aligned"
        );
        if mode == CoherenceMode::NonCoherent {
            assert!(
                cpu_has_flush_instructions(),
                "non-coherent mode needs clflushopt and clwb, which this CPU lacks"
            );
        }
        PoolMemory {
            base,
            len_bytes,
            mode,
            stream_writes: mode == CoherenceMode::NonCoherent && x86::has_avx2(),
            owner: None,
        }
    }

    /// A view of `region` that keeps it mapped while any clone of the view lives.
    ///
    /// # Panics
    /// As [`PoolMemory::new`].
    pub fn from_region(
        region: std::sync::Arc<dyn MappedRegion>,
        mode: CoherenceMode,
    ) -> PoolMemory {
        // SAFETY: the region's memory stays mapped while `region` lives, and the view holds
        // it. Access is only through this view's methods.
        let mut memory = unsafe { PoolMemory::new(region.base(), region.len_bytes(), mode) };
        memory.owner = Some(region);
        memory
    }

    /// The coherence mode this view runs in.
    pub fn mode(&self) -> CoherenceMode {
        self.mode
    }

    /// The addresses the pool occupies in this process.
    pub fn address_range(&self) -> std::ops::Range<usize> {
        let start = self.base as usize;
        start..start + self.len_bytes as usize
    }

    /// The region this view keeps mapped, when it is a `T` (`None` for a view made by
    /// [`PoolMemory::new`], or one of another region type).
    pub fn region<T: MappedRegion>(&self) -> Option<&T> {
        let region: &dyn std::any::Any = self.owner.as_deref()?;
        region.downcast_ref::<T>()
    }

    fn ptr(&self, offset: u64, len: u64) -> *mut u8 {
        debug_assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.len_bytes),
            "access [{offset}, +{len}) outside the pool of {} bytes",
            self.len_bytes
        );
        // `wrapping_add` keeps this function safe; the bound is checked above and by the layout.
        self.base.wrapping_add(offset as usize)
    }

    fn atomic_u64(&self, offset: u64) -> &std::sync::atomic::AtomicU64 {
        debug_assert_eq!(offset % 8, 0, "u64 flag at unaligned offset {offset}");
        let ptr = self.ptr(offset, 8).cast::<u64>();
        // SAFETY: the pointer is in bounds, 8-byte aligned (checked above, and the layout only
        // places flags at aligned offsets) and valid for the life of the mapping, which
        // outlives `self` by the contract of `new`. All concurrent accesses to flag words go
        // through atomics.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(ptr) }
    }
}

/// True when this CPU has the instructions non-coherent mode needs.
pub fn cpu_has_flush_instructions() -> bool {
    x86::has_clflushopt_and_clwb()
}

impl SharedMemory for PoolMemory {
    fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    fn read(&self, offset: u64, out: &mut [u8]) {
        let src = self.ptr(offset, out.len() as u64);
        // SAFETY: `src` is valid for `out.len()` bytes (bounds checked by the layout and
        // `ptr`), `out` is a distinct private buffer, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
    }

    fn write_bulk(&self, offset: u64, data: &[u8]) -> bool {
        if !self.stream_writes || data.len() < STREAM_WRITE_BYTES_MIN {
            self.write(offset, data);
            return false;
        }
        let dst = self.ptr(offset, data.len() as u64);
        // SAFETY: `new` checked AVX2; `dst` is valid for `data.len()` bytes, `data` is private
        // memory, and this agent is the single writer of the range.
        unsafe { x86::stream_copy(dst, data) };
        // The ends are copied through the cache: write back the (at most two) lines they touch.
        let head_line = offset - offset % CACHE_LINE_BYTES;
        let end = offset + data.len() as u64;
        self.flush(head_line, CACHE_LINE_BYTES);
        self.flush(end - 1, 1);
        true
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let dst = self.ptr(offset, data.len() as u64);
        // SAFETY: `dst` is valid for `data.len()` bytes of the mapping; `data` is private
        // memory, so the ranges do not overlap. This agent is the single writer of the range.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    fn load_u64(&self, offset: u64) -> u64 {
        self.atomic_u64(offset)
            .load(std::sync::atomic::Ordering::Acquire)
    }

    fn store_u64(&self, offset: u64, value: u64) {
        self.atomic_u64(offset)
            .store(value, std::sync::atomic::Ordering::Release);
    }

    fn compare_exchange_u64(&self, offset: u64, current: u64, new: u64) -> Result<u64, u64> {
        self.invalidate(offset, 8);
        self.fence();
        let result = self.atomic_u64(offset).compare_exchange(
            current,
            new,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        );
        self.flush(offset, 8);
        self.fence();
        result
    }

    fn with_bytes<R>(&self, offset: u64, len: u64, f: impl FnOnce(&[u8]) -> R) -> R {
        let ptr = self.ptr(offset, len);
        // SAFETY: the range is in bounds and mapped for the life of `self`. The data was
        // published (flag seen after invalidate + fence) and its writer only rewrites it after
        // moving a frontier that callers re-check after `f` returns, as documented on the trait.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len as usize) };
        f(bytes)
    }

    fn with_byte_ranges<R>(&self, ranges: &[(u64, u64)], f: impl FnOnce(&[&[u8]]) -> R) -> R {
        let slices: Vec<&[u8]> = ranges
            .iter()
            .map(|&(offset, len)| {
                let ptr = self.ptr(offset, len);
                // SAFETY: as in `with_bytes`: in bounds, mapped while `self` lives, and
                // re-validated by the caller against the writer's frontier after `f`.
                unsafe { std::slice::from_raw_parts(ptr, len as usize) }
            })
            .collect();
        f(&slices)
    }

    fn fill_bytes<R>(&self, offset: u64, len: u64, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let ptr = self.ptr(offset, len);
        // SAFETY: the range is in bounds and this agent is its single writer: it reserved the
        // range in its own payload log, which no other agent writes and which readers do not
        // read until the ready flag that follows the flush is set.
        let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) };
        f(bytes)
    }

    fn flush(&self, offset: u64, len: u64) {
        if self.mode == CoherenceMode::Coherent || len == 0 {
            return;
        }
        for line in lines(offset, len) {
            let ptr = self.ptr(line, CACHE_LINE_BYTES);
            // SAFETY: `new` checked that the CPU has clwb; `ptr` is a mapped address.
            unsafe { x86::clwb(ptr) };
        }
    }

    fn invalidate(&self, offset: u64, len: u64) {
        if self.mode == CoherenceMode::Coherent || len == 0 {
            return;
        }
        for line in lines(offset, len) {
            let ptr = self.ptr(line, CACHE_LINE_BYTES);
            // SAFETY: `new` checked that the CPU has clflushopt; `ptr` is a mapped address.
            unsafe { x86::clflushopt(ptr) };
        }
    }

    fn fence(&self) {
        // mfence in both modes: it orders clflushopt/clwb (lfence does not), and in coherent
        // mode it is the release/acquire point between a data copy and its flag.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// Bulk writes at least this large are streamed in non-coherent mode; smaller ones stay in
/// the cache, where the writer's own flush handles them.
const STREAM_WRITE_BYTES_MIN: usize = 1024;

/// Start offsets of the cache lines covering `[offset, offset + len)`.
pub fn lines(offset: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = offset - offset % CACHE_LINE_BYTES;
    let end = if len == 0 { first } else { offset + len };
    (first..end).step_by(CACHE_LINE_BYTES as usize)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// CPUID leaf 7 EBX: bit 23 is CLFLUSHOPT, bit 24 is CLWB.
    pub fn has_clflushopt_and_clwb() -> bool {
        const CLFLUSHOPT: u32 = 1 << 23;
        const CLWB: u32 = 1 << 24;
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 7 exists on every x86_64 CPU that runs a current kernel; the
        // instruction has no side effects.
        let leaf = unsafe { core::arch::x86_64::__cpuid_count(7, 0) };
        leaf.ebx & CLFLUSHOPT != 0 && leaf.ebx & CLWB != 0
    }

    /// True when the CPU has AVX2 (for streaming stores).
    pub fn has_avx2() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
    }

    /// Copies `src` to `dst` with streaming (non-temporal) stores for the 32-byte-aligned
    /// middle, ordinary copies for the ends, then `sfence` so the streamed stores are ordered
    /// before anything that follows (the flag protocol fences again anyway).
    ///
    /// # Safety
    /// The CPU must support AVX2; `dst` must be valid for `src.len()` bytes and not overlap
    /// `src`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn stream_copy(dst: *mut u8, src: &[u8]) {
        use core::arch::x86_64::{__m256i, _mm_sfence, _mm256_loadu_si256, _mm256_stream_si256};
        let len = src.len();
        let head = dst.align_offset(32).min(len);
        let body = (len - head) / 32 * 32;
        // SAFETY: the first `head` bytes of both ranges are valid and do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, head) };
        let mut at = head;
        while at < head + body {
            let from = src.as_ptr().wrapping_add(at).cast::<__m256i>();
            let to = dst.wrapping_add(at).cast::<__m256i>();
            // SAFETY: `at + 32 <= len`; an unaligned load from the private source.
            let value = unsafe { _mm256_loadu_si256(from) };
            // SAFETY: `to` is 32-byte aligned (the head aligned it) and `at + 32 <= len`.
            unsafe { _mm256_stream_si256(to, value) };
            at += 32;
        }
        let (from, to) = (src.as_ptr().wrapping_add(at), dst.wrapping_add(at));
        // SAFETY: the last `len - at` bytes of both ranges are valid and do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(from, to, len - at) };
        _mm_sfence();
    }

    /// Writes a line back to memory, keeping it cached.
    ///
    /// # Safety
    /// The CPU must support `clwb` and `ptr` must be a mapped address.
    pub unsafe fn clwb(ptr: *mut u8) {
        // SAFETY: the caller guarantees support and a mapped address; clwb writes no register
        // and reads only the line's address.
        unsafe { core::arch::asm!("clwb [{0}]", in(reg) ptr, options(nostack, preserves_flags)) }
    }

    /// Writes a line back if dirty and evicts it from every cache level.
    ///
    /// # Safety
    /// The CPU must support `clflushopt` and `ptr` must be a mapped address.
    pub unsafe fn clflushopt(ptr: *mut u8) {
        // SAFETY: as for clwb.
        unsafe {
            core::arch::asm!("clflushopt [{0}]", in(reg) ptr, options(nostack, preserves_flags))
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub fn has_clflushopt_and_clwb() -> bool {
        false
    }
    pub fn has_avx2() -> bool {
        false
    }
    pub unsafe fn stream_copy(_dst: *mut u8, _src: &[u8]) {
        unreachable!("streaming writes are only enabled on x86_64")
    }
    pub unsafe fn clwb(_ptr: *mut u8) {
        unreachable!("PoolMemory::new refuses non-coherent mode off x86_64")
    }
    pub unsafe fn clflushopt(_ptr: *mut u8) {
        unreachable!("PoolMemory::new refuses non-coherent mode off x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_cover_unaligned_ranges() {
        assert_eq!(lines(0, 64).collect::<Vec<_>>(), vec![0]);
        assert_eq!(lines(60, 8).collect::<Vec<_>>(), vec![0, 64]);
        assert_eq!(lines(64, 129).collect::<Vec<_>>(), vec![64, 128, 192]);
        assert_eq!(lines(10, 0).count(), 0);
    }

    #[test]
    fn mode_parses_and_prints() {
        for mode in [CoherenceMode::Coherent, CoherenceMode::NonCoherent] {
            assert_eq!(mode.to_string().parse::<CoherenceMode>(), Ok(mode));
        }
        assert!("simulated".parse::<CoherenceMode>().is_err());
    }

    #[test]
    fn byte_ranges_are_the_bytes_at_their_offsets_in_the_mapping_and_in_the_model() {
        let region = std::sync::Arc::new(crate::heap::HeapRegion::new(4096));
        let mapped = region.memory(CoherenceMode::Coherent);
        let modelled = crate::sim::SimAgent::new(&crate::sim::SimMemory::new(4096));
        let data: Vec<u8> = (0..=255).collect();
        let ranges = [(64, 10), (1000, 0), (300, 200), (4000, 96)];
        mapped.write(0, &data.repeat(16));
        modelled.write(0, &data.repeat(16));
        let expected: Vec<Vec<u8>> = ranges
            .iter()
            .map(|&(offset, len)| (offset..offset + len).map(|at| (at % 256) as u8).collect())
            .collect();
        let copy = |slices: &[&[u8]]| slices.iter().map(|s| s.to_vec()).collect::<Vec<_>>();
        assert_eq!(mapped.with_byte_ranges(&ranges, copy), expected);
        assert_eq!(modelled.with_byte_ranges(&ranges, copy), expected);
    }
}
