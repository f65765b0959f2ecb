//! The broker's connection state machine with up to four clients sending arbitrary byte
//! streams (valid-ish frames mixed with garbage), see `embarcadero_fuzz::connection`.
//!
//! Input: `fuzz_input::ConnectionInput`.

#![no_main]

use fuzz_input::ConnectionInput;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(input) = ConnectionInput::parse(data) {
        embarcadero_fuzz::connection::run(&input);
    }
});
