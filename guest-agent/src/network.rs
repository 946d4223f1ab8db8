//! The VM's network (the pod's): interfaces found by MAC, addresses, MTU,
//! routes and permanent neighbour entries, over rtnetlink. Also the
//! per-interface counters for container stats.

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use tokio::sync::OnceCell;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("no interface has MAC address {0}")]
    NoSuchMac(String),
    #[error("no interface is named {0:?}")]
    NoSuchInterface(String),
    #[error("{what} failed")]
    Netlink {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl NetworkError {
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::Invalid { .. } => tonic::Code::InvalidArgument,
            Self::NoSuchMac(_) | Self::NoSuchInterface(_) => tonic::Code::NotFound,
            Self::Netlink { source, .. } => match source.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::ERANGE) => tonic::Code::InvalidArgument,
                Some(libc::ENODEV) | Some(libc::ESRCH) | Some(libc::ENOENT) => {
                    tonic::Code::NotFound
                }
                Some(libc::EEXIST) => tonic::Code::AlreadyExists,
                _ => tonic::Code::FailedPrecondition,
            },
        }
    }
}

fn netlink_error(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |err| {
        let source = match &err {
            rtnetlink::Error::NetlinkError(message) => message.to_io(),
            other => std::io::Error::other(other.to_string()),
        };
        NetworkError::Netlink { what, source }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> NetworkError {
    NetworkError::Invalid {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// "02:00:00:00:00:01" → bytes.
pub fn parse_mac(text: &str) -> Result<Vec<u8>, NetworkError> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|part| {
            (part.len() == 2)
                .then(|| u8::from_str_radix(part, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()
        .ok_or_else(|| invalid("mac", format!("{text:?} is not a MAC address")))?;
    if bytes.len() != 6 {
        return Err(invalid("mac", format!("{text:?} is not a MAC address")));
    }
    Ok(bytes)
}

/// "10.0.0.2/24" → (address, prefix length).
pub fn parse_cidr(field: &str, text: &str) -> Result<(IpAddr, u8), NetworkError> {
    let (address, prefix) = text
        .split_once('/')
        .ok_or_else(|| invalid(field, format!("{text:?} is not CIDR (address/prefix)")))?;
    let address: IpAddr = address
        .parse()
        .map_err(|_| invalid(field, format!("{address:?} is not an IP address")))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|prefix| *prefix <= max)
        .ok_or_else(|| invalid(field, format!("prefix {prefix:?} is not 0-{max}")))?;
    Ok((address, prefix))
}

#[derive(Debug, Clone, Default)]
pub struct InterfaceRequest {
    pub mac: String,
    pub name: String,
    pub addresses: Vec<String>,
    pub mtu: u32,
    pub up: bool,
}

#[derive(Debug, Clone, Default)]
pub struct RouteRequest {
    pub destination: String,
    pub gateway: String,
    pub device: String,
    pub source: String,
    pub metric: u32,
}

#[derive(Debug, Clone, Default)]
pub struct NeighborRequest {
    pub ip: String,
    pub mac: String,
    pub device: String,
}

/// One rtnetlink connection, opened on first use in the agent's network
/// namespace.
#[derive(Default)]
pub struct Network {
    handle: OnceCell<Handle>,
}

fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

impl Network {
    async fn handle(&self) -> Result<&Handle, NetworkError> {
        self.handle
            .get_or_try_init(|| async {
                let (connection, handle, _) =
                    rtnetlink::new_connection().map_err(|source| NetworkError::Netlink {
                        what: "opening a netlink socket".into(),
                        source,
                    })?;
                tokio::spawn(connection);
                Ok(handle)
            })
            .await
    }

    async fn links(&self) -> Result<Vec<LinkMessage>, NetworkError> {
        self.handle()
            .await?
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(netlink_error("listing interfaces"))
    }

    async fn index_by_name(&self, name: &str) -> Result<u32, NetworkError> {
        self.links()
            .await?
            .iter()
            .find(|link| link_name(link) == name)
            .map(|link| link.header.index)
            .ok_or_else(|| NetworkError::NoSuchInterface(name.to_owned()))
    }

    /// Finds the interface by MAC and applies name, MTU, addresses and up.
    pub async fn update_interface(
        &self,
        request: &InterfaceRequest,
    ) -> Result<(String, u32), NetworkError> {
        let mac = parse_mac(&request.mac)?;
        let addresses = request
            .addresses
            .iter()
            .map(|cidr| parse_cidr("addresses", cidr))
            .collect::<Result<Vec<_>, _>>()?;
        if request.name.len() > 15 || request.name.contains(['/', ' ']) {
            return Err(invalid(
                "name",
                format!("{:?} is not an interface name", request.name),
            ));
        }
        let link = self
            .links()
            .await?
            .into_iter()
            .find(|link| {
                link.attributes.iter().any(
                    |attribute| matches!(attribute, LinkAttribute::Address(found) if *found == mac),
                )
            })
            .ok_or_else(|| NetworkError::NoSuchMac(request.mac.clone()))?;
        let index = link.header.index;
        let mut name = link_name(&link);
        let handle = self.handle().await?;
        if !request.name.is_empty() && request.name != name {
            // A rename needs the link down.
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).down().build())
                .execute()
                .await
                .map_err(netlink_error(format!("bringing {name} down to rename it")))?;
            handle
                .link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .name(request.name.clone())
                        .build(),
                )
                .execute()
                .await
                .map_err(netlink_error(format!(
                    "renaming {name} to {}",
                    request.name
                )))?;
            name = request.name.clone();
        }
        if request.mtu != 0 {
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).mtu(request.mtu).build())
                .execute()
                .await
                .map_err(netlink_error(format!(
                    "setting the MTU of {name} to {}",
                    request.mtu
                )))?;
        }
        for (address, prefix) in addresses {
            handle
                .address()
                .add(index, address, prefix)
                .replace()
                .execute()
                .await
                .map_err(netlink_error(format!(
                    "adding {address}/{prefix} to {name}"
                )))?;
        }
        if request.up {
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(netlink_error(format!("bringing {name} up")))?;
        }
        Ok((name, index))
    }

    pub async fn add_route(&self, route: &RouteRequest) -> Result<(), NetworkError> {
        let (destination, prefix) = match route.destination.as_str() {
            "default" | "" => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            text => parse_cidr("destination", text)?,
        };
        let gateway: Option<IpAddr> = if route.gateway.is_empty() {
            None
        } else {
            Some(route.gateway.parse().map_err(|_| {
                invalid(
                    "gateway",
                    format!("{:?} is not an IP address", route.gateway),
                )
            })?)
        };
        let source: Option<IpAddr> = if route.source.is_empty() {
            None
        } else {
            Some(route.source.parse().map_err(|_| {
                invalid("source", format!("{:?} is not an IP address", route.source))
            })?)
        };
        let index = if route.device.is_empty() {
            if gateway.is_none() {
                return Err(invalid("device", "an on-link route needs a device"));
            }
            None
        } else {
            Some(self.index_by_name(&route.device).await?)
        };
        let mismatch = || {
            invalid(
                "route",
                format!("{} mixes IPv4 and IPv6", route.destination),
            )
        };
        let message = match destination {
            IpAddr::V4(destination) => {
                let mut builder =
                    RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(destination, prefix);
                match gateway {
                    Some(IpAddr::V4(gateway)) => builder = builder.gateway(gateway),
                    Some(IpAddr::V6(_)) => return Err(mismatch()),
                    None => {
                        builder = builder.scope(rtnetlink::packet_route::route::RouteScope::Link)
                    }
                }
                match source {
                    Some(IpAddr::V4(source)) => builder = builder.pref_source(source),
                    Some(IpAddr::V6(_)) => return Err(mismatch()),
                    None => {}
                }
                if let Some(index) = index {
                    builder = builder.output_interface(index);
                }
                if route.metric != 0 {
                    builder = builder.priority(route.metric);
                }
                builder.build()
            }
            IpAddr::V6(destination) => {
                let mut builder =
                    RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(destination, prefix);
                match gateway {
                    Some(IpAddr::V6(gateway)) => builder = builder.gateway(gateway),
                    Some(IpAddr::V4(_)) => return Err(mismatch()),
                    None => {}
                }
                match source {
                    Some(IpAddr::V6(source)) => builder = builder.pref_source(source),
                    Some(IpAddr::V4(_)) => return Err(mismatch()),
                    None => {}
                }
                if let Some(index) = index {
                    builder = builder.output_interface(index);
                }
                if route.metric != 0 {
                    builder = builder.priority(route.metric);
                }
                builder.build()
            }
        };
        self.handle()
            .await?
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(netlink_error(format!(
                "adding the route to {} via {}",
                route.destination,
                if route.gateway.is_empty() {
                    &route.device
                } else {
                    &route.gateway
                }
            )))
    }

    pub async fn add_neighbor(&self, neighbor: &NeighborRequest) -> Result<(), NetworkError> {
        let ip: IpAddr = neighbor
            .ip
            .parse()
            .map_err(|_| invalid("ip", format!("{:?} is not an IP address", neighbor.ip)))?;
        let mac = parse_mac(&neighbor.mac)?;
        let index = self.index_by_name(&neighbor.device).await?;
        self.handle()
            .await?
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .replace()
            .execute()
            .await
            .map_err(netlink_error(format!(
                "adding neighbour {} ({}) on {}",
                neighbor.ip, neighbor.mac, neighbor.device
            )))
    }
}

