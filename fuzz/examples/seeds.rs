//! Writes the seed corpora of the `packet`, `uapi`, `netlink` and `manifests` targets under
//! `fuzz/corpus/<target>/` (committed; rerun after changing a format):
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```
//!
//! The `btf` seeds are the synthetic BTF of `agent/src/fastpath/btf.rs`'s tests (`base_blob`
//! alone, and with `split_blob` over it), whose builder lives in that test module; see
//! `fuzz/README.md`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use netlink_packet_core::{
    DoneMessage, ErrorMessage, NLM_F_MULTIPART, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardTimeSpec,
};
use wgpin_common::craft::{Frame, Ip};

const V4: Ip = Ip::V4([203, 0, 113, 7], [192, 0, 2, 1]);
const V6: Ip = Ip::V6(
    [
        0x20, 0x01, 0x0d, 0xb8, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
    ],
    [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
);
/// An IPv6 source that embeds 192.0.2.2 (IPv4-mapped): parsed as IPv6, never as IPv4.
const MAPPED: Ip = Ip::V6(
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 2],
    [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
);

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("seed written");
}

fn packets() {
    let dir = corpus("packet");
    let frames = [
        ("udp4", Frame::udp(V4, 40000, 51820)),
        ("udp6", Frame::udp(V6, 40000, 51820)),
        ("udp6-mapped-source", Frame::udp(MAPPED, 40000, 51820)),
        (
            "vlan2-options",
            Frame::udp(V4, 1, 51820).vlan(10).vlan(20).ipv4_options(12),
        ),
        (
            "v4-first-fragment",
            Frame::udp(V4, 1, 51820).ipv4_fragment(0, true),
        ),
        (
            "v4-later-fragment",
            Frame::udp(V4, 1, 51820).ipv4_fragment(185, false),
        ),
        (
            "v6-first-fragment",
            Frame::udp(V6, 5, 51820).ipv6_fragment(0, true),
        ),
        (
            "v6-later-fragment",
            Frame::udp(V6, 5, 51820).ipv6_fragment(100, false),
        ),
        (
            "v6-ext-chain",
            Frame::udp(V6, 5, 51820)
                .ipv6_ext(0, 1)
                .ipv6_ext(60, 0)
                .ipv6_ext(51, 4)
                .ipv6_ext(43, 0),
        ),
        (
            "wg-initiation",
            Frame::udp(V4, 40000, 51820).wireguard(1, 0x0102_0304, 0),
        ),
        (
            "wg-response",
            Frame::udp(V6, 40000, 51820).wireguard(2, 7, 9),
        ),
        (
            "wg-cookie",
            Frame::udp(V4, 40000, 51820).vlan(3).wireguard(3, 11, 0),
        ),
        (
            "wg-data",
            Frame::udp(V6, 40000, 51820)
                .ipv6_ext(60, 0)
                .wireguard(4, 12, 0),
        ),
        ("tcp4", Frame::tcp(V4, 51820)),
        ("icmp6", Frame::icmp(V6)),
        ("arp", Frame::arp()),
    ];
    for (name, frame) in frames {
        write(&dir, name, &frame.bytes());
    }
    let mut long = Frame::udp(V6, 5, 51820);
    for _ in 0..=wgpin_common::parse::MAX_IPV6_EXT_HEADERS {
        long = long.ipv6_ext(60, 0);
    }
    write(&dir, "v6-chain-too-long", &long.bytes());
    let tiny = Frame::udp(V4, 1, 51820).ipv4_fragment(0, true).bytes();
    write(&dir, "v4-tiny-first-fragment", &tiny[..14 + 20 + 2]);
}

fn hex(byte: u8) -> String {
    format!("{byte:02x}").repeat(32)
}

fn uapi() {
    let dir = corpus("uapi");
    // As wireguard-go answers `get=1` (device/uapi.go, IpcGetOperation).
    let mut reply = String::new();
    let _ = writeln!(reply, "private_key={}", hex(0x58));
    reply.push_str("listen_port=51820\nfwmark=0\n");
    for (key, endpoint, allowed) in [
        (
            0xa1,
            "203.0.113.7:40000",
            ["198.51.100.2/32", "fd00:99::2/128"],
        ),
        (
            0xb2,
            "[2001:db8:40::7]:51820",
            ["198.51.100.3/32", "10.0.0.0/8"],
        ),
        (
            0xc3,
            "[fe80::1%eth0]:51820",
            ["198.51.100.4/32", "fd00:99::/64"],
        ),
    ] {
        let _ = writeln!(reply, "public_key={}", hex(key));
        let _ = writeln!(reply, "preshared_key={}", hex(0));
        reply.push_str("protocol_version=1\n");
        let _ = writeln!(reply, "endpoint={endpoint}");
        reply.push_str("last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=999999999\n");
        reply.push_str("tx_bytes=1234\nrx_bytes=5678\npersistent_keepalive_interval=25\n");
        for net in allowed {
            let _ = writeln!(reply, "allowed_ip={net}");
        }
    }
    reply.push_str("errno=0\n\n");
    write(&dir, "wireguard-go-reply", reply.as_bytes());
    write(&dir, "errno", b"errno=-2147483648\n\n");
    write(
        &dir,
        "peer-only",
        format!("public_key={}\nendpoint=[::ffff:192.0.2.2]:51820\nallowed_ip=::ffff:192.0.2.2/128\nerrno=0\n", hex(0xab)).as_bytes(),
    );
}

fn allowed_ip(net: &str) -> WireguardAllowedIp {
    let net: ipnet::IpNet = net.parse().expect("net");
    let family = match net {
        ipnet::IpNet::V4(_) => WireguardAddressFamily::Ipv4,
        ipnet::IpNet::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.addr()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

/// A netlink message as the kernel sends it, as bytes.
fn netlink_bytes<T>(payload: NetlinkPayload<T>, flags: u16) -> Vec<u8>
where
    T: netlink_packet_core::NetlinkSerializable + std::fmt::Debug,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(header, payload);
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

/// The datagrams of one exchange, each after its length (the `netlink` target's input).
fn framed(datagrams: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for datagram in datagrams {
        let len = u16::try_from(datagram.len()).expect("datagram under 64 KiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(datagram);
    }
    out
}

fn netlink() {
    let dir = corpus("netlink");
    let genl = |attributes| {
        let mut message = GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes,
        });
        message.set_resolved_family_id(0x15);
        message.finalize();
        NetlinkPayload::InnerMessage(message)
    };
    let peer = |key: u8, endpoint: &str, ips: &[&str]| {
        WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey([key; 32]),
            WireguardPeerAttribute::PresharedKey([0; 32]),
            WireguardPeerAttribute::Endpoint(endpoint.parse().expect("endpoint")),
            WireguardPeerAttribute::PersistentKeepalive(25),
            WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                seconds: 1_700_000_000,
                nano_seconds: 5,
            }),
            WireguardPeerAttribute::RxBytes(1234),
            WireguardPeerAttribute::TxBytes(5678),
            WireguardPeerAttribute::ProtocolVersion(1),
            WireguardPeerAttribute::AllowedIps(ips.iter().map(|n| allowed_ip(n)).collect()),
        ])
    };
    let first = netlink_bytes(
        genl(vec![
            WireguardAttribute::IfIndex(7),
            WireguardAttribute::IfName("wg0".into()),
            WireguardAttribute::PublicKey([0x42; 32]),
            WireguardAttribute::ListenPort(51820),
            WireguardAttribute::Fwmark(0),
            WireguardAttribute::Peers(vec![
                peer(
                    0xa1,
                    "203.0.113.7:40000",
                    &["198.51.100.2/32", "fd00:99::2/128"],
                ),
                peer(0xb2, "[2001:db8:40::7]:51820", &["198.51.100.3/32"]),
            ]),
        ]),
        NLM_F_MULTIPART,
    );
    // The kernel continues a peer's allowed IPs in the next message: only its key and more IPs.
    let second = netlink_bytes(
        genl(vec![
            WireguardAttribute::IfName("wg0".into()),
            WireguardAttribute::Peers(vec![WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey([0xb2; 32]),
                WireguardPeerAttribute::AllowedIps(vec![allowed_ip("10.0.0.0/8")]),
            ])]),
        ]),
        NLM_F_MULTIPART,
    );
    let done = netlink_bytes::<GenlMessage<WireguardMessage>>(
        NetlinkPayload::Done(DoneMessage::default()),
        NLM_F_MULTIPART,
    );
    let mut both = first.clone();
    both.extend_from_slice(&second);
    write(
        &dir,
        "dump-two-datagrams",
        &framed(&[first.clone(), second, done.clone()]),
    );
    write(&dir, "dump-one-datagram", &framed(&[[both, done].concat()]));
    let mut refused = ErrorMessage::default();
    refused.code = std::num::NonZeroI32::new(-19);
    write(
        &dir,
        "refused",
        &framed(&[netlink_bytes::<GenlMessage<WireguardMessage>>(
            NetlinkPayload::Error(refused),
            0,
        )]),
    );
}

fn manifests() {
    let dir = corpus("manifests");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for name in ["gateway-interface.yaml", "peers.yaml"] {
        let text = std::fs::read(examples.join(name)).expect("example manifest");
        write(&dir, name, &text);
    }
    // Two interfaces (shared and dedicated), peers that overlap, alias and break the rules.
    write(
        &dir,
        "hostile.yaml",
        br#"apiVersion: wgpin.io/v1alpha1
kind: PinnedInterface
metadata: {name: shared}
spec: {nodeSelector: {}, interfaceName: wgpin0, listenPort: 51820, mode: Shared}
---
apiVersion: wgpin.io/v1alpha1
kind: PinnedInterface
metadata: {name: edge}
spec: {nodeSelector: {matchLabels: {role: a}}, interfaceName: wg-edge, listenPort: 51900, listenPortEnd: 51903, mode: Dedicated}
---
apiVersion: wgpin.io/v1alpha1
kind: PinnedPeer
metadata: {name: alice}
spec:
  interface: shared
  publicKey: xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
  allowedIPs: [198.51.100.2/32]
  sources: [203.0.113.0/24, "::c000:201/128", "64:ff9b::c000:201/128"]
  endpoint: {address: 203.0.113.7, port: 51820}
---
apiVersion: wgpin.io/v1alpha1
kind: PinnedPeer
metadata: {name: bob}
spec:
  interface: shared
  publicKey: TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=
  allowedIPs: [198.51.100.3/32]
  sources: [203.0.113.0/24, 203.0.113.7/32]
---
apiVersion: wgpin.io/v1alpha1
kind: PinnedPeer
metadata: {name: mallory}
spec:
  interface: edge
  publicKey: gN65BkIKy1eCE9pP1wdc8ROUtkHLF2PfAqYdyYBz6EA=
  allowedIPs: ["fd00:99::2/128"]
  sources: ["::ffff:192.0.2.1/128", 192.000.002.001/32, 192.0.2.1/024, "0:0:0:0:0:ffff:c000:201/128", "2001:DB8::/32"]
---
apiVersion: wgpin.io/v1alpha1
kind: PinnedPeer
metadata: {name: anywhere}
spec:
  interface: edge
  publicKey: HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=
  allowedIPs: ["fd00:99::3/128"]
  sources: [0.0.0.0/0, "::/0"]
  allowAnySource: true
  nodeSelector: {matchLabels: {role: a}}
"#,
    );
}

fn main() {
    packets();
    uapi();
    netlink();
    manifests();
    println!("seeds written under {}/corpus", env!("CARGO_MANIFEST_DIR"));
}
