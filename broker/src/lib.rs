//! Embarcadero-rs broker core.
