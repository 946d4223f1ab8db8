//! The API socket uses the same publication rules as the vsock socket: see
//! `microvm_devices::unix_socket`.

pub use microvm_devices::unix_socket::{OwnedListener, UnixSocketError as SocketError};
