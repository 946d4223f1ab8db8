//! One container of the sandbox: its init process and its execs.

use crate::error::ShimError;
use crate::process::Process;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub bundle: String,
    pub init: Arc<Process>,
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    pub fn new(id: &str, bundle: &str, init: Arc<Process>) -> Self {
        Self {
            id: id.to_owned(),
            bundle: bundle.to_owned(),
            init,
            execs: Mutex::new(HashMap::new()),
        }
    }

    /// The init process for an empty `exec_id`, else that exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, ShimError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ShimError::ExecNotFound(exec_id.to_owned()))
    }

    pub fn all_processes(&self) -> Vec<Arc<Process>> {
        let mut all = vec![self.init.clone()];
        all.extend(lock(&self.execs).values().cloned());
        all
    }
}

/// No code panics while holding these maps' locks with a half-made change
/// (each is one insert or remove): recover the guard.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
