//! Builds the device bus from the config and wires it to KVM: legacy devices
//! on port I/O, virtio devices on MMIO slots with an irqfd each and an
//! ioeventfd per queue.

use crate::arch::layout::{VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::config::{devices::parse_mac, RateLimiterConfig, VmConfig};
use crate::GuestMemoryMmap;
use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use microvm_devices::interrupt::{EventFdTrigger, IrqTrigger};
use microvm_devices::legacy::debug_port::{DEBUG_PORT_BASE, DEBUG_PORT_LEN};
use microvm_devices::legacy::i8042::{I8042_DATA_PORT, I8042_PORT_LEN};
use microvm_devices::legacy::serial::{COM1_IRQ, COM1_PORT, SERIAL_PORT_LEN};
use microvm_devices::legacy::{
    DebugPort, DebugPortSink, I8042Sink, SerialDevice, SerialOutput, I8042,
};
use microvm_devices::rate_limiter::RateLimiter;
use microvm_devices::virtio::fs::{VhostUserFs, VhostUserMmio};
use microvm_devices::virtio::mmio::MmioTransport;
use microvm_devices::virtio::VirtioDevice;
use microvm_devices::virtio::VirtioInterrupt;
use microvm_errors::error_chain;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const KEYBOARD_IRQ: u32 = 1;
/// Offset of QueueNotify in the virtio-mmio register file.
const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot open serial output {path}: {source}")]
    SerialOutput {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("bus registration failed: {0:?}")]
    Bus(vm_device::bus::Error),
    #[error("{name}: {message}")]
    Virtio { name: String, message: String },
}

/// A virtio device seen two ways: as a device by its transport, and as an
/// event subscriber by the event loop. Both are the same `Arc<Mutex<D>>`.
pub struct VirtioSlot {
    pub name: String,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>,
    pub base: u64,
    pub irq: u32,
    /// Set for devices whose queues an out-of-process vhost-user back-end
    /// serves: the back-end writes this eventfd itself. It becomes the slot's
    /// irqfd, and the transport reports the used-ring interrupt status (see
    /// `microvm_devices::virtio::fs::transport`).
    pub backend_irqfd: Option<EventFd>,
}

fn slot<D>(name: String, device: D) -> VirtioSlot
where
    D: VirtioDevice + MutEventSubscriber + Send + 'static,
{
    let shared = Arc::new(Mutex::new(device));
    VirtioSlot {
        name,
        device: shared.clone(),
        subscriber: shared,
        base: 0,
        irq: 0,
        backend_irqfd: None,
    }
}

pub struct Devices {
    pub bus: Arc<IoManager>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub virtio: Vec<VirtioSlot>,
}

pub struct GuestSinks {
    pub debug_port: DebugPortSink,
    pub i8042: I8042Sink,
}

fn irq_trigger(vm: &VmFd, gsi: u32) -> Result<Arc<dyn IrqTrigger>, DeviceError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    irq_trigger_on(vm, evt, gsi)
}

fn irq_trigger_on(vm: &VmFd, evt: EventFd, gsi: u32) -> Result<Arc<dyn IrqTrigger>, DeviceError> {
    vm.register_irqfd(&evt, gsi)
        .map_err(|source| DeviceError::Kvm {
            op: "KVM_IRQFD",
            source,
        })?;
    Ok(Arc::new(EventFdTrigger::new(evt)))
}

fn serial_sink(config: &VmConfig) -> Result<Box<dyn Write + Send>, DeviceError> {
    match &config.serial.output {
        None => Ok(Box::new(std::io::stdout())),
        Some(path) => {
            // Append so a fifo or a log file shared with the shim keeps its
            // earlier content; O_CREAT for a plain file.
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| DeviceError::SerialOutput {
                    path: path.clone(),
                    source,
                })?;
            Ok(Box::new(file))
        }
    }
}

