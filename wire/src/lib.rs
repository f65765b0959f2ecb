//! The Embarcadero-rs wire protocol.
