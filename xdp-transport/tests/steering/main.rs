//! The steering program on real veth pairs in private network namespaces, with the
//! transport's own AF_XDP sockets where a test needs a bound one: attach modes and
//! fallback, detach on drop, what is steered and what is passed (counters), SYN cookies
//! (answered SYNs, valid cookies redirected, flows opened by userspace only, unknown flows
//! dropped, the MSS in the tsval, the flow table bounded), socket registration, errors and
//! leftover clean-up. (`xdp-ctl` is tested in xdp-prog, the crate of the binary.)
//!
//! Needs root (namespaces, XDP); without it every test prints `skipped: needs root` and
//! passes. Each test makes its own namespaces (`xdpt-PID-N-c`/`-b`), never the lab's, and
//! removes them when it ends, also on failure.

// The namespace fixtures are xdp-prog's, shared with its own tests.
#[path = "../../../xdp-prog/tests/common/mod.rs"]
mod common;
mod fixtures;
#[path = "../../../xdp-prog/tests/veth/mod.rs"]
mod veth;

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::{in_netns, ip, root_or_skip};
use fixtures::{SteeredSocket, ethernet, ipv4_header, logged, record_logs, unbound_xdp_socket};
use veth::{BROKER_IP, CLIENT_IP, OTHER_IP, Pair, at};
use xdp_prog::{
    AttachMode, AttachedMode, Counters, SteerConfig, XdpError, XdpSteering, detach, queue_count,
    status,
};

const STEERED_PORT: u16 = 9100;
const OTHER_PORT: u16 = 9200;
/// Long enough for a refused connect on veth; short enough that a SYN is sent only once.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

fn config() -> SteerConfig {
    SteerConfig::new(vec![STEERED_PORT, STEERED_PORT + 1], vec![BROKER_IP])
}

fn delta(before: Counters, after: Counters) -> Counters {
    Counters {
        redirected: after.redirected - before.redirected,
        passed: after.passed - before.passed,
        no_socket: after.no_socket - before.no_socket,
        malformed: after.malformed - before.malformed,
        syn_cookie_sent: after.syn_cookie_sent - before.syn_cookie_sent,
        cookie_valid: after.cookie_valid - before.cookie_valid,
        cookie_invalid: after.cookie_invalid - before.cookie_invalid,
        syn_dropped: after.syn_dropped - before.syn_dropped,
    }
}

fn counts(redirected: u64, passed: u64, no_socket: u64, malformed: u64) -> Counters {
    Counters {
        redirected,
        passed,
        no_socket,
        malformed,
        ..Counters::default()
    }
}

/// Runs `step` and returns how the counters moved meanwhile.
fn measure(steering: &XdpSteering, step: impl FnOnce()) -> Counters {
    let before = steering.counters().expect("counters");
    step();
    delta(before, steering.counters().expect("counters"))
}