/// Creates the virtio devices named in the config, in slot order: vsock,
/// disks (in config order, so the first is /dev/vda), net, rng, fs shares
/// (in config order; each connects to its back-end here).
pub fn create_virtio_devices(config: &VmConfig) -> Result<Vec<VirtioSlot>, DeviceError> {
    use microvm_devices::virtio::{block, net, rng, vsock};
    let mut slots = Vec::new();
    let fail = |name: &str, e: &dyn std::fmt::Display| DeviceError::Virtio {
        name: name.to_owned(),
        message: e.to_string(),
    };
    if let Some(v) = &config.vsock {
        let device = vsock::Vsock::with_limits(v.guest_cid, v.uds_path.clone(), v.limits())
            .map_err(|e| fail("vsock", &e))?;
        slots.push(slot("vsock".into(), device));
    }
    for (index, disk) in config.disks.iter().enumerate() {
        let name = format!("disks[{index}]");
        let device = block::Block::new(&block::BlockConfig {
            path: disk.path.clone(),
            read_only: disk.read_only,
            serial: disk.serial.clone(),
            rate_limiter: disk.rate_limiter.unwrap_or_default(),
        })
        .map_err(|e| fail(&name, &e))?;
        slots.push(slot(name, device));
    }
    for (index, netcfg) in config.net.iter().enumerate() {
        let name = format!("net[{index}]");
        let mac = match netcfg.mac.as_deref().and_then(parse_mac) {
            Some(mac) => mac,
            None => random_mac().map_err(|e| fail(&name, &e))?,
        };
        let limiter = |config: &Option<RateLimiterConfig>| {
            RateLimiter::new(&config.unwrap_or_default(), std::time::Instant::now())
                .map_err(|e| fail(&name, &e))
        };
        let (rx, tx) = (
            limiter(&netcfg.rx_rate_limiter)?,
            limiter(&netcfg.tx_rate_limiter)?,
        );
        let device = net::Net::with_tap(&netcfg.tap, mac)
            .map_err(|e| fail(&name, &e))?
            .with_rate_limiters(rx, tx);
        slots.push(slot(name, device));
    }
    if config.rng {
        let device = rng::Rng::new().map_err(|e| fail("rng", &e))?;
        slots.push(slot("rng".into(), device));
    }
    for (index, share) in config.fs.iter().enumerate() {
        let name = format!("fs[{index}]");
        let device = VhostUserFs::connect(&share.device_config())
            .map_err(|e| fail(&name, &error_chain(&e)))?;
        let irqfd = device
            .interrupt_eventfd()
            .try_clone()
            .map_err(DeviceError::EventFd)?;
        let mut fs_slot = slot(name, device);
        fs_slot.backend_irqfd = Some(irqfd);
        slots.push(fs_slot);
    }
    Ok(slots)
}

/// A random locally administered unicast MAC (02:xx:xx:xx:xx:xx).
fn random_mac() -> std::io::Result<[u8; 6]> {
    use std::io::Read;
    let mut mac = [0u8; 6];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut mac[1..])?;
    mac[0] = 0x02;
    Ok(mac)
}

pub fn build(
    config: &VmConfig,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    sinks: GuestSinks,
    virtio: Vec<VirtioSlot>,
) -> Result<Devices, DeviceError> {
    let mut bus = IoManager::new();
    let bus_err = DeviceError::Bus;

    let serial_output = SerialOutput::new(serial_sink(config)?, config.serial.limit_bytes);
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        irq_trigger(vm, COM1_IRQ)?,
        serial_output,
    )));
    bus.register_pio(
        PioRange::new(PioAddress(COM1_PORT), SERIAL_PORT_LEN).map_err(bus_err)?,
        serial.clone(),
    )
    .map_err(bus_err)?;

    let i8042 = Arc::new(Mutex::new(I8042::new(
        irq_trigger(vm, KEYBOARD_IRQ)?,
        sinks.i8042,
    )));
    bus.register_pio(
        PioRange::new(PioAddress(I8042_DATA_PORT), I8042_PORT_LEN).map_err(bus_err)?,
        i8042.clone(),
    )
    .map_err(bus_err)?;

    let debug_port = Arc::new(Mutex::new(DebugPort::new(sinks.debug_port)));
    bus.register_pio(
        PioRange::new(PioAddress(DEBUG_PORT_BASE), DEBUG_PORT_LEN).map_err(bus_err)?,
        debug_port,
    )
    .map_err(bus_err)?;

    let mut slots = Vec::with_capacity(virtio.len());
    for (index, mut slot) in virtio.into_iter().enumerate() {
        slot.base = VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE;
        slot.irq = VIRTIO_IRQ_BASE + index as u32;
        let trigger = match &slot.backend_irqfd {
            Some(evt) => {
                irq_trigger_on(vm, evt.try_clone().map_err(DeviceError::EventFd)?, slot.irq)?
            }
            None => irq_trigger(vm, slot.irq)?,
        };
        let interrupt = Arc::new(VirtioInterrupt::new(trigger));
        let transport =
            MmioTransport::new(mem.clone(), slot.device.clone(), interrupt).map_err(|e| {
                DeviceError::Virtio {
                    name: slot.name.clone(),
                    message: e.to_string(),
                }
            })?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET),
                queue as u32,
            )
            .map_err(|source| DeviceError::Kvm {
                op: "KVM_IOEVENTFD",
                source,
            })?;
        }
        let range = MmioRange::new(MmioAddress(slot.base), VIRTIO_MMIO_SIZE).map_err(bus_err)?;
        if slot.backend_irqfd.is_some() {
            let transport = VhostUserMmio::new(transport);
            bus.register_mmio(range, Arc::new(Mutex::new(transport)))
                .map_err(bus_err)?;
        } else {
            bus.register_mmio(range, Arc::new(Mutex::new(transport)))
                .map_err(bus_err)?;
        }
        slots.push(slot);
    }

    Ok(Devices {
        bus: Arc::new(bus),
        serial,
        i8042,
        virtio: slots,
    })
}
