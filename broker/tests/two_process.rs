//! Two processes, one pool on hugetlbfs: this test process formats the pool and writes
//! while a second process (this test binary run again) attaches, checks the layout, and
//! reads every batch in order with its bytes, concurrently. Then the pool's layout version
//! is changed and a third process must refuse it with the specific error.
//!
//! Needs root to reserve hugepages and mount a private hugetlbfs (CI runs as root); prints a
//! skip line otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker::region::pool_memory;
use hugepages::{BackingKind, PageSize, RegionOptions, SharedRegion, setup};
use shared_log::Order;
use shared_log::coherence::{CoherenceMode, SharedMemory};
use shared_log::layout::{Geometry, LAYOUT_VERSION, PoolHeader};
use shared_log::pool::{Pool, PoolError, TopicConfig};
use shared_log::reader::LogReader;
use shared_log::sequencer::{Sequencer, SequencerConfig};
use shared_log::writer::{AppendError, BatchMeta, TopicWriter};
use units::Timestamp;

const CHILD_POOL_ENV: &str = "EMBARCADERO_TWO_PROCESS_POOL";
const CHILD_ROLE_ENV: &str = "EMBARCADERO_TWO_PROCESS_ROLE";
const BROKERS: u16 = 4;
const BATCHES_PER_BROKER: u64 = 150;
const POOL_BYTES: usize = 16 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_WRONG_LAYOUT: i32 = 3;

fn batch(broker: u16, seq: u64) -> (Vec<u8>, u32) {
    let messages = 1 + (seq % 5) as u32;
    let mut payload = Vec::new();
    for m in 0..messages {
        let len = 50 + (seq as usize * 7 + m as usize * 13) % 400;
        let message: Vec<u8> = (0..len)
            .map(|i| (i as u64 ^ seq ^ (u64::from(broker) << 5) ^ u64::from(m)) as u8)
            .collect();
        wire::payload::push_message(&mut payload, &message);
    }
    (payload, messages)
}

fn options() -> RegionOptions {
    RegionOptions {
        page_size: PageSize::Huge2M,
        allow_fallback: false,
        prefault: true,
    }
}

/// The second process: attach, then read until every batch arrived in order, intact.
fn reader_child(path: &Path) -> i32 {
    let region = SharedRegion::open(path, &options()).expect("open the pool file");
    let pool = match Pool::attach(pool_memory(region, CoherenceMode::NonCoherent)) {
        Ok(pool) => pool,
        Err(PoolError::LayoutVersion { found, expected }) => {
            eprintln!("child: refused pool of layout {found} (this build reads {expected})");
            return EXIT_WRONG_LAYOUT;
        }
        Err(other) => panic!("child: attach failed: {other}"),
    };
    let started = Instant::now();
    let topic = loop {
        if let Some((topic, _)) = pool.find_topic("two-process").expect("topic table") {
            break topic;
        }
        assert!(started.elapsed() < TIMEOUT, "child: topic never appeared");
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut reader = LogReader::new(pool.clone(), topic, true).expect("reader");
    let mut next_seq = vec![0u64; BROKERS as usize];
    let mut position = 0;
    let total = u64::from(BROKERS) * BATCHES_PER_BROKER;
    let mut read = 0;
    while read < total {
        assert!(
            started.elapsed() < TIMEOUT,
            "child: read {read} of {total} batches before the timeout"
        );
        read += reader
            .poll(usize::MAX, |b| {
                let broker = b.client_id as u16;
                assert_eq!(
                    b.broker, broker,
                    "batch from client {} on broker {}",
                    b.client_id, b.broker
                );
                assert_eq!(
                    b.batch_seq, next_seq[broker as usize],
                    "session FIFO for client {broker}"
                );
                assert_eq!(b.global_start, position, "no gap in global positions");
                let (payload, messages) = batch(broker, b.batch_seq);
                assert_eq!(
                    b.payload,
                    &payload[..],
                    "bytes of batch {broker}/{}",
                    b.batch_seq
                );
                assert_eq!(b.message_count, messages);
                next_seq[broker as usize] += 1;
                position += u64::from(messages);
            })
            .expect("read in order") as u64;
    }
    println!("child: read {read} batches, {position} messages, in order and intact");
    0
}

fn spawn_child(path: &Path, role: &str) -> std::process::Child {
    Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_POOL_ENV, path)
        .env(CHILD_ROLE_ENV, role)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child process")
}

