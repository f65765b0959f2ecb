//! The shared memory pool: one `MAP_SHARED` region that every broker process maps.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
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
///
/// Every region holds a shared `flock` on its file for as long as it lives, and
/// [`SharedRegion::create`] takes the old file's lock exclusively before it replaces it: a
/// region that some process on this host has mapped is never replaced under it.
#[derive(Debug)]
pub struct SharedRegion {
    mapping: Mapping,
    backing: BackingKind,
    path: PathBuf,
    prefault_time: Duration,
    /// The file mapped, open for the lock and for [`SharedRegion::check_backing`].
    file: File,
}

/// The `flock` a process holds on a region file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lock {
    /// Held by every process that maps the region.
    Shared,
    /// Taken (without waiting) by a process about to replace the region.
    Exclusive,
}

impl SharedRegion {
    /// Creates (replacing any old file) a region of `bytes` (rounded up to the page size) at
    /// `path`. An old file that another process maps (it holds the file's shared lock) is
    /// not replaced: that is [`Error::RegionInUse`], naming the processes.
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
            BackingKind::Dax => {
                // Nothing is removed, but the device's old contents are about to be
                // overwritten: refuse while another process maps it.
                let device = open_and_lock(
                    path,
                    Lock::Exclusive,
                    Error::DaxDeviceMissing {
                        path: path.to_path_buf(),
                    },
                )?;
                drop(device);
                map_dax(
                    path,
                    Some(round_up(options.page_size, bytes)?),
                    Lock::Shared,
                    options,
                )
            }
        }
    }

    /// Maps an existing region (size taken from the file, or from
    /// `/sys/bus/dax/devices/<name>/size` for `/dev/daxX.Y`).
    ///
    /// With `allow_fallback`, a region missing on hugetlbfs is looked for in
    /// `/dev/shm/<file name>`, where [`SharedRegion::create`] puts it when pages are short.
    ///
    /// Takes the file's shared lock without waiting: [`Error::RegionBeingReplaced`] while a
    /// process about to replace it holds the lock exclusively, and [`Error::RegionReplaced`]
    /// when the path named another file, or none, by the time the lock was taken. Both pass:
    /// try again. So does [`Error::EmptyRegion`] while [`SharedRegion::create`] runs in
    /// another process (it creates the file empty, then sizes it).
    pub fn open(path: &Path, options: &RegionOptions) -> Result<SharedRegion, Error> {
        SharedRegion::open_locked(path, Lock::Shared, options)
    }

    /// Maps an existing region as [`SharedRegion::open`] does, but takes its lock
    /// exclusively (without waiting): [`Error::RegionInUse`] when another process maps it.
    /// For a process about to replace the region that wants to look at it first; drop it
    /// before calling [`SharedRegion::create`].
    pub fn open_exclusive(path: &Path, options: &RegionOptions) -> Result<SharedRegion, Error> {
        SharedRegion::open_locked(path, Lock::Exclusive, options)
    }

    fn open_locked(
        path: &Path,
        lock: Lock,
        options: &RegionOptions,
    ) -> Result<SharedRegion, Error> {
        let name = file_name(path)?;
        match classify(path, options.page_size)? {
            BackingKind::Hugetlbfs(page_size) => {
                let backing = BackingKind::Hugetlbfs(page_size);
                match open_existing(path, backing, lock, options) {
                    Err(Error::RegionMissing { .. }) if options.allow_fallback => {
                        let shm_path = Path::new(SHM_DIR).join(name);
                        let region = open_existing(&shm_path, BackingKind::Shm, lock, options)
                            .map_err(|error| match error {
                                Error::RegionMissing { .. } => Error::RegionMissing {
                                    path: path.to_path_buf(),
                                },
                                other => other,
                            })?;
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
                open_existing(path, BackingKind::Shm, lock, options)
            }
            BackingKind::Dax => map_dax(path, None, lock, options),
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

    /// Checks that [`SharedRegion::path`] still names the file mapped here, and that the
    /// file still holds the whole mapping: [`Error::RegionRemoved`],
    /// [`Error::RegionReplaced`] or [`Error::RegionTruncated`] when not (the mapping then
    /// shows a deleted file nobody else will open, or pages that are gone). Other failures
    /// to `stat` are [`Error::Io`].
    pub fn check_backing(&self) -> Result<(), Error> {
        let mapped = self
            .file
            .metadata()
            .map_err(|error| io_error("fstat", &self.path, error))?;
        let named = match fs::metadata(&self.path) {
            Ok(named) => named,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(Error::RegionRemoved {
                    path: self.path.clone(),
                });
            }
            Err(error) => return Err(io_error("stat", &self.path, error)),
        };
        if (named.dev(), named.ino()) != (mapped.dev(), mapped.ino()) {
            return Err(Error::RegionReplaced {
                path: self.path.clone(),
            });
        }
        if mapped.nlink() == 0 {
            return Err(Error::RegionRemoved {
                path: self.path.clone(),
            });
        }
        // A device's size is not its file size.
        if self.backing != BackingKind::Dax && mapped.len() < self.len() as u64 {
            return Err(Error::RegionTruncated {
                path: self.path.clone(),
                file_bytes: mapped.len(),
                mapped_bytes: self.len() as u64,
            });
        }
        Ok(())
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

/// Removes an old region file, if any, holding its exclusive lock meanwhile: a file that
/// another process maps is [`Error::RegionInUse`] and stays.
fn remove_old(path: &Path) -> Result<(), Error> {
    let old = match File::open(path) {
        Ok(old) => old,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(io_error("open the old region", path, error)),
    };
    lock(&old, path, Lock::Exclusive)?;
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            Err(io_error("remove the old region", path, error))
        }
        _ => Ok(()),
    }
}

/// Takes a lock of `kind` on `file` without waiting.
fn lock(file: &File, path: &Path, kind: Lock) -> Result<(), Error> {
    let operation = match kind {
        Lock::Shared => libc::LOCK_SH,
        Lock::Exclusive => libc::LOCK_EX,
    } | libc::LOCK_NB;
    loop {
        // SAFETY: flock only acts on the descriptor, which `file` keeps open.
        let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        match (error.raw_os_error(), kind) {
            (Some(libc::EINTR), _) => {}
            (Some(libc::EWOULDBLOCK), Lock::Shared) => {
                return Err(Error::RegionBeingReplaced {
                    path: path.to_path_buf(),
                });
            }
            (Some(libc::EWOULDBLOCK), Lock::Exclusive) => {
                return Err(Error::RegionInUse {
                    path: path.to_path_buf(),
                    holder_pids: lock_holders(file),
                });
            }
            _ => return Err(io_error("lock", path, error)),
        }
    }
}

/// Opens `path` and takes a lock of `kind` on it; `missing` when there is no such file.
fn open_and_lock(path: &Path, kind: Lock, missing: Error) -> Result<File, Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|error| match error.kind() {
            io::ErrorKind::NotFound => missing,
            _ => io_error("open", path, error),
        })?;
    lock(&file, path, kind)?;
    check_still_named(&file, path)?;
    Ok(file)
}

