//! The other control bodies: Error, CreateTopic, TopicOk, Goodbye and Redirect. Whatever parses
//! re-encodes to the same bytes and parses back; the checked views never panic.
//!
//! Input: a frame body, parsed as each of these kinds.

#![no_main]

use embarcadero_fuzz::{check_body, limit_variants};
use libfuzzer_sys::fuzz_target;
use wire::{CreateTopic, ErrorFrame, ErrorFrameRepr, FrameKind, Redirect, RedirectRepr, TopicOk};

fn check_views(body: &[u8]) {
    if let Ok(view) = ErrorFrame::new_checked(body) {
        assert_eq!(view.reason().len(), usize::from(view.reason_len()));
        for limits in limit_variants() {
            if let Ok(repr) = ErrorFrameRepr::parse(&view, &limits) {
                assert!(repr.reason().len() <= limits.reason_bytes_max());
                assert_eq!(repr.code.as_u16(), view.code());
                assert_eq!(repr.batch_seq.unwrap_or(u64::MAX), view.batch_seq());
            }
        }
    }
    if let Ok(view) = CreateTopic::new_checked(body) {
        assert_eq!(view.topic().len(), usize::from(view.topic_len()));
        assert_eq!(view.magic(), wire::MAGIC);
    }
    if let Ok(view) = TopicOk::new_checked(body) {
        assert_eq!(view.topic().len(), usize::from(view.topic_len()));
    }
    if let Ok(view) = Redirect::new_checked(body)
        && let Ok(repr) = RedirectRepr::parse(&view)
    {
        assert_eq!(repr.brokers().len(), usize::from(view.count()));
        assert!(repr.brokers().iter().all(|(addr, _)| addr.port() != 0));
    }
}

fuzz_target!(|body: &[u8]| {
    for kind in [
        FrameKind::Error,
        FrameKind::CreateTopic,
        FrameKind::TopicOk,
        FrameKind::Goodbye,
        FrameKind::Redirect,
    ] {
        check_body(kind, body);
    }
    check_views(body);
});