fn wait_child(mut child: std::process::Child) -> i32 {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return status.code().unwrap_or(-1);
        }
        if started.elapsed() > TIMEOUT + Duration::from_secs(5) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child process hung");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Entry point of the child processes; a no-op in the normal test run.
#[test]
fn child_process_entry() {
    if let Ok(path) = std::env::var(CHILD_POOL_ENV) {
        let code = match std::env::var(CHILD_ROLE_ENV).as_deref() {
            Ok("reader") => reader_child(&PathBuf::from(path)),
            other => panic!("unknown child role {other:?}"),
        };
        std::process::exit(code);
    }
}

#[test]
fn a_second_process_attaches_and_reads_in_order_while_the_first_writes() {
    if !setup::is_root() {
        eprintln!("skipped: needs root to reserve hugepages and mount hugetlbfs");
        return;
    }
    let pages = (POOL_BYTES / PageSize::Huge2M.bytes()) as u64;
    setup::ensure_free_pages(PageSize::Huge2M, pages).expect("reserve hugepages");
    let mount = setup::TempMount::new(PageSize::Huge2M).expect("mount hugetlbfs");
    let path = mount.path().join("pool");
    let region = SharedRegion::create(&path, POOL_BYTES, &options()).expect("create pool");
    assert_eq!(region.backing(), BackingKind::Hugetlbfs(PageSize::Huge2M));
    let geometry =
        Geometry::fit(POOL_BYTES as u64, u32::from(BROKERS), 1, 16, 4096).expect("geometry");
    let mem = pool_memory(region, CoherenceMode::NonCoherent);
    let pool = Pool::format(mem.clone(), geometry, 42).expect("format");

    let child = spawn_child(&path, "reader");
    let config = TopicConfig {
        order: Order::TotalSessionFifo,
        ack: 1,
        replication_factor: 1,
        retention: shared_log::Retention::StallLimited,
        history: shared_log::HistoryRetention::UNLIMITED,
    };
    let topic = pool.create_topic("two-process", config).expect("topic");
    let mut writers: Vec<_> = (0..BROKERS)
        .map(|b| TopicWriter::new(pool.clone(), topic, b).expect("writer"))
        .collect();
    let mut sequencer =
        Sequencer::new(pool.clone(), 0, 1, SequencerConfig::default()).expect("sequencer");
    let mut next = vec![0u64; BROKERS as usize];
    let started = Instant::now();
    while next.iter().any(|&n| n < BATCHES_PER_BROKER) {
        assert!(started.elapsed() < TIMEOUT, "writer stalled");
        for (b, writer) in writers.iter_mut().enumerate() {
            if next[b] < BATCHES_PER_BROKER {
                let (payload, messages) = batch(b as u16, next[b]);
                let meta = BatchMeta {
                    client_id: b as u64,
                    session_epoch: 1,
                    batch_seq: next[b],
                    message_count: messages,
                    checksum: wire::payload::checksum(&payload),
                    flags: 0,
                };
                match writer.append(meta, &payload) {
                    Ok(_) => next[b] += 1,
                    Err(AppendError::RingFull { .. } | AppendError::LogFull { .. }) => {}
                    Err(other) => panic!("append: {other}"),
                }
            }
            writer.poll_completions(usize::MAX, |_| {});
        }
        sequencer.poll(Timestamp::now());
    }
    while writers
        .iter()
        .any(|w| w.completed_slots() < w.committed_slots())
    {
        assert!(started.elapsed() < TIMEOUT, "sequencer stalled");
        sequencer.poll(Timestamp::now());
        for writer in &mut writers {
            writer.poll_completions(usize::MAX, |_| {});
        }
    }
    assert_eq!(wait_child(child), 0, "the reader process failed");

    // A pool of another layout version is refused by a new process, with the specific error.
    let version_offset = std::mem::offset_of!(PoolHeader, layout_version) as u64;
    mem.write(version_offset, &(LAYOUT_VERSION + 1).to_le_bytes());
    mem.flush(version_offset, 4);
    mem.fence();
    assert_eq!(wait_child(spawn_child(&path, "reader")), EXIT_WRONG_LAYOUT);
    // `mount` was declared first, so it is unmounted last, after every mapping is gone.
}
