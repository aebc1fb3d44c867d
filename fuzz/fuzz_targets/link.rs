//! cargo-fuzz target `link`: see `regfs_fuzz::link` (fuzz/harness.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regfs_fuzz::link(data));
