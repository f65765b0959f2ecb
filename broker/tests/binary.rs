//! The broker binary itself: refusals that an operator sees at start-up, and brokers that
//! stop when their pool or their id is taken from under them. Every broker runs with
//! `--error-json`: the tests assert on exit codes and on that JSON line, never on the
//! human-readable stderr (printed only when an assertion fails). The hugetlbfs tests need
//! root (to reserve pages and mount a private hugetlbfs) and print a skip line otherwise.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use broker::region::pool_memory;
use hugepages::{PageSize, RegionOptions, SharedRegion, setup};
use serde_json::Value;
use shared_log::coherence::{CoherenceMode, SharedMemory};
use shared_log::layout::{FRONTIER_WRITTEN, Geometry, LAYOUT_VERSION, PoolHeader};
use shared_log::pool::Pool;
use support::Received;
use wire::{Frame, Order, Retention};

fn shm_options() -> RegionOptions {
    RegionOptions {
        allow_fallback: true,
        ..RegionOptions::default()
    }
}

/// How a broker process ended.
#[derive(Debug)]
struct Exit {
    /// Its exit code; `None` when a signal killed it.
    code: Option<i32>,
    /// The signal that killed it.
    signal: Option<i32>,
    /// Its stderr, for the messages of failed assertions.
    stderr: String,
    /// The error it reported on stdout (`--error-json`), if any.
    error: Option<Value>,
}

impl Exit {
    fn new(status: std::process::ExitStatus, stdout: &str, stderr: String) -> Exit {
        let error = stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find_map(|value| value.get("error").cloned());
        Exit {
            code: status.code(),
            signal: status.signal(),
            stderr,
            error,
        }
    }

    fn from_output(output: &Output) -> Exit {
        Exit::new(
            output.status,
            &String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// The reported error, which must be of `kind` with exit code `code`.
    fn error(&self, kind: &str, code: i32) -> &Value {
        let stderr = &self.stderr;
        assert_eq!(
            self.code,
            Some(code),
            "signal {:?}; stderr: {stderr}",
            self.signal
        );
        let error = self
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("no --error-json line; stderr: {stderr}"));
        assert_eq!(error["kind"], kind, "{self:?}");
        assert_eq!(error["exit_code"], code, "{self:?}");
        error
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
            "--error-json",
        ])
        .arg("--pool")
        .arg(&path)
        .output()
        .expect("run the broker");
    let _ = std::fs::remove_file(&path);
    let exit = Exit::from_output(&output);
    let error = exit.error("pool", 1);
    assert_eq!(error["failure"], "incompatible", "{exit:?}");
    assert_eq!(error["path"], path.display().to_string());
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("re-format"), "says what to do: {message}");
}

#[test]
fn a_kafka_listener_on_every_address_needs_an_address_to_name() {
    let path = std::path::PathBuf::from(format!(
        "/dev/shm/embarcadero-kafka-host-test-{}",
        std::process::id()
    ));
    let region = SharedRegion::create(&path, 8 << 20, &shm_options()).expect("a /dev/shm pool");
    let geometry = Geometry::fit(8 << 20, 2, 1, 16, 1024).expect("geometry");
    Pool::format(pool_memory(region, CoherenceMode::NonCoherent), geometry, 1).expect("format");
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args([
            "--id",
            "1",
            "--listen",
            "0.0.0.0:0",
            "--kafka-listen",
            "0.0.0.0:0",
        ])
        .args(["--allow-shm-fallback", "--error-json", "--pool"])
        .arg(&path)
        .output()
        .expect("run the broker");
    let _ = std::fs::remove_file(&path);
    let exit = Exit::from_output(&output);
    let error = exit.error("kafka_host_unknown", 2);
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("--advertise"),
        "says what to do: {message}"
    );
}

#[test]
fn missing_flags_are_a_usage_error_and_exit_2() {
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["--id", "0", "--error-json"])
        .output()
        .expect("run the broker");
    let exit = Exit::from_output(&output);
    let error = exit.error("usage", 2);
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("--pool"), "names the flag: {message}");
}