/// Runs `step`, then waits up to a second for the counters to move by `expected` (for
/// packets `step` sends without waiting for an answer); returns how they moved.
fn measure_until(steering: &XdpSteering, expected: Counters, step: impl FnOnce()) -> Counters {
    let before = steering.counters().expect("counters");
    step();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let moved = delta(before, steering.counters().expect("counters"));
        if moved == expected || std::time::Instant::now() >= deadline {
            return moved;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn driver_mode_attaches_and_drop_detaches() {
    if !root_or_skip("driver_mode_attaches_and_drop_detaches") {
        return;
    }
    let pair = Pair::new(1500);
    in_netns(&pair.broker, || {
        let steering = XdpSteering::attach(&pair.broker_if, AttachMode::Driver, &config())
            .expect("driver-mode attach on veth");
        assert_eq!(steering.mode(), AttachMode::Driver);
        assert_eq!(
            steering.ifindex(),
            xdp_prog::ifindex(&pair.broker_if).unwrap()
        );
        let link = pair.broker_link();
        assert!(link.contains("prog/xdp id"), "{link}");
        let attached = status(&pair.broker_if).unwrap().expect("attached");
        assert_eq!(attached.mode, AttachedMode::Driver);
        assert_eq!(attached.name, xdp_prog::PROGRAM_NAME);
        assert_eq!(attached.prog_id, steering.prog_id());
        drop(steering);
        assert_eq!(status(&pair.broker_if).unwrap(), None);
    });
    let link = pair.broker_link();
    assert!(
        !link.contains("prog/xdp"),
        "a program is left after drop: {link}"
    );
}

#[test]
fn generic_mode_attaches_and_drop_detaches() {
    if !root_or_skip("generic_mode_attaches_and_drop_detaches") {
        return;
    }
    let pair = Pair::new(1500);
    in_netns(&pair.broker, || {
        let steering = XdpSteering::attach(&pair.broker_if, AttachMode::Generic, &config())
            .expect("generic-mode attach on veth");
        assert_eq!(steering.mode(), AttachMode::Generic);
        let link = pair.broker_link();
        assert!(
            link.contains("prog/xdp id") && link.contains("xdpgeneric"),
            "{link}"
        );
        let attached = status(&pair.broker_if).unwrap().expect("attached");
        assert_eq!(attached.mode, AttachedMode::Generic);
    });
    let link = pair.broker_link();
    assert!(
        !link.contains("prog/xdp"),
        "a program is left after drop: {link}"
    );
}

#[test]
fn auto_falls_back_to_generic_where_driver_mode_is_refused() {
    if !root_or_skip("auto_falls_back_to_generic_where_driver_mode_is_refused") {
        return;
    }
    record_logs();
    // veth refuses driver-mode XDP (without multi-buffer support) when the peer's MTU
    // exceeds what fits in one page; generic mode does not care.
    let pair = Pair::new(9000);
    in_netns(&pair.broker, || {
        let refused = XdpSteering::attach(&pair.broker_if, AttachMode::Driver, &config())
            .expect_err("driver mode with MTU 9000 on veth must be refused");
        let text = refused.to_string();
        assert!(matches!(refused, XdpError::AttachRefused { .. }), "{text}");
        assert!(text.contains(&pair.broker_if), "{text}");
        assert!(text.contains("driver mode: "), "{text}");
        // The kernel's own explanation (netlink extack), e.g. "veth: Peer MTU is too large
        // to set XDP", is part of the message.
        assert!(text.contains("(kernel: "), "{text}");
        assert!(text.contains("generic mode was not tried"), "{text}");

        let steering = XdpSteering::attach(&pair.broker_if, AttachMode::Auto, &config())
            .expect("auto mode falls back to generic");
        assert_eq!(steering.mode(), AttachMode::Generic);
        assert_eq!(
            status(&pair.broker_if).unwrap().map(|program| program.mode),
            Some(AttachedMode::Generic)
        );
        let warnings = logged(log::Level::Warn, &pair.broker_if);
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("driver-mode XDP refused") && w.contains("generic")),
            "no fallback warning among {warnings:?}"
        );

        // lo has no driver mode at all.
        let on_lo = XdpSteering::attach("lo", AttachMode::Auto, &config()).expect("auto on lo");
        assert_eq!(on_lo.mode(), AttachMode::Generic);
        let warnings = logged(log::Level::Warn, "driver-mode XDP refused on lo:");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    });
}

