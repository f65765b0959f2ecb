//! One `mmap`ed range, unmapped on drop.

use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;

/// Smallest page size on the platforms we run on; touching one byte per such page faults
/// every page in.
const BASE_PAGE_BYTES: usize = 4096;

/// A readable and writable mapping owned by this value.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory with no thread affinity; the kernel lets any thread
// access or unmap it.
unsafe impl Send for Mapping {}

// SAFETY: `Mapping` itself only hands out its address and length; any access through the
// pointer is the caller's (unsafe) business.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` (> 0) bytes readable and writable with `flags`, from `fd` at offset 0
    /// (`fd` is -1 for anonymous memory).
    pub(crate) fn new(len: usize, flags: libc::c_int, fd: RawFd) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping at an address the kernel picks cannot alias any Rust object;
        // the kernel checks `len`, `flags` and `fd`.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(addr.cast::<u8>()).ok_or_else(|| {
            io::Error::new(io::ErrorKind::AddrNotAvailable, "mmap returned address 0")
        })?;
        Ok(Mapping { ptr, len })
    }

    /// First byte of the mapping.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Faults every page in, writable, without changing its contents.
    ///
    /// Uses `MADV_POPULATE_WRITE` (Linux 5.14+); older kernels get one read per page.
    pub(crate) fn populate_write(&self) -> io::Result<()> {
        // SAFETY: the range is exactly our mapping; MADV_POPULATE_WRITE only faults pages in.
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().cast(),
                self.len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINVAL) {
            return Err(error);
        }
        for offset in (0..self.len).step_by(BASE_PAGE_BYTES) {
            let byte = self.ptr.as_ptr().wrapping_add(offset);
            // SAFETY: `offset < len`, so `byte` is inside our live, readable mapping; a
            // volatile read of a `u8` is valid for any bit pattern and is not optimized away.
            unsafe { byte.read_volatile() };
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this exact range and nothing borrowed from it outlives `self`.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            log::error!(
                "munmap of {} bytes at {:p} failed: {}",
                self.len,
                self.ptr,
                io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_mapping_is_zeroed_and_writable() {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let mapping = Mapping::new(3 * BASE_PAGE_BYTES, flags, -1).unwrap();
        mapping.populate_write().unwrap();
        // SAFETY: the mapping is live, 3 pages long, and only this test touches it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(mapping.ptr(), mapping.len()) };
        assert!(bytes.iter().all(|&b| b == 0));
        bytes[BASE_PAGE_BYTES] = 7;
        assert_eq!(bytes[BASE_PAGE_BYTES], 7);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let error = Mapping::new(0, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
    }
}
