//! Publisher and subscriber library for Embarcadero-rs (filled by the kernel-TCP broker issue).
