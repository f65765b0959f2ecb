//! `xdp-ctl` on a real veth pair in private network namespaces: `status`, `counters`,
//! `queues` and `detach`, their exit codes and errors, with the program attached, left over
//! (its handle forgotten, as after a crash) and gone.
//!
//! Needs root (namespaces, XDP); without it the test prints `skipped: needs root` and passes.

mod common;
mod veth;

use std::io::ErrorKind;
use std::process::Command;
use std::time::Duration;

use common::{in_netns, root_or_skip};
use veth::{BROKER_IP, Pair, at};
use xdp_prog::{AttachMode, SteerConfig, XdpSteering, attached_counters};

const STEERED_PORT: u16 = 9100;
/// Long enough for a refused connect on veth; short enough that a SYN is sent only once.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

fn config() -> SteerConfig {
    SteerConfig::new(vec![STEERED_PORT, STEERED_PORT + 1], vec![BROKER_IP])
}

#[test]
fn xdp_ctl_status_counters_queues_and_detach() {
    if !root_or_skip("xdp_ctl_status_counters_queues_and_detach") {
        return;
    }
    let pair = Pair::new(1500);
    let ctl = |args: &[&str]| {
        let output = Command::new("ip")
            .args(["netns", "exec", &pair.broker, env!("CARGO_BIN_EXE_xdp-ctl")])
            .args(args)
            .output()
            .expect("run xdp-ctl");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let ifname = pair.broker_if.as_str();
    let (code, out, _) = ctl(&["status", ifname]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("no XDP program"), "{out}");
    let (code, out, err) = ctl(&["queues", ifname]);
    assert_eq!((code, out.trim()), (Some(0), "1"), "{err}");
    let (code, _, err) = ctl(&["counters", ifname]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no XDP program attached"), "{err}");
    let (code, _, err) = ctl(&["status", "nosuch0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("\"nosuch0\"") && err.contains(ifname), "{err}");

    in_netns(&pair.broker, || {
        let steering = XdpSteering::attach(ifname, AttachMode::Driver, &config()).expect("attach");
        let end = pair.connect(at(BROKER_IP, STEERED_PORT), CONNECT_TIMEOUT);
        assert_eq!(end, ErrorKind::ConnectionRefused);
        assert_eq!(
            attached_counters(ifname).unwrap(),
            steering.counters().unwrap()
        );
        std::mem::forget(steering);
    });
    let (code, out, err) = ctl(&["status", ifname]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("xdp_steer") && out.contains("mode driver"),
        "{out}"
    );
    let (code, out, err) = ctl(&["counters", ifname]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("no_socket 1\n") && out.contains("redirected 0\n"),
        "{out}"
    );
    let (code, out, err) = ctl(&["detach", ifname]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("detached"), "{out}");
    let (code, out, _) = ctl(&["status", ifname]);
    assert_eq!(code, Some(3), "{out}");
    let (code, out, _) = ctl(&["detach", ifname]);
    assert_eq!(code, Some(0));
    assert!(out.contains("no XDP program was attached"), "{out}");
}
