//! The rtnetlink work done inside the pod's netns: read the pod interface,
//! create the tap, install the redirects, and undo it.
//!
//! Runs on the thread [`super::netns::run_in_netns`] moved into the netns,
//! under a current-thread runtime, so the netlink socket and /dev/net/tun
//! are opened in that netns.

use super::shaper::{Bandwidth, Tbf, TBF_KIND};
use super::{guard, tap, GuestInterface, GuestRoute, NetworkError, PodNetwork, TapOwner};
use futures_util::StreamExt;
use futures_util::TryStreamExt;
use rtnetlink::packet_core::{
    DefaultNla, NetlinkMessage, NetlinkPayload, Nla, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
    TcActionOption, TcActionType, TcAttribute, TcBpfFlags, TcFilterBpf, TcFilterBpfOption,
    TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Selector,
    TcU32SelectorFlags,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// `parent ffff:` in tc's words: the ingress qdisc.
const INGRESS_PARENT: u32 = 0xffff_0000;

pub(super) fn attach(
    netns: &Path,
    tap: &str,
    owner: TapOwner,
    bandwidth: Bandwidth,
) -> Result<PodNetwork, NetworkError> {
    with_netlink(netns, |netlink| async move {
        netlink.attach(tap, owner, bandwidth).await
    })
}

pub(super) fn detach(netns: &Path, tap: &str, veth: &str) -> Result<(), NetworkError> {
    with_netlink(
        netns,
        |netlink| async move { netlink.detach(tap, veth).await },
    )
}

fn with_netlink<'a, T, F, Fut>(netns: &'a Path, work: F) -> Result<T, NetworkError>
where
    F: FnOnce(Netlink<'a>) -> Fut,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| NetworkError::Thread {
            netns: netns.to_owned(),
            source,
        })?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetworkError::Netlink {
                netns: netns.to_owned(),
                step: "opening a netlink socket".into(),
                source,
            })?;
        tokio::spawn(connection);
        work(Netlink { handle, netns }).await
    })
}

struct Netlink<'a> {
    handle: Handle,
    netns: &'a Path,
}

/// What the pod-interface choice needs to know of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LinkSummary {
    index: u32,
    name: String,
    ethernet: bool,
    loopback: bool,
    has_address: bool,
}

