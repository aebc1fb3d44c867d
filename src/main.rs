//! The `regfs` command: parse the flags into a [`Config`], then mount and serve
//! ([`regfs::fuse::session::run`]). Bad flags exit with status 2; everything later with 1.

use std::process::ExitCode;

use clap::Parser;
use regfs::cli::Cli;
use regfs::config::Config;

fn main() -> ExitCode {
    // Chunks are megabytes each: keep such buffers in their own mappings so freeing one returns
    // it to the system (glibc's adaptive threshold would otherwise move them into the heap,
    // where fragmentation keeps peak RSS far above the cache's byte cap).
    // SAFETY: mallopt only tunes the allocator; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    match Config::try_from(Cli::parse()) {
        Ok(cfg) => regfs::fuse::session::run(&cfg),
        Err(e) => {
            eprintln!("regfs: {e}");
            ExitCode::from(2)
        }
    }
}
