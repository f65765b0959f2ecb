//! Process-private buffers on hugepages (staging buffers, frame pools).

use std::time::{Duration, Instant};

use crate::Error;
use crate::map::Mapping;
use crate::region::RegionOptions;
use crate::sysfs::shortage_error;

/// What the errors of a private buffer call the thing being mapped.
const TARGET: &str = "a private buffer";

/// Anonymous `MAP_PRIVATE` memory on hugepages (`MAP_HUGETLB` with `MAP_HUGE_2MB` or
/// `MAP_HUGE_1GB`), or on 4 KiB pages after an announced fallback; unmapped on drop.
#[derive(Debug)]
pub struct PrivateBuffer {
    mapping: Mapping,
    huge: bool,
    prefault_time: Duration,
}

impl PrivateBuffer {
    /// Allocates `bytes` rounded up to whole pages of `options.page_size`, zero-filled.
    ///
    /// When the kernel has too few hugepages this fails with [`Error::HugepagesShort`] (or
    /// [`Error::PageSizeUnsupported`]), or, with `allow_fallback`, warns once and uses
    /// 4 KiB pages of the same length.
    pub fn new(bytes: usize, options: &RegionOptions) -> Result<PrivateBuffer, Error> {
        if bytes == 0 {
            return Err(Error::ZeroSize);
        }
        let page_size = options.page_size;
        let len = page_size
            .round_up(bytes)
            .ok_or(Error::TooLarge { bytes, page_size })?;
        let start = Instant::now();
        let (mapping, huge) = match Mapping::private(len, Some(page_size), options.prefault) {
            Ok(mapping) => (mapping, true),
            // ENOMEM: too few pages to reserve; EINVAL: no pool of this size in the kernel.
            Err(error) if matches!(error.raw_os_error(), Some(libc::ENOMEM | libc::EINVAL)) => {
                let short = shortage_error(page_size, page_size.pages_for(len), TARGET.into());
                if !options.allow_fallback {
                    return Err(short);
                }
                log::warn!("{short}; falling back to 4 KiB pages for a {len}-byte private buffer");
                let mapping =
                    Mapping::private(len, None, options.prefault).map_err(|source| Error::Map {
                        target: TARGET.into(),
                        bytes: len,
                        source,
                    })?;
                (mapping, false)
            }
            Err(source) => {
                return Err(Error::Map {
                    target: TARGET.into(),
                    bytes: len,
                    source,
                });
            }
        };
        let prefault_time = if options.prefault {
            start.elapsed()
        } else {
            Duration::ZERO
        };
        Ok(PrivateBuffer {
            mapping,
            huge,
            prefault_time,
        })
    }

    /// First byte of the buffer. Valid until `self` is dropped.
    pub fn as_ptr(&self) -> *mut u8 {
        self.mapping.ptr()
    }

    /// Length in bytes (a whole number of pages of the requested size).
    pub fn len(&self) -> usize {
        self.mapping.len()
    }

    /// Always false: buffers are never empty; here for API completeness.
    pub fn is_empty(&self) -> bool {
        self.mapping.len() == 0
    }

    /// Whether the buffer is on hugepages (false after a fallback to 4 KiB pages).
    pub fn is_huge(&self) -> bool {
        self.huge
    }

    /// Time spent faulting the pages in; zero when `prefault` was off.
    pub fn prefault_time(&self) -> Duration {
        self.prefault_time
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is live, initialized (zero-filled by the kernel), `len` bytes
        // long, private to this process, and only reachable through `self`.
        unsafe { std::slice::from_raw_parts(self.mapping.ptr(), self.mapping.len()) }
    }

    /// The buffer's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.mapping.ptr(), self.mapping.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PageSize;

    /// The smallest `bytes` that needs more hugepages of `page_size` than are free now, or
    /// `None` when the counters cannot be read.
    fn more_than_free(page_size: PageSize) -> Option<usize> {
        let counters = crate::sysfs::Counters::read(
            std::path::Path::new(crate::sysfs::HUGEPAGES_SYSFS),
            page_size,
        )
        .ok()?;
        let pages = usize::try_from(counters.available() + 64).ok()?;
        pages.checked_mul(page_size.bytes())
    }

    #[test]
    fn falls_back_to_small_pages_when_short() {
        let Some(bytes) = more_than_free(PageSize::Huge2M) else {
            return;
        };
        let options = RegionOptions {
            allow_fallback: true,
            prefault: false,
            ..RegionOptions::default()
        };
        let mut buffer = PrivateBuffer::new(bytes, &options).unwrap();
        assert!(!buffer.is_huge());
        assert_eq!(buffer.len(), bytes);
        assert_eq!(buffer.prefault_time(), Duration::ZERO);
        buffer.as_mut_slice()[bytes - 1] = 9;
        assert_eq!(buffer.as_slice()[bytes - 1], 9);

        let strict = RegionOptions {
            prefault: false,
            ..RegionOptions::default()
        };
        let error = PrivateBuffer::new(bytes, &strict).unwrap_err();
        assert!(
            matches!(error, Error::HugepagesShort { ref fix, .. } if fix.contains("nr_hugepages")),
            "{error:?}"
        );
    }

    #[test]
    fn zero_bytes_are_rejected() {
        let error = PrivateBuffer::new(0, &RegionOptions::default()).unwrap_err();
        assert!(matches!(error, Error::ZeroSize));
    }
}
