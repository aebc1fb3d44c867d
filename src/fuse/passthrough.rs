//! FUSE passthrough: when `open` hands back a verified whole file from the disk cache, the
//! kernel is given that file (a backing id) and reads it without the daemon. Asked for at `init`
//! only when the mount has a disk tier; where the kernel does not offer it, or registering a
//! backing file fails (not privileged, an old kernel), opens fall back to daemon reads and that
//! is logged once.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, FileHandle, FopenFlags, InitFlags, KernelConfig, ReplyOpen};

use crate::sync::lock;

/// Kernel stacking depth asked for: 1 lets backing files live on an ordinary filesystem while
/// the mount itself can still be a lower layer of overlayfs (the kernel allows 2 in all).
const MAX_STACK_DEPTH: u32 = 1;

#[derive(Default)]
pub(super) struct Passthrough {
    enabled: AtomicBool,
    /// Backing ids by handle, kept until release (the kernel needs them while the file is open).
    backing: Mutex<HashMap<FileHandle, Arc<BackingId>>>,
}

impl Passthrough {
    /// At `init`: ask the kernel for passthrough if `wanted`.
    pub fn init(&self, wanted: bool, config: &mut KernelConfig) {
        if !wanted {
            return;
        }
        let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(MAX_STACK_DEPTH).is_ok();
        if granted {
            self.enabled.store(true, Ordering::SeqCst);
            log::info!("FUSE passthrough on: files cached whole are read by the kernel");
        } else {
            log::warn!(
                "the kernel does not offer FUSE passthrough (Linux >= 6.9): files cached whole \
                 are read through the daemon"
            );
        }
    }

    /// Answer an open: with the backing file when there is one and passthrough works, else
    /// plainly.
    pub fn reply(&self, reply: ReplyOpen, fh: FileHandle, flags: FopenFlags, file: Option<&File>) {
        let Some(file) = file.filter(|_| self.enabled.load(Ordering::SeqCst)) else {
            return reply.opened(fh, flags);
        };
        match reply.open_backing(file) {
            Ok(id) => {
                let id = Arc::new(id);
                lock(&self.backing).insert(fh, id.clone());
                reply.opened_passthrough(fh, flags, &id);
            }
            Err(e) => {
                if self.enabled.swap(false, Ordering::SeqCst) {
                    log::warn!(
                        "FUSE passthrough unavailable ({e}; it needs CAP_SYS_ADMIN): files \
                         cached whole are read through the daemon from now on"
                    );
                }
                reply.opened(fh, flags);
            }
        }
    }

    /// At release: the kernel no longer needs the handle's backing file.
    pub fn release(&self, fh: FileHandle) {
        lock(&self.backing).remove(&fh);
    }
}
