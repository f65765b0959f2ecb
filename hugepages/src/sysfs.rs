//! Readers of the kernel's hugepage counters, DAX device sizes and cgroup paths.
//!
//! Each reader takes its root directory (or the file text) so tests can feed it samples.

use std::io;
use std::path::{Path, PathBuf};

use crate::error::io_error;
use crate::{Error, PageSize};

/// Where the kernel publishes the hugepage pools.
pub(crate) const HUGEPAGES_SYSFS: &str = "/sys/kernel/mm/hugepages";

/// Where the kernel lists device-DAX instances.
pub(crate) const DAX_SYSFS: &str = "/sys/bus/dax/devices";

/// Result of a successful [`preflight`]: enough pages are free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preflight {
    /// Page size checked.
    pub page_size: PageSize,
    /// Pages the requested bytes need.
    pub pages_needed: u64,
    /// Pages free and not reserved by other mappings.
    pub pages_free: u64,
}

/// Compares pages needed for `bytes` with free (`free_hugepages` minus `resv_hugepages`)
/// pages in sysfs.
///
/// Returns [`Error::HugepagesShort`] with the exact `echo N > .../nr_hugepages` command
/// when too few are free. Reads only; never changes the reservation.
pub fn preflight(page_size: PageSize, bytes: usize) -> Result<Preflight, Error> {
    preflight_in(Path::new(HUGEPAGES_SYSFS), page_size, bytes)
}

/// [`preflight`] against the pools under `root` (normally [`HUGEPAGES_SYSFS`]).
pub(crate) fn preflight_in(
    root: &Path,
    page_size: PageSize,
    bytes: usize,
) -> Result<Preflight, Error> {
    let counters = Counters::read(root, page_size)?;
    let pages_needed = page_size.pages_for(bytes);
    let pages_free = counters.available();
    if pages_free < pages_needed {
        return Err(Error::HugepagesShort {
            page_size,
            pages_needed,
            pages_free,
            fix: counters.raise_fix(page_size, pages_needed),
        });
    }
    Ok(Preflight {
        page_size,
        pages_needed,
        pages_free,
    })
}

/// The error to report when `mmap` could not get `pages_needed` hugepages (`ENOMEM`).
///
/// Re-reads the counters: if pages are short now, the answer is the reservation command;
/// if not, the kernel refused for another reason, which on hosts like ours is a cgroup limit.
pub(crate) fn shortage_error(page_size: PageSize, pages_needed: u64, target: String) -> Error {
    let counters = match Counters::read(Path::new(HUGEPAGES_SYSFS), page_size) {
        Ok(counters) => counters,
        Err(error) => return error,
    };
    let pages_free = counters.available();
    if pages_free < pages_needed {
        return Error::HugepagesShort {
            page_size,
            pages_needed,
            pages_free,
            fix: counters.raise_fix(page_size, pages_needed),
        };
    }
    let cgroup_text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    Error::HugepagesRefused {
        target,
        page_size,
        pages_needed,
        pages_free,
        fix: format!("cat {}", cgroup_limit_file(&cgroup_text, page_size)),
    }
}

/// The counters of one hugepage pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counters {
    /// `nr_hugepages`: pages in the pool.
    pub(crate) total: u64,
    /// `free_hugepages`: pages not faulted in by anyone.
    pub(crate) free: u64,
    /// `resv_hugepages`: free pages promised to existing mappings.
    pub(crate) reserved: u64,
}

impl Counters {
    /// Reads the pool of `page_size` under `root`.
    pub(crate) fn read(root: &Path, page_size: PageSize) -> Result<Counters, Error> {
        let dir = root.join(page_size.sysfs_dir());
        if !dir.is_dir() {
            return Err(Error::PageSizeUnsupported { page_size });
        }
        Ok(Counters {
            total: read_u64(&dir.join("nr_hugepages"))?,
            free: read_u64(&dir.join("free_hugepages"))?,
            reserved: reserved_pages(read_u64(&dir.join("resv_hugepages"))?),
        })
    }

    /// Pages a new mapping can still reserve.
    pub(crate) fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }

    /// The command that raises the pool just enough for `pages_needed` more pages.
    fn raise_fix(&self, page_size: PageSize, pages_needed: u64) -> String {
        let missing = pages_needed.saturating_sub(self.available());
        format!(
            "echo {} > {HUGEPAGES_SYSFS}/{}/nr_hugepages",
            self.total.saturating_add(missing),
            page_size.sysfs_dir()
        )
    }
}

/// The reserved count as read: the kernel's counter can run below zero for a moment (seen
/// right after an AF_XDP UMEM on hugepages was released), and then reads as a huge number
/// (`18446744073709551600` for -16), which would make every free page look promised.
/// A negative reservation promises nothing: it counts as 0.
fn reserved_pages(read: u64) -> u64 {
    if i64::try_from(read).is_err() {
        0
    } else {
        read
    }
}

/// Size in bytes of the device-DAX instance `name` (e.g. `dax0.0`) listed under `root`.
pub(crate) fn dax_device_bytes(root: &Path, name: &str) -> Result<u64, Error> {
    read_u64(&root.join(name).join("size"))
}

