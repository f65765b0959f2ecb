//! The broker binary itself: refusals that an operator sees at start-up, and brokers that
//! stop when their pool or their id is taken from under them. The hugetlbfs tests need root
//! (to reserve pages and mount a private hugetlbfs) and print a skip line otherwise.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use broker::coherence::{CoherenceMode, SharedMemory};
use broker::layout::{Geometry, LAYOUT_VERSION, PoolHeader};
use broker::pool::Pool;
use broker::region::pool_memory;
use hugepages::{PageSize, RegionOptions, SharedRegion, setup};

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

/// Pool size of the hugetlbfs tests: small, so that several run at once.
const HUGE_POOL: &str = "16M";
/// Longest a broker may take to start, or to exit when it must.
const DEADLINE: Duration = Duration::from_secs(15);

/// A head broker on a pool in a private hugetlbfs (unmounted after the broker is gone).
struct HugePool {
    head: BrokerProcess,
    path: PathBuf,
    _mount: setup::TempMount,
}

/// Mounts a hugetlbfs with room for a few small pools and starts a head broker (with
/// `extra` flags) on a pool there; `None`, with a skip line, when not root.
fn huge_pool(test: &str, extra: &[&str]) -> Option<HugePool> {
    if !setup::is_root() {
        eprintln!("skipped: {test} needs root to reserve hugepages and mount hugetlbfs");
        return None;
    }
    setup::ensure_free_pages(PageSize::Huge2M, 24).expect("reserve hugepages");
    let mount = setup::TempMount::new(PageSize::Huge2M).expect("mount hugetlbfs");
    let path = mount.path().join("pool");
    Some(HugePool {
        head: BrokerProcess::start(broker_command(0, &path, true, extra)),
        path,
        _mount: mount,
    })
}

