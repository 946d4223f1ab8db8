//! Legacy (non-virtio) devices: serial port, i8042 and the debug port.

pub mod debug_port;
pub mod i8042;
pub mod serial;

pub use debug_port::{DebugPort, DebugPortEvent, DebugPortSink};
pub use i8042::{I8042Event, I8042Sink, I8042};
pub use serial::{SerialDevice, SerialOutput};
