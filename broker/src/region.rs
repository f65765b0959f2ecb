//! Pools in real mappings: a `hugepages::SharedRegion` (hugetlbfs file, `/dev/dax`, or the
//! announced `/dev/shm` fallback) as the memory of a [`PoolMemory`].

use std::sync::Arc;

use crate::coherence::{CoherenceMode, MappedRegion, PoolMemory};

impl MappedRegion for hugepages::SharedRegion {
    fn base(&self) -> *mut u8 {
        self.as_ptr()
    }

    fn len_bytes(&self) -> u64 {
        self.len() as u64
    }

    fn check_backing(&self) -> Result<(), hugepages::Error> {
        hugepages::SharedRegion::check_backing(self)
    }
}

/// A view of a shared region that keeps it mapped while the view (or a clone) lives.
pub fn pool_memory(region: hugepages::SharedRegion, mode: CoherenceMode) -> PoolMemory {
    PoolMemory::from_region(Arc::new(region), mode)
}
