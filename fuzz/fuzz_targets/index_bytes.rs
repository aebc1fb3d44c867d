//! cargo-fuzz target `index_bytes`: see `regfs_fuzz::index_bytes` (fuzz/harness.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regfs_fuzz::index_bytes(data));
