//! The pod's network, wired to the VM the way Kata's "tcfilter" mode does.
//!
//! containerd's CRI plugin makes the pod network namespace and a CNI plugin
//! puts one veth (usually `eth0`) in it before the shim's Create. The VM
//! runs inside that netns and talks through a persistent tap there. Ingress
//! `u32` filters with a `mirred egress redirect` move every frame veth → tap
//! and, from the tap, only the frames with the pod's MAC and addresses
//! (ARP included; [`guard`]) tap → veth, dropping the rest; so the guest
//! sees the pod's link as is but cannot spoof on it. Its interface takes
//! the veth's MAC, MTU, addresses and routes (see
//! [`PodNetwork::agent_requests`]).
//!
//! The VMM must open the tap by name (QEMU: `-netdev
//! tap,ifname=NAME,script=no,downscript=no`; microvm-vmm: `--tap NAME`)
//! from inside the netns ([`NetnsForChild`]). Each opener sets the queue's
//! flags (IFF_VNET_HDR included) itself, so the flags the tap is created
//! with do not matter.
//!
//! [`PodNetwork::attach`] and [`PodNetwork::detach`] block: setns(2) moves
//! only the calling thread, so the netlink work runs on a short-lived thread
//! of its own that joins the netns first, and the shim's runtime threads
//! never move. Call them from `tokio::task::spawn_blocking`.

mod guard;
mod link;
mod netns;
mod shaper;
mod tap;

pub use netns::NetnsForChild;
pub use shaper::Bandwidth;

