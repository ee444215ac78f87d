//! Property tests of what the agent reads from (and writes to) WireGuard: the UAPI codec
//! ([`super::uapi`]) and the generic-netlink decoding ([`super::netlink`], through its public
//! functions only: `device_from_replies`, `set_messages`).
//!
//! - UAPI: any reply text, however hostile (numbers past every bound, bad hex, junk keys,
//!   Unicode), gives a device or an error, and the error prints, never a panic; what
//!   [`encode_set`] writes reads back as the same peers; a reply in wireguard-go's format reads
//!   back exactly.
//! - netlink: replies built from a device, split over messages the way the kernel splits them,
//!   emitted to bytes and decoded, fold back into that device; any bytes (random or a real
//!   reply with bytes changed) decode without a panic; `set_messages` stays within its budget
//!   and never replaces a peer's allowed IPs twice.
//!
//! Fixed seed (same cases every run); `PROPTEST_RNG_SEED` and `PROPTEST_CASES` explore further.
//! Failures are kept in `agent/proptest-regressions/` and replayed first.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    time::{Duration, UNIX_EPOCH},
};

use ipnet::IpNet;
use netlink_packet_core::{Emitable, ParseableParametrized};
use netlink_packet_generic::GenlHeader;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
    WireguardTimeSpec,
};
use proptest::{
    prelude::*,
    test_runner::{Config, RngSeed},
};
use wgpin_crds::WireGuardKey;

use super::{
    diff::inside_pin,
    keys::SecretKey,
    model::{DeviceConfig, DeviceState, PeerChange, PeerState},
    netlink::{MESSAGE_BUDGET, device_from_replies, set_messages},
    uapi::{UapiError, encode_set, parse_get},
};

fn config(cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(0x5767_7069_6e01);
    }
    config
}

fn arb_key() -> impl Strategy<Value = WireGuardKey> {
    any::<[u8; 32]>().prop_map(WireGuardKey::from_bytes)
}

fn arb_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 0u8..=32).prop_map(|(a, len)| IpNet::new(
            IpAddr::V4(Ipv4Addr::from(a)),
            len
        )
        .expect("len")),
        (any::<u128>(), 0u8..=128).prop_map(|(a, len)| IpNet::new(
            IpAddr::V6(Ipv6Addr::from(a)),
            len
        )
        .expect("len")),
    ]
}

/// Endpoints as WireGuard reports them: no flow label; a scope id only on IPv6.
fn arb_endpoint() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>())
            .prop_map(|(a, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port)),
        (
            any::<u128>(),
            any::<u16>(),
            prop_oneof![Just(0u32), 1u32..64]
        )
            .prop_map(|(a, port, scope)| SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a),
                port,
                0,
                scope
            ))),
    ]
}

/// A non-zero preshared key (WireGuard reports the zero key as "none").
fn arb_psk() -> impl Strategy<Value = Option<[u8; 32]>> {
    prop::option::of(any::<[u8; 32]>().prop_filter("non-zero", |k| *k != [0; 32]))
}

fn arb_peer() -> impl Strategy<Value = PeerState> {
    (
        arb_key(),
        arb_psk(),
        prop::option::of(arb_endpoint()),
        prop::option::of(1u16..),
        prop::collection::btree_set(arb_net(), 0..6),
        // Handshake: never, or any time a 64-bit Linux can hold (and then some nanoseconds).
        prop::option::of((1u64..(1 << 40), 0u32..1_000_000_000)),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(public_key, psk, endpoint, keepalive, allowed_ips, handshake, rx, tx)| PeerState {
                public_key,
                preshared_key: psk.map(SecretKey::from_bytes),
                endpoint,
                persistent_keepalive: keepalive,
                allowed_ips,
                last_handshake: handshake.map(|(s, n)| UNIX_EPOCH + Duration::new(s, n)),
                rx_bytes: rx,
                tx_bytes: tx,
            },
        )
}

