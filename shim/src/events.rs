//! Task events, in the order containerd expects: create → start → exit →
//! delete for a container, exec-added → exec-started → exit for an exec, and
//! oom. The order is made where the events are queued: the service queues
//! an event under the same lock as the state change it reports
//! (`Process::transition`), and one task forwards the queue to containerd in
//! order. [`EventQueue`] is that queue.

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::{well_known_types::timestamp::Timestamp, MessageDyn};
use containerd_shim::protos::topics;
use std::time::SystemTime;
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    Create {
        container_id: String,
        bundle: String,
        stdin: String,
        stdout: String,
        stderr: String,
        terminal: bool,
        pid: u32,
    },
    Start {
        container_id: String,
        pid: u32,
    },
    Exit {
        container_id: String,
        /// The exec id, or the container id for the init process.
        id: String,
        pid: u32,
        exit_status: u32,
        exited_at: SystemTime,
    },
    Delete {
        container_id: String,
        pid: u32,
        exit_status: u32,
        exited_at: SystemTime,
    },
    ExecAdded {
        container_id: String,
        exec_id: String,
    },
    ExecStarted {
        container_id: String,
        exec_id: String,
        pid: u32,
    },
    Oom {
        container_id: String,
    },
}

pub fn timestamp(at: SystemTime) -> Timestamp {
    let since_epoch = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX);
    // Below 1e9 by construction.
    ts.nanos = i32::try_from(since_epoch.subsec_nanos()).unwrap_or(0);
    ts
}

impl TaskEvent {
    pub fn topic(&self) -> &'static str {
        match self {
            Self::Create { .. } => topics::TASK_CREATE_EVENT_TOPIC,
            Self::Start { .. } => topics::TASK_START_EVENT_TOPIC,
            Self::Exit { .. } => topics::TASK_EXIT_EVENT_TOPIC,
            Self::Delete { .. } => topics::TASK_DELETE_EVENT_TOPIC,
            Self::ExecAdded { .. } => topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Self::ExecStarted { .. } => topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Self::Oom { .. } => topics::TASK_OOM_EVENT_TOPIC,
        }
    }

    /// The protobuf message containerd decodes for [`Self::topic`].
    pub fn into_message(self) -> Box<dyn MessageDyn> {
        match self {
            Self::Create {
                container_id,
                bundle,
                stdin,
                stdout,
                stderr,
                terminal,
                pid,
            } => {
                let mut io = TaskIO::new();
                io.stdin = stdin;
                io.stdout = stdout;
                io.stderr = stderr;
                io.terminal = terminal;
                let mut event = TaskCreate::new();
                event.container_id = container_id;
                event.bundle = bundle;
                event.io = Some(io).into();
                event.pid = pid;
                Box::new(event)
            }
            Self::Start { container_id, pid } => {
                let mut event = TaskStart::new();
                event.container_id = container_id;
                event.pid = pid;
                Box::new(event)
            }
            Self::Exit {
                container_id,
                id,
                pid,
                exit_status,
                exited_at,
            } => {
                let mut event = TaskExit::new();
                event.container_id = container_id;
                event.id = id;
                event.pid = pid;
                event.exit_status = exit_status;
                event.exited_at = Some(timestamp(exited_at)).into();
                Box::new(event)
            }
            Self::Delete {
                container_id,
                pid,
                exit_status,
                exited_at,
            } => {
                let mut event = TaskDelete::new();
                event.id = container_id.clone();
                event.container_id = container_id;
                event.pid = pid;
                event.exit_status = exit_status;
                event.exited_at = Some(timestamp(exited_at)).into();
                Box::new(event)
            }
            Self::ExecAdded {
                container_id,
                exec_id,
            } => {
                let mut event = TaskExecAdded::new();
                event.container_id = container_id;
                event.exec_id = exec_id;
                Box::new(event)
            }
            Self::ExecStarted {
                container_id,
                exec_id,
                pid,
            } => {
                let mut event = TaskExecStarted::new();
                event.container_id = container_id;
                event.exec_id = exec_id;
                event.pid = pid;
                Box::new(event)
            }
            Self::Oom { container_id } => {
                let mut event = TaskOOM::new();
                event.container_id = container_id;
                Box::new(event)
            }
        }
    }
}

/// The sending end; cheap to clone, never blocks (queueing happens under
/// state locks).
#[derive(Debug, Clone)]
pub struct EventQueue {
    sender: mpsc::UnboundedSender<TaskEvent>,
}

impl EventQueue {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<TaskEvent>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (Self { sender }, receiver)
    }

    pub fn push(&self, event: TaskEvent) {
        if self.sender.send(event).is_err() {
            tracing::warn!("event forwarder has stopped; dropping an event");
        }
    }
}

/// Forwards queued events to containerd, one at a time and in order, until
/// the queue closes.
pub async fn forward(
    mut receiver: mpsc::UnboundedReceiver<TaskEvent>,
    publisher: containerd_shim::publisher::RemotePublisher,
    namespace: String,
) {
    while let Some(event) = receiver.recv().await {
        let topic = event.topic();
        let ctx = containerd_shim::Context::default();
        if let Err(err) = publisher
            .publish(ctx, topic, &namespace, event.into_message())
            .await
        {
            tracing::error!("publishing {topic} failed: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::Message;

    #[test]
    fn exit_event_carries_status_and_time() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 5);
        let event = TaskEvent::Exit {
            container_id: "c1".into(),
            id: "c1".into(),
            pid: 42,
            exit_status: 3,
            exited_at: at,
        };
        assert_eq!(event.topic(), "/tasks/exit");
        let bytes = event.into_message().write_to_bytes_dyn().unwrap();
        let decoded = TaskExit::parse_from_bytes(&bytes).unwrap();
        assert_eq!(decoded.container_id, "c1");
        assert_eq!(decoded.exit_status, 3);
        assert_eq!(decoded.pid, 42);
        assert_eq!(decoded.exited_at.seconds, 1_700_000_000);
        assert_eq!(decoded.exited_at.nanos, 5);
    }

    #[test]
    fn topics_match_containerd() {
        let events = [
            (
                TaskEvent::ExecAdded {
                    container_id: "c".into(),
                    exec_id: "e".into(),
                },
                "/tasks/exec-added",
            ),
            (
                TaskEvent::ExecStarted {
                    container_id: "c".into(),
                    exec_id: "e".into(),
                    pid: 1,
                },
                "/tasks/exec-started",
            ),
            (
                TaskEvent::Oom {
                    container_id: "c".into(),
                },
                "/tasks/oom",
            ),
            (
                TaskEvent::Start {
                    container_id: "c".into(),
                    pid: 1,
                },
                "/tasks/start",
            ),
        ];
        for (event, topic) in events {
            assert_eq!(event.topic(), topic);
        }
    }

    #[tokio::test]
    async fn queue_keeps_order() {
        let (queue, mut receiver) = EventQueue::new();
        for pid in 0..100 {
            queue.push(TaskEvent::Start {
                container_id: "c".into(),
                pid,
            });
        }
        for pid in 0..100 {
            assert_eq!(
                receiver.recv().await,
                Some(TaskEvent::Start {
                    container_id: "c".into(),
                    pid
                })
            );
        }
    }
}
