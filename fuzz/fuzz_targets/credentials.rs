//! cargo-fuzz target `credentials`: see `regfs_fuzz::credentials` (fuzz/harness.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regfs_fuzz::credentials(data));