/// Checks that `path` still names `file` (opened from it, then locked): whoever replaced
/// the file in between has gone on, so this one is stale ([`Error::RegionReplaced`]),
/// also while the path names nothing yet (the replacement not created yet).
fn check_still_named(file: &File, path: &Path) -> Result<(), Error> {
    let replaced = || Error::RegionReplaced {
        path: path.to_path_buf(),
    };
    let named = match fs::metadata(path) {
        Ok(named) => named,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(replaced()),
        Err(error) => return Err(io_error("stat", path, error)),
    };
    let opened = file
        .metadata()
        .map_err(|error| io_error("fstat", path, error))?;
    if (named.dev(), named.ino()) != (opened.dev(), opened.ino()) {
        return Err(replaced());
    }
    Ok(())
}

/// Where the kernel lists every lock held on this host.
const PROC_LOCKS: &str = "/proc/locks";

/// Processes holding a `flock` on `file` (empty when `/proc/locks` cannot be read).
fn lock_holders(file: &File) -> Vec<u32> {
    let (Ok(metadata), Ok(text)) = (file.metadata(), fs::read_to_string(PROC_LOCKS)) else {
        return Vec::new();
    };
    let dev = metadata.dev();
    parse_lock_holders(&text, libc::major(dev), libc::minor(dev), metadata.ino())
}

/// The pids of `/proc/locks` lines for a `flock` held (not waited for) on the file
/// `major:minor:inode` (device numbers in hex, as the kernel prints them).
fn parse_lock_holders(text: &str, major: u32, minor: u32, inode: u64) -> Vec<u32> {
    let wanted = format!("{major:02x}:{minor:02x}:{inode}");
    let mut pids: Vec<u32> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // "N: FLOCK ADVISORY READ PID MAJ:MIN:INODE START END"; waiters have "->" after N.
            match fields.as_slice() {
                [_, "FLOCK", _, _, pid, file, ..] if *file == wanted => pid.parse().ok(),
                _ => None,
            }
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
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
    lock(&file, path, Lock::Shared)?;
    // ftruncate reserves nothing on hugetlbfs; mmap does, so pages are checked there.
    file.set_len(len as u64)
        .map_err(|error| io_error("set the size of", path, error))?;
    let region = map_file(file, path, len, backing, options)?;
    cleanup.armed = false;
    Ok(region)
}

