//! The controller: owns the VM and the event loop, serves API calls, and
//! decides when and why the VM stops.
//!
//! Everything that happens elsewhere (API requests, vCPU stops, guest writes
//! to the debug port or i8042) arrives as a message on a channel plus a write
//! to one wake EventFd, which the event manager watches beside the devices.

use crate::api::{ApiCall, Request, Response};
use crate::config::{host_memory_mib, ConfigError, VmConfig};
use crate::devices::GuestSinks;
use crate::seccomp::{SeccompError, SeccompFilters, ThreadKind};
use crate::stop::StopReason;
use crate::vm::{Vm, VmError};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use microvm_devices::legacy::{DebugPortEvent, I8042Event};
/// Re-exported: the one `error_chain` of the workspace, for the binary and
/// the integration tests.
pub use microvm_errors::error_chain;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot read host memory size: {0}")]
    HostMemory(#[source] std::io::Error),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("the VM is not configured")]
    NotConfigured,
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    NotConfigured,
    Configured,
    Running,
    Paused,
    Stopped,
}

/// Messages from threads that are not the controller.
#[derive(Debug)]
enum VmEvent {
    BootTimer(Duration),
    Stop(StopReason),
}

/// Wakes the event loop; its only job is to be readable.
struct Waker(Arc<EventFd>);

impl MutEventSubscriber for Waker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Reading resets the counter; EAGAIN just means another wake raced us.
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.0, EventSet::IN)) {
            tracing::error!("cannot watch the wake eventfd: {e:?}");
        }
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

pub struct Vmm {
    state: VmState,
    config: Option<VmConfig>,
    vm: Option<Vm>,
    event_manager: EventManager<Subscriber>,
    wake: Arc<EventFd>,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    api_rx: Option<Receiver<ApiCall>>,
    subscribers: Vec<Sender<String>>,
    process_start: Instant,
    boot_time: Option<Duration>,
    stop: Option<StopReason>,
    graceful_deadline: Option<Instant>,
    signal_stop: Arc<AtomicBool>,
    /// Installed on the vCPU threads and this thread when the VM starts,
    /// unless the config turns them off.
    seccomp: Option<SeccompFilters>,
}

