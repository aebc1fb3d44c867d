//! cargo-fuzz target `gzip_index`: see `regfs_fuzz::gzip_index` (fuzz/harness.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regfs_fuzz::gzip_index(data));
