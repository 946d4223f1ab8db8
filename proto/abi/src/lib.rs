//! The host↔guest contract, in one place. The shim, the VMM, the guest
//! image builder and the guest agent all take these values from here; a
//! change is one edit, and both sides see it.
//!
//! - [`vsock`]: who listens where on the VM's vsock;
//! - [`ports`]: the VMM's port-I/O doorbells (boot timer, shutdown);
//! - [`console`]: what the agent prints on the serial console;
//! - [`cmdline`]: the kernel command line and the words the agent reads;
//! - [`shared_fs`]: the pod's virtio-fs share;
//! - [`port_forward`]: the header of a forwarded connection (CRI
//!   `PortForward`);
//! - [`image`]: where the built guest image is cached.
//!
//! Without the default `std` feature (the no_std probe guest) it has only
//! the constants.

#![cfg_attr(not(feature = "std"), no_std)]

pub mod vsock {
    /// The host's vsock CID (`VMADDR_CID_HOST`): the only peer the agent
    /// serves.
    pub const HOST_CID: u32 = 2;
    /// Every pod VM's own CID (each VM has its own vsock device and socket).
    pub const GUEST_CID: u32 = 3;
    /// The agent's gRPC API.
    pub const AGENT_PORT: u32 = 1024;
    /// The agent's port-forward listener (raw byte streams, see
    /// [`crate::port_forward`]; only the host is served).
    pub const PORT_FORWARD_PORT: u32 = 1025;
}

pub mod ports {
    //! Two I/O ports nothing on a PC uses. Port I/O (not a vsock message)
    //! because it works before any device is up and costs one exit; under
    //! QEMU nothing decodes them and the writes are ignored.

    /// The first doorbell port and how many there are.
    pub const DEBUG_PORT_BASE: u16 = 0x440;
    pub const DEBUG_PORT_LEN: u16 = 2;
    /// Boot timer: the VMM logs the time from its start to this write.
    pub const BOOT_TIMER_PORT: u16 = DEBUG_PORT_BASE;
    /// The value the boot timer expects (Firecracker's "boot complete").
    pub const BOOT_TIMER_MAGIC: u8 = 123;
    /// Guest shutdown: the VMM stops the VM with the written status.
    pub const SHUTDOWN_PORT: u16 = DEBUG_PORT_BASE + 1;
    /// The status of a clean power-off.
    pub const SHUTDOWN_CLEAN: u8 = 0;
}

pub mod console {
    /// The line the agent prints when it serves; the guest uptime in
    /// seconds follows.
    pub const READY_LINE_PREFIX: &str = "microvm-agent: ready uptime=";

    /// The guest uptime (seconds) from the agent's ready line in `serial`,
    /// if the line is there.
    #[cfg(feature = "std")]
    pub fn ready_uptime(serial: &str) -> Option<f64> {
        serial.lines().find_map(|line| {
            let rest = line.trim().strip_prefix(READY_LINE_PREFIX)?;
            rest.trim().parse::<f64>().ok()
        })
    }
}

pub mod cmdline {
    /// The kernel command line every pod VM boots with. One word per
    /// concern:
    ///
    /// | word | why |
    /// | --- | --- |
    /// | `console=ttyS0` | kernel console on the one 16550 UART (0x3f8) |
    /// | `quiet` | log level 4: a normal boot prints nothing but the agent's lines; every byte through an emulated UART costs an exit |
    /// | `panic=-1` | reboot at once on panic, which ends the VM instead of hanging it |
    /// | `reboot=k` | reboot through the keyboard controller: our VMM turns the i8042 reset (port 0x64) into VM exit. QEMU's microvm has no i8042, so [`qemu`] swaps in `reboot=t` (triple fault, which `-no-reboot` turns into an exit) |
    /// | `8250.nr_uarts=1` | register one UART, do not probe the three absent legacy ports |
    /// | `tsc=reliable` | trust the TSC: no clocksource watchdog, no TSC sync checks |
    /// | `no_timer_check` | skip the check that the IO-APIC timer IRQ works (slow, and wrong under virtualization) |
    /// | `random.trust_cpu=on` | seed the RNG from RDRAND, nothing else feeds it early in a microVM |
    ///
    /// Not here, on purpose: `i8042.*` (the kernel has no i8042 driver, see
    /// `kernel-config/console.config`), `acpi=off`/`pci=off` (not built in;
    /// unknown words would be passed to init). The VMM appends its
    /// `virtio_mmio.device=...` words after these.
    pub const KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1 reboot=k 8250.nr_uarts=1 \
                                      tsc=reliable no_timer_check random.trust_cpu=on";

