//! Process exits and OOM kills, broadcast to every subscriber.
//!
//! OOM kills come from each container cgroup's memory.events (its oom_kill
//! counter): an inotify watch reports changes as they happen, and the
//! runtime checks the counter again when a container's first process exits,
//! so the OOM event comes before that exit.

use crate::lock::lock;
use crate::spawn::ProcessExit;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;

/// Events kept for a slow subscriber before it starts losing them (it
/// then gets an EventsLost count). tokio's broadcast channel allocates and
/// initialises every slot up front (about 100 bytes each), so this is
/// resident from the agent's start: 1024 slots were 27 heap pages of the
/// idle agent. The shim drains events as they come; a burst of 256 exits
/// before it reads again is already far outside normal use.
const BACKLOG: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    ProcessExited {
        container_id: String,
        exec_id: String,
        pid: u32,
        exit: ProcessExit,
    },
    OomKilled {
        container_id: String,
        oom_kill_count: u64,
    },
}

#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<AgentEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(BACKLOG).0,
        }
    }
}

impl EventBus {
    pub fn publish(&self, event: AgentEvent) {
        // No subscriber: nothing to deliver to.
        let _ = self.sender.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.sender.subscribe()
    }
}

/// Inotify with the `AsRawFd` tokio's reactor wants.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

struct Watched {
    container_id: String,
    path: std::path::PathBuf,
    last_count: u64,
}

/// Watches memory.events files and publishes OOM kills.
pub struct OomWatcher {
    inotify: Arc<AsyncFd<InotifyFd>>,
    watched: Mutex<HashMap<WatchDescriptor, Watched>>,
    by_container: Mutex<HashMap<String, WatchDescriptor>>,
    events: EventBus,
}

impl OomWatcher {
    pub fn start(events: EventBus) -> std::io::Result<Arc<Self>> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let watcher = Arc::new(Self {
            // SAFETY: the Inotify owns its descriptor and never changes it;
            // the AsyncFd owns the Inotify and deregisters before dropping it.
            inotify: Arc::new(
                unsafe {
                    AsyncFd::register_with_interest(
                        InotifyFd(inotify),
                        tokio::io::Interest::READABLE,
                    )
                }
                .map_err(|err| err.into_parts().1)?,
            ),
            watched: Mutex::new(HashMap::new()),
            by_container: Mutex::new(HashMap::new()),
            events,
        });
        let task = Arc::clone(&watcher);
        tokio::spawn(async move { task.run().await });
        Ok(watcher)
    }

    async fn run(self: Arc<Self>) {
        loop {
            let Ok(mut ready) = self.inotify.readable().await else {
                return;
            };
            let events = match ready.try_io(|inotify| {
                inotify
                    .get_ref()
                    .0
                    .read_events()
                    .map_err(std::io::Error::from)
            }) {
                Ok(Ok(events)) => events,
                Ok(Err(err)) => {
                    tracing::warn!("reading inotify events failed: {err}");
                    continue;
                }
                Err(_would_block) => continue,
            };
            for event in events {
                self.check_watch(&event.wd);
            }
        }
    }

    /// Starts watching `memory_events` (no-op if the file does not exist:
    /// no memory controller).
    pub fn watch(&self, container_id: &str, memory_events: &Path) {
        if !memory_events.exists() {
            return;
        }
        let wd = match self
            .inotify
            .get_ref()
            .0
            .add_watch(memory_events, AddWatchFlags::IN_MODIFY)
        {
            Ok(wd) => wd,
            Err(err) => {
                tracing::warn!(
                    "cannot watch {} for OOM kills: {err}",
                    memory_events.display()
                );
                return;
            }
        };
        let last_count = read_oom_kill(memory_events).unwrap_or(0);
        lock(&self.watched).insert(
            wd,
            Watched {
                container_id: container_id.to_owned(),
                path: memory_events.to_path_buf(),
                last_count,
            },
        );
        lock(&self.by_container).insert(container_id.to_owned(), wd);
    }

    pub fn unwatch(&self, container_id: &str) {
        if let Some(wd) = lock(&self.by_container).remove(container_id) {
            lock(&self.watched).remove(&wd);
            // Fails harmlessly when the cgroup directory is already gone.
            let _ = self.inotify.get_ref().0.rm_watch(wd);
        }
    }

    /// Publishes an OOM event if the container's oom_kill counter grew.
    pub fn check(&self, container_id: &str) {
        let wd = lock(&self.by_container).get(container_id).copied();
        if let Some(wd) = wd {
            self.check_watch(&wd);
        }
    }

    fn check_watch(&self, wd: &WatchDescriptor) {
        let mut watched = lock(&self.watched);
        let Some(entry) = watched.get_mut(wd) else {
            return;
        };
        let Some(count) = read_oom_kill(&entry.path) else {
            return;
        };
        if count > entry.last_count {
            entry.last_count = count;
            self.events.publish(AgentEvent::OomKilled {
                container_id: entry.container_id.clone(),
                oom_kill_count: count,
            });
        }
    }
}

fn read_oom_kill(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    crate::cgroup::parse_flat_keyed(&text)
        .get("oom_kill")
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_growing_oom_kill_counter_is_published_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.events");
        std::fs::write(&file, "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n").unwrap();
        let events = EventBus::default();
        let mut subscriber = events.subscribe();
        let watcher = OomWatcher::start(events.clone()).unwrap();
        watcher.watch("c1", &file);

        std::fs::write(&file, "low 0\nhigh 0\nmax 1\noom 1\noom_kill 1\n").unwrap();
        let event = tokio::time::timeout(std::time::Duration::from_secs(5), subscriber.recv())
            .await
            .expect("an OOM event within 5 s")
            .unwrap();
        assert_eq!(
            event,
            AgentEvent::OomKilled {
                container_id: "c1".into(),
                oom_kill_count: 1
            }
        );
        // An explicit check with no change publishes nothing more.
        watcher.check("c1");
        watcher.unwatch("c1");
        assert!(subscriber.try_recv().is_err());
    }
}
