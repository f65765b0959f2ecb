//! Shared and private memory regions backed by hugepages.
