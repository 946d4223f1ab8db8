//! The shim's pod network: a CNI-like veth in a pod netns, attached to a
//! persistent tap with tc redirects, with real frames both ways. Needs root;
//! all traffic stays in the two namespaces each test creates (the veth's
//! peer lives in a second netns, never in the host's).

use microvm_devices::virtio::net::tap::Tap;
use microvm_devices::virtio::net::NetBackend;
use microvm_shim::network::{
    Bandwidth, GuestRoute, NetnsForChild, NetworkError, PodNetwork, TapOwner,
};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

const NETNS_DIR: &str = "/run/netns";
const POD_MAC: &str = "02:42:0a:c7:00:02";
const POD_MAC_BYTES: [u8; 6] = [0x02, 0x42, 0x0a, 0xc7, 0x00, 0x02];
const VNET_HDR_LEN: usize = 12;
const TAP: &str = "tap0";

static NEXT: AtomicU8 = AtomicU8::new(1);

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program} {args:?}: {err}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Namespaces left by a killed earlier run (their pid is gone).
fn delete_leftovers() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix("mvt-net-")
            .or_else(|| name.strip_prefix("mvt-peer-"))
        else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = run("ip", &["netns", "del", &name]);
        }
    }
}

/// A pod netns with only `lo`, and a peer netns; both deleted on drop.
struct Namespaces {
    pod: String,
    peer: String,
    subnet: u8,
}

impl Namespaces {
    fn new() -> Self {
        delete_leftovers();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let namespaces = Self {
            pod: format!("mvt-net-{pid}-{n}"),
            peer: format!("mvt-peer-{pid}-{n}"),
            subnet: n,
        };
        ok("ip", &["netns", "add", &namespaces.pod]);
        ok("ip", &["netns", "add", &namespaces.peer]);
        namespaces
    }

    /// What a CNI bridge plugin leaves: eth0 (MAC, MTU 1400,
    /// 10.199.N.2/24, default route via .1 and an on-link route), whose
    /// peer `peer0` (10.199.N.1/24) is in the peer netns.
    fn with_cni_veth() -> Self {
        let namespaces = Self::new();
        let (pod, peer) = (namespaces.pod.as_str(), namespaces.peer.as_str());
        ok(
            "ip",
            &[
                "-n", pod, "link", "add", "eth0", "address", POD_MAC, "mtu", "1400", "type",
                "veth", "peer", "name", "peer0", "mtu", "1400", "netns", peer,
            ],
        );
        let pod_cidr = format!("{}/24", namespaces.pod_ip());
        let peer_cidr = format!("{}/24", namespaces.peer_ip());
        ok("ip", &["-n", pod, "addr", "add", &pod_cidr, "dev", "eth0"]);
        ok("ip", &["-n", pod, "link", "set", "eth0", "up"]);
        ok("ip", &["-n", pod, "link", "set", "lo", "up"]);
        let gateway = namespaces.peer_ip().to_string();
        ok(
            "ip",
            &["-n", pod, "route", "add", "default", "via", &gateway],
        );
        ok(
            "ip",
            &["-n", pod, "route", "add", "192.168.77.0/24", "dev", "eth0"],
        );
        ok(
            "ip",
            &["-n", peer, "addr", "add", &peer_cidr, "dev", "peer0"],
        );
        ok("ip", &["-n", peer, "link", "set", "peer0", "up"]);
        namespaces
    }

    fn pod_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.pod)
    }

    fn peer_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.peer)
    }

    fn pod_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 199, self.subnet, 2)
    }

    fn peer_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 199, self.subnet, 1)
    }

    /// The peer knows the pod's MAC, so frames to the pod go out at once,
    /// without ARP.
    fn pin_pod_mac_on_the_peer(&self) {
        let pod_ip = self.pod_ip().to_string();
        ok(
            "ip",
            &[
                "-n",
                &self.peer,
                "neigh",
                "replace",
                &pod_ip,
                "lladdr",
                POD_MAC,
                "dev",
                "peer0",
                "nud",
                "permanent",
            ],
        );
    }

    fn tap_exists(&self) -> bool {
        run("ip", &["-n", &self.pod, "link", "show", TAP])
            .status
            .success()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.pod]);
        let _ = run("ip", &["netns", "del", &self.peer]);
    }
}

