//! cargo-fuzz target `estargz`: see `regfs_fuzz::estargz` (fuzz/harness.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regfs_fuzz::estargz(data));
