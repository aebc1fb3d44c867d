//! cargo-fuzz target `www_authenticate`: see `regfs_fuzz::www_authenticate` (fuzz/harness.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regfs_fuzz::www_authenticate(data));
