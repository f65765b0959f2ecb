//! The metrics endpoint of a running broker under scrape denial: clients that connect and
//! send nothing, or trickle a request, neither delay a scrape nor stay open past the
//! connection deadline.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use broker::server::in_process::InProcessCluster;
use shared_log::coherence::CoherenceMode;
use shared_log::layout::Geometry;

/// The endpoint's default connection deadline.
const DEADLINE: Duration = Duration::from_secs(2);
/// Room for a loaded machine past the deadline.
const SLACK: Duration = Duration::from_secs(2);

fn one_broker() -> InProcessCluster {
    let geometry = Geometry {
        brokers_max: 1,
        topics_max: 1,
        ring_slots: 64,
        goi_entries: 1 << 10,
        blog_bytes: 1 << 20,
    };
    InProcessCluster::start(geometry, CoherenceMode::NonCoherent, |options| {
        options.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .unwrap()
}

/// `GET path`, answered (headers and body) within `within`, else an error.
fn scrape(addr: SocketAddr, path: &str, within: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, within)?;
    stream.set_read_timeout(Some(within))?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// Waits until the server closes `stream`, at most until `until`; the time it closed.
fn closed_at(mut stream: TcpStream, until: Instant) -> Option<Instant> {
    let mut buffer = [0u8; 512];
    loop {
        let left = until.checked_duration_since(Instant::now())?;
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut buffer) {
            Ok(0) => return Some(Instant::now()),
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some(Instant::now()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if Instant::now() >= until {
                    return None;
                }
            }
            Err(e) => panic!("reading a silent connection: {e}"),
        }
    }
}

/// Opens `silent` connections that send nothing, then scrapes: the scrape is answered
/// within a second, and every silent connection is closed by the server by the deadline.
/// Returns how many connections the endpoint closed to make room.
fn scrape_beside_silent_connections(silent: usize) -> u64 {
    let cluster = one_broker();
    let broker = &cluster.brokers()[0];
    let addr = broker.metrics_addr().unwrap();
    let opened = Instant::now();
    let connections: Vec<TcpStream> = (0..silent)
        .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap())
        .collect();
    // Let the endpoint take them all before the scrape comes.
    std::thread::sleep(Duration::from_millis(200));

    let asked = Instant::now();
    let response = scrape(addr, "/metrics", Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("scrape beside {silent} silent connections: {e}"));
    assert!(asked.elapsed() < Duration::from_secs(1));
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        response.contains("embarcadero_batches_dropped_total{broker=\"0\"} 0\n"),
        "{response}"
    );

    let until = opened + DEADLINE + SLACK;
    for (i, connection) in connections.into_iter().enumerate() {
        let closed = closed_at(connection, until);
        assert!(
            closed.is_some(),
            "silent connection {i} of {silent} still open {:?} after it connected",
            until - opened
        );
    }
    // The endpoint counts a connection just after closing it: give the counters a moment.
    let metrics = broker.metrics();
    let counted = || {
        metrics.metrics_connections_evicted.load(Ordering::Relaxed)
            + metrics
                .metrics_connections_timed_out
                .load(Ordering::Relaxed)
    };
    let counted_by = Instant::now() + Duration::from_secs(1);
    while counted() < silent as u64 && Instant::now() < counted_by {
        std::thread::sleep(Duration::from_millis(10));
    }
    let evicted = metrics.metrics_connections_evicted.load(Ordering::Relaxed);
    let timed_out = metrics
        .metrics_connections_timed_out
        .load(Ordering::Relaxed);
    assert!(
        evicted + timed_out >= silent as u64,
        "{silent} silent connections, {evicted} evicted, {timed_out} timed out"
    );
    evicted
}

#[test]
fn twenty_silent_connections_neither_delay_a_scrape_nor_stay_open() {
    assert_eq!(scrape_beside_silent_connections(20), 0);
}

#[test]
fn two_hundred_silent_connections_neither_delay_a_scrape_nor_stay_open() {
    // Beyond the limit of 64 the oldest were closed to make room.
    assert!(scrape_beside_silent_connections(200) > 0);
}

#[test]
fn a_trickled_request_is_closed_at_the_deadline() {
    let cluster = one_broker();
    let addr = cluster.brokers()[0].metrics_addr().unwrap();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let request =
        b"GET /metrics HTTP/1.1\r\nHost: test\r\nUser-Agent: one byte every 300 ms\r\n\r\n";
    let opened = Instant::now();
    let mut reply = Vec::new();
    let mut closed = false;
    for byte in request {
        if stream.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        let mut buffer = [0u8; 512];
        match stream.read(&mut buffer) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => reply.extend_from_slice(&buffer[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
        if opened.elapsed() > DEADLINE + SLACK {
            break;
        }
    }
    let lasted = opened.elapsed();
    assert!(
        closed,
        "a trickling client still connected after {lasted:?}"
    );
    assert!(
        lasted >= DEADLINE - Duration::from_millis(100),
        "{lasted:?}"
    );
    assert!(lasted <= DEADLINE + SLACK, "{lasted:?}");
    assert!(reply.is_empty(), "{}", String::from_utf8_lossy(&reply));
    // The endpoint still serves.
    let response = scrape(addr, "/metrics", Duration::from_secs(1)).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
}

#[test]
fn other_paths_get_404() {
    let cluster = one_broker();
    let addr = cluster.brokers()[0].metrics_addr().unwrap();
    let response = scrape(addr, "/", Duration::from_secs(1)).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 404 Not Found\r\n"),
        "{response}"
    );
    let response = scrape(addr, "/metricsx", Duration::from_secs(1)).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 404 Not Found\r\n"),
        "{response}"
    );
}