/// Runs `work` on a thread that joined `netns`.
fn in_netns<T: Send + 'static>(netns: &Path, work: impl FnOnce() -> T + Send + 'static) -> T {
    let target = NetnsForChild::open(netns).unwrap();
    std::thread::spawn(move || {
        target.enter().unwrap();
        work()
    })
    .join()
    .unwrap()
}

fn rx_packets(netns: &Path, device: &'static str) -> u64 {
    in_netns(netns, move || {
        let text = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        text.lines()
            .find_map(|line| {
                let (name, counters) = line.split_once(':')?;
                (name.trim() == device).then(|| counters.split_whitespace().nth(1)?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("{device} not in {text}"))
    })
}

/// Reads frames (virtio-net header stripped) until `wanted` accepts one.
fn read_until(tap: &mut Tap, what: &str, wanted: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65_536];
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match tap.read_frame(&mut buf) {
            Ok(len) if len > VNET_HDR_LEN => {
                let frame = buf[VNET_HDR_LEN..len].to_vec();
                if wanted(&frame) {
                    return frame;
                }
                seen.push(frame.len());
            }
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(err) => panic!("reading the tap: {err}"),
        }
    }
    panic!("no {what} on the tap within 5 s; other frames seen (lengths): {seen:?}");
}

fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&sender_mac);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    frame.extend_from_slice(&sender_mac);
    frame.extend_from_slice(&sender.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target.octets());
    frame.resize(VNET_HDR_LEN + 60, 0);
    frame
}

/// Detach removed the veth's ingress qdisc (and so its redirect).
fn assert_no_ingress_qdisc(namespaces: &Namespaces, device: &str) {
    let qdiscs = ok(
        "tc",
        &["-n", &namespaces.pod, "qdisc", "show", "dev", device],
    );
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
}

fn tc_ingress_filters(namespaces: &Namespaces, device: &str) -> String {
    ok(
        "tc",
        &[
            "-n",
            &namespaces.pod,
            "filter",
            "show",
            "dev",
            device,
            "ingress",
        ],
    )
}

