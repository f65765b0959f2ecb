//! End-to-end tests against the real kernel.
//!
//! Tests marked "root" reserve 2 MiB pages (raising the pool, never lowering it) and mount
//! their own hugetlbfs on a fresh temporary directory, which a guard unmounts and removes.
//! Without root they print `skipped: needs root to reserve hugepages` and pass.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hugepages::{
    BackingKind, Error, PageSize, PrivateBuffer, RegionOptions, SharedRegion, backing_of,
    default_pool_dir, hugetlbfs_mounts, preflight, setup,
};

const SYSFS: &str = "/sys/kernel/mm/hugepages";
const MIB: usize = 1 << 20;
/// Set in the environment of the child process that re-runs this binary.
const CHILD_ENV: &str = "HUGEPAGES_TEST_CHILD_REGION";
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

/// Tests that read or change the hugepage counters run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether we run as root; prints the skip line when not.
fn root_or_skip() -> bool {
    if !setup::is_root() {
        eprintln!("skipped: needs root to reserve hugepages");
        return false;
    }
    true
}

fn counter(page_size: PageSize, name: &str) -> u64 {
    let path = Path::new(SYSFS).join(page_size.sysfs_dir()).join(name);
    fs::read_to_string(&path).unwrap().trim().parse().unwrap()
}

/// Pages free and not promised to other mappings.
fn available(page_size: PageSize) -> u64 {
    counter(page_size, "free_hugepages").saturating_sub(counter(page_size, "resv_hugepages"))
}

/// Raises the pool (never lowers it) until `pages` are available; false if the kernel
/// could not find the memory.
fn ensure_available(page_size: PageSize, pages: u64) -> bool {
    setup::ensure_free_pages(page_size, pages).is_ok()
}

/// A hugetlbfs on a fresh temporary directory, removed on drop.
fn test_mount(page_size: PageSize) -> setup::TempMount {
    setup::TempMount::new(page_size).expect("mount hugetlbfs on a temporary directory")
}

/// Removes a file on drop.
struct RemoveFile(PathBuf);

impl Drop for RemoveFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn pattern(index: usize, seed: u8) -> u8 {
    (index % 251) as u8 ^ seed
}

/// Writes the pattern of `seed` into `len` bytes at `ptr`.
fn fill(ptr: *mut u8, len: usize, seed: u8) {
    // SAFETY: callers pass a range inside a live mapping that no one else touches meanwhile.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = pattern(index, seed);
    }
}

/// Whether `len` bytes at `ptr` hold the pattern of `seed`.
fn holds(ptr: *const u8, len: usize, seed: u8) -> bool {
    // SAFETY: callers pass a range inside a live mapping that no one writes meanwhile.
    let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
    bytes
        .iter()
        .enumerate()
        .all(|(index, &byte)| byte == pattern(index, seed))
}

/// A KiB-valued `/proc/self/smaps` field of the mapping that starts at `ptr`.
fn smaps_field_kb(ptr: *const u8, field: &str) -> u64 {
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
    let start = format!("{:x}-", ptr as usize);
    let block: Vec<&str> = smaps
        .lines()
        .skip_while(|line| !line.starts_with(&start))
        .skip(1)
        .take_while(|line| !is_smaps_header(line))
        .collect();
    block
        .iter()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} for mapping at {ptr:p}"))
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap()
}

/// Whether `line` starts a mapping's block in smaps (`start-end perms ...`).
fn is_smaps_header(line: &str) -> bool {
    line.split_whitespace().next().is_some_and(|range| {
        range.contains('-') && range.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
    })
}

/// Hugetlb memory mapped by this process at `ptr`, in KiB.
fn hugetlb_kb(ptr: *const u8) -> u64 {
    smaps_field_kb(ptr, "Private_Hugetlb") + smaps_field_kb(ptr, "Shared_Hugetlb")
}

/// Runs this binary's `child_process_helper` on `path` and waits (bounded) for it.
fn run_child(path: &Path) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_process_helper", "--nocapture"])
        .env(CHILD_ENV, path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child process did not finish within {CHILD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "child process failed: {status}");
}

