//! Scripted faults for the fault proxy ([`super::FaultProxy`]): a [`Scripted`] rule picks
//! requests by method and a fragment of their path, and answers the next `times` of them itself
//! with a status (the registry never sees them), or forwards them and drops the registry's answer
//! (the registry acted; the client sees the connection close).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What the proxy does with a request a rule picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Answer with this status; nothing is forwarded.
    Status(u16),
    /// Forward, wait for the registry's answer, and close without passing it on.
    DropAnswer,
}

/// One rule: the next `times` requests with `method` whose path contains `path` get `act`.
#[derive(Debug)]
pub struct Scripted {
    pub method: &'static str,
    pub path: &'static str,
    pub act: Act,
    left: AtomicUsize,
    /// Requests the rule acted on.
    pub hits: AtomicUsize,
}

impl Scripted {
    /// A rule for the next `times` matching requests (`usize::MAX`: all of them).
    pub fn new(method: &'static str, path: &'static str, act: Act, times: usize) -> Arc<Self> {
        Arc::new(Scripted {
            method,
            path,
            act,
            left: AtomicUsize::new(times),
            hits: AtomicUsize::new(0),
        })
    }

    /// The act for this request, if the rule picks it (and counts it).
    pub fn pick(&self, method: &str, path: &str) -> Option<Act> {
        if method != self.method || !path.contains(self.path) {
            return None;
        }
        self.left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .ok()?;
        self.hits.fetch_add(1, Ordering::SeqCst);
        Some(self.act)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// The first act any of `rules` picks for a request.
pub fn pick(rules: &[Arc<Scripted>], method: &str, path: &str) -> Option<Act> {
    rules.iter().find_map(|r| r.pick(method, path))
}
