//! Everything that can go wrong, each with the command that fixes it where there is one.

use std::io;
use std::path::PathBuf;

use crate::PageSize;

/// Why a region or buffer could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Zero bytes were requested.
    #[error("a region of 0 bytes was requested; ask for at least 1 byte")]
    ZeroSize,

    /// The requested size overflows when rounded up to whole pages.
    #[error("{bytes} bytes cannot be rounded up to whole {page_size} pages: the size overflows")]
    TooLarge {
        /// Bytes requested.
        bytes: usize,
        /// Page size it was rounded to.
        page_size: PageSize,
    },

    /// An existing region is larger than this process's address space.
    #[error("{path:?} holds {bytes} bytes, more than this process can address")]
    Unaddressable {
        /// The region file or device.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },

    /// The path names no file (it is `/` or ends in `..`).
    #[error("{path:?} names no file; give a file path such as /dev/hugepages/embarcadero-pool")]
    InvalidPath {
        /// The path given.
        path: PathBuf,
    },

    /// Fewer hugepages are free than the region needs.
    #[error(
        "{pages_needed} hugepages of {page_size} are needed but only {pages_free} are free; \
         reserve more with: {fix}"
    )]
    HugepagesShort {
        /// Page size asked for.
        page_size: PageSize,
        /// Pages the region needs.
        pages_needed: u64,
        /// Pages free and not reserved by other mappings.
        pages_free: u64,
        /// The command that raises the reservation just enough.
        fix: String,
    },

    /// `mmap` could not reserve hugepages although sysfs shows enough free ones.
    #[error(
        "the kernel refused {pages_needed} hugepages of {page_size} for {target} although \
         {pages_free} are free; a hugetlb cgroup limit is the likely cause, check it with: {fix}"
    )]
    HugepagesRefused {
        /// What was being mapped (a path, or "a private buffer").
        target: String,
        /// Page size asked for.
        page_size: PageSize,
        /// Pages the mapping needs.
        pages_needed: u64,
        /// Pages free according to sysfs after the failure.
        pages_free: u64,
        /// The command that shows the cgroup limit.
        fix: String,
    },

    /// The kernel has no pool for this page size.
    #[error(
        "this kernel offers no {page_size} hugepages (/sys/kernel/mm/hugepages/{} is missing); \
         use 2 MiB pages, or boot with `hugepagesz=1G` on the kernel command line",
        .page_size.sysfs_dir()
    )]
    PageSizeUnsupported {
        /// Page size asked for.
        page_size: PageSize,
    },

    /// No hugetlbfs of this page size is mounted.
    #[error("no hugetlbfs with {page_size} pages is mounted; mount one with: {fix}")]
    NoHugetlbfsMount {
        /// Page size asked for.
        page_size: PageSize,
        /// The mount command.
        fix: String,
    },

    /// The directory that should hold the region does not exist (often: hugetlbfs not mounted).
    #[error(
        "directory {dir:?} does not exist, so no region can live in it; \
         if it is meant to be a hugetlbfs mount, run: {fix}"
    )]
    DirectoryMissing {
        /// The missing directory.
        dir: PathBuf,
        /// The command that creates it and mounts hugetlbfs on it.
        fix: String,
    },

    /// The path is on a filesystem that cannot back a shared region.
    #[error(
        "{path:?} is on a filesystem of type {fs_type:#x}, which cannot back a shared region; \
         put it on hugetlbfs ({fix}), on /dev/daxX.Y, or on /dev/shm with allow_fallback"
    )]
    UnsupportedFilesystem {
        /// The region path.
        path: PathBuf,
        /// `statfs` `f_type` of its directory.
        fs_type: u64,
        /// The command that mounts hugetlbfs at the default place.
        fix: String,
    },

    /// A hugetlbfs mount uses a page size this crate does not support.
    #[error(
        "{path:?} is on hugetlbfs with {page_bytes}-byte pages; only 2 MiB and 1 GiB pages \
         are supported, mount one with: {fix}"
    )]
    UnsupportedPageSize {
        /// The region path.
        path: PathBuf,
        /// Page size of that mount in bytes.
        page_bytes: u64,
        /// The command that mounts a supported hugetlbfs.
        fix: String,
    },

    /// The path is on tmpfs and `allow_fallback` is off.
    #[error(
        "{path:?} is on tmpfs, not hugetlbfs, so the region would not be hugepage-backed; \
         put it on hugetlbfs ({fix}) or set allow_fallback (development only)"
    )]
    FallbackNotAllowed {
        /// The region path.
        path: PathBuf,
        /// The command that mounts hugetlbfs at the default place.
        fix: String,
    },

    /// `open` found no region at the path.
    #[error(
        "no region at {path:?}; create it first (SharedRegion::create), \
         and check that every broker uses the same path"
    )]
    RegionMissing {
        /// The region path.
        path: PathBuf,
    },

    /// The region file is mapped by other processes, so it is not replaced.
    #[error(
        "region {path:?} is in use: {} map it (they hold its shared lock); stop them before \
         replacing it, or put the new region at another path",
        describe_pids(holder_pids)
    )]
    RegionInUse {
        /// The region path.
        path: PathBuf,
        /// Processes on this host holding the lock (from `/proc/locks`; may be empty).
        holder_pids: Vec<u32>,
    },

    /// Another process holds the region file's lock exclusively: it is about to replace it.
    #[error(
        "region {path:?} is being replaced by another process (it holds the file's exclusive \
         lock); open it again once that process has created the new one"
    )]
    RegionBeingReplaced {
        /// The region path.
        path: PathBuf,
    },

    /// The path names another file than the one opened or mapped.
    #[error(
        "{path:?} was removed and created again: it names another file than the one mapped \
         here (the mapping holds the deleted file, which no other process will open)"
    )]
    RegionReplaced {
        /// The region path.
        path: PathBuf,
    },

    /// The mapped file was removed.
    #[error(
        "{path:?} was removed: the mapping holds the deleted file, which no other process \
         will open"
    )]
    RegionRemoved {
        /// The region path.
        path: PathBuf,
    },

    /// The mapped file shrank below the mapping: the pages past its end are gone.
    #[error(
        "{path:?} was truncated to {file_bytes} bytes under a mapping of {mapped_bytes} bytes: \
         the pages past its end are gone"
    )]
    RegionTruncated {
        /// The region path.
        path: PathBuf,
        /// Size of the file now.
        file_bytes: u64,
        /// Size of the mapping.
        mapped_bytes: u64,
    },

    /// `open` found a region file of 0 bytes.
    #[error(
        "region file {path:?} is empty: its creator did not finish; \
         create it again with SharedRegion::create"
    )]
    EmptyRegion {
        /// The region path.
        path: PathBuf,
    },

    /// The DAX device does not exist.
    #[error(
        "no DAX device {path:?}; list devices with `daxctl list`, \
         and put one in devdax mode with `daxctl reconfigure-device --mode=devdax <daxX.Y>`"
    )]
    DaxDeviceMissing {
        /// The device path.
        path: PathBuf,
    },

    /// The DAX device is smaller than the region.
    #[error("DAX device {path:?} holds {device_bytes} bytes but {bytes} were requested")]
    DaxTooSmall {
        /// The device path.
        path: PathBuf,
        /// Size of the device.
        device_bytes: u64,
        /// Size requested (rounded up to the page size).
        bytes: usize,
    },

    /// The caller may not open, create or map the path.
    #[error(
        "permission denied to {action} {path:?}; run as root, \
         or give your user access: chown $(id -u):$(id -g) {}",
        .path.display()
    )]
    PermissionDenied {
        /// What was being done.
        action: &'static str,
        /// The file or directory that refused.
        path: PathBuf,
    },

    /// Pre-faulting a file on tmpfs failed, normally because the filesystem is too small.
    #[error(
        "could not pre-fault {bytes} bytes of {path:?} on tmpfs ({source}); the filesystem is \
         probably too small: check with `df -h {}` and grow it with \
         `mount -o remount,size=<bytes> {}`",
        .dir.display(),
        .dir.display()
    )]
    ShmFull {
        /// The region file.
        path: PathBuf,
        /// The tmpfs mount (or directory) holding it.
        dir: PathBuf,
        /// Length of the region.
        bytes: usize,
        /// The OS error.
        source: io::Error,
    },

    /// `mmap` failed for another reason.
    #[error("could not map {bytes} bytes of {target}: {source}")]
    Map {
        /// What was being mapped (a path, or "a private buffer").
        target: String,
        /// Length of the mapping.
        bytes: usize,
        /// The OS error.
        source: io::Error,
    },

    /// A file operation failed.
    #[error("could not {action} {path:?}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },

    /// A sysfs or procfs file held unexpected text.
    #[error("could not parse {path:?}: expected {expected}, found {text:?}")]
    Parse {
        /// The file read.
        path: PathBuf,
        /// What it should have held.
        expected: &'static str,
        /// What it held.
        text: String,
    },
}

