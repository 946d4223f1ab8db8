//! The sandbox's watchers: the VM's death (every process exits), the
//! agent's OOM events, and each started process's exit.

use super::{lock, LivePod, Sandbox, OUTPUT_DRAIN_TIMEOUT, VM_DIED_EXIT_STATUS, VM_EXIT_GRACE};
use crate::events::TaskEvent;
use crate::oom::{OomGate, Verdict};
use crate::process::Process;
use crate::state::ExitStatus;
use crate::stdio::process_ref;
use microvm_proto::agent::v1 as api;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;
use tokio_stream::StreamExt;

impl Sandbox {
    /// A VM (or one of its host processes) that dies mid-run ends every
    /// process of the pod, each with a TaskExit; later agent calls fail at
    /// once ([`LivePod::call`]).
    pub(super) fn watch_vm(&self, pod: &Arc<LivePod>) {
        let pod = pod.clone();
        let sandbox = self.clone();
        tokio::spawn(async move {
            let exit = pod.host.vm_exit().await;
            if sandbox.inner.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            pod.dead
                .send_replace(Some(format!("{} exited ({})", exit.name, exit.status)));
            tracing::error!(
                "pod VM died: {} exited ({}); every container exits with status {VM_DIED_EXIT_STATUS}; console: {}",
                exit.name,
                exit.status,
                pod.host.console_log()
            );
            let containers: Vec<_> = lock(&sandbox.inner.containers).values().cloned().collect();
            let at = SystemTime::now();
            for container in containers {
                for process in container.all_processes() {
                    process.exited(
                        ExitStatus {
                            code: VM_DIED_EXIT_STATUS,
                            at,
                        },
                        &sandbox.inner.events,
                    );
                }
            }
        });
    }

    /// Forwards the agent's OOM kills of this pod's containers.
    pub(super) fn watch_oom(&self, pod: &Arc<LivePod>) {
        let agent = pod.agent.clone();
        let queue = self.inner.events.clone();
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut gate = OomGate::default();
            let mut stream = match agent.subscribe_events().await {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::warn!("no OOM events from the agent: {err}");
                    return;
                }
            };
            while let Some(Ok(event)) = stream.next().await {
                match event.kind {
                    Some(api::event::Kind::OomKilled(oom)) => {
                        // Only this pod's containers, and at a bounded rate
                        // (oom.rs): the guest writes these.
                        let Some(inner) = inner.upgrade() else { break };
                        let known = lock(&inner.containers).contains_key(&oom.container_id);
                        let now = std::time::Instant::now();
                        if gate.check(&oom.container_id, known, now) == Verdict::Forward {
                            queue.push(TaskEvent::Oom {
                                container_id: oom.container_id,
                            });
                        }
                    }
                    Some(api::event::Kind::EventsLost(lost)) => {
                        tracing::warn!("the agent dropped {} events", lost.count);
                    }
                    _ => {}
                }
            }
        });
    }

    /// Waits in the agent for `process` to exit, drains its output, then
    /// reports the exit. Once per process.
    pub(super) fn watch_exit(&self, pod: &Arc<LivePod>, process: &Arc<Process>) {
        if process.exit_watch_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let process = process.clone();
        let events = self.inner.events.clone();
        let pod = pod.clone();
        tokio::spawn(async move {
            let reference = process_ref(&process.container_id, &process.exec_id);
            let waited_since = SystemTime::now();
            let exit = match pod.agent.wait_process(reference).await {
                Ok(exit) => ExitStatus {
                    // 128 + signal for a killed process, as containerd expects.
                    code: u32::try_from(exit.code).unwrap_or(VM_DIED_EXIT_STATUS),
                    // The guest's time, kept inside the host's window.
                    at: crate::clock::exit_time(exit.exited_at_unix_nanos, waited_since),
                },
                Err(err) => {
                    // A dead VM breaks the agent's streams a moment before
                    // its process exit is seen: the exit waits for that
                    // (bounded), so the VM's death is what gets reported
                    // and logged, before containerd starts tearing down.
                    let vm_died = tokio::time::timeout(VM_EXIT_GRACE, pod.host.vm_exit())
                        .await
                        .is_ok();
                    tracing::error!(
                        "waiting for {} in the agent failed: {err}{}",
                        process.event_id(),
                        if vm_died { " (the pod VM died)" } else { "" }
                    );
                    ExitStatus {
                        code: VM_DIED_EXIT_STATUS,
                        at: SystemTime::now(),
                    }
                }
            };
            for task in process.take_output_tasks() {
                if tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, task)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "output of {} still open {OUTPUT_DRAIN_TIMEOUT:?} after its exit (a child holds it?)",
                        process.event_id()
                    );
                }
            }
            process.exited(exit, &events);
        });
    }
}
