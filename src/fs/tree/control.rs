//! The control directory `MNT/.regfs/`: how the mount is doing, without a debugger. A dot name
//! never collides with a repository (a repository component must start with `[a-z0-9]`).
//!
//! - `stats`: JSON counters (requests by kind, bytes fetched against bytes served and copied,
//!   memory cache hits and misses, the disk tier's counters where there is one, retries,
//!   repositories listed ahead of a walk, the rate-limit headers last seen, and per source
//!   counters when there are mirrors);
//! - `config`: the effective configuration as JSON, without secrets;
//! - `version`: one line.
//!
//! Content is made when it is asked for: at getattr (for `ls -l`'s size) and at open, whose
//! snapshot the handle keeps, so one open reads one consistent document. The files are opened
//! with direct I/O, so the kernel reads to the end of that snapshot whatever size it last saw.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::fs::node::{Content, ControlFile, FileNode, Node};
use crate::fs::{Fs, Ino};

/// The control directory's name in the root.
pub(crate) const CONTROL_DIR: &str = ".regfs";

/// What the control files need that no other part keeps: bytes served, and the configuration.
pub(crate) struct Control {
    served_bytes: AtomicU64,
    served_reads: AtomicU64,
    config: Value,
    started: Instant,
}

impl Control {
    /// `config`: the effective configuration as shown in `.regfs/config` (no secrets).
    pub(crate) fn new(config: Value) -> Self {
        Control {
            served_bytes: AtomicU64::new(0),
            served_reads: AtomicU64::new(0),
            config,
            started: Instant::now(),
        }
    }
}

/// The entries of `.regfs/`.
pub(super) fn children() -> Vec<(String, Node)> {
    [
        ("stats", ControlFile::Stats),
        ("config", ControlFile::Config),
        ("version", ControlFile::Version),
    ]
    .into_iter()
    .map(|(n, f)| (n.to_string(), Node::ControlFile(f)))
    .collect()
}

/// Pretty JSON with a final newline (so `cat` leaves the prompt on its own line).
fn json_bytes(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec_pretty(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

impl Fs {
    /// Count a read of inode `ino` answered to the kernel (`bytes.served` in `.regfs/stats`);
    /// reads of the control files themselves are not counted.
    pub fn note_served(&self, ino: Ino, n: usize) {
        if self
            .inodes
            .node(ino)
            .is_ok_and(|n| matches!(*n, Node::ControlFile(_)))
        {
            return;
        }
        self.control
            .served_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        self.control.served_reads.fetch_add(1, Ordering::Relaxed);
    }

    /// A control file's bytes, made now.
    pub(crate) fn control_bytes(&self, f: ControlFile) -> Bytes {
        match f {
            ControlFile::Stats => json_bytes(&self.stats_doc()),
            ControlFile::Config => json_bytes(&self.control.config),
            ControlFile::Version => Bytes::from(concat!("regfs ", env!("CARGO_PKG_VERSION"), "\n")),
        }
    }

    /// A control file as an open handle serves it: a snapshot made now.
    pub(crate) fn control_file(&self, f: ControlFile) -> FileNode {
        let body = self.control_bytes(f);
        FileNode {
            repo: String::new(),
            size: body.len() as u64,
            content: Content::Inline(body),
            media_type: None,
        }
    }

    /// The `.regfs/stats` document.
    fn stats_doc(&self) -> Value {
        let req = self.reg.snapshot();
        let cache = self.blobs.cache();
        let (hits, misses) = cache.hits_misses();
        let (walk_queued, walk_finished, walk_dropped) = self.walk.counts();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.control.started.elapsed().as_secs(),
            "bytes": {
                "fetched": req.blob_bytes,
                "served": self.control.served_bytes.load(Ordering::Relaxed),
                "reads_served": self.control.served_reads.load(Ordering::Relaxed),
                "joined": cache.joined_bytes(),
                "uploaded": req.upload_bytes,
            },
            "cache": {
                "memory": {
                    "hits": hits,
                    "misses": misses,
                    "bytes": cache.used_bytes(),
                    "chunks": cache.len(),
                    "capacity": cache.capacity(),
                    "slots": self.blobs.slot_counts().map(|(count, held, touched, missed)| {
                        json!({ "count": count, "held": held, "touched": touched, "missed": missed })
                    }),
                },
                "disk": self.disk_cache_stats(),
            },
            "retries": req.retries,
            "walk_ahead": {
                "queued": walk_queued,
                "finished": walk_finished,
                "dropped": walk_dropped,
            },
            "rate_limit": self.reg.rate_limit(),
            "rate_limited": {
                "pull_limit": req.pull_limited,
                "plain": req.rate_limited,
            },
            "requests": req,
            "sources": self.reg.sources(),
        })
    }

    /// The disk tier's counters (hits, misses, evictions, checksum failures, bytes...) as a
    /// JSON object; `null` without a disk tier.
    fn disk_cache_stats(&self) -> Value {
        self.blobs
            .disk()
            .and_then(|d| serde_json::to_value(d.stats()).ok())
            .unwrap_or(Value::Null)
    }
}