impl Netlink<'_> {
    fn netlink_error(
        &self,
        step: impl Into<String>,
    ) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
        let netns = self.netns.to_owned();
        let step = step.into();
        move |err| NetworkError::Netlink {
            netns,
            step,
            source: netlink_io_error(&err),
        }
    }

    async fn links(&self) -> Result<Vec<LinkMessage>, NetworkError> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(self.netlink_error("listing links"))
    }

    async fn addresses(&self) -> Result<Vec<AddressMessage>, NetworkError> {
        self.handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(self.netlink_error("listing addresses"))
    }

    async fn routes(&self) -> Result<Vec<RouteMessage>, NetworkError> {
        let mut routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(self.netlink_error("listing IPv4 routes"))?;
        // A netns with IPv6 disabled answers with an empty dump.
        let v6: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(self.netlink_error("listing IPv6 routes"))?;
        routes.extend(v6);
        Ok(routes)
    }

    async fn attach(
        &self,
        tap: &str,
        owner: TapOwner,
        bandwidth: Bandwidth,
    ) -> Result<PodNetwork, NetworkError> {
        let links = self.links().await?;
        let addresses = self.addresses().await?;
        let mut guest_addresses: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for message in &addresses {
            if let Some(cidr) = guest_address(message) {
                guest_addresses
                    .entry(message.header.index)
                    .or_default()
                    .push(cidr);
            }
        }
        let summaries: Vec<LinkSummary> = links
            .iter()
            .map(|link| LinkSummary {
                index: link.header.index,
                name: link_name(link),
                ethernet: link.header.link_layer_type == LinkLayerType::Ether,
                loopback: link.header.flags.contains(LinkFlags::Loopback),
                has_address: guest_addresses.contains_key(&link.header.index),
            })
            .collect();
        let pod = pick_pod_link(self.netns, tap, &summaries)?.clone();
        let pod_link = links
            .iter()
            .find(|link| link.header.index == pod.index)
            .ok_or_else(|| NetworkError::NoInterface {
                netns: self.netns.to_owned(),
                tap: tap.to_owned(),
                found: pod.name.clone(),
            })?;
        let addresses = guest_addresses.remove(&pod.index).unwrap_or_default();
        if addresses.is_empty() {
            return Err(NetworkError::NoAddress {
                netns: self.netns.to_owned(),
                interface: pod.name,
            });
        }
        let mac_bytes = link_mac(pod_link).ok_or_else(|| NetworkError::NoMac {
            netns: self.netns.to_owned(),
            interface: pod.name.clone(),
        })?;
        let mac = format_mac(&mac_bytes);
        let mtu = link_mtu(pod_link).unwrap_or(1500);
        let mut routes: Vec<GuestRoute> = self
            .routes()
            .await?
            .iter()
            .filter_map(|route| guest_route(route, pod.index, &pod.name))
            .collect();
        // On-link routes first: a gateway must be reachable before a route
        // through it can be added.
        routes.sort_by_key(|route| !route.gateway.is_empty());

        let tap_index = self.ensure_tap(tap, owner, &links).await?;
        for (index, name) in [(tap_index, tap), (pod.index, pod.name.as_str())] {
            let message = if index == tap_index {
                LinkUnspec::new_with_index(index).mtu(mtu).up().build()
            } else {
                LinkUnspec::new_with_index(index).up().build()
            };
            self.handle
                .link()
                .set(message)
                .execute()
                .await
                .map_err(self.netlink_error(format!("setting {name} up (MTU {mtu})")))?;
        }
        self.ensure_redirect(pod.index, &pod.name, tap_index, tap)
            .await?;
        let rules = guard::allow_rules(mac_bytes, &addresses);
        self.ensure_guarded_redirect(tap_index, tap, pod.index, &pod.name, &rules)
            .await?;
        // The guest receives through the tap's egress and sends through
        // the veth's.
        self.shape(tap_index, tap, bandwidth.guest_rx_bytes_per_second)
            .await?;
        self.shape(pod.index, &pod.name, bandwidth.guest_tx_bytes_per_second)
            .await?;
        tracing::info!(
            netns = %self.netns.display(),
            interface = %pod.name,
            %tap,
            %mac,
            mtu,
            guest_rx_bytes_per_second = bandwidth.guest_rx_bytes_per_second,
            guest_tx_bytes_per_second = bandwidth.guest_tx_bytes_per_second,
            "pod interface redirected to the tap"
        );
        Ok(PodNetwork {
            netns: self.netns.to_owned(),
            tap: tap.to_owned(),
            interface: GuestInterface {
                name: pod.name,
                mac,
                mtu,
                addresses,
            },
            routes,
        })
    }

    /// Creates the persistent tap unless it exists; returns its index.
    async fn ensure_tap(
        &self,
        tap: &str,
        owner: TapOwner,
        links: &[LinkMessage],
    ) -> Result<u32, NetworkError> {
        if let Some(existing) = links.iter().find(|link| link_name(link) == tap) {
            return if is_tap(existing) {
                Ok(existing.header.index)
            } else {
                Err(NetworkError::TapNameTaken {
                    netns: self.netns.to_owned(),
                    tap: tap.to_owned(),
                })
            };
        }
        tap::create_persistent_tap(tap, owner).map_err(|(step, source)| NetworkError::Tap {
            netns: self.netns.to_owned(),
            tap: tap.to_owned(),
            step,
            source,
        })?;
        self.links()
            .await?
            .iter()
            .find(|link| link_name(link) == tap)
            .map(|link| link.header.index)
            .ok_or_else(|| NetworkError::Tap {
                netns: self.netns.to_owned(),
                tap: tap.to_owned(),
                step: "finding the new tap",
                source: std::io::Error::from_raw_os_error(libc::ENODEV),
            })
    }

    /// Makes the ingress of `from` redirect everything to the egress of
    /// `to`, with nothing else there. Leaves a correct setup untouched, so a
    /// second attach does not drop frames.
    async fn ensure_redirect(
        &self,
        from: u32,
        from_name: &str,
        to: u32,
        to_name: &str,
    ) -> Result<(), NetworkError> {
        let from_tc = tc_index(from);
        let filters = self.ingress_filters(from).await;
        let targets: Vec<u32> = filters.iter().flat_map(redirect_targets).collect();
        if !targets.is_empty() && targets.iter().all(|target| *target == to) {
            return Ok(());
        }
        self.fresh_ingress_qdisc(from, from_name).await?;
        self.handle
            .traffic_filter(from_tc)
            .add()
            .parent(INGRESS_PARENT)
            // tcm_info carries the protocol in network byte order.
            .protocol((libc::ETH_P_ALL as u16).to_be())
            .redirect(to)
            .map_err(self.netlink_error(format!("building the {from_name} → {to_name} filter")))?
            .execute()
            .await
            .map_err(self.netlink_error(format!(
                "adding the {from_name} → {to_name} redirect filter"
            )))
    }

    /// Makes the ingress of the tap `from` pass to `to` only what `rules`
    /// allow and drop the rest ([`guard`]). Leaves exactly that setup
    /// untouched, so a second attach does not drop frames.
    async fn ensure_guarded_redirect(
        &self,
        from: u32,
        from_name: &str,
        to: u32,
        to_name: &str,
        rules: &[guard::AllowRule],
    ) -> Result<(), NetworkError> {
        let from_tc = tc_index(from);
        let filters = self.ingress_filters(from).await;
        if installed_guard_matches(&filters, to, rules) {
            return Ok(());
        }
        self.fresh_ingress_qdisc(from, from_name).await?;
        for rule in rules {
            let mut selector = TcU32Selector::default();
            selector.flags = TcU32SelectorFlags::Terminal;
            selector.nkeys = u8::try_from(rule.keys.len()).unwrap_or(u8::MAX);
            selector.keys = rule.keys.clone();
            self.handle
                .traffic_filter(from_tc)
                .add()
                .parent(INGRESS_PARENT)
                .priority(rule.priority)
                .protocol(rule.protocol.to_be())
                .u32(&[
                    TcFilterU32Option::Selector(selector),
                    TcFilterU32Option::Action(vec![redirect_action(to)]),
                ])
                .map_err(self.netlink_error(format!("building a {from_name} → {to_name} filter")))?
                .execute()
                .await
                .map_err(self.netlink_error(format!(
                    "adding a {from_name} → {to_name} filter (protocol {:#06x})",
                    rule.protocol
                )))?;
        }
        self.add_drop_filter(from, from_name).await
    }

    /// `tc filter add dev FROM ingress prio 100 protocol all bpf da
    /// bytecode '1,6 0 0 2'`: drops what no earlier filter took. Classic
    /// BPF in direct-action mode, because `act_gact` (`action drop`) is not
    /// in every kernel (these hosts' lacks it) while cls_bpf is; rtnetlink
    /// has no builder for it, so the message is made here.
    async fn add_drop_filter(&self, from: u32, from_name: &str) -> Result<(), NetworkError> {
        let mut message = TcMessage::with_index(tc_index(from));
        message.header.parent = TcHandle::from(INGRESS_PARENT);
        message.header.info = u32::from(TcHandle {
            major: guard::PRIORITY_DROP,
            minor: guard::ETH_P_ALL.to_be(),
        });
        message.attributes = vec![
            TcAttribute::Kind(TcFilterBpf::KIND.to_string()),
            TcAttribute::Options(vec![
                TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
                TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(
                    TCA_BPF_OPS_LEN,
                    1u16.to_ne_bytes().to_vec(),
                ))),
                TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(
                    TCA_BPF_OPS,
                    DROP_PROGRAM.to_vec(),
                ))),
            ]),
        ];
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewTrafficFilter(message));
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        self.send(request, format!("adding the {from_name} drop filter"))
            .await
    }

    /// Caps the egress of `index` at `bytes_per_second` with a tbf root
    /// qdisc (replacing the root qdisc); 0 removes a tbf cap left from
    /// before and leaves any other root qdisc alone.
    async fn shape(
        &self,
        index: u32,
        name: &str,
        bytes_per_second: u64,
    ) -> Result<(), NetworkError> {
        if bytes_per_second == 0 {
            return self.remove_shaping(index, name).await;
        }
        let tbf = Tbf::for_rate(bytes_per_second);
        let mut message = TcMessage::with_index(tc_index(index));
        message.header.parent = TcHandle::ROOT;
        message.attributes = vec![
            TcAttribute::Kind(TBF_KIND.to_string()),
            TcAttribute::Options(
                tbf.attributes()
                    .into_iter()
                    .map(|(kind, value)| TcOption::Other(DefaultNla::new(kind, value)))
                    .collect(),
            ),
        ];
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(message));
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        self.send(
            request,
            format!("capping {name} at {bytes_per_second} bytes/s (tbf)"),
        )
        .await
    }

    /// Deletes the root qdisc of `index` if it is a tbf (ours).
    async fn remove_shaping(&self, index: u32, name: &str) -> Result<(), NetworkError> {
        let qdiscs: Vec<TcMessage> = self
            .handle
            .qdisc()
            .get()
            .index(tc_index(index))
            .execute()
            .try_collect()
            .await
            .unwrap_or_default();
        let shaped = qdiscs.iter().any(|qdisc| {
            qdisc.header.index == tc_index(index)
                && qdisc.header.parent == TcHandle::ROOT
                && qdisc
                    .attributes
                    .iter()
                    .any(|a| matches!(a, TcAttribute::Kind(kind) if kind == TBF_KIND))
        });
        if !shaped {
            return Ok(());
        }
        let mut request = self.handle.qdisc().del(tc_index(index));
        request.message_mut().header.parent = TcHandle::ROOT;
        match request.execute().await {
            Ok(()) => Ok(()),
            Err(err) if is_absent(&err) => Ok(()),
            Err(err) => Err(self.netlink_error(format!("removing the cap on {name}"))(
                err,
            )),
        }
    }

    /// Sends one request built here and waits for its acknowledgement.
    async fn send(
        &self,
        request: NetlinkMessage<RouteNetlinkMessage>,
        step: String,
    ) -> Result<(), NetworkError> {
        let mut handle = self.handle.clone();
        let mut responses = handle
            .request(request)
            .map_err(self.netlink_error(step.clone()))?;
        while let Some(response) = responses.next().await {
            if let NetlinkPayload::Error(err) = response.payload {
                return Err(self.netlink_error(step)(rtnetlink::Error::NetlinkError(
                    err,
                )));
            }
        }
        Ok(())
    }

    /// The ingress filters of `index`; none (no ingress qdisc yet, or a
    /// failed dump) means the caller rebuilds.
    async fn ingress_filters(&self, index: u32) -> Vec<TcMessage> {
        self.handle
            .traffic_filter(tc_index(index))
            .get()
            .ingress()
            .execute()
            .try_collect()
            .await
            .unwrap_or_default()
    }

    /// Replaces the ingress qdisc of `index` (and its filters) by an empty
    /// one.
    async fn fresh_ingress_qdisc(&self, index: u32, name: &str) -> Result<(), NetworkError> {
        self.delete_ingress_qdisc(index, name).await?;
        self.handle
            .qdisc()
            .add(tc_index(index))
            .ingress()
            .execute()
            .await
            .map_err(self.netlink_error(format!("adding an ingress qdisc to {name}")))
    }

    /// Deletes the ingress qdisc of `index` and with it its filters; none
    /// there is fine.
    async fn delete_ingress_qdisc(&self, index: u32, name: &str) -> Result<(), NetworkError> {
        let mut request = self.handle.qdisc().del(tc_index(index));
        request.message_mut().header.parent = TcHandle::INGRESS;
        request.message_mut().header.handle = TcHandle::from(INGRESS_PARENT);
        match request.execute().await {
            Ok(()) => Ok(()),
            Err(err) if is_absent(&err) => Ok(()),
            Err(err) => Err(self
                .netlink_error(format!("deleting the ingress qdisc of {name}"))(
                err
            )),
        }
    }

    async fn detach(&self, tap: &str, veth: &str) -> Result<(), NetworkError> {
        let links = self.links().await?;
        if let Some(link) = links.iter().find(|link| link_name(link) == tap) {
            if is_tap(link) {
                // RTM_DELLINK removes a persistent tap even while a VMM still
                // holds it open, unlike TUNSETPERSIST 0.
                match self.handle.link().del(link.header.index).execute().await {
                    Ok(()) => {}
                    Err(err) if is_absent(&err) => {}
                    Err(err) => return Err(self.netlink_error(format!("deleting tap {tap}"))(err)),
                }
            } else {
                tracing::warn!(netns = %self.netns.display(), %tap, "not deleting: this link is not a tap");
            }
        }
        if let Some(link) = links.iter().find(|link| link_name(link) == veth) {
            self.delete_ingress_qdisc(link.header.index, veth).await?;
            self.remove_shaping(link.header.index, veth).await?;
        }
        Ok(())
    }
}

