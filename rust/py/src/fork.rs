//! A store call and a `fork` never overlap.
//!
//! A child process inherits every lock as it was at the moment of the fork. If another thread
//! was inside a store call (a training loader's prefetch thread in `read_batch`, say) and held
//! the store's index lock or the thread-pool cache, the child would wait for it forever.
//!
//! Calls that keep the GIL cannot overlap a fork: the forking thread holds the GIL. Calls that
//! release it run through [`detached`], which holds a shared gate for the length of the work,
//! and a `pthread_atfork` handler takes the gate exclusively before the fork (waiting for work
//! in flight to finish) and lets it go in the parent and the child after it. The gate is let go
//! before the GIL is taken back, so a fork waiting for it never waits on a thread that waits for
//! the GIL.

use std::cell::RefCell;
use std::sync::{Once, RwLock, RwLockWriteGuard};

use pyo3::Python;

static GATE: RwLock<()> = RwLock::new(());

thread_local! {
    // The exclusive hold taken by the forking thread, released after the fork.
    static HELD: RefCell<Option<RwLockWriteGuard<'static, ()>>> = const { RefCell::new(None) };
}

/// Runs `work` without the GIL, holding the gate. Must not nest (a nested shared hold could
/// wait behind a fork that waits for the outer one).
pub fn detached<T: Send>(py: Python<'_>, work: impl FnOnce() -> T + Send) -> T {
    py.detach(|| {
        let _gate = GATE.read().unwrap_or_else(|p| p.into_inner());
        work()
    })
}

extern "C" fn before_fork() {
    let guard = GATE.write().unwrap_or_else(|p| p.into_inner());
    HELD.with(|h| *h.borrow_mut() = Some(guard));
}

extern "C" fn after_fork() {
    HELD.with(|h| drop(h.borrow_mut().take()));
}

/// Registers the fork handlers once per process.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handlers are plain functions that only lock and unlock a static lock.
        unsafe {
            libc::pthread_atfork(Some(before_fork), Some(after_fork), Some(after_fork));
        }
    });
}
