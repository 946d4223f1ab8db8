//! The agent's one way to take a std mutex.
//!
//! A mutex is poisoned when a thread panics while holding it. The release
//! build cannot see that: it has `panic = "abort"` (the workspace's
//! `[profile.release]`), so the first panic ends the agent, and with it the
//! pod. Debug builds, which the host tests run, unwind instead, and tokio
//! keeps serving after a task panics; there the value is taken as it is, so
//! one failed request does not fail every later one. The agent's guarded
//! values are maps and `Option`s changed in one step; the cgroup tree's
//! lock guards `()` (the directories themselves).

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, taking the value of a poisoned one as it is.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_still_locks() {
        let mutex = Mutex::new(1);
        let poisoned = std::panic::catch_unwind(|| {
            let _guard = mutex.lock().unwrap();
            panic!("poison it");
        });
        assert!(poisoned.is_err());
        assert!(mutex.is_poisoned());
        *lock(&mutex) += 1;
        assert_eq!(*lock(&mutex), 2);
    }
}