#[test]
fn counters_show_what_is_steered_and_what_is_passed() {
    if !root_or_skip("counters_show_what_is_steered_and_what_is_passed") {
        return;
    }
    for mode in [AttachMode::Driver, AttachMode::Generic] {
        let pair = Pair::new(1500);
        in_netns(&pair.broker, || {
            let mut steering =
                XdpSteering::attach(&pair.broker_if, mode, &config()).expect("attach");

            // A SYN to a steered port and address, no socket: counted, and the kernel
            // answers it (nothing listens: refused).
            let moved = measure(&steering, || {
                let end = pair.connect(at(BROKER_IP, STEERED_PORT), CONNECT_TIMEOUT);
                assert_eq!(end, ErrorKind::ConnectionRefused, "{mode}");
            });
            assert_eq!(moved, counts(0, 0, 1, 0), "{mode}: SYN to a steered port");

            // Another port: passed.
            let moved = measure(&steering, || {
                let end = pair.connect(at(BROKER_IP, OTHER_PORT), CONNECT_TIMEOUT);
                assert_eq!(end, ErrorKind::ConnectionRefused, "{mode}");
            });
            assert_eq!(moved, counts(0, 1, 0, 0), "{mode}: SYN to another port");

            // A steered port on an address that is not steered: the ARP for it and the
            // SYN are both passed.
            let moved = measure(&steering, || {
                let end = pair.connect(at(OTHER_IP, STEERED_PORT), CONNECT_TIMEOUT);
                assert_eq!(end, ErrorKind::ConnectionRefused, "{mode}");
            });
            assert_eq!(
                moved,
                counts(0, 2, 0, 0),
                "{mode}: ARP + SYN to another address"
            );

            // ARP is the kernel's, even for the broker address: the ARP request and the SYN
            // to another port that follows are both passed.
            ip(&[
                "-n",
                &pair.client,
                "neigh",
                "del",
                &BROKER_IP.to_string(),
                "dev",
                &pair.client_if,
            ]);
            let moved = measure(&steering, || {
                let end = pair.connect(at(BROKER_IP, OTHER_PORT), CONNECT_TIMEOUT);
                assert_eq!(end, ErrorKind::ConnectionRefused, "{mode}");
            });
            assert_eq!(
                moved,
                counts(0, 2, 0, 0),
                "{mode}: ARP for the broker + SYN"
            );
            // Back to a static entry, so that no reachability probe adds an ARP later.
            ip(&[
                "-n",
                &pair.client,
                "neigh",
                "replace",
                &BROKER_IP.to_string(),
                "lladdr",
                "02:00:00:99:00:02",
                "dev",
                &pair.client_if,
                "nud",
                "permanent",
            ]);

            // Truncated and bogus headers: counted as malformed, passed.
            let moved = measure(&steering, || {
                let mut truncated_ip = ethernet(0x0800);
                truncated_ip.extend_from_slice(&[0x45; 10]);
                pair.send_frame(&truncated_ip);
                let mut short_ihl = ethernet(0x0800);
                short_ihl.extend(ipv4_header(0x44, 6, BROKER_IP));
                pair.send_frame(&short_ihl);
                let mut truncated_tcp = ethernet(0x0800);
                truncated_tcp.extend(ipv4_header(0x45, 6, BROKER_IP));
                truncated_tcp.extend_from_slice(&STEERED_PORT.to_be_bytes()); // only 2 bytes
                pair.send_frame(&truncated_tcp);
                // ARP is not looked into: even a truncated one is simply passed.
                let mut truncated_arp = ethernet(0x0806);
                truncated_arp.extend_from_slice(&[0, 1, 8, 0]);
                pair.send_frame(&truncated_arp);
                // A UDP datagram to the broker is well-formed, and passed.
                let mut udp = ethernet(0x0800);
                udp.extend(ipv4_header(0x45, 17, BROKER_IP));
                udp.extend_from_slice(&[0; 8]);
                pair.send_frame(&udp);
            });
            assert_eq!(moved, counts(0, 2, 0, 3), "{mode}: malformed frames");

            // With a socket on queue 0, broker traffic is the program's (see
            // cookies_answer_syns_and_open_flows); unregistered again, back to the kernel.
            let socket = SteeredSocket::bound(&pair.broker_if, 0);
            steering.register_socket(0, socket.fd()).expect("register");
            steering.unregister_socket(0).expect("unregister");
            let moved = measure(&steering, || {
                let end = pair.connect(at(BROKER_IP, STEERED_PORT), CONNECT_TIMEOUT);
                assert_eq!(end, ErrorKind::ConnectionRefused, "{mode}");
            });
            assert_eq!(moved, counts(0, 0, 1, 0), "{mode}: after unregister");
        });
    }
}

/// Counters with only the cookie verdicts set.
fn cookie_counts(syn_cookie_sent: u64, cookie_valid: u64, cookie_invalid: u64) -> Counters {
    Counters {
        syn_cookie_sent,
        cookie_valid,
        cookie_invalid,
        ..Counters::default()
    }
}

/// A TCP segment from the client's port 40000 to `port` of the broker with `flags`,
/// sequence and acknowledgement numbers, no options, as an Ethernet frame.
fn segment(port: u16, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    let mut frame = ethernet(0x0800);
    frame.extend(ipv4_header(0x45, 6, BROKER_IP));
    tcp_header(&mut frame, port, flags, seq, ack);
    frame
}

