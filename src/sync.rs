//! Lock helpers shared by the core's parts.

use std::sync::{Mutex, MutexGuard};

/// Lock a leaf mutex. Nothing that can panic runs while one of regfs's locks is held, so a
/// poisoned lock still guards consistent data; recovering keeps one bug from taking the whole
/// mount down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
