//! regfs: mount an OCI/Docker registry as a lazy FUSE filesystem.
//!
//! Data flow: `fuse` (adapter) → `fs` (tree and semantics) → `cache` (chunks) → `registry` (HTTP).
//! See docs/ARCHITECTURE.md.

pub mod blob;
pub mod cache;
pub mod cli;
pub mod config;
pub mod digest;
pub mod disk;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod layer;
pub mod manifest;
pub mod mount_options;
pub mod push;
pub mod registry;
pub mod sync;