impl Vmm {
    pub fn new(process_start: Instant, signal_stop: Arc<AtomicBool>) -> Result<Self, VmmError> {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?);
        let mut event_manager =
            EventManager::<Subscriber>::new().map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
        event_manager.add_subscriber(Arc::new(Mutex::new(Waker(wake.clone()))));
        let (events_tx, events_rx) = mpsc::channel();
        Ok(Self {
            state: VmState::NotConfigured,
            config: None,
            vm: None,
            event_manager,
            wake,
            events_tx,
            events_rx,
            api_rx: None,
            subscribers: Vec::new(),
            process_start,
            boot_time: None,
            stop: None,
            graceful_deadline: None,
            signal_stop,
            seccomp: None,
        })
    }

    pub fn wake_fd(&self) -> Arc<EventFd> {
        self.wake.clone()
    }

    pub fn set_seccomp(&mut self, filters: Option<SeccompFilters>) {
        self.seccomp = filters;
    }

    pub fn set_api(&mut self, calls: Receiver<ApiCall>) {
        self.api_rx = Some(calls);
    }

    pub fn configure(&mut self, config: VmConfig) -> Result<(), VmmError> {
        config.validate(host_memory_mib().map_err(VmmError::HostMemory)?)?;
        self.config = Some(config);
        self.state = VmState::Configured;
        Ok(())
    }

    fn notifier(&self) -> impl Fn(VmEvent) + Send + Sync + Clone + 'static {
        let tx = self.events_tx.clone();
        let wake = self.wake.clone();
        move |event| {
            // Both fail only when the controller is gone, i.e. we are exiting.
            let _ = tx.send(event);
            let _ = wake.write(1);
        }
    }

    pub fn start(&mut self) -> Result<(), VmmError> {
        let Some(config) = &self.config else {
            return Err(VmmError::Vm(VmError::Spawn(std::io::Error::other(
                "not configured",
            ))));
        };
        let notify = self.notifier();
        let process_start = self.process_start;
        let debug_notify = notify.clone();
        let i8042_notify = notify.clone();
        let sinks = GuestSinks {
            debug_port: Arc::new(move |event| match event {
                DebugPortEvent::BootTimer => {
                    debug_notify(VmEvent::BootTimer(process_start.elapsed()))
                }
                DebugPortEvent::Shutdown { status } => {
                    debug_notify(VmEvent::Stop(StopReason::GuestShutdown { status }))
                }
            }),
            i8042: Arc::new(move |event| match event {
                I8042Event::Reset => i8042_notify(VmEvent::Stop(StopReason::GuestReboot)),
            }),
        };
        let mut vm = Vm::create(config, sinks)?;
        for slot in vm.virtio_slots() {
            self.event_manager.add_subscriber(slot.subscriber.clone());
        }
        let stop_notify = notify.clone();
        let seccomp = self.seccomp.as_ref().filter(|_| config.seccomp);
        vm.start(
            Arc::new(move |reason| stop_notify(VmEvent::Stop(reason))),
            seccomp,
        )?;
        // The vCPU threads are spawned (unfiltered parents would leak into
        // them otherwise); from here on this thread only runs the VM. Guest
        // work reaches this thread only through the event loop, which runs
        // after this.
        if let Some(filters) = seccomp {
            if let Err(e) = filters.apply(ThreadKind::Vmm) {
                vm.stop();
                return Err(e.into());
            }
        }
        tracing::info!(
            "VM started {:.3} ms after VMM process start",
            self.process_start.elapsed().as_secs_f64() * 1e3
        );
        self.vm = Some(vm);
        self.set_state(VmState::Running);
        Ok(())
    }

    fn set_state(&mut self, state: VmState) {
        self.state = state;
        self.broadcast(serde_json::json!({"event": "state", "state": state}));
    }

    fn broadcast(&mut self, event: serde_json::Value) {
        let line = event.to_string();
        self.subscribers.retain(|s| s.send(line.clone()).is_ok());
    }

    /// Runs until the VM stops (or, with an API and no VM, until told to
    /// stop). Returns why it stopped.
    pub fn run(&mut self) -> StopReason {
        loop {
            if let Err(e) = self.event_manager.run_with_timeout(100) {
                self.stop.get_or_insert(StopReason::VmmError {
                    detail: format!("event loop failed: {e:?}"),
                });
            }
            self.drain_vm_events();
            self.drain_api_calls();
            if self.signal_stop.load(Ordering::Relaxed) {
                self.stop
                    .get_or_insert(StopReason::ShutdownRequested { graceful: false });
            }
            if let Some(deadline) = self.graceful_deadline {
                if Instant::now() >= deadline {
                    tracing::warn!("guest did not shut down in time; forcing");
                    self.stop
                        .get_or_insert(StopReason::ShutdownRequested { graceful: true });
                }
            }
            if let Some(reason) = self.stop.clone() {
                self.finish(&reason);
                return reason;
            }
        }
    }

    fn finish(&mut self, reason: &StopReason) {
        if let Some(vm) = &mut self.vm {
            vm.stop();
        }
        self.state = VmState::Stopped;
        let mut event = serde_json::to_value(reason).unwrap_or_default();
        if let Some(map) = event.as_object_mut() {
            map.insert("event".into(), "stopped".into());
            map.insert("exit_code".into(), (reason.exit_code() as u8).into());
        }
        self.broadcast(event);
        self.subscribers.clear();
        match reason.exit_code() {
            crate::stop::ExitCode::Ok => tracing::info!("VM stopped: {reason}"),
            _ => tracing::warn!("VM stopped: {reason}"),
        }
    }

    fn drain_vm_events(&mut self) {
        while let Ok(event) = self.events_rx.try_recv() {
            match event {
                VmEvent::BootTimer(elapsed) => {
                    self.boot_time = Some(elapsed);
                    tracing::info!(
                        "guest boot timer: {:.3} ms since VMM process start",
                        elapsed.as_secs_f64() * 1e3
                    );
                    self.broadcast(serde_json::json!({"event": "boot-timer", "ms": elapsed.as_secs_f64() * 1e3}));
                }
                VmEvent::Stop(reason) => {
                    // A graceful shutdown that the guest completed by itself.
                    let reason = match (&reason, self.graceful_deadline) {
                        (StopReason::GuestReboot | StopReason::GuestShutdown { .. }, Some(_)) => {
                            StopReason::ShutdownRequested { graceful: true }
                        }
                        _ => reason,
                    };
                    self.stop.get_or_insert(reason);
                }
            }
        }
    }

    fn drain_api_calls(&mut self) {
        let Some(rx) = &self.api_rx else { return };
        let calls: Vec<ApiCall> = rx.try_iter().collect();
        for call in calls {
            let response = self.handle(call.request, call.events);
            // The client may have gone; its loss.
            let _ = call.reply.send(response);
        }
    }

    fn refuse(&self, action: &str) -> Response {
        Response::error(format!("cannot {action}: VM is {}", state_name(self.state)))
    }

    fn handle(&mut self, request: Request, events: Option<Sender<String>>) -> Response {
        match request {
            Request::Configure { config } => match self.state {
                VmState::NotConfigured | VmState::Configured => match self.configure(*config) {
                    Ok(()) => Response::ok(serde_json::json!({"state": self.state})),
                    Err(e) => Response::error(error_chain(&e)),
                },
                _ => self.refuse("configure"),
            },
            Request::Start {} => match self.state {
                VmState::Configured => match self.start() {
                    Ok(()) => Response::ok(serde_json::json!({"state": self.state})),
                    Err(e) => Response::error(error_chain(&e)),
                },
                _ => self.refuse("start"),
            },
            Request::Pause {} => match (self.state, &self.vm) {
                (VmState::Running, Some(vm)) => match vm.pause() {
                    Ok(()) => {
                        self.set_state(VmState::Paused);
                        Response::ok(serde_json::json!({"state": self.state}))
                    }
                    Err(e) => Response::error(error_chain(&e)),
                },
                _ => self.refuse("pause"),
            },
            Request::Resume {} => match (self.state, &self.vm) {
                (VmState::Paused, Some(vm)) => {
                    vm.resume();
                    self.set_state(VmState::Running);
                    Response::ok(serde_json::json!({"state": self.state}))
                }
                _ => self.refuse("resume"),
            },
            Request::Shutdown {
                graceful,
                timeout_ms,
            } => self.shutdown(graceful, timeout_ms),
            Request::State {} => Response::ok(serde_json::json!({
                "state": self.state,
                "boot_time_ms": self.boot_time.map(|d| d.as_secs_f64() * 1e3),
                "uptime_ms": self.process_start.elapsed().as_secs_f64() * 1e3,
            })),
            Request::Metrics {} => Response::ok(match &self.vm {
                Some(vm) => vm.metrics(),
                None => serde_json::json!({}),
            }),
            Request::Subscribe {} => match events {
                Some(sender) => {
                    self.subscribers.push(sender);
                    Response::ok(serde_json::json!({"state": self.state}))
                }
                None => Response::error("subscribe needs an event channel"),
            },
        }
    }

    fn shutdown(&mut self, graceful: bool, timeout_ms: Option<u64>) -> Response {
        match (&self.vm, self.state) {
            (Some(vm), VmState::Running) if graceful => {
                if let Err(e) = vm.inject_ctrl_alt_del() {
                    return Response::error(format!("cannot signal the guest: {e}"));
                }
                let timeout = Duration::from_millis(timeout_ms.unwrap_or(5000));
                self.graceful_deadline = Some(Instant::now() + timeout);
                Response::ok(
                    serde_json::json!({"state": self.state, "graceful_timeout_ms": timeout.as_millis() as u64}),
                )
            }
            _ => {
                self.stop
                    .get_or_insert(StopReason::ShutdownRequested { graceful: false });
                Response::ok(serde_json::json!({"state": "stopping"}))
            }
        }
    }
}

fn state_name(state: VmState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}
