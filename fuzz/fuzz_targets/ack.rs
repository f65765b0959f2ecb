//! Ack bodies: the entry rules (at most 1024, strictly increasing sequences, none beyond the
//! cumulative sequence, positions that do not overflow) hold for whatever parses, which
//! re-encodes to the same bytes; the view's lazy entry iterator agrees with the parser.
//!
//! Input: an Ack body.

#![no_main]

use embarcadero_fuzz::check_body;
use libfuzzer_sys::fuzz_target;
use wire::{Ack, AckRepr, FrameKind};

fuzz_target!(|body: &[u8]| {
    check_body(FrameKind::Ack, body);
    let Ok(view) = Ack::new_checked(body) else {
        return;
    };
    let count = usize::from(view.entry_count());
    assert!(count <= wire::ACK_ENTRIES_MAX);
    assert_eq!(
        body.len(),
        wire::ACK_FIXED_BYTES + count * wire::ACK_ENTRY_BYTES
    );
    let lazy: Vec<_> = view.entries().collect();
    assert_eq!(lazy.len(), count);
    let Ok(repr) = AckRepr::parse(&view) else {
        return;
    };
    let entries = repr.entries();
    assert_eq!(
        lazy.into_iter().collect::<Result<Vec<_>, _>>().as_deref(),
        Ok(entries)
    );
    for (index, entry) in entries.iter().enumerate() {
        assert!(entry.batch_seq <= repr.acked_through_seq());
        assert!(entry.message_count >= 1);
        if let Some(start) = entry.global_start {
            assert!(start.checked_add(u64::from(entry.message_count)).is_some());
        }
        if index > 0 {
            assert!(entries[index - 1].batch_seq < entry.batch_seq);
        }
    }
    assert_eq!(
        AckRepr::new(repr.acked_through_seq(), entries.to_vec()).as_ref(),
        Ok(&repr)
    );
});