#[test]
fn attach_redirects_the_pod_veth_and_a_persistent_tap_both_ways() {
    let namespaces = Namespaces::with_cni_veth();
    let network = PodNetwork::attach(&namespaces.pod_path(), TAP).unwrap();

    assert_eq!(network.tap, TAP);
    assert_eq!(network.netns, namespaces.pod_path());
    assert_eq!(network.interface.name, "eth0");
    assert_eq!(network.interface.mac, POD_MAC);
    assert_eq!(network.interface.mtu, 1400);
    assert_eq!(
        network.interface.addresses,
        vec![format!("{}/24", namespaces.pod_ip())]
    );
    // The kernel's subnet route is left out; the on-link route comes first.
    assert_eq!(
        network.routes,
        vec![
            GuestRoute {
                destination: "192.168.77.0/24".into(),
                gateway: String::new(),
                device: "eth0".into(),
                source: String::new(),
                metric: 0,
            },
            GuestRoute {
                destination: "default".into(),
                gateway: namespaces.peer_ip().to_string(),
                device: "eth0".into(),
                source: String::new(),
                metric: 0,
            },
        ]
    );
    let (interface, routes) = network.agent_requests();
    assert_eq!(interface.mac, POD_MAC);
    assert!(interface.up);
    assert_eq!(routes.routes[1].destination, "default");

    let details = ok("ip", &["-n", &namespaces.pod, "-d", "link", "show", TAP]);
    assert!(details.contains("tun type tap"), "{details}");
    assert!(details.contains("persist on"), "{details}");
    assert!(details.contains("mtu 1400"), "{details}");
    assert!(details.contains(",UP"), "{details}");
    let eth0_filters = tc_ingress_filters(&namespaces, "eth0");
    assert!(eth0_filters.contains("protocol all"), "{eth0_filters}");
    assert!(
        eth0_filters.contains("Egress Redirect to device tap0"),
        "{eth0_filters}"
    );
    let tap_filters = tc_ingress_filters(&namespaces, TAP);
    assert!(
        tap_filters.contains("Egress Redirect to device eth0"),
        "{tap_filters}"
    );

    // The VMM's side: our own VMM's opener, in the pod netns.
    let mut tap = in_netns(&namespaces.pod_path(), || Tap::open(TAP)).unwrap();

    // Peer → eth0 → tap: a UDP datagram (the peer knows the pod's MAC, so
    // the IPv4 frame goes out at once, without ARP).
    let pod_ip = namespaces.pod_ip();
    let peer_ip = namespaces.peer_ip();
    namespaces.pin_pod_mac_on_the_peer();
    in_netns(&namespaces.peer_path(), move || {
        let socket = UdpSocket::bind((peer_ip, 0)).unwrap();
        socket.send_to(b"mvt-probe", (pod_ip, 9999)).unwrap();
    });
    let frame = read_until(&mut tap, "UDP datagram to the pod", |frame| {
        frame.len() > 42
            && frame[..6] == POD_MAC_BYTES
            && frame[12..14] == [0x08, 0x00]
            && frame[23] == 17
            && frame[30..34] == pod_ip.octets()
            && frame[36..38] == 9999u16.to_be_bytes()
    });
    assert_eq!(&frame[42..51], b"mvt-probe");

    // Tap → eth0 → peer: an ARP request from the pod's MAC reaches peer0,
    // and its reply comes back through the tap.
    let before = rx_packets(&namespaces.peer_path(), "peer0");
    tap.write_frame(&arp_request(POD_MAC_BYTES, pod_ip, peer_ip))
        .unwrap();
    let reply = read_until(&mut tap, "ARP reply from the peer", |frame| {
        frame.len() >= 42
            && frame[..6] == POD_MAC_BYTES
            && frame[12..14] == [0x08, 0x06]
            && frame[20..22] == [0, 2]
            && frame[28..32] == peer_ip.octets()
    });
    assert_eq!(reply[32..38], POD_MAC_BYTES);
    let after = rx_packets(&namespaces.peer_path(), "peer0");
    assert!(after > before, "peer0 rx_packets {before} -> {after}");

    // A second attach, with the VMM's fd still open, changes nothing.
    let again = PodNetwork::attach(&namespaces.pod_path(), TAP).unwrap();
    assert_eq!(again, network);
    assert_eq!(tc_ingress_filters(&namespaces, "eth0"), eth0_filters);
    assert_eq!(tc_ingress_filters(&namespaces, TAP), tap_filters);

    // Detach removes the tap even while a VMM still holds it.
    network.detach().unwrap();
    assert!(!namespaces.tap_exists(), "tap survived detach");
    assert_no_ingress_qdisc(&namespaces, "eth0");
    drop(tap);
    network.detach().unwrap();
}

