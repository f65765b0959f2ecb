//! One mapping, made by memmap2 and unmapped on drop.

use std::fs::File;
use std::io;

use memmap2::{Advice, MmapOptions, MmapRaw};

use crate::PageSize;

/// Smallest page size on the platforms we run on; touching one byte per such page faults
/// every page in.
const BASE_PAGE_BYTES: usize = 4096;

/// A readable and writable mapping owned by this value. It hands out only a raw pointer
/// (other processes may change shared memory at any time).
#[derive(Debug)]
pub(crate) struct Mapping {
    map: MmapRaw,
}

impl Mapping {
    /// `len` bytes of `file` from its start, shared (`MAP_SHARED`); with `populate` the
    /// kernel faults every page in while mapping (`MAP_POPULATE`).
    pub(crate) fn shared(file: &File, len: usize, populate: bool) -> io::Result<Mapping> {
        let mut options = MmapOptions::new();
        options.len(nonzero(len)?);
        if populate {
            options.populate();
        }
        Ok(Mapping {
            map: options.map_raw(file)?,
        })
    }

    /// `len` bytes of zero-filled private memory (`MAP_PRIVATE | MAP_ANONYMOUS`), on
    /// hugepages of `huge` when given (`MAP_HUGETLB` with its size); with `populate` the
    /// kernel faults every page in while mapping (`MAP_POPULATE`).
    pub(crate) fn private(
        len: usize,
        huge: Option<PageSize>,
        populate: bool,
    ) -> io::Result<Mapping> {
        let mut options = MmapOptions::new();
        options.len(nonzero(len)?);
        if let Some(page_size) = huge {
            options.huge(Some(page_size.shift()));
        }
        if populate {
            options.populate();
        }
        Ok(Mapping {
            map: options.map_anon()?.into(),
        })
    }

    /// First byte of the mapping.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Faults every page in, writable, without changing its contents.
    ///
    /// Uses `MADV_POPULATE_WRITE` (Linux 5.14+); older kernels get one read per page.
    pub(crate) fn populate_write(&self) -> io::Result<()> {
        let error = match self.map.advise(Advice::PopulateWrite) {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if error.raw_os_error() != Some(libc::EINVAL) {
            return Err(error);
        }
        for offset in (0..self.len()).step_by(BASE_PAGE_BYTES) {
            let byte = self.ptr().wrapping_add(offset);
            // SAFETY: `offset < len`, so `byte` is inside our live, readable mapping; a
            // volatile read of a `u8` is valid for any bit pattern and is not optimized away.
            unsafe { byte.read_volatile() };
        }
        Ok(())
    }
}

/// `len`, or EINVAL for zero: `mmap` refuses an empty mapping, where memmap2 would map one
/// byte instead.
fn nonzero(len: usize) -> io::Result<usize> {
    if len == 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_mapping_is_zeroed_and_writable() {
        let mapping = Mapping::private(3 * BASE_PAGE_BYTES, None, false).unwrap();
        mapping.populate_write().unwrap();
        // SAFETY: the mapping is live, 3 pages long, and only this test touches it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(mapping.ptr(), mapping.len()) };
        assert!(bytes.iter().all(|&b| b == 0));
        bytes[BASE_PAGE_BYTES] = 7;
        assert_eq!(bytes[BASE_PAGE_BYTES], 7);
    }

    #[test]
    fn shared_mapping_writes_reach_the_file() {
        let mut file = tempfile::tempfile().unwrap();
        file.set_len(2 * BASE_PAGE_BYTES as u64).unwrap();
        let mapping = Mapping::shared(&file, 2 * BASE_PAGE_BYTES, true).unwrap();
        mapping.populate_write().unwrap();
        let byte = mapping.ptr().wrapping_add(BASE_PAGE_BYTES + 1);
        // SAFETY: `byte` is inside the live 2-page mapping; only this test uses the file.
        unsafe { byte.write_volatile(9) };
        let mut contents = Vec::new();
        io::Read::read_to_end(&mut file, &mut contents).unwrap();
        assert_eq!(contents[BASE_PAGE_BYTES + 1], 9);
    }

    #[test]
    fn empty_mappings_are_refused() {
        let error = Mapping::private(0, None, false).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
        let file = tempfile::tempfile().unwrap();
        let error = Mapping::shared(&file, 0, false).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
    }
}