    /// `<this>=1` on the command line: the agent runs a shell on the
    /// console (debug initramfs only).
    pub const DEBUG_SHELL: &str = "microvm_debug_shell";
    /// `<this>=<level>`: the agent's log level.
    pub const AGENT_LOG: &str = "microvm_agent_log";

    /// [`KERNEL_CMDLINE`] for QEMU's microvm machine: `reboot=t` (triple
    /// fault) instead of `reboot=k`, because that machine has no i8042.
    #[cfg(feature = "std")]
    pub fn qemu() -> String {
        KERNEL_CMDLINE
            .split_whitespace()
            .map(|word| if word == "reboot=k" { "reboot=t" } else { word })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

pub mod shared_fs {
    /// The virtio-fs tag of the pod's shared directory.
    pub const TAG: &str = "microvm-shared";
    /// Where the agent mounts it in the guest.
    pub const GUEST_DIR: &str = "/run/microvm/shared";
}

#[cfg(feature = "std")]
pub mod image {
    //! The built guest image's cache: `<root>/kernel/<version>-<hash>/`
    //! (`vmlinux`, `bzImage`, `config`) and
    //! `<root>/initramfs/<variant>-<hash>.cpio`. The builder writes it, the
    //! shim reads the newest entry when its config names no image.

    use std::path::PathBuf;

    /// Overrides the cache root.
    pub const CACHE_DIR_ENV: &str = "MICROVM_CACHE_DIR";
    /// The cache root when [`CACHE_DIR_ENV`] is unset: outside any
    /// checkout, so a fresh clone reuses what the machine built before.
    pub const DEFAULT_CACHE_DIR: &str = "/var/cache/microvm";
    pub const KERNEL_DIR: &str = "kernel";
    pub const VMLINUX: &str = "vmlinux";
    pub const INITRAMFS_DIR: &str = "initramfs";
    pub const RELEASE_PREFIX: &str = "release-";
    pub const DEBUG_PREFIX: &str = "debug-";
    pub const INITRAMFS_SUFFIX: &str = ".cpio";

    pub fn cache_root() -> PathBuf {
        match std::env::var_os(CACHE_DIR_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => PathBuf::from(DEFAULT_CACHE_DIR),
        }
    }
}

pub mod port_forward {
    //! CRI port forwarding runs on its own vsock port
    //! ([`crate::vsock::PORT_FORWARD_PORT`]) as raw byte streams: the shim
    //! opens one hybrid-vsock connection per forwarded TCP connection,
    //! sends a [`Request`] naming the TCP port, and the agent answers with
    //! a [`Reply`] once it has connected to the port on the VM's loopback
    //! (or failed to). After a `Connected` reply every byte is the TCP
    //! stream's, both ways; a half-close travels as a vsock shutdown.

    use core::time::Duration;

    /// First bytes of every header, so a stray peer is told apart.
    pub const MAGIC: [u8; 4] = *b"MVPF";
    pub const VERSION: u8 = 1;
    pub const REQUEST_LEN: usize = 8;
    pub const REPLY_LEN: usize = 8;
    /// How long either side waits for the other's header (the agent's
    /// connect to the container's port included).
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    /// After one direction of a forwarded connection ended, how long the
    /// other may still carry bytes before both are closed (containerd waits
    /// 1 s on its side; a peer that never closes must not pin the bridge).
    pub const LINGER_TIMEOUT: Duration = Duration::from_secs(5);

    const STATUS_CONNECTED: u8 = 0;
    const STATUS_FAILED: u8 = 1;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum HeaderError {
        /// The bytes do not start with [`MAGIC`].
        BadMagic,
        /// Another [`VERSION`].
        Version(u8),
        /// A reply status this build does not know.
        Status(u8),
        /// Port 0.
        PortZero,
    }

    impl core::fmt::Display for HeaderError {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self {
                Self::BadMagic => f.write_str("not a port-forward header (bad magic)"),
                Self::Version(version) => write!(
                    f,
                    "port-forward header version {version}, this build speaks {VERSION}"
                ),
                Self::Status(status) => write!(f, "unknown port-forward reply status {status}"),
                Self::PortZero => f.write_str("port-forward to port 0"),
            }
        }
    }

    #[cfg(feature = "std")]
    impl std::error::Error for HeaderError {}

    fn check_prefix(bytes: &[u8; 8]) -> Result<(), HeaderError> {
        if bytes[..4] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if bytes[4] != VERSION {
            return Err(HeaderError::Version(bytes[4]));
        }
        Ok(())
    }

    /// Host -> guest: connect to `127.0.0.1:<port>` in the VM.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Request {
        pub port: u16,
    }

