//! A zeroed, page-aligned heap region to hold a pool inside one process (tests, benchmarks,
//! the in-process cluster). Brokers in separate processes map a hugetlbfs file or a dax
//! device instead (the `broker` crate's regions).

use std::alloc::Layout;
use std::ptr::NonNull;

use std::sync::Arc;

use crate::coherence::{CoherenceMode, MappedRegion, PoolMemory};

/// Alignment of the region: a page, like a real mapping.
const ALIGN_BYTES: usize = 4096;

/// Owns the memory; [`HeapRegion::memory`] hands out views that keep it alive.
#[derive(Debug)]
pub struct HeapRegion {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the region is plain memory owned by this value; access from several threads goes
// through `PoolMemory` and the coherence discipline.
unsafe impl Send for HeapRegion {}
// SAFETY: as above; `&HeapRegion` only hands out views.
unsafe impl Sync for HeapRegion {}

impl HeapRegion {
    /// Allocates `len_bytes` zeroed bytes (rounded up to a page).
    ///
    /// # Panics
    /// When `len_bytes` is zero or the allocation fails.
    pub fn new(len_bytes: u64) -> HeapRegion {
        let size = (len_bytes as usize).next_multiple_of(ALIGN_BYTES);
        let layout = Layout::from_size_align(size, ALIGN_BYTES).expect("valid heap region layout");
        assert!(size > 0, "empty heap region");
        // SAFETY: `layout` has a non-zero size (asserted above).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        HeapRegion { ptr, layout }
    }

    /// A view of a shared region; the region lives until the last view is dropped.
    pub fn memory(self: &Arc<HeapRegion>, mode: CoherenceMode) -> PoolMemory {
        PoolMemory::from_region(Arc::clone(self) as Arc<dyn MappedRegion>, mode)
    }
}

impl MappedRegion for HeapRegion {
    fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn len_bytes(&self) -> u64 {
        self.layout.size() as u64
    }
}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this exact layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// A formatted one-broker, one-topic pool of 8 ring slots on a new heap region, coherent,
/// for unit tests (here, and in crates that enable the `test-support` feature).
#[cfg(any(test, feature = "test-support"))]
pub fn small_test_pool() -> crate::pool::Pool<PoolMemory> {
    let geometry = crate::layout::Geometry {
        brokers_max: 1,
        topics_max: 1,
        ring_slots: 8,
        goi_entries: 64,
        blog_bytes: 64 * 1024,
    };
    let region = Arc::new(HeapRegion::new(geometry.layout_bytes()));
    crate::pool::Pool::format(region.memory(CoherenceMode::Coherent), geometry, 1)
        .expect("format a heap pool")
}
