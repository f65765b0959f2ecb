//! Preparing hugepages for tests and local runs: raise the reservation, mount a private
//! hugetlbfs. The library's mapping functions never do this on their own; tests and tools
//! that need pages call these (as root) and say so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Error;
use crate::page::PageSize;
use crate::sysfs::{Counters, HUGEPAGES_SYSFS};

/// True when this process runs with effective uid 0.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Raises the reservation of `page_size` pages (never lowers it) until at least `pages` are
/// free for new mappings. Fails with [`Error::HugepagesShort`] when the kernel could not find
/// the memory, and with a permission error when not root.
pub fn ensure_free_pages(page_size: PageSize, pages: u64) -> Result<(), Error> {
    let root = Path::new(HUGEPAGES_SYSFS);
    let counters = Counters::read(root, page_size)?;
    if counters.available() >= pages {
        return Ok(());
    }
    let path = root.join(page_size.sysfs_dir()).join("nr_hugepages");
    let wanted = counters.total + pages - counters.available();
    std::fs::write(&path, wanted.to_string()).map_err(|source| {
        crate::error::io_error("raise the hugepage reservation in", &path, source)
    })?;
    let after = Counters::read(root, page_size)?;
    if after.available() < pages {
        return Err(crate::sysfs::shortage_error(
            page_size,
            pages,
            format!(
                "{pages} free pages (the kernel gave {} of {wanted})",
                after.total
            ),
        ));
    }
    Ok(())
}

/// A hugetlbfs mounted on a fresh directory under the temporary directory; unmounted and
/// removed on drop, so a test leaves no mount behind.
#[derive(Debug)]
pub struct TempMount {
    dir: PathBuf,
}

impl TempMount {
    /// Mounts hugetlbfs with `page_size` pages. Needs root.
    pub fn new(page_size: PageSize) -> Result<TempMount, Error> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "embarcadero-hugetlbfs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|source| crate::error::io_error("create", &dir, source))?;
        let status = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o"])
            .arg(format!("pagesize={}", page_size.mount_option()))
            .arg("none")
            .arg(&dir)
            .status()
            .map_err(|source| crate::error::io_error("run mount for", &dir, source))?;
        if !status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(Error::NoHugetlbfsMount {
                page_size,
                fix: crate::error::mount_fix(page_size, &dir),
            });
        }
        Ok(TempMount { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|status| status.success());
        if !unmounted {
            // Something still maps a file there (a failed test): detach it anyway.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
