//! One VM: the KVM objects, guest memory, devices and vCPU threads.

use crate::arch::layout::{
    CMDLINE_MAX_SIZE, KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS, VIRTIO_MMIO_SIZE,
};
use crate::arch::regs::{self, EntryMode};
use crate::arch::{cpuid, mptable};
use crate::boot::{self, BootSetup};
use crate::config::VmConfig;
use crate::devices::{self, Devices, GuestSinks, VirtioSlot};
use crate::memory::{create_guest_memory, GuestRam};
use crate::seccomp::SeccompFilters;
use crate::stop::StopReason;
use crate::vcpu::{self, ExitMetrics, RunControl, VcpuContext, VcpuHandle};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use std::sync::Arc;
use std::time::Duration;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    #[error(transparent)]
    Devices(#[from] crate::devices::DeviceError),
    #[error(transparent)]
    Regs(#[from] crate::arch::regs::RegsError),
    #[error(transparent)]
    Mptable(#[from] crate::arch::mptable::MptableError),
    #[error("cannot start vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

pub struct Vm {
    // Field order is drop order: threads and devices go before the VM fd.
    vcpus: Vec<VcpuHandle>,
    pending_vcpus: Vec<(u8, VcpuFd)>,
    devices: Devices,
    control: Arc<RunControl>,
    exit_metrics: Arc<ExitMetrics>,
    ram: GuestRam,
    vm_fd: VmFd,
    _kvm: Kvm,
    pub entry: EntryMode,
}

impl Vm {
    /// Builds the whole VM, ready to run. Nothing runs until [`Vm::start`].
    pub fn create(config: &VmConfig, sinks: GuestSinks) -> Result<Self, VmError> {
        // Order matters for clean failure: the kernel and initrd are checked
        // before any device creates a host file or socket.
        let kvm_handle = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm_fd = kvm_handle.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        let ram = create_guest_memory(config.machine.memory_mib << 20)?;
        let (kernel, bzimage_params) = boot::load_kernel(&ram.memory, &config.boot.kernel)?;
        let initrd = match &config.boot.initrd {
            Some(path) => Some(boot::load_initrd(&ram.memory, path, kernel.kernel_end)?),
            None => None,
        };
        register_memory(&vm_fd, &ram)?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;

        let virtio = devices::create_virtio_devices(config)?;
        let devices = devices::build(config, &vm_fd, &ram.memory, sinks, virtio)?;

        let mut cmdline = Cmdline::try_from(&config.boot.cmdline, CMDLINE_MAX_SIZE)
            .map_err(boot::BootError::Cmdline)?;
        for slot in &devices.virtio {
            cmdline
                .add_virtio_mmio_device(
                    VIRTIO_MMIO_SIZE,
                    vm_memory::GuestAddress(slot.base),
                    slot.irq,
                    None,
                )
                .map_err(boot::BootError::Cmdline)?;
        }
        mptable::write(&ram.memory, config.machine.vcpus)?;
        boot::write_boot_params(
            &ram.memory,
            BootSetup {
                kernel,
                bzimage_params,
                cmdline: &cmdline,
                initrd,
            },
        )?;

        let pending_vcpus = create_vcpus(&kvm_handle, &vm_fd, config, &ram, kernel.entry)?;
        tracing::info!(
            "VM created: {} vCPU(s), {} MiB, entry {:?}, {} virtio device(s)",
            config.machine.vcpus,
            config.machine.memory_mib,
            kernel.entry,
            devices.virtio.len()
        );
        Ok(Self {
            vcpus: Vec::new(),
            pending_vcpus,
            devices,
            control: RunControl::new(),
            exit_metrics: Arc::default(),
            ram,
            vm_fd,
            _kvm: kvm_handle,
            entry: kernel.entry,
        })
    }

    pub fn virtio_slots(&self) -> &[VirtioSlot] {
        &self.devices.virtio
    }

    /// Spawns the vCPU threads. `on_stop` is told when a vCPU stops by itself.
    /// With `seccomp`, each thread installs its vCPU filter before running.
    pub fn start(
        &mut self,
        on_stop: Arc<dyn Fn(StopReason) + Send + Sync>,
        seccomp: Option<&SeccompFilters>,
    ) -> Result<(), VmError> {
        vcpu::register_kick_handler().map_err(VmError::Spawn)?;
        for (id, fd) in self.pending_vcpus.drain(..) {
            let on_stop = on_stop.clone();
            let handle = vcpu::spawn(VcpuContext {
                id,
                fd,
                bus: self.devices.bus.clone(),
                metrics: self.exit_metrics.clone(),
                control: self.control.clone(),
                on_stop: Box::new(move |reason| on_stop(reason)),
                seccomp: seccomp.cloned(),
            })
            .map_err(VmError::Spawn)?;
            self.vcpus.push(handle);
        }
        Ok(())
    }

    pub fn pause(&self) -> Result<(), VmError> {
        self.control.pause();
        let timeout = Duration::from_secs(2);
        if vcpu::wait_parked(&self.control, &self.vcpus, timeout) {
            Ok(())
        } else {
            self.control.resume();
            Err(VmError::PauseTimeout(timeout))
        }
    }

    pub fn resume(&self) {
        self.control.resume();
    }

    pub fn inject_ctrl_alt_del(&self) -> std::io::Result<()> {
        self.devices
            .i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .inject_ctrl_alt_del()
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&mut self) {
        self.control.stop();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.vcpus.iter().any(|v| !v.is_finished()) && std::time::Instant::now() < deadline {
            self.vcpus.iter().for_each(VcpuHandle::kick);
            std::thread::sleep(Duration::from_millis(1));
        }
        for handle in self.vcpus.drain(..) {
            if handle.is_finished() {
                handle.join();
            } else {
                tracing::error!("a vCPU thread did not stop; leaving it to process exit");
            }
        }
    }

    pub fn metrics(&self) -> serde_json::Value {
        let devices: serde_json::Map<String, serde_json::Value> = self
            .devices
            .virtio
            .iter()
            .map(|slot| {
                let metrics = slot.device.lock().map(|d| d.metrics()).unwrap_or_default();
                (slot.name.clone(), metrics)
            })
            .collect();
        let serial = self
            .devices
            .serial
            .lock()
            .map(|s| s.metrics())
            .unwrap_or_default();
        serde_json::json!({
            "exits": &*self.exit_metrics,
            "serial": serial,
            "virtio": devices,
            "guest_memory_bytes": self.ram.size,
        })
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }
}

fn register_memory(vm_fd: &VmFd, ram: &GuestRam) -> Result<(), VmError> {
    for (slot, region) in ram.memory.iter().enumerate() {
        let host_addr = ram
            .memory
            .get_host_address(region.start_addr())
            .map_err(|_| crate::memory::MemoryError::Regions)?;
        let mem_region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `ram`, which the `Vm`
        // keeps alive for as long as the VM fd exists (field order in `Vm`).
        unsafe { vm_fd.set_user_memory_region(mem_region) }
            .map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn create_vcpus(
    kvm_handle: &Kvm,
    vm_fd: &VmFd,
    config: &VmConfig,
    ram: &GuestRam,
    entry: EntryMode,
) -> Result<Vec<(u8, VcpuFd)>, VmError> {
    let supported_cpuid = kvm_handle
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    let supported_msrs = kvm_handle
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let count = config.machine.vcpus;
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for id in 0..count {
        let fd = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        let mut cpuid = supported_cpuid.clone();
        cpuid::normalize(&mut cpuid, id, count, config.machine.cpu_template);
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        regs::setup_msrs(&fd, supported_msrs.as_slice())?;
        regs::setup_fpu(&fd)?;
        regs::setup_lapic(&fd)?;
        // Only the boot CPU gets entry state; APs wait for INIT/SIPI.
        if id == 0 {
            let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
            let sregs = regs::boot_sregs(&ram.memory, entry, sregs)?;
            fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
            fd.set_regs(&regs::boot_regs(entry))
                .map_err(kvm("KVM_SET_REGS"))?;
        }
        vcpus.push((id, fd));
    }
    Ok(vcpus)
}