fn arb_device() -> impl Strategy<Value = (Option<[u8; 32]>, DeviceState)> {
    (
        prop::option::of(any::<[u8; 32]>()),
        prop::option::of(any::<u16>()),
        prop::option::of(any::<u32>()),
        prop::collection::vec(arb_peer(), 0..6),
    )
        .prop_map(|(private, listen_port, fwmark, peers)| {
            let device = DeviceState {
                public_key: private.map(|k| SecretKey::from_bytes(k).public_key()),
                listen_port,
                fwmark,
                peers: peers.into_iter().map(|p| (p.public_key, p)).collect(),
            };
            (private, device)
        })
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// A `get=1` reply as wireguard-go writes it (`device/uapi.go`, IpcGetOperation).
fn uapi_reply(private: Option<[u8; 32]>, device: &DeviceState) -> String {
    let mut out = String::new();
    if let Some(key) = private {
        let _ = writeln!(out, "private_key={}", hex(&key));
    }
    if let Some(port) = device.listen_port {
        let _ = writeln!(out, "listen_port={port}");
    }
    if let Some(mark) = device.fwmark {
        let _ = writeln!(out, "fwmark={mark}");
    }
    for peer in device.peers.values() {
        let _ = writeln!(out, "public_key={}", hex(peer.public_key.as_bytes()));
        let psk = peer
            .preshared_key
            .as_ref()
            .map_or([0; 32], |k| *k.as_bytes());
        let _ = writeln!(out, "preshared_key={}", hex(&psk));
        let _ = writeln!(out, "protocol_version=1");
        if let Some(endpoint) = peer.endpoint {
            let _ = writeln!(out, "endpoint={endpoint}");
        }
        let since = peer
            .last_handshake
            .map(|t| t.duration_since(UNIX_EPOCH).expect("after the epoch"))
            .unwrap_or_default();
        let _ = writeln!(out, "last_handshake_time_sec={}", since.as_secs());
        let _ = writeln!(out, "last_handshake_time_nsec={}", since.subsec_nanos());
        let _ = writeln!(out, "tx_bytes={}", peer.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", peer.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            peer.persistent_keepalive.unwrap_or(0)
        );
        for net in &peer.allowed_ips {
            let _ = writeln!(out, "allowed_ip={net}");
        }
    }
    out.push_str("errno=0\n");
    out
}

/// One reply line: a key the parser knows (or not) and a value from the kinds that break
/// parsers: numbers at and past their bounds, signs, bad hex, zones, Unicode, `=` inside.
fn arb_line() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "private_key",
            "listen_port",
            "fwmark",
            "public_key",
            "preshared_key",
            "endpoint",
            "persistent_keepalive_interval",
            "allowed_ip",
            "last_handshake_time_sec",
            "last_handshake_time_nsec",
            "rx_bytes",
            "tx_bytes",
            "errno",
            "protocol_version",
            "remove",
            "",
        ])
        .prop_map(str::to_string),
        "\\PC{0,12}",
    ];
    let number = prop_oneof![
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        3 => prop::sample::select(vec![
            "0",
            "-0",
            "+1",
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775807",
            "-2147483648",
            "2147483648",
            "999999999",
            "1000000000",
            "4294967295",
            "65535",
            "65536",
            " 1",
            "1e3",
        ])
        .prop_map(str::to_string),
    ];
    let hexish = prop_oneof![
        "[0-9a-f]{64}",
        "[0-9a-fA-F+\\-]{64}",
        "[0-9a-f]{0,70}",
        "\\PC{64}",
    ];
    let endpointish = prop_oneof![
        arb_endpoint().prop_map(|e| e.to_string()),
        "\\[fe80::[0-9a-f]{1,4}%[a-z0-9]{1,16}\\]:[0-9]{1,6}",
        "\\[[0-9a-f:.%]{0,45}\\]:[0-9]{0,6}",
        "[0-9.:]{0,25}",
    ];
    let netish = prop_oneof![arb_net().prop_map(|n| n.to_string()), "[0-9a-f:./]{0,45}",];
    let value = prop_oneof![
        number,
        hexish,
        endpointish,
        netish,
        "\\PC{0,40}",
        "[=a-z]{0,8}"
    ];
    (key, value).prop_map(|(key, value)| format!("{key}={value}"))
}