use microvm_proto::agent::v1 as api;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "tap name {0:?} is empty, longer than 15 bytes or contains '/', ':', NUL or whitespace"
    )]
    InvalidTapName(String),
    #[error("netns {}: cannot open it", .netns.display())]
    OpenNetns {
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netns {}: cannot enter it (setns)", .netns.display())]
    EnterNetns {
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netns {}: cannot start the netlink thread", .netns.display())]
    Thread {
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netns {}: the netlink thread panicked", .netns.display())]
    ThreadPanicked { netns: PathBuf },
    #[error("netns {}: {step} failed", .netns.display())]
    Netlink {
        netns: PathBuf,
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("netns {}: no pod interface (Ethernet link other than tap {tap}); links found: [{found}]", .netns.display())]
    NoInterface {
        netns: PathBuf,
        tap: String,
        found: String,
    },
    #[error("netns {}: several candidate pod interfaces: [{candidates}]", .netns.display())]
    SeveralInterfaces { netns: PathBuf, candidates: String },
    #[error("netns {}: pod interface {interface} has no IPv4 or global IPv6 address", .netns.display())]
    NoAddress { netns: PathBuf, interface: String },
    #[error("netns {}: {interface} has no Ethernet MAC address", .netns.display())]
    NoMac { netns: PathBuf, interface: String },
    #[error("netns {}: {tap} exists and is not a tap device", .netns.display())]
    TapNameTaken { netns: PathBuf, tap: String },
    #[error("netns {}: tap {tap}: {step} failed", .netns.display())]
    Tap {
        netns: PathBuf,
        tap: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Who may open the pod's tap besides root; unset, anyone who can open
/// /dev/net/tun in the pod's netns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapOwner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// The pod's network as attached to a tap: what the guest's interface must
/// look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub tap: String,
    pub interface: GuestInterface,
    /// Routes via the pod interface, on-link ones first so that a gateway is
    /// reachable before a route uses it.
    pub routes: Vec<GuestRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInterface {
    /// The veth's name (e.g. `eth0`); the guest's interface is renamed to it.
    pub name: String,
    /// Lowercase "aa:bb:cc:dd:ee:ff": the VM's NIC must use this MAC.
    pub mac: String,
    pub mtu: u32,
    /// CIDR, e.g. "10.88.0.5/16"; IPv6 link-local ones are left out (the
    /// guest makes its own).
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRoute {
    /// CIDR; "default" for the IPv4 default route, "::/0" for IPv6's.
    pub destination: String,
    /// "" for an on-link route.
    pub gateway: String,
    pub device: String,
    /// Preferred source address, or "".
    pub source: String,
    pub metric: u32,
}

impl PodNetwork {
    /// Reads the pod interface in `netns` and connects it to the persistent
    /// tap `tap` (created if missing). Blocking; idempotent.
    ///
    /// The pod interface is the only Ethernet link other than `tap`, or, if
    /// there are several, the only one with an address. Routes of the main
    /// table through it are kept, except those the kernel made itself
    /// (`proto kernel`: the subnet route of each address, IPv6 `fe80::/64`),
    /// which the guest kernel makes again when the agent adds the address.
    pub fn attach(netns: &Path, tap: &str) -> Result<Self, NetworkError> {
        Self::attach_owned_by(netns, tap, TapOwner::default())
    }

    /// [`PodNetwork::attach`], with a tap that only `owner` (a VMM jailed
    /// as that uid/gid) or root may open. An existing tap is taken as it
    /// is.
    pub fn attach_owned_by(netns: &Path, tap: &str, owner: TapOwner) -> Result<Self, NetworkError> {
        Self::attach_with(netns, tap, owner, Bandwidth::default())
    }

    /// [`PodNetwork::attach_owned_by`], with the pod's traffic capped each
    /// way at `bandwidth` (0: no cap; a cap left by an earlier attach is
    /// then removed).
    pub fn attach_with(
        netns: &Path,
        tap: &str,
        owner: TapOwner,
        bandwidth: Bandwidth,
    ) -> Result<Self, NetworkError> {
        validate_tap_name(tap)?;
        let tap_name = tap.to_owned();
        netns::run_in_netns(netns, move |netns| {
            link::attach(netns, &tap_name, owner, bandwidth)
        })
    }

    /// Deletes the tap, the veth's ingress qdisc (and so its filter) and
    /// its cap.
    /// Blocking. A netns, tap or veth already gone is not an error.
    pub fn detach(&self) -> Result<(), NetworkError> {
        let tap = self.tap.clone();
        let veth = self.interface.name.clone();
        match netns::run_in_netns(&self.netns, move |netns| link::detach(netns, &tap, &veth)) {
            Err(NetworkError::OpenNetns { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            // The bind mount is gone but the file stayed: the netns is gone.
            Err(NetworkError::EnterNetns { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// What the agent needs to recreate the pod interface in the guest.
    pub fn agent_requests(&self) -> (api::UpdateInterfaceRequest, api::UpdateRoutesRequest) {
        let interface = api::UpdateInterfaceRequest {
            mac: self.interface.mac.clone(),
            name: self.interface.name.clone(),
            addresses: self.interface.addresses.clone(),
            mtu: self.interface.mtu,
            up: true,
        };
        let routes = api::UpdateRoutesRequest {
            routes: self
                .routes
                .iter()
                .map(|route| api::Route {
                    destination: route.destination.clone(),
                    gateway: route.gateway.clone(),
                    device: route.device.clone(),
                    source: route.source.clone(),
                    metric: route.metric,
                })
                .collect(),
        };
        (interface, routes)
    }
}

/// The kernel's rules for interface names (dev_valid_name), minus ':' which
/// iproute2 would read as an alias.
fn validate_tap_name(tap: &str) -> Result<(), NetworkError> {
    let valid = !tap.is_empty()
        && tap.len() < libc::IFNAMSIZ
        && tap != "."
        && tap != ".."
        && !tap
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
    if valid {
        Ok(())
    } else {
        Err(NetworkError::InvalidTapName(tap.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PodNetwork {
        PodNetwork {
            netns: "/var/run/netns/cni-1".into(),
            tap: "tap0".into(),
            interface: GuestInterface {
                name: "eth0".into(),
                mac: "0a:58:0a:58:00:05".into(),
                mtu: 1450,
                addresses: vec!["10.88.0.5/16".into(), "fd00::5/64".into()],
            },
            routes: vec![
                GuestRoute {
                    destination: "169.254.1.1/32".into(),
                    gateway: String::new(),
                    device: "eth0".into(),
                    source: String::new(),
                    metric: 0,
                },
                GuestRoute {
                    destination: "default".into(),
                    gateway: "10.88.0.1".into(),
                    device: "eth0".into(),
                    source: "10.88.0.5".into(),
                    metric: 100,
                },
            ],
        }
    }

    #[test]
    fn agent_requests_carry_the_interface_and_routes_in_order() {
        let (interface, routes) = sample().agent_requests();
        assert_eq!(
            interface,
            api::UpdateInterfaceRequest {
                mac: "0a:58:0a:58:00:05".into(),
                name: "eth0".into(),
                addresses: vec!["10.88.0.5/16".into(), "fd00::5/64".into()],
                mtu: 1450,
                up: true,
            }
        );
        assert_eq!(routes.routes.len(), 2);
        assert_eq!(routes.routes[0].destination, "169.254.1.1/32");
        assert_eq!(routes.routes[0].gateway, "");
        assert_eq!(routes.routes[0].device, "eth0");
        assert_eq!(
            routes.routes[1],
            api::Route {
                destination: "default".into(),
                gateway: "10.88.0.1".into(),
                device: "eth0".into(),
                source: "10.88.0.5".into(),
                metric: 100,
            }
        );
    }

    #[test]
    fn tap_names_follow_the_kernel_rules() {
        for good in ["tap0", "tap_pod-1.x", "a23456789012345"] {
            assert!(validate_tap_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a234567890123456",
            "tap/0",
            "tap 0",
            "tap:0",
            "t\0",
        ] {
            let err = validate_tap_name(bad).unwrap_err();
            assert!(matches!(err, NetworkError::InvalidTapName(_)), "{bad:?}");
        }
    }

    #[test]
    fn attach_refuses_a_bad_tap_name_before_touching_the_netns() {
        let err = PodNetwork::attach(Path::new("/nonexistent/netns"), "bad/name").unwrap_err();
        assert!(matches!(err, NetworkError::InvalidTapName(_)), "{err}");
    }

    #[test]
    fn detach_of_a_vanished_netns_is_ok_and_attach_names_it() {
        let mut network = sample();
        network.netns = "/nonexistent/mvt-netns".into();
        network.detach().unwrap();
        let err = PodNetwork::attach(&network.netns, "tap0").unwrap_err();
        assert!(matches!(err, NetworkError::OpenNetns { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/mvt-netns"), "{err}");
    }
}
