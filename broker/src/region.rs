//! Pools in real mappings: a `hugepages::SharedRegion` (hugetlbfs file, `/dev/dax`, or the
//! announced `/dev/shm` fallback) as the memory of a [`PoolMemory`].

use std::sync::Arc;

use shared_log::coherence::{CoherenceMode, MappedRegion, PoolMemory};

/// A mapped pool file (or device) that a [`PoolMemory`] keeps mapped.
#[derive(Debug)]
pub struct FileRegion(hugepages::SharedRegion);

impl MappedRegion for FileRegion {
    fn base(&self) -> *mut u8 {
        self.0.as_ptr()
    }

    fn len_bytes(&self) -> u64 {
        self.0.len() as u64
    }
}

/// A view of a shared region that keeps it mapped while the view (or a clone) lives.
pub fn pool_memory(region: hugepages::SharedRegion, mode: CoherenceMode) -> PoolMemory {
    PoolMemory::from_region(Arc::new(FileRegion(region)), mode)
}

/// Checks that the file `memory` maps is still the one its path names, whole (see
/// `hugepages::SharedRegion::check_backing`); memory that no file backs (a heap pool) always
/// is.
pub fn check_backing(memory: &PoolMemory) -> Result<(), hugepages::Error> {
    memory
        .region::<FileRegion>()
        .map_or(Ok(()), |region| region.0.check_backing())
}
