//! cargo-fuzz target `tar_index`: see `regfs_fuzz::tar_index` (fuzz/harness.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regfs_fuzz::tar_index(data));
