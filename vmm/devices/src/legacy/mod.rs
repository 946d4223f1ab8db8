//! Legacy (non-virtio) devices: serial port, i8042 and the boot timer.