/// tc takes ifindexes as i32; the kernel's are positive i32s anyway.
fn tc_index(index: u32) -> i32 {
    i32::try_from(index).unwrap_or(i32::MAX)
}

fn netlink_io_error(err: &rtnetlink::Error) -> std::io::Error {
    match err {
        rtnetlink::Error::NetlinkError(message) => message.to_io(),
        other => std::io::Error::other(other.to_string()),
    }
}

/// "Already gone" answers to a delete.
fn is_absent(err: &rtnetlink::Error) -> bool {
    matches!(
        netlink_io_error(err).raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::EINVAL)
    )
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

fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Address(bytes) => bytes.as_slice().try_into().ok(),
            _ => None,
        })
}

fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
}

/// A tun-driver link in tap (Ethernet) mode.
fn is_tap(link: &LinkMessage) -> bool {
    link.header.link_layer_type == LinkLayerType::Ether
        && link.attributes.iter().any(|attribute| {
            matches!(attribute, LinkAttribute::LinkInfo(infos)
                if infos.iter().any(|info| matches!(info, LinkInfo::Kind(InfoKind::Tun))))
        })
}

fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The pod interface: the only Ethernet link other than the tap, or among
/// several, the only one with an address (fallback devices such as
/// `gretap0` exist in every netns once their module is loaded).
fn pick_pod_link<'a>(
    netns: &Path,
    tap: &str,
    links: &'a [LinkSummary],
) -> Result<&'a LinkSummary, NetworkError> {
    let candidates: Vec<&LinkSummary> = links
        .iter()
        .filter(|link| link.ethernet && !link.loopback && link.name != tap)
        .collect();
    let names = |links: &[&LinkSummary]| {
        links
            .iter()
            .map(|link| link.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match candidates.as_slice() {
        [only] => Ok(only),
        [] => Err(NetworkError::NoInterface {
            netns: netns.to_owned(),
            tap: tap.to_owned(),
            found: links
                .iter()
                .map(|link| link.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
        several => {
            let addressed: Vec<&LinkSummary> = several
                .iter()
                .copied()
                .filter(|link| link.has_address)
                .collect();
            match addressed.as_slice() {
                [only] => Ok(only),
                _ => Err(NetworkError::SeveralInterfaces {
                    netns: netns.to_owned(),
                    candidates: names(several),
                }),
            }
        }
    }
}

/// "10.88.0.5/16" for an address the guest should carry; None for IPv6
/// link-local ones, which the guest kernel makes itself.
fn guest_address(message: &AddressMessage) -> Option<String> {
    let find = |local: bool| {
        message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                AddressAttribute::Local(address) if local => Some(*address),
                AddressAttribute::Address(address) if !local => Some(*address),
                _ => None,
            })
    };
    // For IPv4, IFA_LOCAL is the interface's own address (IFA_ADDRESS is the
    // peer on point-to-point links); IPv6 has only IFA_ADDRESS.
    let address = match message.header.family {
        AddressFamily::Inet => find(true).or_else(|| find(false))?,
        AddressFamily::Inet6 => find(false)?,
        _ => return None,
    };
    match address {
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => None,
        _ => Some(format!("{address}/{}", message.header.prefix_len)),
    }
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The guest's copy of a route through the pod interface (`index`), or None
/// for routes it must not get: other tables, other devices, non-unicast,
/// multipath, and `proto kernel` ones that the guest kernel makes when the
/// address is added.
fn guest_route(route: &RouteMessage, index: u32, device: &str) -> Option<GuestRoute> {
    let header = &route.header;
    let mut table = u32::from(header.table);
    let mut oif = None;
    let mut destination = None;
    let mut gateway = None;
    let mut source = None;
    let mut metric = 0;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Table(id) => table = *id,
            RouteAttribute::Oif(id) => oif = Some(*id),
            RouteAttribute::Destination(address) => destination = route_ip(address),
            RouteAttribute::Gateway(address) => gateway = route_ip(address),
            RouteAttribute::PrefSource(address) => source = route_ip(address),
            RouteAttribute::Priority(priority) => metric = *priority,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || header.kind != RouteType::Unicast
        || header.protocol == RouteProtocol::Kernel
        || oif != Some(index)
    {
        return None;
    }
    let prefix = header.destination_prefix_length;
    let destination = match (header.address_family, destination) {
        (AddressFamily::Inet, _) if prefix == 0 => "default".to_owned(),
        (AddressFamily::Inet6, _) if prefix == 0 => "::/0".to_owned(),
        (_, Some(address)) => format!("{address}/{prefix}"),
        (_, None) => return None,
    };
    let text = |address: Option<IpAddr>| address.map(|a| a.to_string()).unwrap_or_default();
    Some(GuestRoute {
        destination,
        gateway: text(gateway),
        device: device.to_owned(),
        source: text(source),
        metric,
    })
}

/// `action mirred egress redirect dev <to>`.
fn redirect_action(to: u32) -> TcAction {
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    action
}

/// cls_bpf's attributes for a classic BPF program (linux/pkt_cls.h).
const TCA_BPF_OPS_LEN: u16 = 4;
const TCA_BPF_OPS: u16 = 5;
/// One `struct sock_filter`, `ret #TC_ACT_SHOT`: {code BPF_RET|BPF_K
/// (0x06), jt 0, jf 0, k 2}.
const DROP_PROGRAM: [u8; 8] = {
    let code = 0x06u16.to_ne_bytes();
    let k = 2u32.to_ne_bytes();
    [code[0], code[1], 0, 0, k[0], k[1], k[2], k[3]]
};

/// Whether a dumped filter is the drop filter [`Netlink::add_drop_filter`]
/// makes: cls_bpf running exactly [`DROP_PROGRAM`].
fn is_drop_filter(message: &TcMessage) -> bool {
    let kind_is_bpf = message
        .attributes
        .iter()
        .any(|a| matches!(a, TcAttribute::Kind(kind) if kind == TcFilterBpf::KIND));
    let runs_drop = message.attributes.iter().any(|attribute| {
        let TcAttribute::Options(options) = attribute else {
            return false;
        };
        options.iter().any(|option| {
            let TcOption::Bpf(TcFilterBpfOption::Other(nla)) = option else {
                return false;
            };
            let mut value = vec![0u8; nla.value_len()];
            nla.emit_value(&mut value);
            nla.kind() == TCA_BPF_OPS && value == DROP_PROGRAM
        })
    });
    kind_is_bpf && runs_drop
}

/// A u32 selector's keys as `(off, mask, val)`, sorted.
type KeyList = Vec<(i32, u32, u32)>;

/// The u32 filters of a dump, each as its keys and its redirect targets.
fn u32_filters(filters: &[TcMessage]) -> Vec<(KeyList, Vec<u32>)> {
    let mut found = Vec::new();
    for message in filters {
        let mut keys = None;
        for attribute in &message.attributes {
            let TcAttribute::Options(options) = attribute else {
                continue;
            };
            for option in options {
                if let TcOption::U32(TcFilterU32Option::Selector(selector)) = option {
                    let mut list: Vec<_> = selector
                        .keys
                        .iter()
                        .map(|k| (k.off, k.mask, k.val))
                        .collect();
                    list.sort_unstable();
                    keys = Some(list);
                }
            }
        }
        // Hash-table entries of the dump have no selector: not filters.
        if let Some(keys) = keys {
            found.push((keys, redirect_targets(message)));
        }
    }
    found
}

/// Whether the dump is exactly the guard for `rules` redirecting to `to`:
/// the allow rules' keys (as a multiset), nothing else redirecting, and
/// one drop filter.
fn installed_guard_matches(filters: &[TcMessage], to: u32, rules: &[guard::AllowRule]) -> bool {
    let found = u32_filters(filters);
    let mut allowed: Vec<KeyList> = found
        .iter()
        .filter(|(_, targets)| targets == &[to])
        .map(|(keys, _)| keys.clone())
        .collect();
    let drops = filters.iter().filter(|m| is_drop_filter(m)).count();
    let mut wanted: Vec<KeyList> = rules
        .iter()
        .map(|rule| {
            let mut keys: Vec<_> = rule.keys.iter().map(|k| (k.off, k.mask, k.val)).collect();
            keys.sort_unstable();
            keys
        })
        .collect();
    allowed.sort();
    wanted.sort();
    drops == 1 && found.len() == rules.len() && allowed == wanted
}

/// The ifindexes a filter dump message redirects to with mirred.
fn redirect_targets(message: &TcMessage) -> Vec<u32> {
    let mut targets = Vec::new();
    for attribute in &message.attributes {
        let TcAttribute::Options(options) = attribute else {
            continue;
        };
        for option in options {
            let TcOption::U32(TcFilterU32Option::Action(actions)) = option else {
                continue;
            };
            for action in actions {
                for action_attribute in &action.attributes {
                    let TcActionAttribute::Options(action_options) = action_attribute else {
                        continue;
                    };
                    for action_option in action_options {
                        if let TcActionOption::Mirror(TcActionMirrorOption::Parms(mirror)) =
                            action_option
                        {
                            if mirror.eaction == TcMirrorActionType::EgressRedir {
                                targets.push(mirror.ifindex);
                            }
                        }
                    }
                }
            }
        }
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::RouteScope;
    use rtnetlink::packet_route::tc::TcFilterU32;

    fn summary(index: u32, name: &str, ethernet: bool, has_address: bool) -> LinkSummary {
        LinkSummary {
            index,
            name: name.into(),
            ethernet,
            loopback: name == "lo",
            has_address,
        }
    }

    #[test]
    fn the_pod_link_is_the_one_ethernet_link_that_is_not_the_tap() {
        let netns = Path::new("/run/netns/x");
        let links = [
            summary(1, "lo", false, true),
            summary(2, "tunl0", false, false),
            summary(3, "eth0", true, true),
            summary(4, "tap0", true, false),
        ];
        assert_eq!(pick_pod_link(netns, "tap0", &links).unwrap().name, "eth0");
        // Without an address it is still picked; attach then says so.
        let links = [
            summary(1, "lo", false, true),
            summary(3, "eth0", true, false),
        ];
        assert_eq!(pick_pod_link(netns, "tap0", &links).unwrap().index, 3);
        // A fallback gretap0 without address does not make it ambiguous.
        let links = [
            summary(3, "gretap0", true, false),
            summary(4, "eth0", true, true),
        ];
        assert_eq!(pick_pod_link(netns, "tap0", &links).unwrap().name, "eth0");
    }

    #[test]
    fn zero_or_several_pod_links_are_errors_that_name_what_was_found() {
        let netns = Path::new("/run/netns/x");
        let links = [
            summary(1, "lo", false, true),
            summary(2, "tap0", true, false),
        ];
        let err = pick_pod_link(netns, "tap0", &links).unwrap_err();
        assert!(matches!(err, NetworkError::NoInterface { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("/run/netns/x") && text.contains("lo, tap0"),
            "{text}"
        );
        let links = [
            summary(2, "eth0", true, true),
            summary(3, "eth1", true, true),
        ];
        let err = pick_pod_link(netns, "tap0", &links).unwrap_err();
        assert!(err.to_string().contains("eth0, eth1"), "{err}");
    }

    fn address(
        family: AddressFamily,
        prefix: u8,
        attributes: Vec<AddressAttribute>,
    ) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.family = family;
        message.header.prefix_len = prefix;
        message.attributes = attributes;
        message
    }

    #[test]
    fn addresses_become_cidrs_without_link_local_ipv6() {
        let v4 = address(
            AddressFamily::Inet,
            24,
            vec![
                AddressAttribute::Address("10.0.0.9".parse().unwrap()),
                AddressAttribute::Local("10.0.0.2".parse().unwrap()),
            ],
        );
        assert_eq!(guest_address(&v4).as_deref(), Some("10.0.0.2/24"));
        let v6 = address(
            AddressFamily::Inet6,
            64,
            vec![AddressAttribute::Address("fd00::2".parse().unwrap())],
        );
        assert_eq!(guest_address(&v6).as_deref(), Some("fd00::2/64"));
        let link_local = address(
            AddressFamily::Inet6,
            64,
            vec![AddressAttribute::Address("fe80::1".parse().unwrap())],
        );
        assert_eq!(guest_address(&link_local), None);
        assert_eq!(
            guest_address(&address(AddressFamily::Inet, 24, vec![])),
            None
        );
    }

    fn route(
        family: AddressFamily,
        prefix: u8,
        protocol: RouteProtocol,
        attributes: Vec<RouteAttribute>,
    ) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.address_family = family;
        message.header.destination_prefix_length = prefix;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = protocol;
        message.header.scope = RouteScope::Universe;
        message.header.kind = RouteType::Unicast;
        message.attributes = attributes;
        message
    }

    fn v4(text: &str) -> RouteAddress {
        RouteAddress::Inet(text.parse().unwrap())
    }

    #[test]
    fn routes_are_converted_and_kernel_or_foreign_ones_dropped() {
        let default = route(
            AddressFamily::Inet,
            0,
            RouteProtocol::Boot,
            vec![
                RouteAttribute::Gateway(v4("10.0.0.1")),
                RouteAttribute::Oif(3),
                RouteAttribute::Priority(100),
                RouteAttribute::PrefSource(v4("10.0.0.2")),
            ],
        );
        assert_eq!(
            guest_route(&default, 3, "eth0"),
            Some(GuestRoute {
                destination: "default".into(),
                gateway: "10.0.0.1".into(),
                device: "eth0".into(),
                source: "10.0.0.2".into(),
                metric: 100,
            })
        );
        let on_link = route(
            AddressFamily::Inet,
            32,
            RouteProtocol::Static,
            vec![
                RouteAttribute::Destination(v4("169.254.1.1")),
                RouteAttribute::Oif(3),
            ],
        );
        let converted = guest_route(&on_link, 3, "eth0").unwrap();
        assert_eq!(converted.destination, "169.254.1.1/32");
        assert_eq!(converted.gateway, "");
        let v6_default = route(
            AddressFamily::Inet6,
            0,
            RouteProtocol::Ra,
            vec![
                RouteAttribute::Gateway(RouteAddress::Inet6("fe80::1".parse().unwrap())),
                RouteAttribute::Oif(3),
            ],
        );
        assert_eq!(
            guest_route(&v6_default, 3, "eth0").unwrap().destination,
            "::/0"
        );

        let subnet = route(
            AddressFamily::Inet,
            24,
            RouteProtocol::Kernel,
            vec![
                RouteAttribute::Destination(v4("10.0.0.0")),
                RouteAttribute::Oif(3),
            ],
        );
        assert_eq!(guest_route(&subnet, 3, "eth0"), None);
        assert_eq!(guest_route(&default, 4, "eth0"), None, "other device");
        let mut other_table = default.clone();
        other_table.attributes.push(RouteAttribute::Table(100));
        assert_eq!(guest_route(&other_table, 3, "eth0"), None);
        let mut local = default.clone();
        local.header.kind = RouteType::Local;
        assert_eq!(guest_route(&local, 3, "eth0"), None);
        let mut multipath = default;
        multipath
            .attributes
            .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
        assert_eq!(guest_route(&multipath, 3, "eth0"), None);
    }

    #[test]
    fn redirect_targets_are_read_from_u32_mirred_filters() {
        let mut mirror = TcMirror::default();
        mirror.generic = TcActionGeneric::default();
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = 7;
        let mut action = TcAction::default();
        action.attributes = vec![
            TcActionAttribute::Kind(TcActionMirror::KIND.into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                mirror.clone(),
            ))]),
        ];
        let mut message = TcMessage::default();
        message.attributes = vec![
            TcAttribute::Kind(TcFilterU32::KIND.into()),
            TcAttribute::Options(vec![TcOption::U32(TcFilterU32Option::Action(vec![action]))]),
        ];
        assert_eq!(redirect_targets(&message), vec![7]);
        // A mirror (copy) is not a redirect.
        mirror.eaction = TcMirrorActionType::EgressMirror;
        if let TcAttribute::Options(options) = &mut message.attributes[1] {
            if let TcOption::U32(TcFilterU32Option::Action(actions)) = &mut options[0] {
                actions[0].attributes[1] =
                    TcActionAttribute::Options(vec![TcActionOption::Mirror(
                        TcActionMirrorOption::Parms(mirror),
                    )]);
            }
        }
        assert!(redirect_targets(&message).is_empty());
        assert!(redirect_targets(&TcMessage::default()).is_empty());
    }

    #[test]
    fn macs_print_lowercase_with_colons() {
        assert_eq!(
            format_mac(&[0x0a, 0x58, 0xAB, 0, 1, 0xff]),
            "0a:58:ab:00:01:ff"
        );
    }
}
