//! Page sizes and the kinds of memory that can back a region.

use std::fmt;

/// A hugepage size the kernel can hand out on x86-64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 2 MiB pages (`hugepages-2048kB`).
    Huge2M,
    /// 1 GiB pages (`hugepages-1048576kB`).
    Huge1G,
}

impl PageSize {
    /// Bytes in one page.
    pub fn bytes(self) -> usize {
        match self {
            PageSize::Huge2M => 2 << 20,
            PageSize::Huge1G => 1 << 30,
        }
    }

    /// Name of this size's directory under `/sys/kernel/mm/hugepages/`.
    pub fn sysfs_dir(self) -> &'static str {
        match self {
            PageSize::Huge2M => "hugepages-2048kB",
            PageSize::Huge1G => "hugepages-1048576kB",
        }
    }

    /// The page size of exactly `bytes`, if it is one of ours.
    pub fn from_bytes(bytes: u64) -> Option<PageSize> {
        [PageSize::Huge2M, PageSize::Huge1G]
            .into_iter()
            .find(|size| size.bytes() as u64 == bytes)
    }

    /// The `pagesize=` value for `mount -t hugetlbfs`.
    pub fn mount_option(self) -> &'static str {
        match self {
            PageSize::Huge2M => "2M",
            PageSize::Huge1G => "1G",
        }
    }

    /// The conventional mount point for this size, as `scripts/setup-hugepages.sh` creates it.
    pub fn default_mount_dir(self) -> &'static str {
        match self {
            PageSize::Huge2M => "/dev/hugepages",
            PageSize::Huge1G => "/dev/hugepages1G",
        }
    }

    /// log2 of the size: what `mmap` takes with `MAP_HUGETLB` to pick this size
    /// (`MAP_HUGE_2MB` is 21 shifted by `MAP_HUGE_SHIFT`).
    pub(crate) fn shift(self) -> u8 {
        self.bytes().trailing_zeros() as u8
    }

    /// Number of pages that hold `bytes`.
    pub(crate) fn pages_for(self, bytes: usize) -> u64 {
        bytes.div_ceil(self.bytes()) as u64
    }

    /// `bytes` rounded up to a whole number of pages, `None` if that overflows.
    pub(crate) fn round_up(self, bytes: usize) -> Option<usize> {
        bytes.checked_next_multiple_of(self.bytes())
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageSize::Huge2M => "2 MiB",
            PageSize::Huge1G => "1 GiB",
        })
    }
}

/// What memory backs a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackingKind {
    /// A file on a hugetlbfs mount with pages of this size.
    Hugetlbfs(PageSize),
    /// A device-DAX character device (`/dev/daxX.Y`), e.g. real CXL memory.
    Dax,
    /// A file on tmpfs (`/dev/shm`): 4 KiB pages, for development only.
    Shm,
}

impl fmt::Display for BackingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackingKind::Hugetlbfs(size) => write!(f, "hugetlbfs ({size} pages)"),
            BackingKind::Dax => f.write_str("device DAX"),
            BackingKind::Shm => f.write_str("shm (4 KiB pages, not hugepage-backed)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_names() {
        assert_eq!(PageSize::Huge2M.bytes(), 2 * 1024 * 1024);
        assert_eq!(PageSize::Huge1G.bytes(), 1024 * 1024 * 1024);
        assert_eq!(PageSize::Huge2M.sysfs_dir(), "hugepages-2048kB");
        assert_eq!(PageSize::Huge1G.sysfs_dir(), "hugepages-1048576kB");
        assert_eq!(PageSize::Huge2M.to_string(), "2 MiB");
        assert_eq!(PageSize::Huge1G.to_string(), "1 GiB");
        assert_eq!(PageSize::from_bytes(2 << 20), Some(PageSize::Huge2M));
        assert_eq!(PageSize::from_bytes(1 << 30), Some(PageSize::Huge1G));
        assert_eq!(PageSize::from_bytes(4096), None);
        let flag = |page_size: PageSize| i32::from(page_size.shift()) << libc::MAP_HUGE_SHIFT;
        assert_eq!(flag(PageSize::Huge2M), libc::MAP_HUGE_2MB);
        assert_eq!(flag(PageSize::Huge1G), libc::MAP_HUGE_1GB);
    }

    #[test]
    fn rounding() {
        let size = PageSize::Huge2M;
        assert_eq!(size.pages_for(1), 1);
        assert_eq!(size.pages_for(size.bytes()), 1);
        assert_eq!(size.pages_for(size.bytes() + 1), 2);
        assert_eq!(size.round_up(1), Some(size.bytes()));
        assert_eq!(size.round_up(3 * size.bytes()), Some(3 * size.bytes()));
        assert_eq!(size.round_up(usize::MAX), None);
    }

    #[test]
    fn backing_display() {
        assert_eq!(
            BackingKind::Hugetlbfs(PageSize::Huge1G).to_string(),
            "hugetlbfs (1 GiB pages)"
        );
        assert!(BackingKind::Shm.to_string().contains("not hugepage-backed"));
    }
}
