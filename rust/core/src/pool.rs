//! featstore's own thread pools.
//!
//! Never rayon's global pool: a library must not size or occupy the application's pool, and a
//! pool inherited through `fork` (DataLoader workers fork) has no threads in the child. Pools are
//! cached per thread count and per process; a child notices the pid changed and builds new ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

struct Pools {
    pid: u32,
    by_size: HashMap<usize, Arc<ThreadPool>>,
}

static POOLS: Mutex<Option<Pools>> = Mutex::new(None);

/// The default number of threads: the cores this process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The most threads a pool gets, whatever is asked: a few per core covers the latency of network
/// file systems; past that, threads only cost their start-up (10,000 took minutes).
pub fn max_threads() -> usize {
    (default_threads() * 4).max(8)
}

/// A pool of `threads` threads (default: [`default_threads`], at most [`max_threads`]) that is
/// valid in this process.
pub fn pool(threads: Option<usize>) -> Arc<ThreadPool> {
    let n = threads
        .filter(|&n| n > 0)
        .unwrap_or_else(default_threads)
        .min(max_threads());
    let pid = std::process::id();
    let mut guard = POOLS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if guard.as_ref().is_some_and(|p| p.pid != pid) {
        // Forked child: the parent's worker threads do not exist here. Dropping those pools
        // would signal threads that are gone and touch locks copied mid-use, so leak them.
        if let Some(old) = guard.take() {
            std::mem::forget(old);
        }
    }
    let pools = guard.get_or_insert_with(|| Pools {
        pid,
        by_size: HashMap::new(),
    });
    pools
        .by_size
        .entry(n)
        .or_insert_with(|| {
            Arc::new(
                ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("featstore-{i}"))
                    .build()
                    .expect("cannot start featstore worker threads"),
            )
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_are_cached_per_size() {
        let a = pool(Some(2));
        let b = pool(Some(2));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(pool(Some(3)).current_num_threads(), 3);
    }

    #[test]
    fn a_huge_thread_count_is_capped() {
        assert_eq!(pool(Some(10_000)).current_num_threads(), max_threads());
    }
}
