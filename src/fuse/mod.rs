//! The kernel side of regfs: [`adapter`] turns fuser's calls into calls on the [`crate::fs`] core
//! and its results into replies; [`mountpoint`] checks where it mounts; [`session`] mounts (daemonizing first unless in the foreground),
//! handles SIGINT/SIGTERM, wires kernel cache invalidation, and unmounts.

pub mod adapter;
pub mod mountpoint;
mod passthrough;
pub mod session;

pub use adapter::FuseAdapter;