/// The broker command for `id` on `pool`; `head` formats the pool.
fn broker_command(id: u16, pool: &Path, head: bool, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_broker"));
    command
        .args(["--id", &id.to_string(), "--listen", "127.0.0.1:0"])
        .arg("--pool")
        .arg(pool)
        .args(["--attach-timeout-ms", "5000"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if head {
        command.args([
            "--head",
            "--format",
            "--pool-bytes",
            HUGE_POOL,
            "--brokers-max",
            "4",
            "--topics-max",
            "1",
            "--ring-slots",
            "64",
            "--goi-entries",
            "1024",
        ]);
    }
    command
}

/// A broker process; killed (SIGKILL) on drop if still running.
struct BrokerProcess {
    child: Child,
    stderr: Option<JoinHandle<String>>,
}

impl BrokerProcess {
    /// Starts the broker and waits for its "listening on" line.
    fn start(mut command: Command) -> BrokerProcess {
        let mut child = command.spawn().expect("spawn the broker");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let stderr = Some(std::thread::spawn(move || read_all(stderr)));
        let (lines, listening) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("listening on") {
                    let _ = lines.send(());
                }
            }
        });
        let mut broker = BrokerProcess { child, stderr };
        if listening.recv_timeout(DEADLINE).is_err() {
            let (code, stderr) = broker.wait(Duration::ZERO);
            panic!("the broker did not start (exit {code:?}): {stderr}");
        }
        broker
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("poll the broker").is_none()
    }

    /// Waits up to `deadline` for the broker to exit (then kills it); its exit code (`None`
    /// when killed by a signal) and its stderr.
    fn wait(&mut self, deadline: Duration) -> (Option<i32>, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("poll the broker") {
                break status;
            }
            if started.elapsed() >= deadline {
                let _ = self.child.kill();
                break self.child.wait().expect("reap the broker");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stderr = self
            .stderr
            .take()
            .map(|reader| reader.join().expect("stderr reader"))
            .unwrap_or_default();
        (status.code(), stderr)
    }

    /// SIGTERM, then the exit code once it has stopped in order.
    fn terminate(&mut self) -> Option<i32> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
        self.wait(DEADLINE).0
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_all(mut from: impl Read) -> String {
    let mut text = String::new();
    let _ = from.read_to_string(&mut text);
    text
}

/// Runs a broker that must exit by itself within [`DEADLINE`]; its exit code and stderr.
fn run_to_exit(command: Command) -> (Option<i32>, String) {
    let mut child = command;
    let child = child
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the broker");
    let mut broker = BrokerProcess {
        stderr: None,
        child,
    };
    let stderr = broker.child.stderr.take().expect("piped stderr");
    broker.stderr = Some(std::thread::spawn(move || read_all(stderr)));
    broker.wait(DEADLINE)
}

#[test]
fn formatting_a_pool_that_brokers_use_is_refused_and_names_them() {
    let Some(pool) = huge_pool("formatting_a_pool_that_brokers_use_is_refused", &[]) else {
        return;
    };
    let other = BrokerProcess::start(broker_command(1, &pool.path, false, &[]));
    let inode = std::fs::metadata(&pool.path).unwrap().ino();

    // Another head with another geometry.
    let (code, stderr) = run_to_exit(broker_command(
        2,
        &pool.path,
        false,
        &[
            "--head",
            "--format",
            "--pool-bytes",
            "32M",
            "--goi-entries",
            "2048",
        ],
    ));
    assert_eq!(code, Some(1), "stderr: {stderr}");
    let expected = format!(
        "is in use by broker 0 (pid {} on this host), broker 1 (pid {} on this host)",
        pool.head.pid(),
        other.pid()
    );
    assert!(stderr.contains(&expected), "stderr: {stderr}");
    assert!(stderr.contains("stop them first"), "the fix: {stderr}");
    let inode_after = std::fs::metadata(&pool.path).unwrap().ino();
    assert_eq!(inode_after, inode, "the pool stays");
}

#[test]
fn a_second_broker_with_the_id_of_a_live_one_is_refused() {
    let Some(pool) = huge_pool("a_second_broker_with_the_id_of_a_live_one_is_refused", &[]) else {
        return;
    };
    let mut first = BrokerProcess::start(broker_command(1, &pool.path, false, &[]));
    let (code, stderr) = run_to_exit(broker_command(1, &pool.path, false, &[]));
    assert_eq!(code, Some(1), "stderr: {stderr}");
    let expected = format!(
        "broker id 1 is taken by a live broker: broker 1 (pid {} on this host)",
        first.pid()
    );
    assert!(stderr.contains(&expected), "stderr: {stderr}");
    assert!(stderr.contains("free --id"), "the fix: {stderr}");
    assert!(first.is_running(), "the first broker 1 goes on");
}

#[test]
fn a_killed_broker_restarts_after_the_claim_lease_and_a_stopped_one_at_once() {
    let lease_ms = 2000;
    let lease = ["--claim-lease-ms", "2000"];
    let Some(pool) = huge_pool("a_killed_broker_restarts_after_the_claim_lease", &lease) else {
        return;
    };
    let start_broker_1 = || {
        let started = Instant::now();
        let broker = BrokerProcess::start(broker_command(1, &pool.path, false, &lease));
        (broker, started.elapsed())
    };
    let (mut broker, _) = start_broker_1();
    // kill -9: the claim stays behind with a heartbeat that no longer moves.
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
    let (mut broker, waited) = start_broker_1();
    assert!(
        waited >= Duration::from_millis(lease_ms),
        "a crashed claim is watched for a lease before it is taken over; started after {waited:?}"
    );
    // An orderly stop gives the claim back.
    assert_eq!(broker.terminate(), Some(0));
    let (_broker, waited) = start_broker_1();
    assert!(
        waited < Duration::from_millis(lease_ms),
        "a released claim is taken at once; started after {waited:?}"
    );
}

/// Changes the pool file under a running head with `change`, then checks that the head
/// exits 1 within 5 s and says `reason`.
fn head_stops_when_its_pool_file(change: impl FnOnce(&Path), reason: &str) {
    let Some(mut pool) = huge_pool("a broker whose pool file changes exits 1", &[]) else {
        return;
    };
    change(&pool.path);
    let (code, stderr) = pool.head.wait(Duration::from_secs(5));
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(stderr.contains(reason), "stderr: {stderr}");
}

#[test]
fn a_broker_whose_pool_file_is_replaced_exits_1() {
    let replace = |path: &Path| {
        std::fs::remove_file(path).unwrap();
        let replacement = std::fs::File::create(path).unwrap();
        replacement.set_len(2 << 20).unwrap();
    };
    head_stops_when_its_pool_file(replace, "was removed and created again");
}

#[test]
fn a_broker_whose_pool_file_is_truncated_exits_1() {
    let truncate = |path: &Path| {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_len(2 << 20).unwrap();
    };
    head_stops_when_its_pool_file(truncate, "truncated to 2097152 bytes");
}