proptest! {
    #![proptest_config(config(3_000))]

    /// Any reply: a device or an error, and the error's message prints; never a panic.
    #[test]
    fn uapi_any_reply_parses_or_fails_cleanly(
        (private, device) in arb_device(),
        inserted in prop::collection::vec(
            (any::<prop::sample::Index>(), prop_oneof![9 => arb_line(), 1 => "\\PC{0,30}"]),
            1..4,
        ),
    ) {
        // A valid reply with hostile lines put in anywhere, so that they are reached.
        let mut lines: Vec<String> =
            uapi_reply(private, &device).lines().map(str::to_string).collect();
        for (at, line) in inserted {
            lines.insert(at.index(lines.len() + 1), line);
        }
        let reply = lines.join("\n");
        match parse_get("wg0", &reply) {
            Ok(device) => {
                for (key, peer) in &device.peers {
                    prop_assert_eq!(key, &peer.public_key);
                    prop_assert!(peer.persistent_keepalive != Some(0));
                }
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(message.starts_with("wg0: "), "{}", message);
            }
        }
    }

    /// A reply in wireguard-go's format reads back as exactly the device it describes.
    #[test]
    fn uapi_reply_round_trips((private, device) in arb_device()) {
        let reply = uapi_reply(private, &device);
        let parsed = parse_get("wg0", &reply).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed, device);
    }

    /// What `encode_set` writes reads back as the same settings and peers (a `set=1` request
    /// uses the reply's keys; `parse_get` skips the ones only requests have).
    #[test]
    fn uapi_set_request_reads_back((private, device) in arb_device()) {
        let changes: Vec<PeerChange> = device
            .peers
            .values()
            .map(|peer| PeerChange::Upsert {
                public_key: peer.public_key,
                update_only: false,
                preshared_key: peer.preshared_key.clone(),
                endpoint: peer.endpoint,
                persistent_keepalive: Some(peer.persistent_keepalive.unwrap_or(0)),
                allowed_ips: Some(peer.allowed_ips.clone()),
            })
            .collect();
        let request = encode_set(
            &DeviceConfig {
                private_key: private.map(SecretKey::from_bytes),
                listen_port: device.listen_port,
            },
            &changes,
        );
        let parsed = parse_get("wg0", &request).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed.public_key, device.public_key);
        prop_assert_eq!(parsed.listen_port, device.listen_port);
        prop_assert_eq!(parsed.peers.len(), device.peers.len());
        for (key, want) in &device.peers {
            let have = &parsed.peers[key];
            prop_assert_eq!(&have.preshared_key, &want.preshared_key);
            prop_assert_eq!(have.endpoint, want.endpoint);
            prop_assert_eq!(have.persistent_keepalive, want.persistent_keepalive);
            prop_assert_eq!(&have.allowed_ips, &want.allowed_ips);
        }
    }
}

#[test]
fn uapi_errno_of_i32_min_prints() {
    let error = parse_get("wg0", "errno=-2147483648\n").expect_err("an error");
    assert!(matches!(
        error,
        UapiError::Errno {
            errno: i32::MIN,
            ..
        }
    ));
    // `errno.abs()` overflowed here (a panic in debug builds).
    assert!(error.to_string().contains("errno=-2147483648"), "{error}");
}

#[test]
fn uapi_handshake_past_the_end_of_time_is_refused() {
    let peer = format!("public_key={}\n", "ab".repeat(32));
    for line in [
        "last_handshake_time_sec=18446744073709551615",
        "last_handshake_time_sec=9223372036854775807",
        "last_handshake_time_nsec=1000000000",
        "last_handshake_time_nsec=4294967295",
    ] {
        // `UNIX_EPOCH + Duration` panicked on the first two, `Duration::new` could on the rest.
        let result = parse_get("wg0", &format!("{peer}{line}\nerrno=0\n"));
        match result {
            Err(UapiError::Protocol { line: reported, .. }) => assert_eq!(reported, line),
            other => panic!("{line}: {other:?}"),
        }
    }
    let device = parse_get(
        "wg0",
        &format!("{peer}last_handshake_time_sec=4102444800\nlast_handshake_time_nsec=999999999\n"),
    )
    .expect("year 2100 is fine");
    let handshake = device.peers.values().next().and_then(|p| p.last_handshake);
    assert_eq!(
        handshake,
        Some(UNIX_EPOCH + Duration::new(4_102_444_800, 999_999_999))
    );
}

#[test]
fn uapi_keys_are_hex_digits_only() {
    // `u8::from_str_radix` takes "+f": 32 of them used to read as a key of 0x0f bytes.
    for bad in ["+f".repeat(32), format!("{}+f", "00".repeat(31))] {
        let result = parse_get("wg0", &format!("public_key={bad}\n"));
        assert!(
            matches!(result, Err(UapiError::Protocol { .. })),
            "{bad}: {result:?}"
        );
    }
    assert!(parse_get("wg0", &format!("public_key={}\n", "AB".repeat(32))).is_ok());
}

