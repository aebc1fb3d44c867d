//! cargo-fuzz target `zstd_frames`: see `regfs_fuzz::zstd_frames` (fuzz/harness.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regfs_fuzz::zstd_frames(data));