/// "processes 1, 2" or "processes on this host" when the pids are unknown.
fn describe_pids(pids: &[u32]) -> String {
    if pids.is_empty() {
        return "processes on this host".to_owned();
    }
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    format!("processes {}", list.join(", "))
}

/// The command that mounts hugetlbfs with `page_size` pages on `dir`.
pub(crate) fn mount_fix(page_size: PageSize, dir: &std::path::Path) -> String {
    format!(
        "mkdir -p {dir} && mount -t hugetlbfs -o pagesize={size} none {dir}",
        dir = dir.display(),
        size = page_size.mount_option()
    )
}

/// The command that mounts hugetlbfs with `page_size` pages at its conventional place.
pub(crate) fn default_mount_fix(page_size: PageSize) -> String {
    mount_fix(
        page_size,
        std::path::Path::new(page_size.default_mount_dir()),
    )
}

/// Turns a failed file operation into a specific error.
pub(crate) fn io_error(action: &'static str, path: &std::path::Path, source: io::Error) -> Error {
    match source.kind() {
        io::ErrorKind::PermissionDenied => Error::PermissionDenied {
            action,
            path: path.to_path_buf(),
        },
        _ => Error::Io {
            action,
            path: path.to_path_buf(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn mount_fix_is_the_exact_command() {
        assert_eq!(
            default_mount_fix(PageSize::Huge2M),
            "mkdir -p /dev/hugepages && mount -t hugetlbfs -o pagesize=2M none /dev/hugepages"
        );
        assert_eq!(
            mount_fix(PageSize::Huge1G, Path::new("/mnt/huge")),
            "mkdir -p /mnt/huge && mount -t hugetlbfs -o pagesize=1G none /mnt/huge"
        );
    }

    #[test]
    fn permission_errors_name_the_path() {
        let error = io_error(
            "create",
            Path::new("/dev/hugepages"),
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(matches!(error, Error::PermissionDenied { .. }));
        assert!(
            error
                .to_string()
                .contains("chown $(id -u):$(id -g) /dev/hugepages")
        );
        let error = io_error(
            "open",
            Path::new("/x"),
            io::Error::from_raw_os_error(libc::EIO),
        );
        assert!(matches!(error, Error::Io { .. }));
    }
}