/// wireguard-go names the zone of a link-local endpoint (Go's `netip.AddrPort`); such a line
/// used to fail the whole read, so one peer at a link-local address blinded the pin check of
/// every peer on the device. The address and port are kept exactly.
#[test]
fn uapi_link_local_endpoint_with_a_zone_name_reads() {
    let reply = format!(
        "public_key={}\nendpoint=[fe80::1%eth0]:51820\nerrno=0\n",
        "ab".repeat(32)
    );
    let device = parse_get("wg0", &reply).expect("parses");
    let endpoint = device.peers.values().next().and_then(|p| p.endpoint);
    assert_eq!(endpoint, Some("[fe80::1]:51820".parse().expect("addr")));
    let endpoint = endpoint.expect("endpoint");
    assert!(inside_pin(&endpoint, &["fe80::/10".parse().expect("net")]));
    assert!(!inside_pin(
        &endpoint,
        &["192.0.2.0/24".parse().expect("net")]
    ));
    // A numeric zone keeps its scope id; junk after the zone is still refused.
    let numeric = parse_get(
        "wg0",
        &format!(
            "public_key={}\nendpoint=[fe80::1%2]:51820\n",
            "ab".repeat(32)
        ),
    )
    .expect("parses");
    assert_eq!(
        numeric.peers.values().next().and_then(|p| p.endpoint),
        Some("[fe80::1%2]:51820".parse().expect("addr"))
    );
    for bad in [
        "[fe80::1%]:51820",
        "[fe80::1%eth 0]:51820",
        "[fe80::1%eth0]:70000",
        "[192.0.2.1%eth0]:1",
        "[fe80::1%eth0]",
    ] {
        let result = parse_get(
            "wg0",
            &format!("public_key={}\nendpoint={bad}\n", "ab".repeat(32)),
        );
        assert!(
            matches!(result, Err(UapiError::Protocol { .. })),
            "{bad}: {result:?}"
        );
    }
}

/// An endpoint WireGuard reports in an aliasing form of an IPv4 address is judged as the
/// address its packets came from. The IPv4-mapped form is what a dual-stack socket reports for
/// IPv4 traffic (Linux drops IPv6 packets whose source is IPv4-mapped, and the fast path
/// checked those packets as IPv4), so it is the IPv4 address (`inside_pin` since a31e939):
/// inside an IPv4 pin that holds it, and never inside an IPv6 pin that merely contains the
/// mapped spelling (`::/64` does). NAT64 and IPv4-compatible forms are the IPv6 addresses they
/// literally are: an IPv4 pin never contains them.
#[test]
fn endpoints_in_aliasing_forms_are_judged_as_the_address_they_carry() {
    let v4_pin: Vec<IpNet> = vec!["192.0.2.2/32".parse().expect("net")];
    let v6_pin: Vec<IpNet> = vec!["::/64".parse().expect("net")];
    let mapped: SocketAddr = "[::ffff:192.0.2.2]:51820".parse().expect("addr");
    assert!(inside_pin(&mapped, &v4_pin));
    assert!(v6_pin[0].contains(&mapped.ip()), "the spelling is inside");
    assert!(!inside_pin(&mapped, &v6_pin), "the address is not");
    assert!(!inside_pin(
        &"[::ffff:192.0.2.3]:51820".parse().expect("addr"),
        &v4_pin
    ));
    for endpoint in [
        "[::c000:202]:51820",
        "[64:ff9b::c000:202]:51820",
        "[::ffff:0:c000:202]:51820",
    ] {
        let endpoint: SocketAddr = endpoint.parse().expect("addr");
        assert!(!inside_pin(&endpoint, &v4_pin), "{endpoint}");
    }
    assert!(inside_pin(
        &"192.0.2.2:51820".parse().expect("addr"),
        &v4_pin
    ));
}