/// Opens an existing region file, takes `lock` on it, and maps all of it.
fn open_existing(
    path: &Path,
    backing: BackingKind,
    lock: Lock,
    options: &RegionOptions,
) -> Result<SharedRegion, Error> {
    let file = open_and_lock(
        path,
        lock,
        Error::RegionMissing {
            path: path.to_path_buf(),
        },
    )?;
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
    map_file(file, path, len, backing, options)
}

/// Maps a DAX device (holding `lock` on it): `len` bytes, or the whole device when `len`
/// is `None`.
fn map_dax(
    path: &Path,
    len: Option<usize>,
    lock: Lock,
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
    let file = open_and_lock(path, lock, missing())?;
    map_file(file, path, len, BackingKind::Dax, options)
}

/// Maps `len` bytes of `file` shared, pre-faulting them if asked, and logs the time taken.
/// The region keeps `file` (and its lock).
fn map_file(
    file: File,
    path: &Path,
    len: usize,
    backing: BackingKind,
    options: &RegionOptions,
) -> Result<SharedRegion, Error> {
    // tmpfs is pre-faulted by MADV_POPULATE_WRITE after mapping: MAP_POPULATE would fault it
    // read-only and hide allocation failures.
    let populate_by_mmap = options.prefault && backing != BackingKind::Shm;
    let start = Instant::now();
    let mapping = Mapping::shared(&file, len, populate_by_mmap)
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
        file,
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
    fn lock_holders_are_read_from_proc_locks() {
        let text = "\
1: FLOCK  ADVISORY  READ  4242 00:2e:1234 0 EOF
1: -> FLOCK  ADVISORY  WRITE 5000 00:2e:1234 0 EOF
2: FLOCK  ADVISORY  READ  77 00:2e:1234 0 EOF
3: POSIX  ADVISORY  WRITE 88 00:2e:1234 0 EOF
4: FLOCK  ADVISORY  READ  99 00:2e:12345 0 EOF
5: FLOCK  ADVISORY  READ  4242 00:2e:1234 0 EOF
6: FLOCK  ADVISORY  WRITE 11 fd:01:1234 0 EOF
";
        assert_eq!(parse_lock_holders(text, 0, 0x2e, 1234), vec![77, 4242]);
        assert_eq!(parse_lock_holders(text, 0xfd, 1, 1234), vec![11]);
        assert!(parse_lock_holders(text, 0, 0x2e, 1).is_empty());
    }

    #[test]
    fn a_mapped_region_is_not_replaced_and_a_replaced_one_is_noticed() {
        let path = PathBuf::from(format!(
            "/dev/shm/hugepages-lock-test-{}",
            std::process::id()
        ));
        let options = RegionOptions {
            allow_fallback: true,
            prefault: false,
            ..RegionOptions::default()
        };
        let region = SharedRegion::create(&path, 4096, &options).expect("a /dev/shm region");
        region
            .check_backing()
            .expect("the region backs its mapping");
        match SharedRegion::create(&path, 4096, &options) {
            Err(Error::RegionInUse { holder_pids, .. }) => {
                assert!(holder_pids.contains(&std::process::id()), "{holder_pids:?}");
            }
            other => panic!("expected RegionInUse, got {other:?}"),
        }
        assert!(matches!(
            SharedRegion::open_exclusive(&path, &options),
            Err(Error::RegionInUse { .. })
        ));
        let second = SharedRegion::open(&path, &options).expect("shared locks go together");
        drop(second);

        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(0).unwrap();
        assert!(matches!(
            region.check_backing(),
            Err(Error::RegionTruncated { file_bytes: 0, .. })
        ));
        fs::remove_file(&path).unwrap();
        assert!(matches!(
            region.check_backing(),
            Err(Error::RegionRemoved { .. })
        ));
        fs::write(&path, [0u8; 64]).unwrap();
        assert!(matches!(
            region.check_backing(),
            Err(Error::RegionReplaced { .. })
        ));
        // The region still holds the deleted file's lock, not the new file's.
        let exclusive = SharedRegion::open_exclusive(&path, &options).expect("a free new file");
        assert!(matches!(
            SharedRegion::open(&path, &options),
            Err(Error::RegionBeingReplaced { .. })
        ));
        drop(exclusive);
        drop(region);
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_removed_before_its_lock_was_taken_counts_as_replaced() {
        let path = PathBuf::from(format!(
            "/dev/shm/hugepages-named-test-{}",
            std::process::id()
        ));
        let file = File::create(&path).unwrap();
        check_still_named(&file, &path).expect("the path names the file");
        // A formatter removed it between our open and our lock; its new file is not there yet.
        fs::remove_file(&path).unwrap();
        assert!(matches!(
            check_still_named(&file, &path),
            Err(Error::RegionReplaced { .. })
        ));
        // Now it is.
        fs::write(&path, [0u8; 8]).unwrap();
        assert!(matches!(
            check_still_named(&file, &path),
            Err(Error::RegionReplaced { .. })
        ));
        fs::remove_file(&path).unwrap();
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
