//! cargo-fuzz target `manifest`: see `regfs_fuzz::manifest` (fuzz/harness.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regfs_fuzz::manifest(data));
