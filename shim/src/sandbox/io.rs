//! A process's stdio: containerd's FIFOs wired to the agent's streams
//! through [`super::PodAgent`] (the copies themselves are in
//! [`crate::stdio`]).

use super::{LivePod, Sandbox};
use crate::process::Process;
use crate::stdio::process_ref;
use microvm_proto::agent::v1 as api;

impl Sandbox {
    /// Starts the copies of `process`'s output (kept, so its exit is
    /// reported after they drain) and of its stdin.
    pub(super) fn start_io(&self, pod: &LivePod, process: &Process) {
        let reference = process_ref(&process.container_id, &process.exec_id);
        let mut tasks = vec![pod.agent.copy_output(
            reference.clone(),
            api::OutputStream::Stdout,
            process.stdio.stdout.clone(),
        )];
        if !process.stdio.terminal {
            tasks.push(pod.agent.copy_output(
                reference.clone(),
                api::OutputStream::Stderr,
                process.stdio.stderr.clone(),
            ));
        }
        if !process.stdio.stdin.is_empty() {
            // Not an output task: stdin may stay open past the exit.
            drop(pod.agent.copy_stdin(reference, process.stdio.stdin.clone()));
        }
        process.add_output_tasks(tasks);
    }
}
