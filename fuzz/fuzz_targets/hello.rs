//! The handshake bodies: Hello (publisher, and subscriber with its start position and
//! delivery limit) and HelloOk. Whatever parses re-encodes to the same bytes and parses back;
//! the checked views never panic; parsed fields follow the protocol's rules.
//!
//! Input: a frame body, parsed both as Hello and as HelloOk.

#![no_main]

use embarcadero_fuzz::{check_body, limit_variants};
use libfuzzer_sys::fuzz_target;
use wire::{FrameKind, Hello, HelloOk, HelloOkRepr, HelloRepr, Role};

fn check_hello(body: &[u8]) {
    let Ok(view) = Hello::new_checked(body) else {
        return;
    };
    assert_eq!(view.magic(), wire::MAGIC);
    assert_eq!(view.protocol_version(), wire::PROTOCOL_VERSION);
    assert_eq!(view.topic().len(), usize::from(view.topic_len()));
    for limits in limit_variants() {
        let Ok(repr) = HelloRepr::parse(&view, &limits) else {
            continue;
        };
        assert_eq!(repr.client_id, view.client_id());
        assert_eq!(repr.session_epoch, view.session_epoch());
        assert_eq!(repr.topic.as_bytes(), view.topic());
        assert!(repr.topic.as_bytes().len() <= limits.topic_bytes_max());
        assert_eq!(view.reserved(), 0);
        match repr.role {
            Role::Publish => {
                assert_eq!(view.role(), 1);
                assert_eq!((view.from_position(), view.batch_bytes_max()), (0, 0));
            }
            Role::Subscribe {
                from_position,
                batch_bytes_max,
            } => {
                assert_eq!(view.role(), 2);
                assert_eq!(from_position, view.from_position());
                assert!(
                    batch_bytes_max == 0
                        || (wire::BATCH_BYTES_MIN..=wire::BATCH_BYTES_HARD_MAX)
                            .contains(&batch_bytes_max)
                );
            }
        }
    }
}

fn check_hello_ok(body: &[u8]) {
    let Ok(view) = HelloOk::new_checked(body) else {
        return;
    };
    assert_eq!(view.protocol_version(), wire::PROTOCOL_VERSION);
    let Ok(repr) = HelloOkRepr::parse(&view) else {
        return;
    };
    assert!(repr.log_start <= repr.log_end);
    assert!(view.reserved().iter().all(|&b| b == 0));
    assert!((wire::BATCH_BYTES_MIN..=wire::BATCH_BYTES_HARD_MAX).contains(&repr.batch_bytes_max));
    assert_eq!(repr.next_batch_seq, view.next_batch_seq());
}

fuzz_target!(|body: &[u8]| {
    check_body(FrameKind::Hello, body);
    check_body(FrameKind::HelloOk, body);
    check_hello(body);
    check_hello_ok(body);
});
