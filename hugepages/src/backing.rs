//! Which memory would back a file at a given path.

use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{default_mount_fix, io_error, mount_fix};
use crate::{BackingKind, Error, PageSize};

/// `statfs` `f_type` of hugetlbfs.
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
/// `statfs` `f_type` of tmpfs (and of devtmpfs).
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// What would back a region file at `path`, judged by `statfs` of its parent directory
/// (`/dev/dax*` paths are device DAX).
///
/// hugetlbfs gives [`BackingKind::Hugetlbfs`] with the mount's page size, tmpfs gives
/// [`BackingKind::Shm`]; any other filesystem is [`Error::UnsupportedFilesystem`].
pub fn backing_of(path: &Path) -> Result<BackingKind, Error> {
    classify(path, PageSize::Huge2M)
}

/// [`backing_of`], with `page_size` used in the mount commands of its errors.
pub(crate) fn classify(path: &Path, page_size: PageSize) -> Result<BackingKind, Error> {
    if is_dax_path(path) {
        return Ok(BackingKind::Dax);
    }
    let dir = parent_dir(path);
    let (fs_type, block_bytes) = statfs(dir).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => Error::DirectoryMissing {
            dir: dir.to_path_buf(),
            fix: mount_fix(page_size, dir),
        },
        _ => io_error("statfs", dir, source),
    })?;
    from_statfs(path, fs_type, block_bytes, page_size)
}

/// The backing for a filesystem of type `fs_type` whose blocks are `block_bytes` long.
fn from_statfs(
    path: &Path,
    fs_type: u64,
    block_bytes: u64,
    page_size: PageSize,
) -> Result<BackingKind, Error> {
    match fs_type {
        // hugetlbfs reports its page size as the block size.
        HUGETLBFS_MAGIC => PageSize::from_bytes(block_bytes)
            .map(BackingKind::Hugetlbfs)
            .ok_or_else(|| Error::UnsupportedPageSize {
                path: path.to_path_buf(),
                page_bytes: block_bytes,
                fix: default_mount_fix(page_size),
            }),
        TMPFS_MAGIC => Ok(BackingKind::Shm),
        _ => Err(Error::UnsupportedFilesystem {
            path: path.to_path_buf(),
            fs_type,
            fix: default_mount_fix(page_size),
        }),
    }
}

/// Whether `path` names a device-DAX character device such as `/dev/dax0.0`.
pub(crate) fn is_dax_path(path: &Path) -> bool {
    path.parent() == Some(Path::new("/dev"))
        && path
            .file_name()
            .is_some_and(|name| name.as_bytes().starts_with(b"dax"))
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// `statfs(2)` of `dir`: filesystem magic (low 32 bits) and block size.
fn statfs(dir: &Path) -> io::Result<(u64, u64)> {
    let c_dir = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c_dir` is NUL-terminated and `buf` is writable room for one `statfs`.
    let rc = unsafe { libc::statfs(c_dir.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so the kernel filled `buf`.
    let stat = unsafe { buf.assume_init() };
    // Magic numbers are 32-bit; masking keeps them equal where `f_type` is a signed 32-bit long.
    Ok(((stat.f_type as u64) & 0xffff_ffff, stat.f_bsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_magic() {
        let path = Path::new("/x/pool");
        assert_eq!(
            from_statfs(path, HUGETLBFS_MAGIC, 2 << 20, PageSize::Huge2M).unwrap(),
            BackingKind::Hugetlbfs(PageSize::Huge2M)
        );
        assert_eq!(
            from_statfs(path, HUGETLBFS_MAGIC, 1 << 30, PageSize::Huge2M).unwrap(),
            BackingKind::Hugetlbfs(PageSize::Huge1G)
        );
        assert_eq!(
            from_statfs(path, TMPFS_MAGIC, 4096, PageSize::Huge2M).unwrap(),
            BackingKind::Shm
        );
        let ext4 = from_statfs(path, 0xef53, 4096, PageSize::Huge2M).unwrap_err();
        assert!(matches!(
            ext4,
            Error::UnsupportedFilesystem {
                fs_type: 0xef53,
                ..
            }
        ));
        assert!(ext4.to_string().contains("0xef53"));
        assert!(
            ext4.to_string()
                .contains("mount -t hugetlbfs -o pagesize=2M")
        );
        let odd = from_statfs(path, HUGETLBFS_MAGIC, 64 << 10, PageSize::Huge2M).unwrap_err();
        assert!(matches!(
            odd,
            Error::UnsupportedPageSize {
                page_bytes: 65536,
                ..
            }
        ));
    }

    #[test]
    fn dax_paths() {
        assert!(is_dax_path(Path::new("/dev/dax0.0")));
        assert!(is_dax_path(Path::new("/dev/dax12.3")));
        assert!(!is_dax_path(Path::new("/dev/shm/dax0.0")));
        assert!(!is_dax_path(Path::new("/tmp/dax0.0")));
        assert_eq!(
            backing_of(Path::new("/dev/dax0.0")).unwrap(),
            BackingKind::Dax
        );
    }

    #[test]
    fn missing_directory_names_the_mount_command() {
        let error = classify(
            Path::new("/nonexistent-hugepages-test-dir/pool"),
            PageSize::Huge1G,
        )
        .unwrap_err();
        let Error::DirectoryMissing { dir, fix } = &error else {
            panic!("expected DirectoryMissing, got {error:?}");
        };
        assert_eq!(dir, Path::new("/nonexistent-hugepages-test-dir"));
        assert_eq!(
            fix,
            "mkdir -p /nonexistent-hugepages-test-dir && mount -t hugetlbfs -o pagesize=1G \
             none /nonexistent-hugepages-test-dir"
        );
    }

    #[test]
    fn parent_of_a_bare_name_is_the_current_dir() {
        assert_eq!(parent_dir(Path::new("pool")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/pool")), Path::new("/a"));
    }
}
