//! The broker binary itself: refusals that an operator sees at start-up.

use std::process::Command;

use broker::coherence::{CoherenceMode, SharedMemory};
use broker::layout::{Geometry, LAYOUT_VERSION, PoolHeader};
use broker::pool::Pool;
use broker::region::pool_memory;
use hugepages::{RegionOptions, SharedRegion};

fn shm_options() -> RegionOptions {
    RegionOptions {
        allow_fallback: true,
        ..RegionOptions::default()
    }
}

#[test]
fn a_broker_refuses_a_pool_of_another_layout_and_says_so() {
    let path = std::path::PathBuf::from(format!(
        "/dev/shm/embarcadero-layout-test-{}",
        std::process::id()
    ));
    let region = SharedRegion::create(&path, 8 << 20, &shm_options()).expect("a /dev/shm pool");
    let geometry = Geometry::fit(8 << 20, 2, 1, 16, 1024).expect("geometry");
    let mem = pool_memory(region, CoherenceMode::NonCoherent);
    Pool::format(mem.clone(), geometry, 1).expect("format");
    let version_offset = std::mem::offset_of!(PoolHeader, layout_version) as u64;
    mem.write(version_offset, &(LAYOUT_VERSION + 7).to_le_bytes());
    mem.flush(version_offset, 4);
    mem.fence();

    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args([
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--allow-shm-fallback",
            "--attach-timeout-ms",
            "2000",
        ])
        .arg("--pool")
        .arg(&path)
        .output()
        .expect("run the broker");
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    let expected = format!(
        "pool layout version {} is not supported",
        LAYOUT_VERSION + 7
    );
    assert!(stderr.contains(&expected), "stderr: {stderr}");
    assert!(
        stderr.contains("re-format"),
        "the error says what to do: {stderr}"
    );
}

#[test]
fn missing_flags_are_named_and_exit_2() {
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["--id", "0"])
        .output()
        .expect("run the broker");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--pool is required"));
}

#[test]
fn a_missing_pool_file_is_reported_after_the_attach_timeout() {
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args([
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--attach-timeout-ms",
            "200",
        ])
        .args([
            "--pool",
            "/dev/shm/embarcadero-no-such-pool",
            "--allow-shm-fallback",
        ])
        .output()
        .expect("run the broker");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("embarcadero-no-such-pool"),
        "the error names the pool: {stderr}"
    );
}
