//! One process as the service tracks it: its [`ProcessState`], its stdio
//! paths, and a watch channel that `Wait` awaits. A state change and the
//! event that reports it are made under one lock ([`Process::transition`]),
//! so the event queue sees them in the order the states changed.

use crate::events::{EventQueue, TaskEvent};
use crate::state::{ExitStatus, Op, Outcome, ProcessState, Status, TransitionError};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use tokio::sync::watch;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

#[derive(Debug)]
pub struct Process {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub stdio: StdioPaths,
    pid: AtomicU32,
    state: Mutex<ProcessState>,
    status_tx: watch::Sender<Status>,
    /// Set once a task waits for this process's exit in the agent.
    pub exit_watch_started: AtomicBool,
    /// The output copies; the exit is reported after they end.
    pub output_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// For an exec: the OCI Process (JSON) it runs.
    pub exec_spec: Vec<u8>,
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, stdio: StdioPaths) -> Self {
        Self::with_exec_spec(container_id, exec_id, stdio, Vec::new())
    }

    pub fn with_exec_spec(
        container_id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        exec_spec: Vec<u8>,
    ) -> Self {
        let (status_tx, _) = watch::channel(Status::Created);
        Self {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            stdio,
            pid: AtomicU32::new(0),
            state: Mutex::new(ProcessState::default()),
            status_tx,
            exit_watch_started: AtomicBool::new(false),
            output_tasks: Mutex::new(Vec::new()),
            exec_spec,
        }
    }

    /// The id containerd uses for this process in events (the exec id, or
    /// the container id for init).
    pub fn event_id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::SeqCst);
    }

    pub fn status(&self) -> Status {
        *self.status_tx.borrow()
    }

    pub fn check(&self, op: Op) -> Result<(), TransitionError> {
        self.lock().check(op)
    }

    /// Applies `op` and, if it changed the state, queues `event(self)`,
    /// both under the state lock.
    pub fn transition(
        &self,
        op: Op,
        events: &EventQueue,
        event: impl FnOnce(&Self, Status) -> Option<TaskEvent>,
    ) -> Result<Outcome, TransitionError> {
        let mut state = self.lock();
        let outcome = state.apply(op)?;
        if outcome == Outcome::Changed {
            let status = state.status();
            if let Some(event) = event(self, status) {
                events.push(event);
            }
            self.status_tx.send_replace(status);
        }
        Ok(outcome)
    }

    /// Marks the process exited with `exit` and queues its TaskExit, unless
    /// it had already exited.
    pub fn exited(&self, exit: ExitStatus, events: &EventQueue) {
        let result = self.transition(Op::Exit(exit), events, |process, _| {
            Some(TaskEvent::Exit {
                container_id: process.container_id.clone(),
                id: process.event_id().to_owned(),
                pid: process.pid(),
                exit_status: exit.code,
                exited_at: exit.at,
            })
        });
        if let Err(err) = result {
            tracing::debug!("exit of {} ignored: {err}", self.event_id());
        }
    }

    /// Resolves once the process has exited (or was deleted unstarted).
    pub async fn wait(&self) -> Status {
        let mut status = self.status_tx.subscribe();
        let result = status
            .wait_for(|status| matches!(status, Status::Stopped(_) | Status::Deleted(_)))
            .await
            .map(|status| *status);
        // The sender lives in `self`, so it cannot be gone here.
        result.unwrap_or(Status::Deleted(None))
    }

    pub fn add_output_tasks(&self, tasks: Vec<tokio::task::JoinHandle<()>>) {
        self.output_tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(tasks);
    }

    pub fn take_output_tasks(&self) -> Vec<tokio::task::JoinHandle<()>> {
        std::mem::take(
            &mut *self
                .output_tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProcessState> {
        // A panic while holding the lock cannot leave ProcessState half
        // changed (apply is all or nothing): recover the guard.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    fn exit(code: u32) -> ExitStatus {
        ExitStatus {
            code,
            at: SystemTime::UNIX_EPOCH,
        }
    }

    fn drain(receiver: &mut tokio::sync::mpsc::UnboundedReceiver<TaskEvent>) -> Vec<&'static str> {
        let mut topics = Vec::new();
        while let Ok(event) = receiver.try_recv() {
            topics.push(event.topic());
        }
        topics
    }

    #[tokio::test]
    async fn events_follow_the_state_changes() {
        let (events, mut receiver) = EventQueue::new();
        let process = Arc::new(Process::new("c1", "", StdioPaths::default()));
        process.set_pid(7);
        let waiter = {
            let process = process.clone();
            tokio::spawn(async move { process.wait().await })
        };
        process
            .transition(Op::Start, &events, |p, _| {
                Some(TaskEvent::Start {
                    container_id: p.container_id.clone(),
                    pid: p.pid(),
                })
            })
            .unwrap();
        // A bad transition queues nothing.
        assert!(process
            .transition(Op::Start, &events, |_, _| panic!("not called"))
            .is_err());
        process.exited(exit(3), &events);
        // The VM dying afterwards does not report a second exit.
        process.exited(exit(255), &events);
        let status = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.exit(), Some(exit(3)));
        assert_eq!(drain(&mut receiver), ["/tasks/start", "/tasks/exit"]);
    }

    #[tokio::test]
    async fn exec_exit_event_names_the_exec() {
        let (events, mut receiver) = EventQueue::new();
        let process = Process::new("c1", "e1", StdioPaths::default());
        process.transition(Op::Start, &events, |_, _| None).unwrap();
        process.exited(exit(0), &events);
        match receiver.try_recv().unwrap() {
            TaskEvent::Exit {
                container_id, id, ..
            } => {
                assert_eq!(container_id, "c1");
                assert_eq!(id, "e1");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
