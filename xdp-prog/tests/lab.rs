//! `scripts/lab.sh`: up, status, exec, up again over a crashed run's leftovers (including an
//! XDP program left attached), up with `--gso off`, down twice; nothing may remain.
//!
//! Needs root; without it the test prints `skipped: needs root` and passes. It uses its
//! own `--prefix`, so it never touches a running lab (`emb-*`).

mod common;

use std::net::{SocketAddrV4, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{in_netns, ip, root_or_skip, run};
use xdp_prog::{AttachMode, SteerConfig, XdpSteering};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/lab.sh");

/// Runs the lab script; returns (exit code, stdout + stderr).
fn lab(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .output()
        .expect("run scripts/lab.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

/// Takes the lab of `prefix` down when the test ends, also on failure.
struct LabGuard {
    prefix: String,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = lab(&["down", "--prefix", &self.prefix]);
    }
}

fn assert_gone(prefix: &str) {
    let namespaces = ip(&["netns", "list"]);
    assert!(
        !namespaces.contains(&format!("{prefix}-")),
        "namespaces left: {namespaces}"
    );
    let links = ip(&["-br", "link", "show"]);
    assert!(
        !links.contains(&format!("{prefix}-")),
        "links left: {links}"
    );
    let state = format!("/run/embarcadero-lab/{prefix}.env");
    assert!(!Path::new(&state).exists(), "{state} left");
}

#[test]
fn lab_up_status_exec_up_again_down_leave_nothing_behind() {
    if !root_or_skip("lab_up_status_exec_up_again_down_leave_nothing_behind") {
        return;
    }
    let prefix = format!("lt{}", std::process::id() % 100_000);
    let guard = LabGuard {
        prefix: prefix.clone(),
    };
    let p = prefix.as_str();
    let (client_ns, broker_ns) = (format!("{p}-client"), format!("{p}-broker0"));
    let (client_if, broker_if) = (format!("{p}-c0"), format!("{p}-b0"));

    let (code, out) = lab(&["status", "--prefix", p]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains(&format!("lab {p}: down")), "{out}");
    let (code, out) = lab(&["up", "--prefix", p, "--mtu", "1"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--mtu needs a number"), "{out}");

    let (code, out) = lab(&["up", "--prefix", p, "--brokers", "3"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("lab {p}: up")), "{out}");
    let broker = ip(&["-n", &broker_ns, "-d", "addr", "show", &broker_if]);
    for expected in ["10.77.0.2/24", "mtu 3500", "numrxqueues 1", "numtxqueues 1"] {
        assert!(broker.contains(expected), "{expected} missing: {broker}");
    }
    let client = ip(&["-n", &client_ns, "-d", "addr", "show", &client_if]);
    for expected in ["10.77.0.1/24", "mtu 3500", "numrxqueues 1"] {
        assert!(client.contains(expected), "{expected} missing: {client}");
    }
    assert!(ip(&["-n", &broker_ns, "link", "show", "lo"]).contains("UP"));
    let state = std::fs::read_to_string(format!("/run/embarcadero-lab/{p}.env")).unwrap();
    assert!(
        state.contains("BROKERS=10.77.0.2:9100,10.77.1.2:9101,10.77.2.2:9102\n"),
        "{state}"
    );
    let (code, out) = lab(&["status", "--prefix", p]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("xdp: none"), "{out}");

    // The client reaches the broker's kernel (nothing listens: refused).
    let end = in_netns(&client_ns, || {
        let broker = SocketAddrV4::new([10, 77, 0, 2].into(), 9100);
        TcpStream::connect_timeout(&broker.into(), Duration::from_secs(2)).map(drop)
    });
    assert_eq!(
        end.map_err(|error| error.kind()),
        Err(std::io::ErrorKind::ConnectionRefused)
    );
    let out =
        run(Command::new("bash")
            .args([SCRIPT, "exec", "client", "--prefix", p, "ip", "-br", "addr"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.77.0.1/24"));

    // A crashed broker leaves its program attached; MTU 3500 allows driver mode on veth.
    in_netns(&broker_ns, || {
        let config = SteerConfig::new(vec![9100, 9101, 9102], vec![[10, 77, 0, 2].into()]);
        let steering =
            XdpSteering::attach(&broker_if, AttachMode::Driver, &config).expect("driver mode");
        std::mem::forget(steering);
    });
    let (code, out) = lab(&["status", "--prefix", p]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("xdp: xdp prog/xdp id"), "{out}");

    // `up` again cleans all that up first.
    let (code, out) = lab(&["up", "--prefix", p, "--gso", "off"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("xdpdrv off"), "{out}");
    assert!(out.contains(&format!("ip netns del {client_ns}")), "{out}");
    assert!(out.contains("xdp: none"), "{out}");
    let offloads =
        run(Command::new("ip").args(["netns", "exec", &client_ns, "ethtool", "-k", &client_if]));
    let offloads = String::from_utf8_lossy(&offloads.stdout).into_owned();
    for expected in [
        "generic-segmentation-offload: off",
        "tcp-segmentation-offload: off",
    ] {
        assert!(
            offloads.contains(expected),
            "{expected} missing: {offloads}"
        );
    }

    for _ in 0..2 {
        let (code, out) = lab(&["down", "--prefix", p]);
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains(&format!("lab {p}: down")), "{out}");
        assert_gone(p);
    }
    let (code, out) = lab(&["status", "--prefix", p]);
    assert_eq!(code, Some(3), "{out}");
    let (code, out) = lab(&["exec", "client", "--prefix", p, "true"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("run scripts/lab.sh up first"), "{out}");
    drop(guard);
}