/// Per-interface counters of /proc/<pid>/net/dev (the network namespace
/// of `pid`; the agent's own when `pid` is 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceCounters {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

pub fn parse_net_dev(text: &str) -> Vec<InterfaceCounters> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let values: Vec<u64> = counters
                .split_whitespace()
                .map(|value| value.parse().unwrap_or(0))
                .collect();
            let get = |index: usize| values.get(index).copied().unwrap_or(0);
            Some(InterfaceCounters {
                name: name.trim().to_owned(),
                rx_bytes: get(0),
                rx_packets: get(1),
                rx_errors: get(2),
                rx_dropped: get(3),
                tx_bytes: get(8),
                tx_packets: get(9),
                tx_errors: get(10),
                tx_dropped: get(11),
            })
        })
        .collect()
}

pub fn interface_counters(pid: u32) -> Vec<InterfaceCounters> {
    let path = if pid == 0 {
        "/proc/self/net/dev".to_owned()
    } else {
        format!("/proc/{pid}/net/dev")
    };
    std::fs::read_to_string(path)
        .map(|text| parse_net_dev(&text))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_cidrs_parse_strictly() {
        assert_eq!(
            parse_mac("02:00:0a:FF:00:01").unwrap(),
            vec![2, 0, 10, 255, 0, 1]
        );
        for bad in [
            "",
            "02:00",
            "02:00:00:00:00:0g",
            "2:0:0:0:0:1",
            "02:00:00:00:00:01:02",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_cidr("a", "10.0.0.2/24").unwrap(),
            ("10.0.0.2".parse().unwrap(), 24)
        );
        assert_eq!(parse_cidr("a", "fd00::1/64").unwrap().1, 64);
        assert!(parse_cidr("a", "10.0.0.2").is_err());
        assert!(parse_cidr("a", "10.0.0.2/33").is_err());
        let err = parse_cidr("addresses", "x/1").unwrap_err();
        assert_eq!(err.grpc_code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("addresses"));
    }

    #[test]
    fn net_dev_counters_parse() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
                    face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
                    lo:    1234      10    0    0    0     0          0         0     1234      10    0    0    0     0       0          0\n  \
                    eth0: 5 1 2 3 0 0 0 0 6 7 8 9 0 0 0 0\n";
        let counters = parse_net_dev(text);
        assert_eq!(counters.len(), 2);
        assert_eq!(counters[0].name, "lo");
        assert_eq!(counters[0].rx_bytes, 1234);
        assert_eq!(
            counters[1],
            InterfaceCounters {
                name: "eth0".into(),
                rx_bytes: 5,
                rx_packets: 1,
                rx_errors: 2,
                rx_dropped: 3,
                tx_bytes: 6,
                tx_packets: 7,
                tx_errors: 8,
                tx_dropped: 9,
            }
        );
    }
}