/// Appends a TCP header without options from the client's port 40000 to `port`.
fn tcp_header(frame: &mut Vec<u8>, port: u16, flags: u8, seq: u32, ack: u32) {
    frame.extend_from_slice(&40_000u16.to_be_bytes());
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&seq.to_be_bytes());
    frame.extend_from_slice(&ack.to_be_bytes());
    frame.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
}

#[test]
fn cookies_answer_syns_and_open_flows() {
    if !root_or_skip("cookies_answer_syns_and_open_flows") {
        return;
    }
    for mode in [AttachMode::Driver, AttachMode::Generic] {
        let pair = Pair::new(1500);
        // veth in driver mode delivers what a program sends back (XDP_TX) only to a peer
        // with a driver-mode program of its own: the steering program for a port nobody
        // uses passes everything at the client end.
        in_netns(&pair.client, || {
            let client_end = SteerConfig::new(vec![1], vec![CLIENT_IP]);
            let _pass = XdpSteering::attach(&pair.client_if, AttachMode::Driver, &client_end)
                .expect("a program at the client end");
            in_netns(&pair.broker, || {
                let mut steering =
                    XdpSteering::attach(&pair.broker_if, mode, &config()).expect("attach");
                let socket = SteeredSocket::bound(&pair.broker_if, 0);
                steering.register_socket(0, socket.fd()).expect("register");

                // The SYN is answered here with a cookie; the client's ACK carries it back
                // and is redirected into the socket (which drops it: no fill-ring frames).
                let mut stream = None;
                let moved = measure(&steering, || {
                    stream = Some(
                        pair.connect_stream(at(BROKER_IP, STEERED_PORT), CONNECT_TIMEOUT)
                            .unwrap_or_else(|e| panic!("{mode}: connect: {e}")),
                    );
                });
                assert_eq!(moved, cookie_counts(1, 1, 0), "{mode}: handshake");
                assert_eq!(socket.dropped(), 1, "{mode}: the ACK reached the socket");
                let local = stream.as_ref().and_then(|s| s.local_addr().ok());
                let Some(std::net::SocketAddr::V4(local)) = local else {
                    panic!("{mode}: the client's address: {local:?}");
                };
                let flow = xdp_prog::FlowKey {
                    remote_ip: *local.ip(),
                    remote_port: local.port(),
                    local_ip: BROKER_IP,
                    local_port: STEERED_PORT,
                };
                // The program never opens a flow: userspace does when it adopts the
                // connection (a flow nobody adopted would stay in the map for ever).
                let flows = steering.flows().expect("the flows map");
                assert_eq!(
                    flows.contains(&flow).ok(),
                    Some(false),
                    "{mode}: not opened"
                );
                flows.insert(&flow).expect("open the flow");
                flows.insert(&flow).expect("opening an open flow is fine");
                assert_eq!(flows.contains(&flow).ok(), Some(true), "{mode}: flow open");

                // The flow is open: its next segment (a RST) goes to the socket as well.
                let moved = measure_until(&steering, counts(1, 0, 0, 0), || {
                    fixtures::reset(stream.take().expect("connected"));
                });
                assert_eq!(moved, counts(1, 0, 0, 0), "{mode}: segment of an open flow");
                assert_eq!(socket.dropped(), 2, "{mode}");
                // Userspace closes flows.
                assert_eq!(flows.remove(&flow).ok(), Some(true), "{mode}: removed");
                assert_eq!(flows.remove(&flow).ok(), Some(false), "{mode}: gone");
                assert_eq!(flows.contains(&flow).ok(), Some(false), "{mode}");

                // Segments of unknown flows: an ACK without a valid cookie, a RST, a
                // SYN-ACK are dropped here (the kernel never sees them, so it sends no
                // RST either).
                let moved = measure(&steering, || {
                    pair.send_frame(&segment(STEERED_PORT, 0x10, 1000, 0x1234_5678));
                    pair.send_frame(&segment(STEERED_PORT, 0x04, 1000, 0));
                    pair.send_frame(&segment(STEERED_PORT, 0x12, 1000, 1));
                });
                assert_eq!(moved, cookie_counts(0, 0, 3), "{mode}: unknown flows");
                assert_eq!(
                    socket.dropped(),
                    2,
                    "{mode}: nothing more reached the socket"
                );

                // A SYN with IPv4 options cannot be answered (the SYN-ACK is built in
                // place over a 20-byte IPv4 header): dropped, and counted as such, not as
                // an invalid cookie.
                let moved = measure(&steering, || {
                    let mut syn = ethernet(0x0800);
                    let mut header = ipv4_header(0x46, 6, BROKER_IP);
                    header[3] = 44;
                    syn.extend(header);
                    syn.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
                    tcp_header(&mut syn, STEERED_PORT, 0x02, 1000, 0);
                    pair.send_frame(&syn);
                });
                assert_eq!(
                    moved,
                    Counters {
                        syn_dropped: 1,
                        ..Counters::default()
                    },
                    "{mode}: SYN with IPv4 options"
                );
            });
        });
    }
}