// ---- generic netlink ----

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let family = match net.addr() {
        IpAddr::V4(_) => WireguardAddressFamily::Ipv4,
        IpAddr::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.addr()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

/// A `WG_CMD_GET_DEVICE` dump of `device` the way the kernel writes one: device attributes in
/// the first message, each peer's allowed IPs cut into chunks of `chunk` (a continued peer
/// carries only its key and more allowed IPs), `per_message` peer entries per message.
fn netlink_replies(
    device: &DeviceState,
    chunk: usize,
    per_message: usize,
) -> Vec<WireguardMessage> {
    let mut entries = Vec::new();
    for peer in device.peers.values() {
        let ips: Vec<WireguardAllowedIp> = peer.allowed_ips.iter().map(allowed_ip).collect();
        let mut chunks = ips.chunks(chunk.max(1));
        let mut first = vec![
            WireguardPeerAttribute::PublicKey(*peer.public_key.as_bytes()),
            WireguardPeerAttribute::PresharedKey(
                peer.preshared_key
                    .as_ref()
                    .map_or([0; 32], |k| *k.as_bytes()),
            ),
            WireguardPeerAttribute::PersistentKeepalive(peer.persistent_keepalive.unwrap_or(0)),
            WireguardPeerAttribute::RxBytes(peer.rx_bytes),
            WireguardPeerAttribute::TxBytes(peer.tx_bytes),
            WireguardPeerAttribute::ProtocolVersion(1),
        ];
        let since = peer
            .last_handshake
            .map(|t| t.duration_since(UNIX_EPOCH).expect("after the epoch"))
            .unwrap_or_default();
        first.push(WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
            seconds: i64::try_from(since.as_secs()).expect("fits"),
            nano_seconds: i64::from(since.subsec_nanos()),
        }));
        if let Some(endpoint) = peer.endpoint {
            first.push(WireguardPeerAttribute::Endpoint(endpoint));
        }
        first.push(WireguardPeerAttribute::AllowedIps(
            chunks.next().map(<[_]>::to_vec).unwrap_or_default(),
        ));
        entries.push(WireguardPeer(first));
        for more in chunks {
            entries.push(WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(*peer.public_key.as_bytes()),
                WireguardPeerAttribute::AllowedIps(more.to_vec()),
            ]));
        }
    }
    let mut head = vec![WireguardAttribute::IfName("wg0".into())];
    if let Some(key) = device.public_key {
        head.push(WireguardAttribute::PublicKey(*key.as_bytes()));
    }
    if let Some(port) = device.listen_port {
        head.push(WireguardAttribute::ListenPort(port));
    }
    if let Some(mark) = device.fwmark {
        head.push(WireguardAttribute::Fwmark(mark));
    }
    let mut messages = vec![WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: head,
    }];
    for group in entries.chunks(per_message.max(1)) {
        messages.push(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![
                WireguardAttribute::IfName("wg0".into()),
                WireguardAttribute::Peers(group.to_vec()),
            ],
        });
    }
    messages
}

/// A message as bytes: the generic-netlink header, then the attributes.
fn emit(message: &WireguardMessage) -> Vec<u8> {
    let header = GenlHeader {
        cmd: message.cmd.into(),
        version: 1,
    };
    let mut bytes = vec![0u8; header.buffer_len() + message.buffer_len()];
    header.emit(&mut bytes[..4]);
    message.emit(&mut bytes[4..]);
    bytes
}

/// Bytes decoded as the netlink client decodes a reply's payload.
fn decode(bytes: &[u8]) -> Option<WireguardMessage> {
    let header = GenlHeader::parse(bytes).ok()?;
    WireguardMessage::parse_with_param(bytes.get(4..)?, header).ok()
}

