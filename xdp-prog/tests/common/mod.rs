//! What every namespace test needs: the root check (with its `skipped:` line), running
//! commands, and running code inside a network namespace.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};

/// True when running as root; otherwise prints the skip line (uncaptured) and returns false.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    // Written to the stderr handle, not with eprintln!, so the test harness does not hide it.
    let _ = writeln!(
        io::stderr(),
        "skipped: needs root ({test} creates network namespaces and attaches XDP)"
    );
    false
}

/// Runs `command` and returns its output; panics with its stderr when it fails.
pub fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `ip ARGS...`, panicking on failure.
pub fn ip(args: &[&str]) -> String {
    String::from_utf8_lossy(&run(Command::new("ip").args(args)).stdout).into_owned()
}

/// Runs `f` on a thread that has entered network namespace `ns`, and returns its result
/// (re-raising its panic). The caller's thread stays where it is.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            let file = File::open(format!("/run/netns/{ns}"))
                .unwrap_or_else(|error| panic!("namespace {ns}: {error}"));
            // SAFETY: `file` is an open network namespace file for the duration of the
            // call; setns only changes this (fresh) thread's namespace.
            let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns {ns}: {}", io::Error::last_os_error());
            f()
        });
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