/// A SYN from the client's port 40000 to the steered port with `options` (whole words).
fn syn_with_options(options: &[u8]) -> Vec<u8> {
    let tcp_len = 20 + options.len();
    let mut frame = ethernet(0x0800);
    let mut header = ipv4_header(0x45, 6, BROKER_IP);
    header[2..4].copy_from_slice(&(20 + tcp_len as u16).to_be_bytes());
    frame.extend(header);
    tcp_header(&mut frame, STEERED_PORT, 0x02, 1000, 0);
    frame[14 + 20 + 12] = ((tcp_len / 4) as u8) << 4;
    frame.extend_from_slice(options);
    frame
}

/// The tsval of the SYN-ACK in `frame`, if it is one from the steered port.
fn syn_ack_tsval(frame: &[u8]) -> Option<u32> {
    let tcp = frame.get(14 + 20..)?;
    if u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]) != STEERED_PORT || tcp[13] != 0x12 {
        return None;
    }
    let end = usize::from(tcp[12] >> 4) * 4;
    let mut at = 20;
    while at + 1 < end {
        match tcp[at] {
            1 => at += 1,
            8 => return Some(u32::from_be_bytes(tcp[at + 2..at + 6].try_into().ok()?)),
            _ => at += usize::from(tcp[at + 1]).max(1),
        }
    }
    None
}

#[test]
fn the_syn_ack_keeps_the_clients_mss_in_its_tsval() {
    if !root_or_skip("the_syn_ack_keeps_the_clients_mss_in_its_tsval") {
        return;
    }
    let pair = Pair::new(1500);
    let capture = pair.client_capture();
    in_netns(&pair.client, || {
        // See cookies_answer_syns_and_open_flows: XDP_TX reaches a driver-mode peer only.
        let client_end = SteerConfig::new(vec![1], vec![CLIENT_IP]);
        let _pass = XdpSteering::attach(&pair.client_if, AttachMode::Driver, &client_end)
            .expect("a program at the client end");
        in_netns(&pair.broker, || {
            let mut steering = XdpSteering::attach(&pair.broker_if, AttachMode::Driver, &config())
                .expect("attach");
            let socket = SteeredSocket::bound(&pair.broker_if, 0);
            steering.register_socket(0, socket.fd()).expect("register");
            // NOP NOP TIMESTAMP(tsval 7, echo 0), and the MSS option or not.
            let timestamps = [1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 0];
            let mss = |mss: u16| {
                let mut options = vec![2, 4];
                options.extend_from_slice(&mss.to_be_bytes());
                options.extend_from_slice(&timestamps);
                options
            };
            // Bits 4-9 of the tsval: the MSS / 64, 0 for none, at least 1 for one given.
            for (options, code) in [(timestamps.to_vec(), 0), (mss(1460), 22), (mss(48), 1)] {
                pair.send_frame(&syn_with_options(&options));
                let syn_ack =
                    fixtures::capture_frame(&capture, |frame| syn_ack_tsval(frame).is_some())
                        .expect("a SYN-ACK");
                let tsval = syn_ack_tsval(&syn_ack).expect("a tsval");
                assert_eq!((tsval >> 4) & 0x3f, code, "options {options:?}");
                assert_eq!(tsval & 0xf, 0xf, "no window scale offered");
            }
        });
    });
}