#[test]
fn attach_without_a_usable_pod_interface_fails_clearly_and_makes_no_tap() {
    let namespaces = Namespaces::new();
    let err = PodNetwork::attach(&namespaces.pod_path(), TAP).unwrap_err();
    assert!(matches!(err, NetworkError::NoInterface { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&namespaces.pod), "{text}");
    assert!(text.contains("found: [lo]"), "{text}");
    assert!(!namespaces.tap_exists());

    // A veth without an address is found but refused.
    ok(
        "ip",
        &[
            "-n",
            &namespaces.pod,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "peer0",
            "netns",
            &namespaces.peer,
        ],
    );
    let err = PodNetwork::attach(&namespaces.pod_path(), TAP).unwrap_err();
    assert!(matches!(err, NetworkError::NoAddress { .. }), "{err}");
    assert!(err.to_string().contains("eth0"), "{err}");

    // Two addressed candidates are ambiguous.
    ok(
        "ip",
        &[
            "-n",
            &namespaces.pod,
            "addr",
            "add",
            "10.1.0.2/24",
            "dev",
            "eth0",
        ],
    );
    ok(
        "ip",
        &[
            "-n",
            &namespaces.pod,
            "link",
            "add",
            "eth1",
            "type",
            "veth",
            "peer",
            "name",
            "peer1",
            "netns",
            &namespaces.peer,
        ],
    );
    ok(
        "ip",
        &[
            "-n",
            &namespaces.pod,
            "addr",
            "add",
            "10.2.0.2/24",
            "dev",
            "eth1",
        ],
    );
    let err = PodNetwork::attach(&namespaces.pod_path(), TAP).unwrap_err();
    assert!(
        matches!(err, NetworkError::SeveralInterfaces { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("eth0, eth1"), "{err}");
    assert!(!namespaces.tap_exists());
}

#[test]
fn a_name_held_by_another_kind_of_link_is_not_taken_over() {
    let namespaces = Namespaces::with_cni_veth();
    // A veth (its peer in the peer netns) under the tap's name.
    ok(
        "ip",
        &[
            "-n",
            &namespaces.pod,
            "link",
            "add",
            TAP,
            "type",
            "veth",
            "peer",
            "name",
            "peer9",
            "netns",
            &namespaces.peer,
        ],
    );
    let err = PodNetwork::attach(&namespaces.pod_path(), TAP).unwrap_err();
    assert!(matches!(err, NetworkError::TapNameTaken { .. }), "{err}");
}

#[test]
fn detach_is_ok_when_the_tap_or_the_netns_is_already_gone() {
    let namespaces = Namespaces::with_cni_veth();
    let network = PodNetwork::attach(&namespaces.pod_path(), TAP).unwrap();
    assert!(namespaces.tap_exists());
    ok("ip", &["-n", &namespaces.pod, "link", "del", TAP]);
    network.detach().unwrap();
    assert_no_ingress_qdisc(&namespaces, "eth0");
    drop(namespaces);
    network.detach().unwrap();
}

/// QEMU opens a tap that already exists (here made by `ip tuntap` without
/// IFF_VNET_HDR, and reused by attach) and turns vnet headers on itself;
/// NetnsForChild puts the child into the pod netns.
#[test]
fn qemu_started_in_the_pod_netns_opens_the_persistent_tap() {
    let namespaces = Namespaces::with_cni_veth();
    ok(
        "ip",
        &[
            "-n",
            &namespaces.pod,
            "tuntap",
            "add",
            "dev",
            TAP,
            "mode",
            "tap",
        ],
    );
    let before = ok("ip", &["-n", &namespaces.pod, "-d", "link", "show", TAP]);
    assert!(before.contains("vnet_hdr off"), "{before}");
    let network = PodNetwork::attach(&namespaces.pod_path(), TAP).unwrap();
    assert!(tc_ingress_filters(&namespaces, "eth0").contains("Redirect to device tap0"));

    // The child really is in the pod netns.
    let netns_inode = std::fs::metadata(namespaces.pod_path()).unwrap().ino();
    let target = NetnsForChild::open(&namespaces.pod_path()).unwrap();
    let mut readlink = Command::new("readlink");
    readlink.arg("/proc/self/ns/net");
    // SAFETY: enter() is a single setns(2), async-signal-safe.
    unsafe { readlink.pre_exec(move || target.enter()) };
    let output = readlink.output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("net:[{netns_inode}]")
    );

    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipping the QEMU part: qemu-system-x86_64 not found");
        return;
    }
    let target = NetnsForChild::open(&namespaces.pod_path()).unwrap();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-M",
        "microvm",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-netdev",
        "tap,id=n0,ifname=tap0,script=no,downscript=no",
        "-device",
        "virtio-net-device,netdev=n0",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: enter() is a single setns(2), async-signal-safe.
    unsafe { qemu.pre_exec(move || target.enter()) };
    let mut child = qemu.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut details = String::new();
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            let output = child.wait_with_output().unwrap();
            panic!(
                "QEMU exited ({status}): {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        details = ok("ip", &["-n", &namespaces.pod, "-d", "link", "show", TAP]);
        if details.contains("vnet_hdr on") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(details.contains("vnet_hdr on"), "{details}");
    network.detach().unwrap();
    assert!(!namespaces.tap_exists());
}

/// An IPv4/UDP frame (no UDP checksum, which IPv4 allows) with the vnet
/// header our tap opener expects in front.
fn udp_frame(
    source_mac: [u8; 6],
    destination_mac: [u8; 6],
    source: Ipv4Addr,
    destination: Ipv4Addr,
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame.extend_from_slice(&destination_mac);
    frame.extend_from_slice(&source_mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&source.octets());
    ip[16..20].copy_from_slice(&destination.octets());
    let sum = ip
        .chunks(2)
        .map(|word| u32::from(u16::from_be_bytes([word[0], word[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !((folded & 0xffff) + (folded >> 16)) as u16;
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&40000u16.to_be_bytes());
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

fn link_mac(netns: &str, device: &str) -> [u8; 6] {
    let text = ok("ip", &["-n", netns, "-o", "link", "show", device]);
    let mac = text
        .split_whitespace()
        .skip_while(|word| *word != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {text}"));
    let mut bytes = [0u8; 6];
    for (byte, part) in bytes.iter_mut().zip(mac.split(':')) {
        *byte = u8::from_str_radix(part, 16).unwrap();
    }
    bytes
}

/// The guest owns its kernel, so it can send any frame. Only the pod's own
/// MAC and IP get past the tap: a spoofed source IP, a spoofed MAC and ARP
/// for another address are dropped before the CNI link.
#[test]
fn frames_from_the_guest_with_another_mac_or_ip_never_leave_the_tap() {
    let namespaces = Namespaces::with_cni_veth();
    let network = PodNetwork::attach(&namespaces.pod_path(), TAP).unwrap();
    let mut tap = in_netns(&namespaces.pod_path(), || Tap::open(TAP)).unwrap();
    let (pod_ip, peer_ip) = (namespaces.pod_ip(), namespaces.peer_ip());
    let peer_mac = link_mac(&namespaces.peer, "peer0");
    let spoofed_ip = Ipv4Addr::new(10, 199, namespaces.subnet, 9);
    let spoofed_mac = [0x02, 0x42, 0x0a, 0xc7, 0x00, 0x09];

    let socket = in_netns(&namespaces.peer_path(), move || {
        let socket = UdpSocket::bind((peer_ip, 9998)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        socket
    });
    let send = |tap: &mut Tap, mac, source, payload: &[u8]| {
        tap.write_frame(&udp_frame(mac, peer_mac, source, peer_ip, 9998, payload))
            .unwrap();
    };
    send(&mut tap, POD_MAC_BYTES, spoofed_ip, b"spoofed-ip");
    send(&mut tap, spoofed_mac, pod_ip, b"spoofed-mac");
    tap.write_frame(&arp_request(POD_MAC_BYTES, spoofed_ip, peer_ip))
        .unwrap();
    // The honest datagram goes last: once it is in, the others had their
    // chance (one path, in order).
    send(&mut tap, POD_MAC_BYTES, pod_ip, b"honest");
    let mut received = Vec::new();
    let mut buf = [0u8; 64];
    while let Ok((len, from)) = socket.recv_from(&mut buf) {
        received.push((String::from_utf8_lossy(&buf[..len]).into_owned(), from));
    }
    let payloads: Vec<&str> = received.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(payloads, ["honest"], "{received:?}");
    assert_eq!(received[0].1.ip(), std::net::IpAddr::V4(pod_ip));
    let neighbours = ok(
        "ip",
        &[
            "-n",
            &namespaces.peer,
            "neigh",
            "show",
            &spoofed_ip.to_string(),
        ],
    );
    assert!(
        neighbours.trim().is_empty(),
        "spoofed ARP was learnt: {neighbours}"
    );

    // The drop of the rest is cls_bpf (act_gact is not in every kernel).
    let tap_filters = tc_ingress_filters(&namespaces, TAP);
    assert!(
        tap_filters.contains("bpf") && tap_filters.contains("direct-action"),
        "{tap_filters}"
    );
    // A second attach finds the guard as it is and keeps it.
    PodNetwork::attach(&namespaces.pod_path(), TAP).unwrap();
    assert_eq!(tc_ingress_filters(&namespaces, TAP), tap_filters);
    network.detach().unwrap();
}

/// Frames the tap yields within `window` (virtio-net header included).
fn count_frames(tap: &mut Tap, window: Duration, wanted: impl Fn(&[u8]) -> bool) -> usize {
    let deadline = Instant::now() + window;
    let mut buf = vec![0u8; 65_536];
    let mut count = 0;
    while Instant::now() < deadline {
        match tap.read_frame(&mut buf) {
            Ok(len) if len > VNET_HDR_LEN && wanted(&buf[VNET_HDR_LEN..len]) => count += 1,
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(err) => panic!("reading the tap: {err}"),
        }
    }
    count
}

/// `network.guest_{rx,tx}_bytes_per_second`: tbf qdiscs on the host cap
/// both ways. 300 frames of 1242 bytes sent at once each way; at 20 kB/s,
/// with a 64 KiB bucket and as much queued, about 100 get through in the
/// first second, never all 300.
#[test]
fn a_capped_pod_gets_its_cap_each_way_and_detach_removes_it() {
    const FRAMES: usize = 300;
    const PAYLOAD: usize = 1200; // under the veth MTU of 1400
    const CAP: u64 = 20_000;
    let namespaces = Namespaces::with_cni_veth();
    let bandwidth = Bandwidth {
        guest_rx_bytes_per_second: CAP,
        guest_tx_bytes_per_second: CAP,
    };
    let network =
        PodNetwork::attach_with(&namespaces.pod_path(), TAP, TapOwner::default(), bandwidth)
            .unwrap();
    for device in [TAP, "eth0"] {
        let qdiscs = ok(
            "tc",
            &["-n", &namespaces.pod, "qdisc", "show", "dev", device],
        );
        assert!(
            qdiscs.contains("qdisc tbf") && qdiscs.contains("rate 160Kbit"),
            "{qdiscs}"
        );
    }
    let mut tap = in_netns(&namespaces.pod_path(), || Tap::open(TAP)).unwrap();
    let (pod_ip, peer_ip) = (namespaces.pod_ip(), namespaces.peer_ip());
    let peer_mac = link_mac(&namespaces.peer, "peer0");

    // Guest → peer: counted by peer0's receive counter.
    let before = rx_packets(&namespaces.peer_path(), "peer0");
    let payload = [0x5au8; PAYLOAD];
    for _ in 0..FRAMES {
        tap.write_frame(&udp_frame(
            POD_MAC_BYTES,
            peer_mac,
            pod_ip,
            peer_ip,
            9997,
            &payload,
        ))
        .unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    let sent_through = rx_packets(&namespaces.peer_path(), "peer0") - before;
    assert!(
        (30..200).contains(&sent_through),
        "{sent_through} of {FRAMES} frames from the guest reached the peer; {}",
        ok(
            "tc",
            &[
                "-n",
                &namespaces.pod,
                "-s",
                "-d",
                "qdisc",
                "show",
                "dev",
                "eth0"
            ]
        )
    );

    eprintln!("guest → peer: {sent_through} of {FRAMES} frames in 1 s");

    // Peer → guest: counted on the tap.
    namespaces.pin_pod_mac_on_the_peer();
    in_netns(&namespaces.peer_path(), move || {
        let socket = UdpSocket::bind((peer_ip, 0)).unwrap();
        for _ in 0..FRAMES {
            let _ = socket.send_to(&payload, (pod_ip, 9996));
        }
    });
    let received = count_frames(&mut tap, Duration::from_secs(1), |frame| {
        frame.len() > 38 && frame[12..14] == [0x08, 0x00] && frame[36..38] == 9996u16.to_be_bytes()
    });
    assert!(
        (30..200).contains(&received),
        "{received} of {FRAMES} frames to the guest came through the tap"
    );

    eprintln!("peer → guest: {received} of {FRAMES} frames in 1 s");

    // No cap on a second attach takes ours off; detach leaves the veth bare.
    PodNetwork::attach(&namespaces.pod_path(), TAP).unwrap();
    let qdiscs = ok(
        "tc",
        &["-n", &namespaces.pod, "qdisc", "show", "dev", "eth0"],
    );
    assert!(!qdiscs.contains("tbf"), "{qdiscs}");
    PodNetwork::attach_with(&namespaces.pod_path(), TAP, TapOwner::default(), bandwidth).unwrap();
    network.detach().unwrap();
    let qdiscs = ok(
        "tc",
        &["-n", &namespaces.pod, "qdisc", "show", "dev", "eth0"],
    );
    assert!(!qdiscs.contains("tbf"), "{qdiscs}");
}