#[test]
fn an_advertised_address_others_cannot_reach_is_a_usage_error() {
    for advertise in ["0.0.0.0:9000", "[::1]:9000", "10.0.0.5:0"] {
        let output = Command::new(env!("CARGO_BIN_EXE_broker"))
            .args([
                "--id",
                "0",
                "--pool",
                "/nonexistent/pool",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--advertise", advertise, "--error-json"])
            .output()
            .expect("run the broker");
        let exit = Exit::from_output(&output);
        let error = exit.error("usage", 2);
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("--advertise") && message.contains(advertise),
            "names the flag and the address: {message}"
        );
    }
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
            "--error-json",
        ])
        .args([
            "--pool",
            "/dev/shm/embarcadero-no-such-pool",
            "--allow-shm-fallback",
        ])
        .output()
        .expect("run the broker");
    let exit = Exit::from_output(&output);
    let error = exit.error("pool", 1);
    assert_eq!(error["failure"], "missing", "{exit:?}");
    assert_eq!(error["path"], "/dev/shm/embarcadero-no-such-pool");
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
        .args(["--attach-timeout-ms", "5000", "--error-json"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    without_core_dumps(&mut command);
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
    /// Where it accepts clients (0.0.0.0:0 for one that was not waited for).
    addr: SocketAddr,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl BrokerProcess {
    /// Starts the broker and waits for its "listening on" line.
    fn start(command: Command) -> BrokerProcess {
        let (mut broker, listening) = BrokerProcess::spawn(command);
        match listening.recv_timeout(DEADLINE) {
            Ok(addr) => broker.addr = addr,
            Err(_) => {
                let exit = broker.wait(Duration::ZERO);
                panic!("the broker did not start: {exit:?}");
            }
        }
        broker
    }

    /// Starts the broker; the receiver gets its address once it listens.
    fn spawn(mut command: Command) -> (BrokerProcess, mpsc::Receiver<SocketAddr>) {
        let mut child = command.spawn().expect("spawn the broker");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (addr, listening) = mpsc::channel();
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(Ok(listen)) = line.strip_prefix("listening on ").map(str::parse) {
                    let _ = addr.send(listen);
                }
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        let broker = BrokerProcess {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            stdout: Some(stdout),
            stderr: Some(std::thread::spawn(move || read_all(stderr))),
        };
        (broker, listening)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("poll the broker").is_none()
    }

    /// Sends `signal` (a name for kill(1), e.g. "STOP").
    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal}");
        if signal == "STOP" {
            // kill(2) returns before the process has stopped: on a busy machine it may run
            // on for a while (and take what is sent to it meanwhile).
            let stat = format!("/proc/{}/stat", self.pid());
            let started = Instant::now();
            while !std::fs::read_to_string(&stat)
                .is_ok_and(|text| text.rsplit(") ").next().is_some_and(|s| s.starts_with('T')))
            {
                assert!(started.elapsed() < DEADLINE, "the broker did not stop");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Waits up to `deadline` for the broker to exit (then kills it).
    fn wait(&mut self, deadline: Duration) -> Exit {
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
        let join = |reader: Option<JoinHandle<String>>| {
            reader
                .map(|reader| reader.join().expect("output reader"))
                .unwrap_or_default()
        };
        let stdout = join(self.stdout.take());
        Exit::new(status, &stdout, join(self.stderr.take()))
    }

    /// SIGTERM, then the exit code once it has stopped in order.
    fn terminate(&mut self) -> Option<i32> {
        self.signal("TERM");
        self.wait(DEADLINE).code
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

/// Runs a broker that must exit by itself within [`DEADLINE`].
fn run_to_exit(command: Command) -> Exit {
    BrokerProcess::spawn(command).0.wait(DEADLINE)
}

/// The pids a `pool_in_use` or `broker_id_taken` report names, by broker id.
fn holders(holders: &[&Value]) -> Vec<(u64, u64, bool)> {
    holders
        .iter()
        .map(|h| {
            (
                h["broker"].as_u64().unwrap_or(u64::MAX),
                h["pid"].as_u64().unwrap_or(0),
                h["this_host"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

#[test]
fn formatting_a_pool_that_brokers_use_is_refused_and_names_them() {
    let Some(pool) = huge_pool("formatting_a_pool_that_brokers_use_is_refused", &[]) else {
        return;
    };
    let other = BrokerProcess::start(broker_command(1, &pool.path, false, &[]));
    let inode = std::fs::metadata(&pool.path).unwrap().ino();

    // Another head with another geometry.
    let exit = run_to_exit(broker_command(
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
    let error = exit.error("pool_in_use", 4);
    assert_eq!(error["path"], pool.path.display().to_string());
    let brokers: Vec<&Value> = error["brokers"].as_array().into_iter().flatten().collect();
    assert_eq!(
        holders(&brokers),
        [
            (0, u64::from(pool.head.pid()), true),
            (1, u64::from(other.pid()), true)
        ],
        "{exit:?}"
    );
    let inode_after = std::fs::metadata(&pool.path).unwrap().ino();
    assert_eq!(inode_after, inode, "the pool stays");
}

#[test]
fn a_second_broker_with_the_id_of_a_live_one_is_refused() {
    let Some(pool) = huge_pool("a_second_broker_with_the_id_of_a_live_one_is_refused", &[]) else {
        return;
    };
    let mut first = BrokerProcess::start(broker_command(1, &pool.path, false, &[]));
    let exit = run_to_exit(broker_command(1, &pool.path, false, &[]));
    let error = exit.error("broker_id_taken", 3);
    assert_eq!(
        holders(&[&error["holder"]]),
        [(1, u64::from(first.pid()), true)],
        "{exit:?}"
    );
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

/// Batches a paused broker finds in its socket when it resumes.
const BATCHES_SENT_DURING_THE_PAUSE: u64 = 32;

/// Slots published in the ring of broker `broker` for `topic`, read from the pool file.
fn written_slots(pool: &Path, topic: &str, broker: u16) -> u64 {
    let options = RegionOptions {
        prefault: false,
        ..RegionOptions::default()
    };
    let region = SharedRegion::open(pool, &options).expect("open the pool");
    let pool = Pool::attach(pool_memory(region, CoherenceMode::NonCoherent)).expect("attach");
    let (topic, _) = pool
        .find_topic(topic)
        .expect("the topic table")
        .expect("the topic");
    let offset = pool
        .geometry()
        .frontier_offset(topic, broker, FRONTIER_WRITTEN);
    pool.read_frontier(offset).0
}

#[test]
fn a_broker_paused_past_its_lease_and_taken_over_exits_1_without_publishing() {
    let Some(pool) = huge_pool("a_broker_paused_past_its_lease_exits_1", &[]) else {
        return;
    };
    let lease = ["--claim-lease-ms", "500"];
    support::create_topic(
        pool.head.addr,
        "paused",
        Order::Total,
        Retention::StallLimited,
    );
    let mut paused = BrokerProcess::start(broker_command(1, &pool.path, false, &lease));
    let mut publisher = support::publisher(paused.addr, "paused", Order::Total, 7);
    publisher.batch(0, &[b"before the pause"]);
    publisher.acks_through(0);
    assert_eq!(written_slots(&pool.path, "paused", 1), 1);

    paused.signal("STOP");
    let payload = vec![0x5a; 16 << 10];
    for seq in 1..=BATCHES_SENT_DURING_THE_PAUSE {
        publisher.batch(seq, &[payload.as_slice()]);
    }
    // A second broker 1 takes the silent claim over after a lease, and picks the ring up.
    let successor = BrokerProcess::start(broker_command(1, &pool.path, false, &lease));
    paused.signal("CONT");

    let exit = paused.wait(DEADLINE);
    let error = exit.error("claim_lost", 1);
    assert_eq!(
        holders(&[&error["holder"]]),
        [(1, u64::from(successor.pid()), true)],
        "{exit:?}"
    );
    // The resumed broker published none of the batches waiting in its socket...
    assert_eq!(
        written_slots(&pool.path, "paused", 1),
        1,
        "a second writer published into the ring broker 1 now owns"
    );
    // ...and acknowledged none of them.
    loop {
        match publisher.receive() {
            Received::Frame(Frame::Ack(ack)) => {
                assert_eq!(ack.acked_through_seq(), 0, "acknowledged: {ack:?}");
            }
            Received::Closed => break,
            other => panic!(
                "expected the connection to close, got {:?}",
                frame_of(&other)
            ),
        }
    }
}

/// A description of what a client received, for messages.
fn frame_of(received: &Received) -> String {
    match received {
        Received::Frame(frame) => format!("{frame:?}"),
        Received::Delivery(header, _) => format!("a delivery {header:?}"),
        Received::Closed => "the end of the stream".to_owned(),
        Received::TimedOut => "nothing within the read timeout".to_owned(),
    }
}

/// Where `pid` maps the file `path`: the first address of its mapping.
fn mapped_at(pid: u32, path: &Path) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read the maps");
    let line = maps
        .lines()
        .find(|line| line.ends_with(&path.display().to_string()))
        .unwrap_or_else(|| panic!("{} is not mapped: {maps}", path.display()));
    let start = line.split('-').next().unwrap_or_default();
    u64::from_str_radix(start, 16).expect("a hex address")
}

/// The start of a `siginfo_t` as the kernel lays it out on x86-64: a fault's address sits
/// where a queued signal has the sender's pid and uid.
#[repr(C)]
struct SigInfo {
    signo: i32,
    errno: i32,
    code: i32,
    padding: i32,
    fault_address: u64,
    rest: [u64; 13],
}

#[test]
fn a_sigbus_sent_by_a_process_is_not_taken_for_a_fault_in_the_pool() {
    let Some(mut pool) = huge_pool("a_sigbus_sent_by_a_process_is_not_a_fault", &[]) else {
        return;
    };
    let address = mapped_at(pool.head.pid(), &pool.path);
    // Queued by a process (si_code SI_QUEUE), with a pool address where a fault's would be.
    let info = SigInfo {
        signo: libc::SIGBUS,
        errno: 0,
        code: libc::SI_QUEUE,
        padding: 0,
        fault_address: address + 4096,
        rest: [0; 13],
    };
    let pid = libc::pid_t::try_from(pool.head.pid()).expect("a pid");
    // SAFETY: rt_sigqueueinfo reads 128 bytes of `info`, which is that large and lives here.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigqueueinfo,
            pid,
            libc::SIGBUS,
            &raw const info,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    // Not a fault in the pool: the default action (death by SIGBUS), not exit 1.
    let exit = pool.head.wait(DEADLINE);
    assert_eq!(exit.signal, Some(libc::SIGBUS), "{exit:?}");
    assert!(exit.error.is_none(), "{exit:?}");
}

const _: () = assert!(std::mem::size_of::<SigInfo>() == 128);

/// Changes the pool file under a running head with `change`, then checks that the head
/// exits 1 within 5 s, reporting the pool file `reported` (removed, replaced, truncated).
fn head_stops_when_its_pool_file(change: impl FnOnce(&Path), reported: &str) {
    let Some(mut pool) = huge_pool("a broker whose pool file changes exits 1", &[]) else {
        return;
    };
    change(&pool.path);
    let exit = pool.head.wait(Duration::from_secs(5));
    let error = exit.error("pool_file_gone", 1);
    assert_eq!(error["change"], reported, "{exit:?}");
    assert_eq!(error["path"], pool.path.display().to_string());
}

#[test]
fn a_broker_whose_pool_file_is_replaced_exits_1() {
    let replace = |path: &Path| {
        std::fs::remove_file(path).unwrap();
        let replacement = std::fs::File::create(path).unwrap();
        replacement.set_len(2 << 20).unwrap();
    };
    head_stops_when_its_pool_file(replace, "replaced");
}

#[test]
fn a_broker_whose_pool_file_is_truncated_exits_1() {
    let truncate = |path: &Path| {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_len(2 << 20).unwrap();
    };
    head_stops_when_its_pool_file(truncate, "truncated");
}

/// Keeps the core dumps of brokers killed on purpose out of the working directory.
fn without_core_dumps(command: &mut Command) -> &mut Command {
    let no_core_dumps = || {
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `none` is a valid rlimit for the call to read.
        match unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    };
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // setrlimit, which is async-signal-safe.
    unsafe { command.pre_exec(no_core_dumps) }
}
