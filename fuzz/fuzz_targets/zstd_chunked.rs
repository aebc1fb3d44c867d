//! cargo-fuzz target `zstd_chunked`: see `regfs_fuzz::zstd_chunked` (fuzz/harness.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regfs_fuzz::zstd_chunked(data));
