//! cargo-fuzz target `toc_json`: see `regfs_fuzz::toc_json` (fuzz/harness.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regfs_fuzz::toc_json(data));
