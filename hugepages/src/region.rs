//! The shared memory pool: one `MAP_SHARED` region that every broker process maps.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::backing::{classify, parent_dir};
use crate::error::{default_mount_fix, io_error};
use crate::map::Mapping;
use crate::sysfs::{DAX_SYSFS, dax_device_bytes, is_not_found, preflight, shortage_error};
use crate::{BackingKind, Error, PageSize};

/// Where regions go when hugepages are short and fallback is allowed.
const SHM_DIR: &str = "/dev/shm";

/// Permissions of new region files: brokers of one group may share the pool.
const REGION_FILE_MODE: u32 = 0o660;

/// How to set up a [`SharedRegion`] or [`crate::PrivateBuffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionOptions {
    /// Page size for private buffers, for rounding shm and DAX regions, and in suggested
    /// mount commands. A hugetlbfs file always gets the page size of its mount.
    pub page_size: PageSize,
    /// Accept memory that is not hugepage-backed (tmpfs, 4 KiB pages), with one warning.
    pub allow_fallback: bool,
    /// Fault every page in while mapping, so the first access does not pay for it.
    pub prefault: bool,
}

impl Default for RegionOptions {
    fn default() -> Self {
        RegionOptions {
            page_size: PageSize::Huge2M,
            allow_fallback: false,
            prefault: true,
        }
    }
}

/// A `MAP_SHARED` mapping of the pool file (or DAX device); unmapped on drop.
///
/// Other processes change this memory at any time, so it is exposed only as a raw pointer:
/// callers access it with volatile or atomic operations at offsets they agree on.
#[derive(Debug)]
pub struct SharedRegion {
    mapping: Mapping,
    backing: BackingKind,
    path: PathBuf,
    prefault_time: Duration,
}

impl SharedRegion {
    /// Creates (replacing any old file) a region of `bytes` (rounded up to the page size) at
    /// `path`.
    ///
    /// On hugetlbfs the old file (and, with `allow_fallback`, an old `/dev/shm/<file name>`)
    /// is removed first and [`crate::preflight`] runs before the new one is created; when pages
    /// are short this fails with [`Error::HugepagesShort`], or, with `allow_fallback`, creates
    /// `/dev/shm/<file name>` instead and warns once. A path on tmpfs
    /// needs `allow_fallback`. A `/dev/daxX.Y` device is mapped as it is: its old contents
    /// are not cleared.
    pub fn create(
        path: &Path,
        bytes: usize,
        options: &RegionOptions,
    ) -> Result<SharedRegion, Error> {
        if bytes == 0 {
            return Err(Error::ZeroSize);
        }
        let name = file_name(path)?;
        match classify(path, options.page_size)? {
            BackingKind::Hugetlbfs(page_size) => {
                let len = round_up(page_size, bytes)?;
                let shm_path = Path::new(SHM_DIR).join(name);
                remove_old(path)?;
                if options.allow_fallback {
                    // A fallback region left by an earlier run is an old region too, and
                    // `open` would find it if this one is ever missing.
                    remove_old(&shm_path)?;
                }
                match preflight(page_size, len) {
                    Ok(_) => create_file(path, len, BackingKind::Hugetlbfs(page_size), options),
                    Err(error @ Error::HugepagesShort { .. }) if options.allow_fallback => {
                        log::warn!(
                            "{error}; falling back to {}, which is NOT hugepage-backed \
                             (development only)",
                            shm_path.display()
                        );
                        create_file(&shm_path, len, BackingKind::Shm, options)
                    }
                    Err(error) => Err(error),
                }
            }
            BackingKind::Shm => {
                accept_shm(path, options)?;
                let len = round_up(options.page_size, bytes)?;
                remove_old(path)?;
                create_file(path, len, BackingKind::Shm, options)
            }
            BackingKind::Dax => map_dax(path, Some(round_up(options.page_size, bytes)?), options),
        }
    }

    /// Maps an existing region (size taken from the file, or from
    /// `/sys/bus/dax/devices/<name>/size` for `/dev/daxX.Y`).
    ///
    /// With `allow_fallback`, a region missing on hugetlbfs is looked for in
    /// `/dev/shm/<file name>`, where [`SharedRegion::create`] puts it when pages are short.
    pub fn open(path: &Path, options: &RegionOptions) -> Result<SharedRegion, Error> {
        let name = file_name(path)?;
        match classify(path, options.page_size)? {
            BackingKind::Hugetlbfs(page_size) => {
                let backing = BackingKind::Hugetlbfs(page_size);
                match open_existing(path, backing, options) {
                    Err(Error::RegionMissing { .. }) if options.allow_fallback => {
                        let shm_path = Path::new(SHM_DIR).join(name);
                        let region = open_existing(&shm_path, BackingKind::Shm, options).map_err(
                            |error| match error {
                                Error::RegionMissing { .. } => Error::RegionMissing {
                                    path: path.to_path_buf(),
                                },
                                other => other,
                            },
                        )?;
                        log::warn!(
                            "no region at {}; using the fallback region {}, which is NOT \
                             hugepage-backed (development only)",
                            path.display(),
                            shm_path.display()
                        );
                        Ok(region)
                    }
                    result => result,
                }
            }
            BackingKind::Shm => {
                accept_shm(path, options)?;
                open_existing(path, BackingKind::Shm, options)
            }
            BackingKind::Dax => map_dax(path, None, options),
        }
    }

