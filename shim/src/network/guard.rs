//! What the guest may send: the tap's ingress passes a frame to the pod's
//! veth only when it comes from the pod's MAC and, for IPv4, ARP and IPv6,
//! from one of the pod's addresses; everything else is dropped. Without
//! this, `mirred` forwards the guest's frames raw, and a guest (root in its
//! VM, NET_RAW or not) could spoof MAC, IP and ARP on the CNI bridge.
//!
//! The rules are `u32` keys (offsets from the network header, as the
//! ingress hook sees it; the Ethernet header is at -14), built here as data
//! so they are tested without a netns; [`super::link`] installs them.
//! IPv6 also passes link-local (`fe80::/10`) and unspecified (`::`, for
//! duplicate address detection) sources, from the pod's MAC only: neither
//! can pose as another pod.

use rtnetlink::packet_route::tc::TcU32Key;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub(super) const ETH_P_IP: u16 = 0x0800;
pub(super) const ETH_P_ARP: u16 = 0x0806;
pub(super) const ETH_P_IPV6: u16 = 0x86dd;
pub(super) const ETH_P_ALL: u16 = 0x0003;

/// tc priorities: the allow rules first, then the drop of the rest.
const PRIORITY_IPV4: u16 = 1;
const PRIORITY_ARP: u16 = 2;
const PRIORITY_IPV6: u16 = 3;
pub(super) const PRIORITY_DROP: u16 = 100;

/// One allow rule: frames of `protocol` whose keys all match go to the veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AllowRule {
    pub priority: u16,
    pub protocol: u16,
    pub keys: Vec<TcU32Key>,
}

/// A key on 4 bytes at `off` (aligned, as iproute2 packs them).
fn key(off: i32, bytes: [u8; 4], mask: u32) -> TcU32Key {
    let mut key = TcU32Key::default();
    key.off = off;
    key.mask = mask;
    key.val = u32::from_be_bytes(bytes) & mask;
    key
}

/// The Ethernet source, 8 bytes before the network header: a full word
/// and the high half of the next one.
fn source_mac(mac: [u8; 6]) -> [TcU32Key; 2] {
    [
        key(-8, [mac[0], mac[1], mac[2], mac[3]], u32::MAX),
        key(-4, [mac[4], mac[5], 0, 0], 0xffff_0000),
    ]
}

fn ipv4_rule(mac: [u8; 6], ip: Ipv4Addr) -> AllowRule {
    let mut keys = source_mac(mac).to_vec();
    keys.push(key(12, ip.octets(), u32::MAX));
    AllowRule {
        priority: PRIORITY_IPV4,
        protocol: ETH_P_IP,
        keys,
    }
}

/// ARP for IPv4 over Ethernet: sender hardware address at 8, sender
/// protocol address at 14 (so split over the words at 12 and 16).
fn arp_rule(mac: [u8; 6], ip: Ipv4Addr) -> AllowRule {
    let [a, b, c, d] = ip.octets();
    let mut keys = source_mac(mac).to_vec();
    keys.push(key(8, [mac[0], mac[1], mac[2], mac[3]], u32::MAX));
    keys.push(key(12, [mac[4], mac[5], a, b], u32::MAX));
    keys.push(key(16, [c, d, 0, 0], 0xffff_0000));
    AllowRule {
        priority: PRIORITY_ARP,
        protocol: ETH_P_ARP,
        keys,
    }
}

/// IPv6 source at 8, `prefix_len` bits of `ip` (128: the address).
fn ipv6_rule(mac: [u8; 6], ip: Ipv6Addr, prefix_len: u32) -> AllowRule {
    let mut keys = source_mac(mac).to_vec();
    let octets = ip.octets();
    for word in 0..4u32 {
        let bits = prefix_len.saturating_sub(word * 32).min(32);
        if bits == 0 {
            break;
        }
        let start = (word * 4) as usize;
        let bytes = octets[start..start + 4].try_into().expect("4 bytes");
        keys.push(key(8 + start as i32, bytes, u32::MAX << (32 - bits)));
    }
    AllowRule {
        priority: PRIORITY_IPV6,
        protocol: ETH_P_IPV6,
        keys,
    }
}