proptest! {
    #![proptest_config(config(1_000))]

    /// A dump split anywhere, emitted and decoded, folds back into the device it came from.
    #[test]
    fn netlink_replies_fold_back_into_the_device(
        (_, device) in arb_device(),
        chunk in 1usize..4,
        per_message in 1usize..4,
    ) {
        let decoded: Vec<WireguardMessage> = netlink_replies(&device, chunk, per_message)
            .iter()
            .map(|m| decode(&emit(m)).ok_or_else(|| TestCaseError::fail("decodes")))
            .collect::<Result<_, _>>()?;
        prop_assert_eq!(device_from_replies(&decoded), device);
    }

    /// Any bytes, random or a real reply with a few bytes changed or cut: decoding and folding
    /// never panic.
    #[test]
    fn netlink_any_bytes_decode_without_panic(
        (_, device) in arb_device(),
        changes in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
        random in prop::collection::vec(any::<u8>(), 0..300),
        use_random in prop::bool::weighted(0.2),
    ) {
        let mut replies: Vec<Vec<u8>> = netlink_replies(&device, 2, 2).iter().map(emit).collect();
        if use_random {
            replies.push(random);
        }
        for bytes in &mut replies {
            for (at, value) in &changes {
                if !bytes.is_empty() {
                    let at = at.index(bytes.len());
                    bytes[at] = *value;
                }
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
        }
        let decoded: Vec<WireguardMessage> = replies.iter().filter_map(|b| decode(b)).collect();
        let folded = device_from_replies(&decoded);
        for (key, peer) in &folded.peers {
            prop_assert_eq!(key, &peer.public_key);
        }
    }
}

fn arb_change() -> impl Strategy<Value = PeerChange> {
    prop_oneof![
        1 => arb_key().prop_map(PeerChange::Remove),
        4 => (
            arb_key(),
            any::<bool>(),
            arb_psk(),
            prop::option::of(arb_endpoint()),
            prop::option::of(any::<u16>()),
            prop::option::of(prop::collection::btree_set(arb_net(), 0..1_500)),
        )
            .prop_map(|(public_key, update_only, psk, endpoint, keepalive, allowed_ips)| {
                PeerChange::Upsert {
                    public_key,
                    update_only,
                    preshared_key: psk.map(SecretKey::from_bytes),
                    endpoint,
                    persistent_keepalive: keepalive,
                    allowed_ips,
                }
            }),
    ]
}

proptest! {
    #![proptest_config(config(48))]

    /// Every message fits a netlink message (16-bit attribute lengths) and decodes to itself;
    /// each peer's allowed IPs arrive whole, replaced at most once, never before its fields.
    #[test]
    fn netlink_set_messages_fit_and_carry_every_allowed_ip(
        changes in prop::collection::vec(arb_change(), 0..12)
    ) {
        // One change per key, as the diff produces them.
        let mut seen = BTreeSet::new();
        let changes: Vec<PeerChange> =
            changes.into_iter().filter(|c| seen.insert(c.public_key())).collect();
        let messages = set_messages("wg0", &DeviceConfig::default(), &changes);
        let mut carried: BTreeMap<WireGuardKey, (usize, BTreeSet<IpNet>)> = BTreeMap::new();
        for message in &messages {
            let bytes = emit(message);
            prop_assert!(bytes.len() <= MESSAGE_BUDGET + 1024, "{} bytes", bytes.len());
            let decoded = decode(&bytes);
            prop_assert_eq!(decoded.as_ref(), Some(message));
            for attribute in &message.attributes {
                let WireguardAttribute::Peers(peers) = attribute else { continue };
                for peer in peers {
                    let mut key = None;
                    let mut replaces = false;
                    let mut ips = BTreeSet::new();
                    for attribute in &peer.0 {
                        match attribute {
                            WireguardPeerAttribute::PublicKey(k) => key = Some(WireGuardKey::from_bytes(*k)),
                            WireguardPeerAttribute::Flags(flags) => {
                                replaces = flags.contains(WireguardPeerFlags::ReplaceAllowedIps)
                            }
                            WireguardPeerAttribute::AllowedIps(list) => {
                                for ip in list {
                                    let address = ip.0.iter().find_map(|a| match a {
                                        WireguardAllowedIpAttr::IpAddr(a) => Some(*a),
                                        _ => None,
                                    });
                                    let len = ip.0.iter().find_map(|a| match a {
                                        WireguardAllowedIpAttr::Cidr(l) => Some(*l),
                                        _ => None,
                                    });
                                    if let (Some(address), Some(len)) = (address, len) {
                                        ips.insert(IpNet::new(address, len).expect("valid"));
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    let key = key.ok_or_else(|| TestCaseError::fail("peer without key"))?;
                    let entry = carried.entry(key).or_default();
                    entry.0 += usize::from(replaces);
                    entry.1.extend(ips);
                }
            }
        }
        for change in &changes {
            let (replaces, ips) = carried.get(&change.public_key()).cloned().unwrap_or_default();
            match change {
                PeerChange::Remove(_) => prop_assert_eq!(replaces, 0),
                PeerChange::Upsert { allowed_ips, .. } => {
                    prop_assert_eq!(replaces, usize::from(allowed_ips.is_some()));
                    prop_assert_eq!(&ips, &allowed_ips.clone().unwrap_or_default());
                }
            }
        }
    }
}

/// A handshake time past what `SystemTime` holds (seconds at `i64::MAX` plus a carried second)
/// panicked in `device_from_replies`; it is now read as no handshake. The kernel never sends
/// that, but the decoder must not trust it.
#[test]
fn netlink_handshake_past_the_end_of_time_does_not_panic() {
    let key = [7u8; 32];
    for (seconds, nano_seconds) in [(i64::MAX, 1_000_000_000), (i64::MAX, i64::MAX)] {
        let reply = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(key),
                WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                    seconds,
                    nano_seconds,
                }),
            ])])],
        };
        let decoded = decode(&emit(&reply)).expect("the library decodes it");
        let device = std::panic::catch_unwind(|| device_from_replies(&[decoded]));
        assert!(
            device.is_ok(),
            "device_from_replies panicked on ({seconds}, {nano_seconds})"
        );
    }
}