    /// First byte of the region. Valid until `self` is dropped.
    pub fn as_ptr(&self) -> *mut u8 {
        self.mapping.ptr()
    }

    /// Length of the region in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.mapping.len()
    }

    /// Always false: regions are never empty; here for API completeness.
    pub fn is_empty(&self) -> bool {
        self.mapping.len() == 0
    }

    /// What memory backs the region.
    pub fn backing(&self) -> BackingKind {
        self.backing
    }

    /// The file or device actually mapped (the `/dev/shm` file after a fallback).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Time spent faulting the pages in while mapping; zero when `prefault` was off.
    pub fn prefault_time(&self) -> Duration {
        self.prefault_time
    }
}

/// The final component of `path`, required for the `/dev/shm` fallback name.
fn file_name(path: &Path) -> Result<&std::ffi::OsStr, Error> {
    path.file_name().ok_or_else(|| Error::InvalidPath {
        path: path.to_path_buf(),
    })
}

/// `bytes` rounded up to whole pages.
fn round_up(page_size: PageSize, bytes: usize) -> Result<usize, Error> {
    page_size
        .round_up(bytes)
        .ok_or(Error::TooLarge { bytes, page_size })
}

/// Lets a tmpfs path through only with `allow_fallback`, and then warns once.
fn accept_shm(path: &Path, options: &RegionOptions) -> Result<(), Error> {
    let fix = default_mount_fix(options.page_size);
    if !options.allow_fallback {
        return Err(Error::FallbackNotAllowed {
            path: path.to_path_buf(),
            fix,
        });
    }
    log::warn!(
        "{} is on tmpfs: the region is not hugepage-backed, for development only; \
         for production put it on hugetlbfs ({fix})",
        path.display()
    );
    Ok(())
}

/// Removes an old region file, if any.
fn remove_old(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            Err(io_error("remove the old region", path, error))
        }
        _ => Ok(()),
    }
}

/// Removes a half-made region file unless disarmed.
struct RemoveOnFailure<'a> {
    path: &'a Path,
    armed: bool,
}

impl Drop for RemoveOnFailure<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: the error that got us here is the one worth reporting.
            let _ = fs::remove_file(self.path);
        }
    }
}

/// Creates a file of `len` bytes at `path` and maps it.
fn create_file(
    path: &Path,
    len: usize,
    backing: BackingKind,
    options: &RegionOptions,
) -> Result<SharedRegion, Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(REGION_FILE_MODE)
        .open(path)
        .map_err(|error| match error.kind() {
            io::ErrorKind::PermissionDenied => io_error("create files in", parent_dir(path), error),
            _ => io_error("create", path, error),
        })?;
    let mut cleanup = RemoveOnFailure { path, armed: true };
    // ftruncate reserves nothing on hugetlbfs; mmap does, so pages are checked there.
    file.set_len(len as u64)
        .map_err(|error| io_error("set the size of", path, error))?;
    let region = map_file(&file, path, len, backing, options)?;
    cleanup.armed = false;
    Ok(region)
}

/// Opens an existing region file and maps all of it.
fn open_existing(
    path: &Path,
    backing: BackingKind,
    options: &RegionOptions,
) -> Result<SharedRegion, Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|error| match error.kind() {
            io::ErrorKind::NotFound => Error::RegionMissing {
                path: path.to_path_buf(),
            },
            _ => io_error("open", path, error),
        })?;
    let size = file
        .metadata()
        .map_err(|error| io_error("stat", path, error))?
        .len();
    if size == 0 {
        return Err(Error::EmptyRegion {
            path: path.to_path_buf(),
        });
    }
    let len = usize::try_from(size).map_err(|_| Error::Unaddressable {
        path: path.to_path_buf(),
        bytes: size,
    })?;
    map_file(&file, path, len, backing, options)
}

