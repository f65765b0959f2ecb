//! hugetlbfs mounts, read from `/proc/mounts`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use crate::error::{default_mount_fix, io_error};
use crate::{Error, PageSize};

/// One mounted hugetlbfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Mount point.
    pub path: PathBuf,
    /// Size of the pages its files get.
    pub page_size: PageSize,
}

/// The hugetlbfs mounts listed in `/proc/mounts`, in mount order.
///
/// Mounts with a page size other than 2 MiB or 1 GiB are left out.
pub fn hugetlbfs_mounts() -> Result<Vec<Mount>, Error> {
    let path = Path::new("/proc/mounts");
    let text = std::fs::read_to_string(path).map_err(|source| io_error("read", path, source))?;
    Ok(parse_mounts(&text))
}

/// The first hugetlbfs mount with `page_size` pages, the natural home of a pool file.
///
/// Returns [`Error::NoHugetlbfsMount`] with the mount command when there is none.
pub fn default_pool_dir(page_size: PageSize) -> Result<PathBuf, Error> {
    hugetlbfs_mounts()?
        .into_iter()
        .find(|mount| mount.page_size == page_size)
        .map(|mount| mount.path)
        .ok_or_else(|| Error::NoHugetlbfsMount {
            page_size,
            fix: default_mount_fix(page_size),
        })
}

/// The hugetlbfs mounts in the text of `/proc/mounts`.
pub(crate) fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_device, mount_point, fs_type, options) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            if fs_type != "hugetlbfs" {
                return None;
            }
            // The kernel prints `pagesize=` on every hugetlbfs mount; without it the default
            // hugepage size applies, which is 2 MiB on x86-64. The kernel writes it with
            // binary units (`2M`, `1024M`), as `units` reads them.
            let page_size = match options.split(',').find_map(|o| o.strip_prefix("pagesize=")) {
                Some(value) => PageSize::from_bytes(units::parse_bytes(value).ok()?)?,
                None => PageSize::Huge2M,
            };
            Some(Mount {
                path: unescape(mount_point),
                page_size,
            })
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) that `/proc/mounts` uses in paths.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|octal| std::str::from_utf8(octal).ok())
            .and_then(|octal| u8::from_str_radix(octal, 8).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
proc /proc proc rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,relatime,size=24684092k 0 0
hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0
none /dev/hugepages1G hugetlbfs rw,relatime,pagesize=1024M 0 0
none /mnt/huge\\040pool hugetlbfs rw,relatime 0 0
none /mnt/giant hugetlbfs rw,relatime,pagesize=1G,size=4G 0 0
none /mnt/odd hugetlbfs rw,relatime,pagesize=64K 0 0
none /mnt/kilo hugetlbfs rw,relatime,pagesize=2048k 0 0
none /mnt/garbled hugetlbfs rw,relatime,pagesize=2X 0 0
/dev/vda / ext4 rw,relatime 0 0
truncated-line
";

    #[test]
    fn parses_page_sizes_and_paths() {
        let mounts = parse_mounts(SAMPLE);
        let expected = [
            ("/dev/hugepages", PageSize::Huge2M),
            ("/dev/hugepages1G", PageSize::Huge1G),
            ("/mnt/huge pool", PageSize::Huge2M),
            ("/mnt/giant", PageSize::Huge1G),
            ("/mnt/kilo", PageSize::Huge2M),
        ];
        let expected: Vec<Mount> = expected
            .iter()
            .map(|(path, page_size)| Mount {
                path: PathBuf::from(path),
                page_size: *page_size,
            })
            .collect();
        assert_eq!(mounts, expected);
    }

    #[test]
    fn no_hugetlbfs_gives_no_mounts() {
        assert!(parse_mounts("tmpfs /dev/shm tmpfs rw 0 0\n").is_empty());
        assert!(parse_mounts("").is_empty());
    }

    #[test]
    fn unescapes_octal_and_keeps_the_rest() {
        assert_eq!(unescape(r"/a\040b\134c"), PathBuf::from(r"/a b\c"));
        assert_eq!(unescape(r"/trailing\04"), PathBuf::from(r"/trailing\04"));
        assert_eq!(unescape(r"/bad\999"), PathBuf::from(r"/bad\999"));
    }
}
