//! vCPU threads and KVM-exit dispatch.
//!
//! Each vCPU runs on its own thread. The controller pauses or stops them by
//! setting the shared [`RunControl`] state and kicking the threads with a
//! signal, which makes KVM_RUN return EINTR. A kick that lands just before a
//! thread enters KVM_RUN is lost, so the controller repeats it until every
//! thread has acknowledged (see `RunControl::wait_parked`).

use crate::seccomp::{SeccompFilters, ThreadKind};
use crate::stop::StopReason;
use kvm_ioctls::{VcpuExit, VcpuFd};
use microvm_devices::metrics::Counter;
use serde::Serialize;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// Exit counts, for the control API's `metrics`.
#[derive(Default, Serialize)]
pub struct ExitMetrics {
    pub io_in: Counter,
    pub io_out: Counter,
    pub mmio_read: Counter,
    pub mmio_write: Counter,
    pub unhandled_io: Counter,
    pub unhandled_mmio: Counter,
    pub hlt: Counter,
    pub interrupted: Counter,
    pub other: Counter,
}

/// What the vCPU loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    Stop(StopReason),
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// Dispatches one KVM exit. A free function so tests can feed it fabricated
/// exits. Nothing the guest does here can panic: unknown ports read as 0xff
/// (as on a PC), unknown MMIO reads as zero, and both are counted.
pub fn handle_kvm_exit(exit: VcpuExit<'_>, bus: &IoManager, metrics: &ExitMetrics) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            metrics.io_in.inc();
            if bus.pio_read(PioAddress(port), data).is_err() {
                metrics.unhandled_io.inc();
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            metrics.io_out.inc();
            if bus.pio_write(PioAddress(port), data).is_err() {
                metrics.unhandled_io.inc();
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            metrics.mmio_read.inc();
            if bus.mmio_read(MmioAddress(addr), data).is_err() {
                metrics.unhandled_mmio.inc();
                data.fill(0);
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            metrics.mmio_write.inc();
            if bus.mmio_write(MmioAddress(addr), data).is_err() {
                metrics.unhandled_mmio.inc();
            }
            ExitAction::Continue
        }
        // With the in-kernel LAPIC, HLT only reaches us if the guest halted
        // with nothing that could ever wake it.
        VcpuExit::Hlt => {
            metrics.hlt.inc();
            ExitAction::Stop(StopReason::GuestShutdown { status: 0 })
        }
        VcpuExit::Shutdown => ExitAction::Stop(StopReason::TripleFault),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => {
            ExitAction::Stop(StopReason::GuestShutdown { status: 0 })
        }
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => {
            ExitAction::Stop(StopReason::GuestReboot)
        }
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Stop(StopReason::GuestUnrunnable {
            detail: format!("VM entry failed on host CPU {cpu}, hardware reason {reason:#x}"),
        }),
        VcpuExit::InternalError => ExitAction::Stop(StopReason::GuestUnrunnable {
            detail: "KVM internal error (instruction emulation failed)".into(),
        }),
        other => {
            metrics.other.inc();
            ExitAction::Stop(StopReason::GuestUnrunnable {
                detail: format!("unexpected KVM exit {other:?}"),
            })
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    Stopping,
}

/// Shared between the controller and all vCPU threads.
pub struct RunControl {
    state: Mutex<(RunState, usize)>,
    changed: Condvar,
}

impl RunControl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new((RunState::Running, 0)),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (RunState, usize)> {
        // A vCPU thread never panics while holding this lock, so poisoning
        // cannot carry a broken invariant; keep going with the data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, state: RunState) {
        self.lock().0 = state;
        self.changed.notify_all();
    }

    pub fn pause(&self) {
        self.set(RunState::Paused);
    }

    pub fn resume(&self) {
        self.set(RunState::Running);
    }

    pub fn stop(&self) {
        self.set(RunState::Stopping);
    }

    /// Called by a vCPU thread before each KVM_RUN. Blocks while paused.
    /// Returns false when the thread must exit.
    fn wait_runnable(&self) -> bool {
        let mut guard = self.lock();
        loop {
            match guard.0 {
                RunState::Running => return true,
                RunState::Stopping => return false,
                RunState::Paused => {
                    guard.1 += 1;
                    self.changed.notify_all();
                    guard = self.changed.wait(guard).unwrap_or_else(|e| e.into_inner());
                    guard.1 -= 1;
                }
            }
        }
    }

    fn parked(&self) -> usize {
        self.lock().1
    }
}

pub struct VcpuHandle {
    thread: JoinHandle<()>,
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the no-op handler whose only job is to interrupt KVM_RUN.
pub fn register_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl VcpuHandle {
    pub fn kick(&self) {
        // A thread that already exited cannot be kicked, which is fine.
        let _ = self.thread.kill(kick_signal());
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}

/// Kicks every vCPU until all have parked (or exited), or `timeout` passes.
pub fn wait_parked(control: &RunControl, vcpus: &[VcpuHandle], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let running = vcpus.iter().filter(|v| !v.thread.is_finished()).count();
        if control.parked() >= running {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        vcpus.iter().for_each(VcpuHandle::kick);
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub struct VcpuContext {
    pub id: u8,
    pub fd: VcpuFd,
    pub bus: Arc<IoManager>,
    pub metrics: Arc<ExitMetrics>,
    pub control: Arc<RunControl>,
    /// Told once, when this vCPU stops by itself.
    pub on_stop: Box<dyn FnOnce(StopReason) + Send>,
    /// Installed by the thread itself before its first KVM_RUN.
    pub seccomp: Option<SeccompFilters>,
}

pub fn spawn(ctx: VcpuContext) -> std::io::Result<VcpuHandle> {
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{}", ctx.id))
        .spawn(move || run_vcpu(ctx))?;
    Ok(VcpuHandle { thread })
}

fn run_vcpu(mut ctx: VcpuContext) {
    if let Some(filters) = &ctx.seccomp {
        if let Err(e) = filters.apply(ThreadKind::Vcpu) {
            // Never run the guest unfiltered when filters were asked for.
            (ctx.on_stop)(StopReason::VmmError {
                detail: format!("vCPU {}: {e}", ctx.id),
            });
            return;
        }
    }
    let reason = loop {
        if !ctx.control.wait_runnable() {
            return;
        }
        match ctx.fd.run() {
            Ok(exit) => match handle_kvm_exit(exit, &ctx.bus, &ctx.metrics) {
                ExitAction::Continue => {}
                ExitAction::Stop(reason) => break reason,
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                ctx.metrics.interrupted.inc();
            }
            Err(e) => {
                break StopReason::VmmError {
                    detail: format!("KVM_RUN on vCPU {} failed: {e}", ctx.id),
                }
            }
        }
    };
    tracing::debug!(vcpu = ctx.id, "vCPU stopped: {reason}");
    (ctx.on_stop)(reason);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;
    use vm_device::bus::{MmioRange, PioAddressOffset, PioRange};
    use vm_device::MutDevicePio;

    struct Recorder(Vec<(u16, Vec<u8>)>);
    impl MutDevicePio for Recorder {
        fn pio_read(&mut self, _: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn pio_write(&mut self, _: PioAddress, offset: PioAddressOffset, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    fn bus() -> (IoManager, Arc<StdMutex<Recorder>>) {
        let mut bus = IoManager::new();
        let dev = Arc::new(StdMutex::new(Recorder(Vec::new())));
        bus.register_pio(PioRange::new(PioAddress(0x3f8), 8).unwrap(), dev.clone())
            .unwrap();
        let _ = MmioRange::new(MmioAddress(0), 1);
        (bus, dev)
    }

    #[test]
    fn port_io_reaches_the_device_and_unknown_ports_read_ff() {
        let (bus, dev) = bus();
        let metrics = ExitMetrics::default();
        assert_eq!(
            handle_kvm_exit(VcpuExit::IoOut(0x3f9, &[7]), &bus, &metrics),
            ExitAction::Continue
        );
        assert_eq!(dev.lock().unwrap().0, vec![(1, vec![7])]);
        let mut data = [0u8; 1];
        handle_kvm_exit(VcpuExit::IoIn(0x3fa, &mut data), &bus, &metrics);
        assert_eq!(data, [3]);
        let mut unknown = [0u8; 2];
        handle_kvm_exit(VcpuExit::IoIn(0x1234, &mut unknown), &bus, &metrics);
        assert_eq!(unknown, [0xff, 0xff]);
        assert_eq!(metrics.unhandled_io.get(), 1);
        assert_eq!(metrics.io_in.get(), 2);
    }

    #[test]
    fn unknown_mmio_reads_zero_and_is_counted() {
        let (bus, _) = bus();
        let metrics = ExitMetrics::default();
        let mut data = [0xaau8; 4];
        handle_kvm_exit(VcpuExit::MmioRead(0xd000_0000, &mut data), &bus, &metrics);
        assert_eq!(data, [0; 4]);
        handle_kvm_exit(
            VcpuExit::MmioWrite(0xd000_0000, &[1, 2, 3, 4]),
            &bus,
            &metrics,
        );
        assert_eq!(metrics.unhandled_mmio.get(), 2);
    }

    #[test]
    fn stop_exits_map_to_reasons() {
        let (bus, _) = bus();
        let metrics = ExitMetrics::default();
        assert_eq!(
            handle_kvm_exit(VcpuExit::Shutdown, &bus, &metrics),
            ExitAction::Stop(StopReason::TripleFault)
        );
        assert_eq!(
            handle_kvm_exit(
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]),
                &bus,
                &metrics
            ),
            ExitAction::Stop(StopReason::GuestReboot)
        );
        assert!(matches!(
            handle_kvm_exit(VcpuExit::InternalError, &bus, &metrics),
            ExitAction::Stop(StopReason::GuestUnrunnable { .. })
        ));
        assert!(matches!(
            handle_kvm_exit(VcpuExit::FailEntry(0x21, 0), &bus, &metrics),
            ExitAction::Stop(StopReason::GuestUnrunnable { .. })
        ));
    }

    #[test]
    fn run_control_parks_and_releases() {
        let control = RunControl::new();
        control.pause();
        let worker = {
            let control = control.clone();
            std::thread::spawn(move || control.wait_runnable())
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while control.parked() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(control.parked(), 1);
        control.stop();
        assert!(!worker.join().unwrap());
    }
}