/// Maps a DAX device: `len` bytes, or the whole device when `len` is `None`.
fn map_dax(
    path: &Path,
    len: Option<usize>,
    options: &RegionOptions,
) -> Result<SharedRegion, Error> {
    let missing = || Error::DaxDeviceMissing {
        path: path.to_path_buf(),
    };
    let name = file_name(path)?.to_str().ok_or_else(missing)?;
    let device_bytes = dax_device_bytes(Path::new(DAX_SYSFS), name).map_err(|error| {
        if is_not_found(&error) {
            missing()
        } else {
            error
        }
    })?;
    let len = match len {
        Some(bytes) if bytes as u64 > device_bytes => {
            return Err(Error::DaxTooSmall {
                path: path.to_path_buf(),
                device_bytes,
                bytes,
            });
        }
        Some(bytes) => bytes,
        None => usize::try_from(device_bytes).map_err(|_| Error::Unaddressable {
            path: path.to_path_buf(),
            bytes: device_bytes,
        })?,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|error| match error.kind() {
            io::ErrorKind::NotFound => missing(),
            _ => io_error("open", path, error),
        })?;
    map_file(&file, path, len, BackingKind::Dax, options)
}

/// Maps `len` bytes of `file` shared, pre-faulting them if asked, and logs the time taken.
fn map_file(
    file: &File,
    path: &Path,
    len: usize,
    backing: BackingKind,
    options: &RegionOptions,
) -> Result<SharedRegion, Error> {
    // tmpfs is pre-faulted by MADV_POPULATE_WRITE after mapping: MAP_POPULATE would fault it
    // read-only and hide allocation failures.
    let populate_by_mmap = options.prefault && backing != BackingKind::Shm;
    let flags = libc::MAP_SHARED
        | if populate_by_mmap {
            libc::MAP_POPULATE
        } else {
            0
        };
    let start = Instant::now();
    let mapping = Mapping::new(len, flags, file.as_raw_fd())
        .map_err(|error| map_error(error, path, len, backing))?;
    if options.prefault && backing == BackingKind::Shm {
        mapping.populate_write().map_err(|source| Error::ShmFull {
            path: path.to_path_buf(),
            dir: parent_dir(path).to_path_buf(),
            bytes: len,
            source,
        })?;
    }
    let prefault_time = if options.prefault {
        start.elapsed()
    } else {
        Duration::ZERO
    };
    if options.prefault {
        log::info!(
            "mapped {len} bytes of {} ({backing}), pre-faulted in {:.1} ms",
            path.display(),
            prefault_time.as_secs_f64() * 1e3
        );
    } else {
        log::info!(
            "mapped {len} bytes of {} ({backing}), not pre-faulted",
            path.display()
        );
    }
    Ok(SharedRegion {
        mapping,
        backing,
        path: path.to_path_buf(),
        prefault_time,
    })
}

/// Turns a failed `mmap` of a region file into a specific error.
fn map_error(error: io::Error, path: &Path, len: usize, backing: BackingKind) -> Error {
    match (error.raw_os_error(), backing) {
        (Some(libc::ENOMEM), BackingKind::Hugetlbfs(page_size)) => shortage_error(
            page_size,
            page_size.pages_for(len),
            path.display().to_string(),
        ),
        (Some(libc::EACCES | libc::EPERM), _) => Error::PermissionDenied {
            action: "map",
            path: path.to_path_buf(),
        },
        _ => Error::Map {
            target: path.display().to_string(),
            bytes: len,
            source: error,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<SharedRegion>();
        send_sync::<crate::PrivateBuffer>();
    }

    #[test]
    fn defaults() {
        let options = RegionOptions::default();
        assert_eq!(options.page_size, PageSize::Huge2M);
        assert!(!options.allow_fallback);
        assert!(options.prefault);
    }

    #[test]
    fn mmap_errors_are_specific() {
        let path = Path::new("/dev/hugepages/pool");
        let denied = map_error(
            io::Error::from_raw_os_error(libc::EACCES),
            path,
            4096,
            BackingKind::Shm,
        );
        assert!(matches!(
            denied,
            Error::PermissionDenied { action: "map", .. }
        ));
        assert!(denied.to_string().contains("/dev/hugepages/pool"));
        let other = map_error(
            io::Error::from_raw_os_error(libc::ENODEV),
            path,
            4096,
            BackingKind::Dax,
        );
        assert!(matches!(other, Error::Map { bytes: 4096, .. }));
        let short = map_error(
            io::Error::from_raw_os_error(libc::ENOMEM),
            path,
            usize::MAX / 2,
            BackingKind::Hugetlbfs(PageSize::Huge2M),
        );
        // Nobody has that many pages free, so the re-read counters say "short".
        assert!(
            matches!(short, Error::HugepagesShort { ref fix, .. } if fix.contains("nr_hugepages")),
            "{short:?}"
        );
    }

    #[test]
    fn zero_bytes_and_nameless_paths_are_rejected() {
        let options = RegionOptions::default();
        assert!(matches!(
            SharedRegion::create(Path::new("/dev/shm/x"), 0, &options),
            Err(Error::ZeroSize)
        ));
        assert!(matches!(
            SharedRegion::open(Path::new("/"), &options),
            Err(Error::InvalidPath { .. })
        ));
    }
}