/// The allow rules for a pod with `mac` and `addresses` (CIDRs or bare
/// addresses; the prefix is the subnet's, not the pod's, so it is ignored).
pub(super) fn allow_rules(mac: [u8; 6], addresses: &[String]) -> Vec<AllowRule> {
    let ips: Vec<IpAddr> = addresses
        .iter()
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect();
    let mut rules = Vec::new();
    for ip in &ips {
        if let IpAddr::V4(ip) = ip {
            rules.push(ipv4_rule(mac, *ip));
            rules.push(arp_rule(mac, *ip));
        }
    }
    for ip in &ips {
        if let IpAddr::V6(ip) = ip {
            rules.push(ipv6_rule(mac, *ip, 128));
        }
    }
    rules.push(ipv6_rule(
        mac,
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
    ));
    rules.push(ipv6_rule(mac, Ipv6Addr::UNSPECIFIED, 128));
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0xc7, 0x00, 0x02];

    /// Applies a rule's keys to a frame the way cls_u32 does: each key
    /// reads the big-endian word at network header + off.
    fn matches(rule: &AllowRule, frame: &[u8]) -> bool {
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        ethertype == rule.protocol
            && rule.keys.iter().all(|key| {
                let at = (14 + key.off) as usize;
                let word = u32::from_be_bytes(frame[at..at + 4].try_into().unwrap());
                word & key.mask == key.val
            })
    }

    fn passes(rules: &[AllowRule], frame: &[u8]) -> bool {
        rules.iter().any(|rule| matches(rule, frame))
    }

    fn ethernet(source: [u8; 6], ethertype: u16) -> Vec<u8> {
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&source);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame
    }

    fn ipv4(source_mac: [u8; 6], source: Ipv4Addr) -> Vec<u8> {
        let mut frame = ethernet(source_mac, ETH_P_IP);
        let mut header = [0u8; 20];
        header[0] = 0x45;
        header[12..16].copy_from_slice(&source.octets());
        header[16..20].copy_from_slice(&[10, 0, 0, 1]);
        frame.extend_from_slice(&header);
        frame
    }

    fn arp(source_mac: [u8; 6], sender_mac: [u8; 6], sender: Ipv4Addr) -> Vec<u8> {
        let mut frame = ethernet(source_mac, ETH_P_ARP);
        frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        frame.extend_from_slice(&sender_mac);
        frame.extend_from_slice(&sender.octets());
        frame.extend_from_slice(&[0; 10]);
        frame
    }

    fn ipv6(source_mac: [u8; 6], source: Ipv6Addr) -> Vec<u8> {
        let mut frame = ethernet(source_mac, ETH_P_IPV6);
        let mut header = [0u8; 40];
        header[0] = 0x60;
        header[8..24].copy_from_slice(&source.octets());
        frame.extend_from_slice(&header);
        frame
    }

    #[test]
    fn only_the_pods_mac_and_addresses_pass() {
        let pod4: Ipv4Addr = "10.199.1.2".parse().unwrap();
        let pod6: Ipv6Addr = "fd00::2".parse().unwrap();
        let rules = allow_rules(MAC, &["10.199.1.2/24".into(), "fd00::2/64".into()]);
        let other_mac = [0x02, 0x42, 0x0a, 0xc7, 0x00, 0x09];
        let other4: Ipv4Addr = "10.199.1.9".parse().unwrap();

        assert!(passes(&rules, &ipv4(MAC, pod4)));
        assert!(!passes(&rules, &ipv4(MAC, other4)), "spoofed IPv4 source");
        assert!(!passes(&rules, &ipv4(other_mac, pod4)), "spoofed MAC");

        assert!(passes(&rules, &arp(MAC, MAC, pod4)));
        assert!(
            !passes(&rules, &arp(MAC, MAC, other4)),
            "ARP for another IP"
        );
        assert!(
            !passes(&rules, &arp(MAC, other_mac, pod4)),
            "ARP sender MAC"
        );
        assert!(!passes(&rules, &arp(other_mac, other_mac, pod4)));

        assert!(passes(&rules, &ipv6(MAC, pod6)));
        assert!(passes(
            &rules,
            &ipv6(MAC, "fe80::42:aff:fec7:2".parse().unwrap())
        ));
        assert!(passes(&rules, &ipv6(MAC, Ipv6Addr::UNSPECIFIED)));
        assert!(!passes(&rules, &ipv6(MAC, "fd00::9".parse().unwrap())));
        assert!(!passes(&rules, &ipv6(MAC, "fec0::1".parse().unwrap())));
        assert!(!passes(&rules, &ipv6(other_mac, pod6)));

        // Any other protocol has no allow rule at all (a VLAN tag, say).
        assert!(!passes(&rules, &ethernet(MAC, 0x8100)));
    }

    #[test]
    fn keys_are_aligned_words() {
        let rules = allow_rules(MAC, &["10.0.0.2/8".into(), "2001:db8::1/64".into()]);
        for rule in &rules {
            for key in &rule.keys {
                assert_eq!(key.off % 4, 0, "{rule:?}");
                assert_eq!(key.val & !key.mask, 0, "{rule:?}");
            }
        }
        // IPv4: 2 rules per address; IPv6: the address, fe80::/10, ::.
        assert_eq!(rules.len(), 5);
        let link_local = &rules[3];
        assert_eq!(link_local.keys.len(), 3, "{link_local:?}");
        assert_eq!(link_local.keys[2].mask, 0xffc0_0000);
    }
}