/// The cgroup file that holds this process's hugetlb limit for `page_size`, found from the
/// text of `/proc/self/cgroup` (a v1 hugetlb hierarchy wins over the v2 one).
pub(crate) fn cgroup_limit_file(cgroup_text: &str, page_size: PageSize) -> String {
    let size = match page_size {
        PageSize::Huge2M => "2MB",
        PageSize::Huge1G => "1GB",
    };
    let mut unified = None;
    for line in cgroup_text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let path = path.trim_end_matches('/');
        if controllers.split(',').any(|name| name == "hugetlb") {
            return format!("/sys/fs/cgroup/hugetlb{path}/hugetlb.{size}.limit_in_bytes");
        }
        if controllers.is_empty() {
            unified = Some(format!("/sys/fs/cgroup{path}/hugetlb.{size}.max"));
        }
    }
    unified.unwrap_or_else(|| format!("/sys/fs/cgroup/hugetlb.{size}.max"))
}

/// Reads a file that holds one decimal number.
pub(crate) fn read_u64(path: &Path) -> Result<u64, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| io_error("read", path, source))?;
    text.trim().parse().map_err(|_| Error::Parse {
        path: PathBuf::from(path),
        expected: "a decimal number",
        text,
    })
}

/// Whether `error` is a missing file.
pub(crate) fn is_not_found(error: &Error) -> bool {
    matches!(error, Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A fake `/sys/kernel/mm/hugepages` with one 2 MiB pool.
    fn fake_pool(total: u64, free: u64, reserved: u64) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("hugepages-2048kB");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("nr_hugepages"), format!("{total}\n")).unwrap();
        fs::write(dir.join("free_hugepages"), format!("{free}\n")).unwrap();
        fs::write(dir.join("resv_hugepages"), format!("{reserved}\n")).unwrap();
        root
    }

    #[test]
    fn enough_pages_pass() {
        let root = fake_pool(600, 520, 10);
        let report = preflight_in(root.path(), PageSize::Huge2M, 510 * (2 << 20)).unwrap();
        assert_eq!(
            report,
            Preflight {
                page_size: PageSize::Huge2M,
                pages_needed: 510,
                pages_free: 510,
            }
        );
    }

    #[test]
    fn short_pages_give_the_exact_fix() {
        // 600 in the pool, 100 free of which 88 are promised: 12 usable, 24 needed.
        let root = fake_pool(600, 100, 88);
        let error = preflight_in(root.path(), PageSize::Huge2M, 24 * (2 << 20) - 5).unwrap_err();
        let Error::HugepagesShort {
            page_size,
            pages_needed,
            pages_free,
            fix,
        } = &error
        else {
            panic!("expected HugepagesShort, got {error:?}");
        };
        assert_eq!(*page_size, PageSize::Huge2M);
        assert_eq!((*pages_needed, *pages_free), (24, 12));
        assert_eq!(
            fix,
            "echo 612 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
        );
        assert!(error.to_string().contains(fix.as_str()));
    }

    #[test]
    fn reserved_above_free_counts_as_none() {
        let root = fake_pool(4, 1, 3);
        let error = preflight_in(root.path(), PageSize::Huge2M, 1).unwrap_err();
        assert!(matches!(error, Error::HugepagesShort { pages_free: 0, .. }));
    }

    #[test]
    fn a_reservation_below_zero_counts_as_none() {
        // resv_hugepages as the kernel printed it at -16.
        let root = fake_pool(600, 392, 18_446_744_073_709_551_600);
        let report = preflight_in(root.path(), PageSize::Huge2M, 128 * (2 << 20)).unwrap();
        assert_eq!(report.pages_free, 392);
    }

    #[test]
    fn missing_pool_is_unsupported_page_size() {
        let root = fake_pool(0, 0, 0);
        let error = preflight_in(root.path(), PageSize::Huge1G, 1).unwrap_err();
        assert!(matches!(
            error,
            Error::PageSizeUnsupported {
                page_size: PageSize::Huge1G
            }
        ));
    }

    #[test]
    fn garbage_counter_is_a_parse_error() {
        let root = fake_pool(0, 0, 0);
        fs::write(
            root.path().join("hugepages-2048kB/free_hugepages"),
            "lots\n",
        )
        .unwrap();
        let error = preflight_in(root.path(), PageSize::Huge2M, 1).unwrap_err();
        assert!(matches!(error, Error::Parse { ref text, .. } if text == "lots\n"));
    }

    #[test]
    fn dax_size_is_read_from_sysfs() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("dax0.0")).unwrap();
        fs::write(root.path().join("dax0.0/size"), "68719476736\n").unwrap();
        assert_eq!(dax_device_bytes(root.path(), "dax0.0").unwrap(), 64 << 30);
        let missing = dax_device_bytes(root.path(), "dax1.0").unwrap_err();
        assert!(is_not_found(&missing));
    }

    #[test]
    fn cgroup_limit_file_for_v1_and_v2() {
        let v2 = "0::/system.slice/broker.service\n";
        assert_eq!(
            cgroup_limit_file(v2, PageSize::Huge2M),
            "/sys/fs/cgroup/system.slice/broker.service/hugetlb.2MB.max"
        );
        let root_v2 = "0::/\n";
        assert_eq!(
            cgroup_limit_file(root_v2, PageSize::Huge1G),
            "/sys/fs/cgroup/hugetlb.1GB.max"
        );
        let v1 = "12:hugetlb:/user/7\n3:cpu,cpuacct:/user/7\n0::/user/7\n";
        assert_eq!(
            cgroup_limit_file(v1, PageSize::Huge2M),
            "/sys/fs/cgroup/hugetlb/user/7/hugetlb.2MB.limit_in_bytes"
        );
        assert_eq!(
            cgroup_limit_file("", PageSize::Huge2M),
            "/sys/fs/cgroup/hugetlb.2MB.max"
        );
    }
}