/// The child side of `region_on_hugetlbfs_is_shared_across_processes`: a no-op unless that
/// test re-runs this binary with `HUGEPAGES_TEST_CHILD_REGION` set.
#[test]
fn child_process_helper() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let region = SharedRegion::open(Path::new(&path), &RegionOptions::default()).unwrap();
    assert_eq!(region.backing(), BackingKind::Hugetlbfs(PageSize::Huge2M));
    let half = region.len() / 2;
    assert!(
        holds(region.as_ptr(), half, 1),
        "child sees the parent's bytes"
    );
    fill(region.as_ptr().wrapping_add(half), region.len() - half, 2);
}

#[test]
fn region_on_hugetlbfs_is_shared_across_processes() {
    let _serial = serial();
    if !root_or_skip() {
        return;
    }
    assert!(
        ensure_available(PageSize::Huge2M, 3),
        "kernel gave too few 2 MiB pages"
    );
    let mount = test_mount(PageSize::Huge2M);
    let path = mount.path().join("pool");
    let options = RegionOptions::default();

    assert!(
        hugetlbfs_mounts()
            .unwrap()
            .iter()
            .any(|m| m.path == mount.path() && m.page_size == PageSize::Huge2M)
    );
    let pool_dir = default_pool_dir(PageSize::Huge2M).unwrap();
    assert_eq!(
        backing_of(&pool_dir.join("x")).unwrap(),
        BackingKind::Hugetlbfs(PageSize::Huge2M)
    );
    assert_eq!(
        backing_of(&path).unwrap(),
        BackingKind::Hugetlbfs(PageSize::Huge2M)
    );

    let free_before = counter(PageSize::Huge2M, "free_hugepages");
    let region = SharedRegion::create(&path, 5 * MIB + 1, &options).unwrap();
    assert_eq!(region.len(), 6 * MIB, "rounded up to whole 2 MiB pages");
    assert_eq!(region.backing(), BackingKind::Hugetlbfs(PageSize::Huge2M));
    assert_eq!(region.path(), path);
    assert!(!region.is_empty());
    assert!(region.prefault_time() > Duration::ZERO);
    assert_eq!(smaps_field_kb(region.as_ptr(), "KernelPageSize"), 2048);
    assert_eq!(
        hugetlb_kb(region.as_ptr()),
        6 * 1024,
        "all pages pre-faulted"
    );
    assert!(counter(PageSize::Huge2M, "free_hugepages") <= free_before - 3);

    let half = region.len() / 2;
    fill(region.as_ptr(), half, 1);

    let again = SharedRegion::open(&path, &options).unwrap();
    assert_eq!(again.len(), region.len());
    assert_eq!(again.backing(), region.backing());
    assert_ne!(again.as_ptr(), region.as_ptr());
    assert!(holds(again.as_ptr(), half, 1));

    run_child(&path);
    assert!(holds(region.as_ptr().wrapping_add(half), half, 2));
    assert!(holds(again.as_ptr().wrapping_add(half), half, 2));

    // Replacing the region gives fresh, zeroed pages; without prefault nothing is faulted.
    drop(again);
    drop(region);
    let lazy = RegionOptions {
        prefault: false,
        ..options
    };
    let fresh = SharedRegion::create(&path, 6 * MIB, &lazy).unwrap();
    assert_eq!(fresh.prefault_time(), Duration::ZERO);
    assert_eq!(hugetlb_kb(fresh.as_ptr()), 0);
    // SAFETY: the region is live and only this test maps it.
    let bytes = unsafe { std::slice::from_raw_parts(fresh.as_ptr(), fresh.len()) };
    assert!(bytes.iter().all(|&byte| byte == 0));
}

