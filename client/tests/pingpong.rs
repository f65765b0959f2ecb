//! The `pingpong` binary: a paced run against `pingpong serve` reports every round trip in
//! its JSON; a run without a server fails with exit code 1.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const PINGPONG: &str = env!("CARGO_BIN_EXE_pingpong");

/// A loopback address nothing listens on right now.
fn free_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// Starts `pingpong serve` and waits until it accepts connections.
fn serve(addr: &str) -> Child {
    let child = Command::new(PINGPONG)
        .args(["serve", "--listen", addr, "--idle-exit-s", "5"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "pingpong serve did not start");
        thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn paced_run_measures_every_round_trip() {
    let addr = free_address();
    let mut server = serve(&addr);
    let output = Command::new(PINGPONG)
        .args(["run", "--connect", &addr, "--message-bytes", "1KiB"])
        .args(["--rate-msgs-per-s", "2000", "--duration-s", "0.5"])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["backend"], "tcp-pingpong");
    assert_eq!(report["message_bytes"], 1024);
    let messages = report["messages"].as_u64().unwrap();
    // 0.5 s at 2,000/s: the 1,000 messages due in it, however late the machine sends them.
    assert_eq!(messages, 1_000);
    assert_eq!(report["latency_us"]["count"].as_u64(), Some(messages));
    let distribution = report["latency_distribution_us"].as_array().unwrap();
    assert_eq!(
        distribution.last().unwrap()["count"].as_u64(),
        Some(messages)
    );
}

#[test]
fn run_without_a_server_fails() {
    let output = Command::new(PINGPONG)
        .args(["run", "--connect", &free_address(), "--duration-s", "0.2"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
}
