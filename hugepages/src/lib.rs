//! Shared and private memory regions backed by hugepages.
//!
//! The broker's pool ("CXL memory") is one [`SharedRegion`], mapped `MAP_SHARED` by every
//! broker process: a file on hugetlbfs by default, a `/dev/daxX.Y` device on real CXL
//! hardware, or a file in `/dev/shm` only when the caller allows that fallback (it is then
//! announced with a warning). Process-private staging memory is a [`PrivateBuffer`]. Both
//! are mapped by memmap2 (`MAP_POPULATE`, `MAP_HUGETLB` with the page size).
//!
//! Before reserving anything, [`preflight`] compares the pages a size needs with the pages
//! free in sysfs, and every failure says what is wrong and the exact command that fixes it
//! (`echo N > /sys/kernel/mm/hugepages/.../nr_hugepages`, `mount -t hugetlbfs ...`).
//! The library reads the reservation but never changes it; `scripts/setup-hugepages.sh` does.
//!
//! ```no_run
//! use hugepages::{RegionOptions, SharedRegion, default_pool_dir, PageSize};
//!
//! let dir = default_pool_dir(PageSize::Huge2M)?;
//! let region = SharedRegion::create(&dir.join("pool"), 64 << 20, &RegionOptions::default())?;
//! println!("{} bytes on {} in {:?}", region.len(), region.backing(), region.prefault_time());
//! # Ok::<(), hugepages::Error>(())
//! ```

#![deny(missing_docs)]

mod backing;
mod error;
mod map;
mod mounts;
mod page;
mod private;
mod region;
pub mod setup;
mod sysfs;

pub use backing::backing_of;
pub use error::Error;
pub use mounts::{Mount, default_pool_dir, hugetlbfs_mounts};
pub use page::{BackingKind, PageSize};
pub use private::PrivateBuffer;
pub use region::{RegionOptions, SharedRegion};
pub use sysfs::{Preflight, preflight};