#[test]
fn the_flows_map_refuses_a_flow_beyond_its_size() {
    if !root_or_skip("the_flows_map_refuses_a_flow_beyond_its_size") {
        return;
    }
    let pair = Pair::new(1500);
    in_netns(&pair.broker, || {
        let config = SteerConfig {
            flows_max: 2,
            ..config()
        };
        let steering =
            XdpSteering::attach(&pair.broker_if, AttachMode::Driver, &config).expect("attach");
        let flows = steering.flows().expect("the flows map");
        let flow = |remote_port| xdp_prog::FlowKey {
            remote_ip: CLIENT_IP,
            remote_port,
            local_ip: BROKER_IP,
            local_port: STEERED_PORT,
        };
        flows.insert(&flow(1)).expect("first flow");
        flows.insert(&flow(2)).expect("second flow");
        // Nothing is evicted to make room: the live flows stay.
        let full = flows.insert(&flow(3)).unwrap_err();
        assert!(
            matches!(full, XdpError::FlowTableFull { max: 2, .. }),
            "{full}"
        );
        assert!(full.to_string().contains("flows_max"), "{full}");
        assert_eq!(flows.contains(&flow(1)).ok(), Some(true));
        assert_eq!(flows.contains(&flow(2)).ok(), Some(true));
        flows
            .insert(&flow(2))
            .expect("an open flow again: no new entry");
        assert_eq!(flows.remove(&flow(1)).ok(), Some(true));
        flows.insert(&flow(3)).expect("room again");
    });
}

#[test]
fn sockets_given_at_attach_are_registered_before_the_program_runs() {
    if !root_or_skip("sockets_given_at_attach_are_registered_before_the_program_runs") {
        return;
    }
    let pair = Pair::new(1500);
    in_netns(&pair.broker, || {
        let (first, second) = (unbound_xdp_socket(), unbound_xdp_socket());
        let bad = XdpSteering::attach_with_sockets(
            &pair.broker_if,
            AttachMode::Driver,
            &config(),
            &[(0, first.as_raw_fd()), (64, second.as_raw_fd())],
        )
        .unwrap_err();
        assert!(
            matches!(bad, XdpError::QueueOutOfRange { queue: 64, .. }),
            "{bad}"
        );
        assert_eq!(status(&pair.broker_if).unwrap(), None, "nothing attached");

        let mut steering = XdpSteering::attach_with_sockets(
            &pair.broker_if,
            AttachMode::Driver,
            &config(),
            &[(0, first.as_raw_fd())],
        )
        .expect("attach with a socket");
        let taken = steering.register_socket(0, second.as_raw_fd()).unwrap_err();
        assert!(
            matches!(taken, XdpError::QueueTaken { queue: 0, .. }),
            "queue 0 has its socket from the start: {taken}"
        );
    });
}

#[test]
fn socket_registration_errors() {
    if !root_or_skip("socket_registration_errors") {
        return;
    }
    let pair = Pair::new(1500);
    in_netns(&pair.broker, || {
        let mut steering =
            XdpSteering::attach(&pair.broker_if, AttachMode::Driver, &config()).expect("attach");
        let first = unbound_xdp_socket();
        let second = unbound_xdp_socket();
        steering
            .register_socket(0, first.as_raw_fd())
            .expect("first socket");
        steering
            .register_socket(0, first.as_raw_fd())
            .expect("the same socket again is fine");
        let taken = steering.register_socket(0, second.as_raw_fd()).unwrap_err();
        assert!(
            matches!(taken, XdpError::QueueTaken { queue: 0, .. }),
            "{taken}"
        );
        assert!(taken.to_string().contains("second broker"), "{taken}");
        steering
            .register_socket(1, second.as_raw_fd())
            .expect("another queue");

        let out_of_range = steering
            .register_socket(64, second.as_raw_fd())
            .unwrap_err();
        assert!(
            matches!(out_of_range, XdpError::QueueOutOfRange { queue: 64, .. }),
            "{out_of_range}"
        );
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("a TCP socket");
        let not_xdp = steering
            .register_socket(2, std::os::fd::AsRawFd::as_raw_fd(&tcp))
            .unwrap_err();
        assert!(
            matches!(not_xdp, XdpError::RegisterSocket { queue: 2, .. }),
            "{not_xdp}"
        );
        assert!(not_xdp.to_string().contains("AF_XDP"), "{not_xdp}");

        steering.unregister_socket(0).expect("unregister");
        steering
            .unregister_socket(0)
            .expect("unregister twice is fine");
        steering
            .register_socket(0, second.as_raw_fd())
            .expect("the queue is free again");
        drop(first);
        // Closing a socket removes it from the map (here from queues 0 and 1).
        let third = unbound_xdp_socket();
        steering.register_socket(0, third.as_raw_fd()).unwrap_err();
        drop(second);
        // The kernel releases a closed socket once its last reference goes, which another
        // thread's work (the other tests run in parallel) may defer a little: a deadline,
        // not a single try.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match steering.register_socket(0, third.as_raw_fd()) {
                Ok(()) => break,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("closing the socket did not free the queue within 2 s: {e}"),
            }
        }
    });
}