    impl Request {
        /// `MAGIC, VERSION, 0, 0, 0, 0, port (big-endian)`.
        pub fn encode(&self) -> [u8; REQUEST_LEN] {
            let port = self.port.to_be_bytes();
            [
                MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], VERSION, 0, port[0], port[1],
            ]
        }

        pub fn decode(bytes: &[u8; REQUEST_LEN]) -> Result<Self, HeaderError> {
            check_prefix(bytes)?;
            let port = u16::from_be_bytes([bytes[6], bytes[7]]);
            if port == 0 {
                return Err(HeaderError::PortZero);
            }
            Ok(Self { port })
        }
    }

    /// Guest -> host: whether the agent reached the port.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Reply {
        Connected,
        /// connect() failed with this errno (ECONNREFUSED: nothing listens).
        Failed {
            errno: u16,
        },
    }

    impl Reply {
        /// `MAGIC, VERSION, status, errno (big-endian u16), 0`.
        pub fn encode(&self) -> [u8; REPLY_LEN] {
            let (status, errno) = match *self {
                Self::Connected => (STATUS_CONNECTED, 0u16),
                Self::Failed { errno } => (STATUS_FAILED, errno),
            };
            let errno = errno.to_be_bytes();
            [
                MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], VERSION, status, errno[0], errno[1],
            ]
        }

        pub fn decode(bytes: &[u8; REPLY_LEN]) -> Result<Self, HeaderError> {
            check_prefix(bytes)?;
            match bytes[5] {
                STATUS_CONNECTED => Ok(Self::Connected),
                STATUS_FAILED => Ok(Self::Failed {
                    errno: u16::from_be_bytes([bytes[6], bytes[7]]),
                }),
                other => Err(HeaderError::Status(other)),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn requests_round_trip_and_bad_ones_are_refused() {
            for port in [1u16, 80, 8080, 65535] {
                let bytes = Request { port }.encode();
                assert_eq!(Request::decode(&bytes), Ok(Request { port }));
            }
            assert_eq!(
                Request::decode(&Request { port: 0 }.encode()),
                Err(HeaderError::PortZero)
            );
            let mut bytes = Request { port: 80 }.encode();
            bytes[0] = b'X';
            assert_eq!(Request::decode(&bytes), Err(HeaderError::BadMagic));
            let mut bytes = Request { port: 80 }.encode();
            bytes[4] = 9;
            assert_eq!(Request::decode(&bytes), Err(HeaderError::Version(9)));
            assert!(HeaderError::Version(9).to_string().contains("version 9"));
        }

        #[test]
        fn replies_round_trip_and_unknown_statuses_are_refused() {
            for reply in [
                Reply::Connected,
                Reply::Failed { errno: 111 },
                Reply::Failed { errno: u16::MAX },
            ] {
                assert_eq!(Reply::decode(&reply.encode()), Ok(reply));
            }
            let mut bytes = Reply::Connected.encode();
            bytes[5] = 7;
            assert_eq!(Reply::decode(&bytes), Err(HeaderError::Status(7)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_has_the_documented_words() {
        let words: Vec<_> = cmdline::KERNEL_CMDLINE.split_whitespace().collect();
        for expected in ["console=ttyS0", "quiet", "panic=-1", "reboot=k"] {
            assert!(words.contains(&expected), "{expected} missing");
        }
        // Words with a dot in the name are module parameters, all others
        // must be known to the kernel: none may be a stray word for init.
        assert_eq!(words.len(), 8);
    }

    #[test]
    fn qemu_cmdline_swaps_only_the_reboot_method() {
        let qemu = cmdline::qemu();
        assert!(qemu.contains("reboot=t"));
        assert!(!qemu.contains("reboot=k"));
        assert_eq!(
            qemu.replace("reboot=t", "reboot=k"),
            cmdline::KERNEL_CMDLINE
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }

    #[test]
    fn ready_uptime_parses_the_agent_line() {
        let serial = "noise\r\nmicrovm-agent: ready uptime=0.42\r\nreboot: Restarting system\r\n";
        assert_eq!(console::ready_uptime(serial), Some(0.42));
        assert_eq!(
            console::ready_uptime("microvm-agent: ready uptime=\n"),
            None
        );
        assert_eq!(console::ready_uptime("nothing here"), None);
    }

    #[test]
    fn the_doorbells_are_the_two_debug_ports() {
        assert_eq!(ports::BOOT_TIMER_PORT, 0x440);
        assert_eq!(ports::SHUTDOWN_PORT, 0x441);
        assert_eq!(ports::DEBUG_PORT_LEN, 2);
    }
}