#[test]
fn short_hugepages_fail_or_fall_back_to_shm() {
    let _serial = serial();
    if !root_or_skip() {
        return;
    }
    let mount = test_mount(PageSize::Huge2M);
    let name = format!("hugepages-test-short-{}", std::process::id());
    let path = mount.path().join(&name);
    let shm_path = Path::new("/dev/shm").join(&name);
    let _remove_shm = RemoveFile(shm_path.clone());
    let pages = available(PageSize::Huge2M) + 64;
    let bytes = usize::try_from(pages).unwrap() * PageSize::Huge2M.bytes();
    let strict = RegionOptions {
        prefault: false,
        ..RegionOptions::default()
    };

    let error = SharedRegion::create(&path, bytes, &strict).unwrap_err();
    let Error::HugepagesShort {
        page_size,
        pages_needed,
        fix,
        ..
    } = &error
    else {
        panic!("expected HugepagesShort, got {error:?}");
    };
    assert_eq!(*page_size, PageSize::Huge2M);
    assert_eq!(*pages_needed, pages);
    assert!(fix.starts_with("echo ") && fix.ends_with("/hugepages-2048kB/nr_hugepages"));
    assert!(!path.exists(), "nothing is created when pages are short");

    let lenient = RegionOptions {
        allow_fallback: true,
        ..strict
    };
    let region = SharedRegion::create(&path, bytes, &lenient).unwrap();
    assert_eq!(region.backing(), BackingKind::Shm);
    assert_eq!(region.path(), shm_path);
    assert_eq!(region.len(), bytes);
    fill(region.as_ptr(), 4096, 7);

    let reopened = SharedRegion::open(&path, &lenient).unwrap();
    assert_eq!(reopened.backing(), BackingKind::Shm);
    assert!(holds(reopened.as_ptr(), 4096, 7));
    assert!(matches!(
        SharedRegion::open(&path, &strict),
        Err(Error::RegionMissing { .. })
    ));

    // Once pages are there, a new region goes to hugetlbfs and the old fallback is removed.
    drop(reopened);
    drop(region);
    assert!(
        ensure_available(PageSize::Huge2M, 1),
        "kernel gave too few 2 MiB pages"
    );
    let region = SharedRegion::create(&path, 1, &lenient).unwrap();
    assert_eq!(region.backing(), BackingKind::Hugetlbfs(PageSize::Huge2M));
    assert!(!shm_path.exists(), "the stale fallback region is removed");
}

#[test]
fn opening_a_missing_region_says_so() {
    let _serial = serial();
    if !root_or_skip() {
        return;
    }
    let mount = test_mount(PageSize::Huge2M);
    let path = mount.path().join("never-created");
    let lenient = RegionOptions {
        allow_fallback: true,
        ..RegionOptions::default()
    };
    for options in [RegionOptions::default(), lenient] {
        let error = SharedRegion::open(&path, &options).unwrap_err();
        assert!(
            matches!(error, Error::RegionMissing { path: ref p } if *p == path),
            "{error:?}"
        );
    }
}

#[test]
fn preflight_reports_shortage_with_the_fix() {
    let _serial = serial();
    let pages = available(PageSize::Huge2M) + 64;
    let bytes = usize::try_from(pages).unwrap() * PageSize::Huge2M.bytes();
    let error = preflight(PageSize::Huge2M, bytes).unwrap_err();
    let Error::HugepagesShort {
        pages_needed, fix, ..
    } = &error
    else {
        panic!("expected HugepagesShort, got {error:?}");
    };
    assert_eq!(*pages_needed, pages);
    assert!(
        fix.starts_with("echo ")
            && fix.ends_with(" > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
        "{fix}"
    );
    assert!(error.to_string().contains(fix.as_str()));

    let enough = preflight(PageSize::Huge2M, 0).unwrap();
    assert_eq!(enough.pages_needed, 0);
}

#[test]
fn directory_on_another_filesystem_is_refused() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("pool");
    let options = RegionOptions::default();
    let error = SharedRegion::create(&path, MIB, &options).unwrap_err();
    match backing_of(&path) {
        Ok(BackingKind::Shm) => assert!(
            matches!(error, Error::FallbackNotAllowed { .. }),
            "{error:?}"
        ),
        Err(Error::UnsupportedFilesystem { fs_type, .. }) => {
            assert!(
                matches!(error, Error::UnsupportedFilesystem { fs_type: t, .. } if t == fs_type),
                "{error:?}"
            );
            assert!(error.to_string().contains("mount -t hugetlbfs"));
        }
        other => panic!("{:?} is neither tmpfs nor ordinary: {other:?}", dir.path()),
    }
    assert!(!path.exists());
}