#[test]
fn attach_errors_name_what_is_wrong() {
    if !root_or_skip("attach_errors_name_what_is_wrong") {
        return;
    }
    let pair = Pair::new(1500);
    in_netns(&pair.broker, || {
        let missing = XdpSteering::attach("nosuch0", AttachMode::Auto, &config()).unwrap_err();
        let text = missing.to_string();
        assert!(
            matches!(missing, XdpError::InterfaceMissing { .. }),
            "{text}"
        );
        assert!(text.contains("\"nosuch0\""), "{text}");
        assert!(
            text.contains(&pair.broker_if) && text.contains("lo"),
            "{text}"
        );

        let empty = SteerConfig::new(vec![], vec![BROKER_IP]);
        let invalid = XdpSteering::attach(&pair.broker_if, AttachMode::Auto, &empty).unwrap_err();
        assert!(
            matches!(invalid, XdpError::InvalidConfig { .. }),
            "{invalid}"
        );

        let _first =
            XdpSteering::attach(&pair.broker_if, AttachMode::Driver, &config()).expect("attach");
        for mode in [AttachMode::Driver, AttachMode::Generic, AttachMode::Auto] {
            let second = XdpSteering::attach(&pair.broker_if, mode, &config()).unwrap_err();
            let text = second.to_string();
            assert!(
                matches!(
                    second,
                    XdpError::AlreadyAttached {
                        mode: AttachedMode::Driver,
                        ..
                    }
                ),
                "{text}"
            );
            assert!(
                text.contains(&format!("xdp-ctl detach {}", pair.broker_if)),
                "{text}"
            );
        }
    });
}

#[test]
fn detach_removes_a_leftover_program() {
    if !root_or_skip("detach_removes_a_leftover_program") {
        return;
    }
    let pair = Pair::new(1500);
    for mode in [AttachMode::Driver, AttachMode::Generic] {
        in_netns(&pair.broker, || {
            let steering = XdpSteering::attach(&pair.broker_if, mode, &config()).expect("attach");
            // A crash: the handle never drops, the program stays attached.
            std::mem::forget(steering);
            assert!(status(&pair.broker_if).unwrap().is_some());
            assert!(detach(&pair.broker_if).expect("detach"), "{mode}");
            assert_eq!(status(&pair.broker_if).unwrap(), None, "{mode}");
            assert!(!detach(&pair.broker_if).expect("detach again"), "{mode}");
        });
        let link = pair.broker_link();
        assert!(!link.contains("prog/xdp"), "{mode}: {link}");
    }
}

#[test]
fn queue_count_reads_this_namespaces_sysfs_only() {
    if !root_or_skip("queue_count_reads_this_namespaces_sysfs_only") {
        return;
    }
    let pair = Pair::new(1500);
    // This thread's /sys is the root namespace's: the broker's veth is not in it.
    in_netns(&pair.broker, || {
        let error = queue_count(&pair.broker_if).unwrap_err();
        assert!(
            matches!(error, XdpError::SysfsOtherNamespace { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("ip netns exec"), "{error}");
    });
}
