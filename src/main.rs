//! The `regfs` command: parse the flags (and `-o` options) into a [`Config`], then mount and serve
//! ([`regfs::fuse::session::run`]); or print a generated file (`--generate`, for install.sh).
//! Bad flags exit with status 2; everything later with 1.

use std::process::ExitCode;

use regfs::cli::{Cli, Invocation};
use regfs::config::Config;

fn main() -> ExitCode {
    // Chunks are megabytes each: keep such buffers in their own mappings so freeing one returns
    // it to the system (glibc's adaptive threshold would otherwise move them into the heap,
    // where fragmentation keeps peak RSS far above the cache's byte cap). 256 KiB, not 1 MiB:
    // the HTTP client's receive buffers (up to about 400 KiB per connection, reallocated as
    // they grow) left the heap fragmented too: 64 random readers over a 64 MiB cache (57
    // requests in flight) peaked at 110 to 124 MiB with 1 MiB, 98 to 110 MiB with this. The
    // price: those buffers are mapped afresh, so a cold sequential read faults on about 10 % of
    // its pages instead of 5 % (about 0.03 s of CPU per GiB).
    // SAFETY: mallopt only tunes the allocator; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
    let cli = match Cli::invocation(std::env::args_os()) {
        Ok(Invocation::Mount(cli)) => cli,
        Ok(Invocation::Generate(what)) => {
            return match regfs::cli::generate(what, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("regfs: --generate: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Err(e) => e.exit(),
    };
    match Config::try_from(*cli) {
        Ok(cfg) => regfs::fuse::session::run(&cfg),
        Err(e) => {
            eprintln!("regfs: {e}");
            ExitCode::from(2)
        }
    }
}