#[test]
fn missing_directory_gives_the_mount_command() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("hugepages");
    let path = missing.join("pool");
    let expected_fix = format!(
        "mkdir -p {0} && mount -t hugetlbfs -o pagesize=2M none {0}",
        missing.display()
    );
    let create = SharedRegion::create(&path, MIB, &RegionOptions::default()).unwrap_err();
    let open = SharedRegion::open(&path, &RegionOptions::default()).unwrap_err();
    for error in [create, open] {
        assert!(
            matches!(error, Error::DirectoryMissing { ref dir, ref fix }
                if *dir == missing && *fix == expected_fix),
            "{error:?}"
        );
    }
}

#[test]
fn tmpfs_needs_fallback_and_then_is_shm() {
    let path = PathBuf::from(format!(
        "/dev/shm/hugepages-test-tmpfs-{}",
        std::process::id()
    ));
    if backing_of(&path).ok() != Some(BackingKind::Shm) {
        eprintln!("skipped: /dev/shm is not a tmpfs here");
        return;
    }
    let _remove = RemoveFile(path.clone());
    let strict = RegionOptions::default();
    let error = SharedRegion::create(&path, 4097, &strict).unwrap_err();
    assert!(
        matches!(error, Error::FallbackNotAllowed { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("mount -t hugetlbfs"));
    assert!(!path.exists());

    let lenient = RegionOptions {
        allow_fallback: true,
        ..strict
    };
    let region = SharedRegion::create(&path, 4097, &lenient).unwrap();
    assert_eq!(region.backing(), BackingKind::Shm);
    assert_eq!(region.len(), 2 * MIB, "rounded like a hugepage region");
    assert!(region.prefault_time() > Duration::ZERO);
    assert_eq!(
        smaps_field_kb(region.as_ptr(), "Rss"),
        2 * 1024,
        "pre-faulted"
    );
    fill(region.as_ptr(), region.len(), 3);

    let again = SharedRegion::open(&path, &lenient).unwrap();
    assert_eq!(again.len(), region.len());
    assert!(holds(again.as_ptr(), again.len(), 3));
    assert!(matches!(
        SharedRegion::open(&path, &strict),
        Err(Error::FallbackNotAllowed { .. })
    ));
    let empty = PathBuf::from(format!("{}-empty", path.display()));
    let _remove_empty = RemoveFile(empty.clone());
    fs::write(&empty, b"").unwrap();
    assert!(matches!(
        SharedRegion::open(&empty, &lenient),
        Err(Error::EmptyRegion { .. })
    ));
}

#[test]
fn private_buffer_on_2m_pages() {
    let _serial = serial();
    if !root_or_skip() {
        return;
    }
    assert!(
        ensure_available(PageSize::Huge2M, 2),
        "kernel gave too few 2 MiB pages"
    );
    let mut buffer = PrivateBuffer::new(3 * MIB, &RegionOptions::default()).unwrap();
    assert!(buffer.is_huge());
    assert_eq!(buffer.len(), 4 * MIB);
    assert!(!buffer.is_empty());
    assert_eq!(smaps_field_kb(buffer.as_ptr(), "KernelPageSize"), 2048);
    assert_eq!(
        hugetlb_kb(buffer.as_ptr()),
        4 * 1024,
        "all pages pre-faulted"
    );
    assert!(buffer.as_slice().iter().all(|&byte| byte == 0));
    fill(buffer.as_mut_slice().as_mut_ptr(), 4 * MIB, 5);
    assert!(holds(buffer.as_slice().as_ptr(), 4 * MIB, 5));
}

#[test]
fn private_buffer_on_a_1g_page() {
    let _serial = serial();
    if !root_or_skip() {
        return;
    }
    if !Path::new(SYSFS).join(PageSize::Huge1G.sysfs_dir()).is_dir()
        || !ensure_available(PageSize::Huge1G, 1)
    {
        eprintln!("skipped: the kernel could not provide a free 1 GiB page");
        return;
    }
    let buffer = PrivateBuffer::new(
        1,
        &RegionOptions {
            page_size: PageSize::Huge1G,
            ..RegionOptions::default()
        },
    )
    .unwrap();
    assert!(buffer.is_huge());
    assert_eq!(buffer.len(), 1 << 30);
    assert_eq!(
        smaps_field_kb(buffer.as_ptr(), "KernelPageSize"),
        1024 * 1024
    );
}
