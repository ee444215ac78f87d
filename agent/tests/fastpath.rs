//! The fast path for real: the eBPF programs through the kernel verifier, attached in network
//! namespaces, with real packets, exact counters and events; and program-level verdicts with
//! `BPF_PROG_TEST_RUN`. Needs root (the test command runs as root).

mod support;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use support::{Pair, Receiver, SERVER_V4, SERVER_V6, in_netns, require_root, send_udp, unique_id};
use wgpin_agent::fastpath::{
    BpfPaths, FastPath, FastPathState, Hook, HookChoice, Op, PinKey, Violation,
    state::{PeerIdentity, PeerPinKey},
};
use wgpin_common::{
    AllowEntry, Counters, NO_PEER, PortEntry,
    craft::{Frame, Ip},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_SHOT: u32 = 2;
/// TC_ACT_UNSPEC (-1): pass on to the next tcx program, if any.
const TC_NEXT: u32 = u32::MAX;

/// A bpffs root of this test's own, removed at the end even when the test fails.
struct TestRoot(PathBuf);

impl TestRoot {
    fn new() -> Self {
        require_root();
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/wgpin-test-{}",
            unique_id()
        )))
    }

    fn paths(&self) -> BpfPaths {
        BpfPaths::new(&self.0)
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads the fast path under `root` and attaches it to the server end of `pair`.
fn attached(
    pair: &Pair,
    root: &TestRoot,
    choice: HookChoice,
) -> (FastPath, wgpin_agent::fastpath::Attachment) {
    let (paths, interface) = (root.paths(), pair.server_if.clone());
    in_netns(&pair.server_ns, move || {
        let mut fast_path = FastPath::open(paths).expect("fast path loads");
        let attachment = fast_path.attach(&interface, choice).expect("attaches");
        (fast_path, attachment)
    })
}

fn pin(port: u16, prefix: &str) -> PinKey {
    PinKey {
        port,
        prefix: prefix.parse().expect("prefix"),
    }
}

fn state(ports: &[(u16, u32, u32)], pins: &[(u16, &str, u32)]) -> FastPathState {
    FastPathState {
        ports: ports
            .iter()
            .map(|(port, port_slot, peer_slot)| {
                (
                    *port,
                    if *peer_slot == NO_PEER {
                        PortEntry::shared(*port_slot)
                    } else {
                        PortEntry::dedicated(*port_slot, *peer_slot)
                    },
                )
            })
            .collect(),
        pins: pins
            .iter()
            .map(|(port, prefix, peer_slot)| {
                (
                    pin(*port, prefix),
                    AllowEntry {
                        peer_slot: *peer_slot,
                    },
                )
            })
            .collect(),
        ..FastPathState::default()
    }
}

fn count_by_source(received: &[(IpAddr, usize)]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (ip, _) in received {
        *counts.entry(ip.to_string()).or_default() += 1;
    }
    counts
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(ip, n)| (ip.to_string(), *n)).collect()
}

fn counters(allowed: u64, allowed_bytes: u64, dropped: u64, dropped_bytes: u64) -> Counters {
    Counters {
        allowed_packets: allowed,
        allowed_bytes,
        dropped_packets: dropped,
        dropped_bytes,
    }
}

/// Frame sizes for 100-byte UDP payloads.
const V4_FRAME: u64 = 14 + 20 + 8 + 100;
const V6_FRAME: u64 = 14 + 40 + 8 + 100;

/// Dedicated port 40001 (peer slot 7), shared port 40002 (a /29 for peer 1 with a /32 inside
/// it for peer 2), unmanaged 40003: who gets through, the exact counters, and one event per
/// offending source.
fn allowlist_on_real_packets(choice: HookChoice, expected_hook: Hook) {
    let pair = Pair::new();
    let root = TestRoot::new();
    let (server_ns, client_ns) = (pair.server_ns.clone(), pair.client_ns.clone());
    let (mut fast_path, attachment) = attached(&pair, &root, choice);
    assert_eq!(attachment.hook, expected_hook, "{attachment:?}");
    let desired = state(
        &[(40001, 0, 7), (40002, 1, NO_PEER)],
        &[
            (40001, "192.0.2.2/32", 7),
            (40001, "fd00:2::2/128", 7),
            (40002, "192.0.2.0/29", 1),
            (40002, "192.0.2.3/32", 2),
        ],
    );
    assert_eq!(fast_path.apply(&desired).expect("maps written"), 6);
    assert_eq!(
        fast_path.apply(&desired).expect("no-op apply"),
        0,
        "an unchanged state writes nothing"
    );
    assert_eq!(fast_path.read_state().expect("maps read back"), desired);

    let dedicated = Receiver::bind(&server_ns, 40001);
    let shared = Receiver::bind(&server_ns, 40002);
    let unmanaged = Receiver::bind(&server_ns, 40003);
    for (source, dest, port, n) in [
        ("192.0.2.2", SERVER_V4, 40001, 3),
        ("192.0.2.3", SERVER_V4, 40001, 2),
        ("fd00:2::2", SERVER_V6, 40001, 3),
        ("fd00:2::3", SERVER_V6, 40001, 2),
        ("192.0.2.2", SERVER_V4, 40002, 4),
        ("192.0.2.3", SERVER_V4, 40002, 5),
        ("fd00:2::5", SERVER_V6, 40002, 2),
        ("192.0.2.4", SERVER_V4, 40003, 2),
    ] {
        send_udp(&client_ns, source, dest, port, n, 100);
    }
    assert_eq!(
        count_by_source(&dedicated.drain()),
        counts(&[("192.0.2.2", 3), ("fd00:2::2", 3)])
    );
    assert_eq!(
        count_by_source(&shared.drain()),
        counts(&[("192.0.2.2", 4), ("192.0.2.3", 5)])
    );
    assert_eq!(
        count_by_source(&unmanaged.drain()),
        counts(&[("192.0.2.4", 2)]),
        "unmanaged ports are untouched"
    );

    let port_counters = |slot| fast_path.port_counters(slot).expect("port counters");
    let peer_counters = |slot| fast_path.peer_counters(slot).expect("peer counters");
    assert_eq!(
        port_counters(0),
        counters(
            6,
            3 * V4_FRAME + 3 * V6_FRAME,
            4,
            2 * V4_FRAME + 2 * V6_FRAME
        )
    );
    assert_eq!(port_counters(1), counters(9, 9 * V4_FRAME, 2, 2 * V6_FRAME));
    assert_eq!(
        peer_counters(7),
        port_counters(0),
        "dedicated: the port's counts are its peer's"
    );
    assert_eq!(
        peer_counters(1),
        counters(4, 4 * V4_FRAME, 0, 0),
        "the /29 outside the /32"
    );
    assert_eq!(
        peer_counters(2),
        counters(5, 5 * V4_FRAME, 0, 0),
        "the longest prefix wins"
    );

    let mut events: Vec<(String, u16, u32, u32)> = fast_path
        .drain_violations()
        .into_iter()
        .map(|v: Violation| (v.source.to_string(), v.port, v.port_slot, v.peer_slot))
        .collect();
    events.sort();
    assert_eq!(
        events,
        [
            ("192.0.2.3".to_string(), 40001, 0, 7),
            ("fd00:2::3".to_string(), 40001, 0, 7),
            ("fd00:2::5".to_string(), 40002, 1, NO_PEER),
        ]
    );
    let global = fast_path.global_counters().expect("global counters");
    assert_eq!(
        (
            global.events_sent,
            global.events_rate_limited,
            global.events_lost
        ),
        (3, 3, 0)
    );

    let verification = in_netns(&server_ns, move || fast_path.verify());
    assert!(verification.is_ok(), "{verification:?}");
}

#[test]
fn xdp_allows_pinned_sources_and_drops_the_rest() {
    allowlist_on_real_packets(HookChoice::Xdp, Hook::Xdp);
}

/// On a veth, `Auto` picks TC (native XDP would copy every packet) and says so.
#[test]
fn tc_allows_pinned_sources_and_drops_the_rest() {
    allowlist_on_real_packets(HookChoice::Auto, Hook::Tc);
}

#[test]
fn auto_on_a_veth_picks_tc_and_says_why() {
    let pair = Pair::new();
    let root = TestRoot::new();
    let (_fast_path, attachment) = attached(&pair, &root, HookChoice::Auto);
    assert_eq!(attachment.hook, Hook::Tc);
    assert!(
        attachment.reason.contains("a veth"),
        "{}",
        attachment.reason
    );
}

/// Verdicts of both programs on crafted frames (`BPF_PROG_TEST_RUN`), one table.
#[test]
fn program_verdicts_on_crafted_frames() {
    let root = TestRoot::new();
    let mut fast_path = FastPath::open(root.paths()).expect("fast path loads");
    fast_path
        .apply(&state(
            &[(40001, 0, 7), (40002, 1, NO_PEER), (40003, 2, NO_PEER)],
            &[
                (40001, "203.0.113.0/24", 7),
                (40001, "fd00:40::/48", 7),
                (40002, "198.51.100.0/24", 1),
                (40003, "0.0.0.0/0", 3),
            ],
        ))
        .expect("maps written");

    const PINNED: [u8; 4] = [203, 0, 113, 9];
    const OTHER: [u8; 4] = [192, 0, 2, 77];
    const DST: [u8; 4] = [192, 0, 2, 1];
    const PINNED6: [u8; 16] = [0xfd, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
    const OTHER6: [u8; 16] = [0xfd, 0, 0, 0x41, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
    const MAPPED_PINNED: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113, 9];
    const DST6: [u8; 16] = [0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let v4 = |src| Ip::V4(src, DST);
    let v6 = |src| Ip::V6(src, DST6);
    let pass = true;
    let drop = false;
    let cases: Vec<(&str, Frame, bool)> = vec![
        (
            "pinned IPv4 source",
            Frame::udp(v4(PINNED), 5000, 40001),
            pass,
        ),
        (
            "unpinned IPv4 source",
            Frame::udp(v4(OTHER), 5000, 40001),
            drop,
        ),
        (
            "pinned IPv6 source",
            Frame::udp(v6(PINNED6), 5000, 40001),
            pass,
        ),
        (
            "unpinned IPv6 source",
            Frame::udp(v6(OTHER6), 5000, 40001),
            drop,
        ),
        (
            "a pin counts only for its own port",
            Frame::udp(v4(PINNED), 5000, 40002),
            drop,
        ),
        ("unmanaged port", Frame::udp(v4(OTHER), 5000, 40009), pass),
        (
            "IPv4-mapped IPv6 form of a pinned IPv4 source",
            Frame::udp(v6(MAPPED_PINNED), 5000, 40001),
            drop,
        ),
        (
            "IPv4 catch-all pin",
            Frame::udp(v4(OTHER), 5000, 40003),
            pass,
        ),
        (
            "the IPv4 catch-all is not an IPv6 one",
            Frame::udp(v6(OTHER6), 5000, 40003),
            drop,
        ),
        ("TCP to a managed port", Frame::tcp(v4(OTHER), 40001), pass),
        (
            "TCP over IPv6 to a managed port",
            Frame::tcp(v6(OTHER6), 40001),
            pass,
        ),
        ("ICMP", Frame::icmp(v4(OTHER)), pass),
        ("ICMPv6", Frame::icmp(v6(OTHER6)), pass),
        ("ARP", Frame::arp(), pass),
        (
            "VLAN-tagged, unpinned",
            Frame::udp(v4(OTHER), 5000, 40001).vlan(100),
            drop,
        ),
        (
            "two VLAN tags, pinned",
            Frame::udp(v4(PINNED), 5000, 40001).vlan(100).vlan(200),
            pass,
        ),
        (
            "IPv4 options, unpinned",
            Frame::udp(v4(OTHER), 5000, 40001).ipv4_options(40),
            drop,
        ),
        (
            "IPv4 options, pinned",
            Frame::udp(v4(PINNED), 5000, 40001).ipv4_options(40),
            pass,
        ),
        (
            "first fragment, unpinned",
            Frame::udp(v4(OTHER), 5000, 40001).ipv4_fragment(0, true),
            drop,
        ),
        (
            "first fragment, pinned",
            Frame::udp(v4(PINNED), 5000, 40001).ipv4_fragment(0, true),
            pass,
        ),
        (
            "later fragment",
            Frame::udp(v4(OTHER), 5000, 40001).ipv4_fragment(100, false),
            pass,
        ),
        (
            "IPv6 first fragment, unpinned",
            Frame::udp(v6(OTHER6), 5000, 40001).ipv6_fragment(0, true),
            drop,
        ),
        (
            "IPv6 later fragment",
            Frame::udp(v6(OTHER6), 5000, 40001).ipv6_fragment(50, true),
            pass,
        ),
        (
            "IPv6 extension headers, unpinned",
            Frame::udp(v6(OTHER6), 5000, 40001)
                .ipv6_ext(0, 0)
                .ipv6_ext(60, 1)
                .ipv6_ext(51, 4),
            drop,
        ),
        (
            "IPv6 extension headers, pinned",
            Frame::udp(v6(PINNED6), 5000, 40001)
                .ipv6_ext(0, 0)
                .ipv6_ext(43, 2),
            pass,
        ),
    ];
    let mut over_long = Frame::udp(v6(PINNED6), 5000, 40001);
    for _ in 0..=wgpin_common::parse::MAX_IPV6_EXT_HEADERS {
        over_long = over_long.ipv6_ext(60, 0);
    }
    let mut cases = cases;
    cases.push(("IPv6 chain longer than any real one", over_long, drop));

    let mut failures = Vec::new();
    for (hook, pass_code, drop_code) in [
        (Hook::Xdp, XDP_PASS, XDP_DROP),
        (Hook::Tc, TC_NEXT, TC_SHOT),
    ] {
        for (name, frame, should_pass) in &cases {
            let (verdict, _) = fast_path
                .test_run(hook, &frame.bytes(), 1)
                .expect("test run");
            let expected = if *should_pass { pass_code } else { drop_code };
            if verdict != expected {
                failures.push(format!(
                    "{hook}: {name}: verdict {verdict}, expected {expected}"
                ));
            }
        }
        // A tiny first fragment (cut inside the UDP header) hides its port: dropped.
        let tiny = Frame::udp(v4(PINNED), 5000, 40001)
            .ipv4_fragment(0, true)
            .bytes();
        let (verdict, _) = fast_path
            .test_run(hook, &tiny[..14 + 20 + 2], 1)
            .expect("test run");
        if verdict != drop_code {
            failures.push(format!("{hook}: tiny first fragment: verdict {verdict}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let global = fast_path.global_counters().expect("global counters");
    assert_eq!(
        global.unparseable_dropped, 4,
        "over-long chain and tiny fragment, in each program"
    );
    fast_path.remove_all().expect("clean up");
}

/// A burst from one source gives one event; the rest are counted as rate-limited and handed
/// on with the next event from that source.
/// Identity mode's verdicts (`BPF_PROG_TEST_RUN`), with sessions recorded as the hook on
/// `wg_index_hashtable_insert` would (the hook itself needs kernel WireGuard: the VM tier).
/// Port 40010 is shared by peer A (slot 1, 192.0.2.0/28) and peer C (slot 2, 192.0.2.130/32);
/// A's session index is 0x11 and C's 0x22.
#[test]
fn identity_mode_checks_each_session_against_its_own_peer() {
    let root = TestRoot::new();
    let mut fast_path = FastPath::open(root.paths()).expect("fast path loads");
    const PORT: u16 = 40010;
    let (a_slot, c_slot) = (1, 2);
    let mut desired = state(
        &[],
        &[
            (PORT, "192.0.2.0/28", a_slot),
            (PORT, "fd00:a::/64", a_slot),
            (PORT, "192.0.2.130/32", c_slot),
            (PORT, "fd00:c::1/128", c_slot),
        ],
    );
    desired.ports.insert(PORT, PortEntry::identity(0));
    for (slot, prefix) in [
        (a_slot, "192.0.2.0/28"),
        (a_slot, "fd00:a::/64"),
        (c_slot, "192.0.2.130/32"),
        (c_slot, "fd00:c::1/128"),
    ] {
        desired.peer_pins.insert(PeerPinKey {
            peer_slot: slot,
            prefix: prefix.parse().expect("prefix"),
        });
    }
    for (slot, byte) in [(a_slot, 0xaa), (c_slot, 0xcc)] {
        desired.identities.insert(
            PeerIdentity {
                port: PORT,
                public_key: [byte; 32],
            },
            slot,
        );
    }
    fast_path.apply(&desired).expect("maps written");
    assert_eq!(fast_path.read_state().expect("read back"), desired);
    // An event for every violation: this test checks what they say, not the rate limit.
    fast_path
        .set_event_interval(Duration::from_nanos(1))
        .expect("event interval");
    let (a_index, c_index, unknown) = (0x11, 0x22, 0x33);
    fast_path
        .record_session(PORT, a_index, a_slot)
        .expect("session");
    fast_path
        .record_session(PORT, c_index, c_slot)
        .expect("session");

    const GATEWAY: [u8; 4] = [198, 51, 100, 1];
    const A: [u8; 4] = [192, 0, 2, 2];
    const C: [u8; 4] = [192, 0, 2, 130];
    const OUTSIDE: [u8; 4] = [203, 0, 113, 9];
    let to_gateway = |src, message, first, second| {
        Frame::udp(Ip::V4(src, GATEWAY), 40000, PORT).wireguard(message, first, second)
    };
    const GATEWAY6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const A6: [u8; 16] = [0xfd, 0, 0, 0xa, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x42];
    const C6: [u8; 16] = [0xfd, 0, 0, 0xc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let to_gateway6 = |src, message, first| {
        Frame::udp(Ip::V6(src, GATEWAY6), 40000, PORT).wireguard(message, first, 0)
    };
    let (pass, drop) = (true, false);
    let ingress: Vec<(&str, Frame, bool)> = vec![
        (
            "initiation from C's address (cannot be attributed: the union decides)",
            to_gateway(C, 1, 7, 0),
            pass,
        ),
        (
            "initiation from outside every pin",
            to_gateway(OUTSIDE, 1, 7, 0),
            drop,
        ),
        (
            "A's data from A's address",
            to_gateway(A, 4, a_index, 0),
            pass,
        ),
        (
            "A's data from C's address",
            to_gateway(C, 4, a_index, 0),
            drop,
        ),
        (
            "C's data from C's address",
            to_gateway(C, 4, c_index, 0),
            pass,
        ),
        (
            "C's data from A's address",
            to_gateway(A, 4, c_index, 0),
            drop,
        ),
        (
            "a response to A's handshake from C's address",
            to_gateway(C, 2, 9, a_index),
            drop,
        ),
        (
            "a response to A's handshake from A's address",
            to_gateway(A, 2, 9, a_index),
            pass,
        ),
        (
            "a cookie reply for A's session from C's address",
            to_gateway(C, 3, a_index, 0),
            drop,
        ),
        (
            "an unknown session from C's address (the union decides)",
            to_gateway(C, 4, unknown, 0),
            pass,
        ),
        (
            "an unknown session from outside every pin",
            to_gateway(OUTSIDE, 4, unknown, 0),
            drop,
        ),
        (
            "A's data from A's IPv6 prefix",
            to_gateway6(A6, 4, a_index),
            pass,
        ),
        (
            "A's data from C's IPv6 address",
            to_gateway6(C6, 4, a_index),
            drop,
        ),
        (
            "C's data from C's IPv6 address",
            to_gateway6(C6, 4, c_index),
            pass,
        ),
    ];
    // Egress: what WireGuard sends from the identity port.
    let from_gateway = |dst, message, first, second| {
        Frame::udp(Ip::V4(GATEWAY, dst), PORT, 40000).wireguard(message, first, second)
    };
    let egress: Vec<(&str, Frame, bool)> = vec![
        (
            "a response for A to A's address",
            from_gateway(A, 2, a_index, 9),
            pass,
        ),
        (
            "a response for A to C's address (a stolen key used there)",
            from_gateway(C, 2, a_index, 9),
            drop,
        ),
        (
            "an initiation for A to C's address",
            from_gateway(C, 1, a_index, 0),
            drop,
        ),
        (
            "a response for C to C's address",
            from_gateway(C, 2, c_index, 9),
            pass,
        ),
        (
            "a response for A to C's IPv6 address",
            Frame::udp(Ip::V6(GATEWAY6, C6), PORT, 40000).wireguard(2, a_index, 9),
            drop,
        ),
        (
            "data (no sender index) to C's address",
            from_gateway(C, 4, 9, 0),
            pass,
        ),
        (
            "a response with an unknown index",
            from_gateway(C, 2, unknown, 9),
            pass,
        ),
        (
            "another port's traffic",
            Frame::udp(Ip::V4(GATEWAY, C), 40011, 40000).wireguard(2, a_index, 9),
            pass,
        ),
    ];
    let mut failures = Vec::new();
    let mut check = |hook: Hook, cases: &[(&str, Frame, bool)], pass_code: u32, drop_code: u32| {
        for (name, frame, should_pass) in cases {
            let (verdict, _) = fast_path
                .test_run(hook, &frame.bytes(), 1)
                .expect("test run");
            let expected = if *should_pass { pass_code } else { drop_code };
            if verdict != expected {
                failures.push(format!(
                    "{hook}: {name}: verdict {verdict}, expected {expected}"
                ));
            }
        }
    };
    check(Hook::Xdp, &ingress, XDP_PASS, XDP_DROP);
    check(Hook::Tc, &ingress, TC_NEXT, TC_SHOT);
    check(Hook::Egress, &egress, TC_NEXT, TC_SHOT);
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let counters = fast_path.identity_counters().expect("identity counters");
    // Per program: A's data, C's data, the response and the cookie from the wrong address.
    // And A's data from C's IPv6 address; on egress, the IPv6 response too.
    assert_eq!(counters.ingress_dropped, 2 * 5, "{counters:?}");
    assert_eq!(counters.egress_dropped, 3, "{counters:?}");
    assert_eq!(counters.unknown_sessions, 2 * 2, "{counters:?}");
    // The violations name the session's peer and the address that broke its pin.
    let violations = fast_path.drain_violations();
    let from = |kind: u8, slot: u32, source: [u8; 4]| {
        violations
            .iter()
            .any(|v| v.kind == kind && v.peer_slot == slot && v.source == IpAddr::from(source))
    };
    assert!(
        from(wgpin_common::VIOLATION_SESSION, a_slot, C),
        "{violations:?}"
    );
    assert!(
        from(wgpin_common::VIOLATION_SESSION, c_slot, A),
        "{violations:?}"
    );
    assert!(
        from(wgpin_common::VIOLATION_HANDSHAKE_OUT, a_slot, C),
        "{violations:?}"
    );
    assert!(
        from(wgpin_common::VIOLATION_SOURCE, NO_PEER, OUTSIDE),
        "{violations:?}"
    );
    // Per-peer counters: A's drops are A's, whichever address they came from.
    let a = fast_path.peer_counters(a_slot).expect("A's counters");
    assert_eq!(a.dropped_packets, 2 * 4 + 3, "{a:?}");

    // Removing identity mode takes the port's flag first, then identities and peer pins.
    let ops = fast_path
        .apply_ops(&FastPathState::default())
        .expect("removed");
    let first_identity = ops
        .iter()
        .position(|op| matches!(op, Op::DeleteIdentity(_)));
    let port = ops.iter().position(|op| matches!(op, Op::DeletePort(_)));
    assert!(port < first_identity, "{ops:?}");
    assert_eq!(
        fast_path.read_state().expect("read back"),
        FastPathState::default()
    );
    fast_path.remove_all().expect("clean up");
}

#[test]
fn event_rate_limit_holds_under_a_burst() {
    let pair = Pair::new();
    let root = TestRoot::new();
    let client_ns = pair.client_ns.clone();
    let (mut fast_path, _) = attached(&pair, &root, HookChoice::Auto);
    fast_path
        .apply(&state(&[(40001, 0, 0)], &[(40001, "192.0.2.2/32", 0)]))
        .expect("maps written");
    fast_path
        .set_event_interval(Duration::from_millis(500))
        .expect("interval set");

    send_udp(&client_ns, "192.0.2.5", SERVER_V4, 40001, 500, 64);
    send_udp(&client_ns, "192.0.2.6", SERVER_V4, 40001, 1, 64);
    let first = fast_path.drain_violations();
    let sources: Vec<String> = first.iter().map(|v| v.source.to_string()).collect();
    assert_eq!(
        sources,
        ["192.0.2.5", "192.0.2.6"],
        "one event per source: {first:?}"
    );
    let global = fast_path.global_counters().expect("global counters");
    assert_eq!((global.events_sent, global.events_rate_limited), (2, 499));
    assert_eq!(
        fast_path
            .port_counters(0)
            .expect("counters")
            .dropped_packets,
        501,
        "every packet is still counted"
    );

    // After the interval, the next event carries the count it stood for.
    std::thread::sleep(Duration::from_millis(600));
    send_udp(&client_ns, "192.0.2.5", SERVER_V4, 40001, 1, 64);
    let second = fast_path.drain_violations();
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(second[0].suppressed, 499);
}

/// A datagram larger than the MTU arrives in fragments; only the first carries the ports.
/// From an unpinned source that first fragment is dropped, so nothing is ever reassembled,
/// while the later fragments pass the fast path and die in the reassembly queue.
#[test]
fn a_fragmented_datagram_from_an_unpinned_source_is_never_reassembled() {
    let pair = Pair::new();
    pair.mtu(1280);
    let root = TestRoot::new();
    let (server_ns, client_ns) = (pair.server_ns.clone(), pair.client_ns.clone());
    let (mut fast_path, _) = attached(&pair, &root, HookChoice::Auto);
    fast_path
        .apply(&state(
            &[(40001, 0, 0)],
            &[(40001, "192.0.2.2/32", 0), (40001, "fd00:2::2/128", 0)],
        ))
        .expect("maps written");
    let receiver = Receiver::bind(&server_ns, 40001);
    for (pinned, unpinned, dest) in [
        ("192.0.2.2", "192.0.2.3", SERVER_V4),
        ("fd00:2::2", "fd00:2::3", SERVER_V6),
    ] {
        send_udp(&client_ns, pinned, dest, 40001, 1, 4000);
        send_udp(&client_ns, unpinned, dest, 40001, 1, 4000);
    }
    let received = receiver.drain();
    let sources: Vec<(String, usize)> = received
        .iter()
        .map(|(ip, len)| (ip.to_string(), *len))
        .collect();
    assert_eq!(
        sources,
        [
            ("192.0.2.2".to_string(), 4000),
            ("fd00:2::2".to_string(), 4000)
        ]
    );
    let counters = fast_path.port_counters(0).expect("counters");
    assert_eq!(
        (counters.allowed_packets, counters.dropped_packets),
        (2, 2),
        "one first fragment each, nothing else counted"
    );
}

/// Verification notices a removed link pin, a replaced map pin and a vanished interface.
#[test]
fn verify_notices_what_was_taken_away() {
    let pair = Pair::new();
    let root = TestRoot::new();
    let (server_ns, interface) = (pair.server_ns.clone(), pair.server_if.clone());
    let paths = root.paths();
    let problems = in_netns(&server_ns, move || {
        let mut fast_path = FastPath::open(paths.clone()).expect("fast path loads");
        fast_path
            .attach(&interface, HookChoice::Xdp)
            .expect("attaches");
        let mut seen = Vec::new();
        seen.push(fast_path.verify().problems);
        // Someone removes a map pin.
        std::fs::remove_file(paths.map(wgpin_common::maps::PORTS)).expect("unpin map");
        seen.push(fast_path.verify().problems);
        // Someone removes the link pin.
        std::fs::remove_file(paths.link(Hook::Xdp, &interface)).expect("unpin link");
        seen.push(fast_path.verify().problems);
        // The interface disappears.
        support::run("ip", &["link", "del", &interface]);
        seen.push(fast_path.verify().problems);
        seen
    });
    assert!(problems[0].is_empty(), "fresh: {:?}", problems[0]);
    assert!(
        problems[1]
            .iter()
            .any(|p| p.contains("WGPIN_PORTS is no longer pinned")),
        "{:?}",
        problems[1]
    );
    assert!(
        problems[2]
            .iter()
            .any(|p| p.contains("no longer pinned at")),
        "{:?}",
        problems[2]
    );
    assert!(
        problems[3].iter().any(|p| p.contains("xdp on")),
        "{:?}",
        problems[3]
    );
}

/// `kill -9` of the process that loaded the fast path leaves it enforcing; a new loader adopts
/// the pinned link and maps (writing nothing), and the counters carry on from where they were.
#[test]
fn kill_9_leaves_enforcement_and_a_new_loader_adopts_it() {
    let pair = Pair::new();
    let root = TestRoot::new();
    let exe = std::env::current_exe().expect("test binary");
    let mut holder = Command::new(exe)
        .args([
            "--exact",
            "hold_fast_path_until_killed",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WGPIN_TEST_ROOT", &root.0)
        .env("WGPIN_TEST_NETNS", &pair.server_ns)
        .env("WGPIN_TEST_INTERFACE", &pair.server_if)
        .stdout(Stdio::piped())
        .spawn()
        .expect("holder starts");
    let mut stdout = std::io::BufReader::new(holder.stdout.take().expect("holder stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        let read = std::io::BufRead::read_line(&mut stdout, &mut line).expect("holder output");
        assert!(read > 0, "the holder exited before it was ready");
        // libtest prints "test NAME ... " on the same line first.
        if line.trim_end().ends_with("WGPIN-HOLDER-READY") {
            break;
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    let _ = holder.wait();

    let receiver = Receiver::bind(&pair.server_ns, 40001);
    send_udp(&pair.client_ns, "192.0.2.2", SERVER_V4, 40001, 2, 100);
    send_udp(&pair.client_ns, "192.0.2.3", SERVER_V4, 40001, 3, 100);
    assert_eq!(
        count_by_source(&receiver.drain()),
        counts(&[("192.0.2.2", 2)]),
        "still enforced with no loader alive"
    );

    let (server_ns, interface, paths) =
        (pair.server_ns.clone(), pair.server_if.clone(), root.paths());
    let (writes, verification, before) = in_netns(&server_ns, move || {
        let mut fast_path = FastPath::open(paths).expect("adopts");
        assert_eq!(fast_path.attachments(), [(Hook::Xdp, interface.clone())]);
        let attachment = fast_path
            .attach(&interface, HookChoice::Auto)
            .expect("kept");
        assert_eq!(attachment.reason, "kept the pinned link");
        let writes = fast_path.apply(&held_state()).expect("apply");
        (
            writes,
            fast_path.verify(),
            fast_path.port_counters(0).expect("counters"),
        )
    });
    assert_eq!(writes, 0, "the adopted maps already hold the state");
    assert!(verification.is_ok(), "{verification:?}");
    assert_eq!(
        (before.allowed_packets, before.dropped_packets),
        (2, 3),
        "counts made while no loader ran"
    );
}

fn held_state() -> FastPathState {
    state(&[(40001, 0, 0)], &[(40001, "192.0.2.2/32", 0)])
}

/// Not a test: the process `kill_9_leaves_enforcement_and_a_new_loader_adopts_it` kills.
#[test]
#[ignore = "helper process for the kill -9 test; does nothing on its own"]
fn hold_fast_path_until_killed() {
    let (Ok(root), Ok(netns), Ok(interface)) = (
        std::env::var("WGPIN_TEST_ROOT"),
        std::env::var("WGPIN_TEST_NETNS"),
        std::env::var("WGPIN_TEST_INTERFACE"),
    ) else {
        return;
    };
    in_netns(&netns, move || {
        let mut fast_path = FastPath::open(BpfPaths::new(root)).expect("fast path loads");
        fast_path
            .attach(&interface, HookChoice::Xdp)
            .expect("attaches");
        fast_path.apply(&held_state()).expect("maps written");
        println!("WGPIN-HOLDER-READY");
        std::thread::sleep(Duration::from_secs(60));
    });
}

/// When another program owns an interface's XDP hook, the loader does not fight it: it falls
/// back to TC and says why.
#[test]
fn another_xdp_owner_means_tc_with_a_reason() {
    let pair = Pair::new();
    let (first_root, second_root) = (TestRoot::new(), TestRoot::new());
    let (server_ns, interface) = (pair.server_ns.clone(), pair.server_if.clone());
    let (first_paths, second_paths) = (first_root.paths(), second_root.paths());
    let (first, second) = in_netns(&server_ns, move || {
        let mut owner = FastPath::open(first_paths).expect("first loader");
        let first = owner
            .attach(&interface, HookChoice::Xdp)
            .expect("takes the XDP hook");
        let mut second_loader = FastPath::open(second_paths).expect("second loader");
        let second = second_loader
            .attach(&interface, HookChoice::Auto)
            .expect("falls back");
        let verification = second_loader.verify();
        assert!(verification.is_ok(), "{verification:?}");
        (first, second)
    });
    assert_eq!(first.hook, Hook::Xdp);
    assert_eq!(second.hook, Hook::Tc);
    assert!(
        second.reason.contains("another XDP program"),
        "{}",
        second.reason
    );
}

/// Pins change while a pinned source streams packets: not one of its packets is dropped, and
/// a source pinned in neither state never gets through.
#[test]
fn changing_pins_under_traffic_drops_no_valid_packet() {
    let pair = Pair::new();
    let root = TestRoot::new();
    let (mut fast_path, _) = attached(&pair, &root, HookChoice::Auto);
    let wide = state(&[(40001, 0, NO_PEER)], &[(40001, "192.0.2.0/24", 1)]);
    let narrow = state(
        &[(40001, 0, NO_PEER)],
        &[(40001, "192.0.2.2/32", 2), (40001, "192.0.2.128/25", 3)],
    );
    fast_path.apply(&wide).expect("maps written");

    const VALID: usize = 20_000;
    const INVALID: usize = 2_000;
    let client_ns = pair.client_ns.clone();
    let sender = std::thread::spawn(move || {
        for _ in 0..(VALID / 100) {
            send_udp(&client_ns, "192.0.2.2", SERVER_V4, 40001, 100, 32);
            send_udp(
                &client_ns,
                "fd00:2::5",
                SERVER_V6,
                40001,
                INVALID / (VALID / 100),
                32,
            );
        }
    });
    let mut changes = 0;
    while !sender.is_finished() {
        fast_path
            .apply(if changes % 2 == 0 { &narrow } else { &wide })
            .expect("pins changed");
        changes += 1;
    }
    sender.join().expect("sender");
    let counters = fast_path.port_counters(0).expect("counters");
    assert!(
        changes >= 10,
        "the pins changed only {changes} times while traffic flowed"
    );
    assert_eq!(
        (counters.allowed_packets, counters.dropped_packets),
        (VALID as u64, INVALID as u64),
        "after {changes} changes"
    );
}

/// Replacing the program (what an upgrade does) keeps the link and its pin, swaps the program
/// atomically, and lets no unpinned packet through while traffic flows.
#[test]
fn replacing_the_program_leaves_no_window() {
    for choice in [HookChoice::Xdp, HookChoice::Tc] {
        let pair = Pair::new();
        let root = TestRoot::new();
        let (server_ns, interface) = (pair.server_ns.clone(), pair.server_if.clone());
        let (old_paths, new_paths) = (root.paths(), root.paths());
        // The "old agent" attaches and goes away.
        in_netns(&server_ns, move || {
            let mut old = FastPath::open(old_paths).expect("old agent loads");
            old.attach(&interface, choice).expect("attaches");
            old.apply(&state(
                &[(40001, 0, NO_PEER)],
                &[(40001, "192.0.2.2/32", 1)],
            ))
            .expect("maps written");
        });
        let client_ns = pair.client_ns.clone();
        let interface = pair.server_if.clone();
        let (links_before, links_after, counters) = in_netns(&server_ns, move || {
            let hook = if choice == HookChoice::Tc {
                Hook::Tc
            } else {
                Hook::Xdp
            };
            let pin_path = new_paths.link(hook, &interface);
            // (link id, program id) of the pinned link.
            let pinned = || -> (u32, u32) {
                let link =
                    aya::programs::links::PinnedLink::from_pin(&pin_path).expect("link pinned");
                let info = aya::programs::links::FdLink::from(link)
                    .info()
                    .expect("link info");
                (info.id(), info.program_id())
            };
            let mut new = FastPath::open(new_paths).expect("new agent adopts");
            let before = pinned();
            let sender = std::thread::spawn(move || {
                for _ in 0..100 {
                    send_udp(&client_ns, "192.0.2.2", SERVER_V4, 40001, 50, 32);
                    send_udp(&client_ns, "192.0.2.3", SERVER_V4, 40001, 10, 32);
                }
            });
            let mut replaced = 0;
            while !sender.is_finished() {
                new.replace_programs().expect("program replaced");
                replaced += 1;
            }
            sender.join().expect("sender");
            assert!(
                replaced >= 5,
                "replaced only {replaced} times during traffic"
            );
            let verification = new.verify();
            assert!(verification.is_ok(), "{interface}: {verification:?}");
            (before, pinned(), new.port_counters(0).expect("counters"))
        });
        assert_eq!(
            links_before.0, links_after.0,
            "{choice:?}: the same link, not a new one"
        );
        assert_ne!(
            links_before.1, links_after.1,
            "{choice:?}: with another program in it"
        );
        assert_eq!(
            (counters.allowed_packets, counters.dropped_packets),
            (5000, 1000),
            "{choice:?}"
        );
    }
}

/// A flood from ever new sources (the attack the per-source rate limit cannot stop) produces
/// exactly the per-CPU budget of events a second; the rest are counted and cost no map insert.
#[test]
fn a_flood_from_ever_new_sources_stays_within_the_event_budget() {
    let root = TestRoot::new();
    let mut fast_path = FastPath::open(root.paths()).expect("fast path loads");
    fast_path
        .apply(&state(
            &[(40001, 0, NO_PEER)],
            &[(40001, "fd00:40::/48", 1)],
        ))
        .expect("maps written");
    fast_path.set_event_budget(100).expect("budget set");
    const FLOOD: u32 = 3_000;
    let destination = [0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    for n in 0..FLOOD {
        let mut source = [0xfd, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        source[12..].copy_from_slice(&n.to_be_bytes());
        let frame = Frame::udp(Ip::V6(source, destination), 5000, 40001).bytes();
        let (verdict, _) = fast_path.test_run(Hook::Xdp, &frame, 1).expect("test run");
        assert_eq!(verdict, XDP_DROP);
    }
    let events = fast_path.drain_violations();
    let global = fast_path.global_counters().expect("global counters");
    assert_eq!(events.len(), 100, "one window's budget of events");
    assert_eq!(
        (global.events_sent, global.events_rate_limited),
        (100, u64::from(FLOOD) - 100)
    );
    assert_eq!(
        fast_path
            .port_counters(0)
            .expect("counters")
            .dropped_packets,
        u64::from(FLOOD),
        "every packet is dropped and counted"
    );
    fast_path.remove_all().expect("clean up");
}

/// An IPv4 address embedded in an IPv6 one (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible
/// `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, IPv4-translated `::ffff:0:a.b.c.d`) is an IPv6 source
/// to the real programs: a pin is an allowlist, and only a prefix of the packet's own family
/// that literally contains its source admits it. So no aliasing form of 192.0.2.2 passes its
/// IPv4 pin, and no IPv6 pin written in such a form (which validation refuses anyway for the
/// mapped one) admits the IPv4 address it embeds.
#[test]
fn aliasing_forms_of_an_address_never_pass_its_pin() {
    let root = TestRoot::new();
    let mut fast_path = FastPath::open(root.paths()).expect("fast path loads");
    fast_path
        .apply(&state(
            &[(40001, 0, 7), (40002, 1, NO_PEER), (40003, 2, 9)],
            &[
                (40001, "192.0.2.2/32", 7),
                (40001, "fd00:2::2/128", 7),
                (40002, "192.0.2.0/24", 1),
                (40002, "2001:db8::/32", 2),
                // Written in an aliasing form on purpose (the maps take anything): it must not
                // admit IPv4 192.0.2.2 nor any IPv4 source.
                (40003, "::ffff:192.0.2.2/128", 9),
                (40003, "::ffff:0:0/96", 9),
                (40003, "64:ff9b::/96", 9),
            ],
        ))
        .expect("maps written");
    let embedded = |prefix: [u8; 12]| {
        let mut address = [0u8; 16];
        address[..12].copy_from_slice(&prefix);
        address[12..].copy_from_slice(&[192, 0, 2, 2]);
        address
    };
    let mapped = embedded([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
    let compatible = embedded([0; 12]);
    let nat64 = embedded([0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0]);
    let translated = embedded([0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0]);
    let server6 = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let v4 = |src: [u8; 4]| Ip::V4(src, [192, 0, 2, 1]);
    let v6 = |src: [u8; 16]| Ip::V6(src, server6);
    let cases: Vec<(&str, Ip, u16, bool)> = vec![
        ("IPv4 192.0.2.2, pinned", v4([192, 0, 2, 2]), 40001, true),
        ("IPv4-mapped", v6(mapped), 40001, false),
        ("IPv4-compatible", v6(compatible), 40001, false),
        ("NAT64", v6(nat64), 40001, false),
        ("IPv4-translated", v6(translated), 40001, false),
        ("IPv4-mapped, /24 pin", v6(mapped), 40002, false),
        ("NAT64, /24 pin", v6(nat64), 40002, false),
        (
            "IPv4 192.0.2.2, mapped pins only",
            v4([192, 0, 2, 2]),
            40003,
            false,
        ),
        (
            "IPv4 0.0.0.0, mapped pins only",
            v4([0, 0, 0, 0]),
            40003,
            false,
        ),
        // The aliasing pins admit exactly the IPv6 sources they literally contain.
        (
            "IPv6 ::ffff:192.0.2.2 under its own pin",
            v6(mapped),
            40003,
            true,
        ),
        (
            "IPv6 64:ff9b::c000:202 under 64:ff9b::/96",
            v6(nat64),
            40003,
            true,
        ),
        (
            "IPv6 ::c000:202, not under any",
            v6(compatible),
            40003,
            false,
        ),
    ];
    let mut failures = Vec::new();
    for (hook, pass_code, drop_code) in [
        (Hook::Xdp, XDP_PASS, XDP_DROP),
        (Hook::Tc, TC_NEXT, TC_SHOT),
    ] {
        for (name, ip, port, pass) in &cases {
            let frame = Frame::udp(*ip, 5000, *port).bytes();
            let (verdict, _) = fast_path.test_run(hook, &frame, 1).expect("test run");
            let expected = if *pass { pass_code } else { drop_code };
            if verdict != expected {
                failures.push(format!(
                    "{hook}: {name} to {port}: verdict {verdict}, expected {expected}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    fast_path.remove_all().expect("clean up");
}

/// The programs the kernel verified give the verdict the host parser and the allowlist's
/// meaning give, on any frame: crafted ones of every shape, with bytes changed, cut short,
/// with sources near and inside the pins (proptest over `BPF_PROG_TEST_RUN`, both hooks).
#[test]
fn the_programs_agree_with_the_host_parser_on_any_frame() {
    use proptest::{
        prelude::*,
        test_runner::{Config, RngSeed, TestRunner},
    };
    use wgpin_common::{Parsed, parse};

    let root = TestRoot::new();
    let mut fast_path = FastPath::open(root.paths()).expect("fast path loads");
    let desired = state(
        &[(40001, 0, 7), (40002, 1, NO_PEER)],
        &[
            (40001, "192.0.2.2/32", 7),
            (40001, "fd00:2::/64", 7),
            (40002, "192.0.2.0/29", 1),
            (40002, "192.0.2.3/32", 2),
            (40002, "::/0", 3),
        ],
    );
    fast_path.apply(&desired).expect("maps written");
    let allowed = |parsed: Parsed| match parsed {
        Parsed::NotUdp | Parsed::LaterFragment => true,
        Parsed::Unparseable => false,
        Parsed::Udp(udp) => {
            let port = udp.dst_port();
            let source: IpAddr = if udp.family == wgpin_common::FAMILY_V4 {
                IpAddr::from([udp.src[0], udp.src[1], udp.src[2], udp.src[3]])
            } else {
                IpAddr::from(udp.src)
            };
            !desired.ports.contains_key(&port)
                || desired
                    .pins
                    .keys()
                    .any(|k| k.port == port && k.prefix.contains(&source))
        }
    };

    let near_v4 = prop_oneof![
        Just([192u8, 0, 2, 2]),
        (0u8..16).prop_map(|n| [192, 0, 2, n]),
        any::<[u8; 4]>(),
    ];
    let near_v6 = prop_oneof![
        any::<u64>().prop_map(|n| {
            let mut a = [0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            a[8..].copy_from_slice(&n.to_be_bytes());
            a
        }),
        (0u8..16).prop_map(|n| [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, n]),
        any::<[u8; 16]>(),
    ];
    let ip = prop_oneof![
        near_v4.prop_map(|s| Ip::V4(s, [192, 0, 2, 1])),
        near_v6.prop_map(|s| Ip::V6(s, [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])),
    ];
    let frame = (
        ip,
        prop_oneof![Just(40001u16), Just(40002), Just(40003), any::<u16>()],
        0usize..=2,
        prop::option::weighted(0.3, (prop_oneof![Just(0u16), 1u16..0x2000], any::<bool>())),
        prop::collection::vec((prop::sample::select(vec![0u8, 43, 51, 60]), 0u8..3), 0..10),
        0usize..=3,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        prop::option::weighted(0.2, any::<prop::sample::Index>()),
    )
        .prop_map(|(ip, port, vlans, fragment, exts, options, changes, cut)| {
            let mut frame = Frame::udp(ip, 5000, port).ipv4_options(options * 4);
            for n in 0..vlans {
                frame = frame.vlan(10 + n as u16);
            }
            if matches!(ip, Ip::V6(..)) {
                for (kind, len) in exts {
                    frame = frame.ipv6_ext(kind, len);
                }
            }
            if let Some((offset, more)) = fragment {
                frame = frame.ipv4_fragment(offset, more);
            }
            let mut bytes = frame.bytes();
            for (at, value) in changes {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
            if let Some(cut) = cut {
                // The kernel's test run needs at least an Ethernet header.
                bytes.truncate(14 + cut.index(bytes.len() - 13));
            }
            bytes
        });

    // Fixed seed, the same cases every run; PROPTEST_CASES and PROPTEST_RNG_SEED explore.
    let env = |name: &str| std::env::var(name).ok().and_then(|n| n.parse::<u64>().ok());
    let config = Config {
        cases: env("PROPTEST_CASES").map_or(5_000, |n| n as u32),
        rng_seed: RngSeed::Fixed(env("PROPTEST_RNG_SEED").unwrap_or(0x5767_7069_6e04)),
        // Failures go to agent/proptest-regressions/ and are replayed first.
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "proptest-regressions/tests/fastpath.txt",
            ),
        )),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let skipped = std::cell::Cell::new(0u32);
    let result = runner.run(&frame, |bytes| {
        let expected = allowed(parse(&bytes[..]));
        for (hook, pass_code) in [(Hook::Xdp, XDP_PASS), (Hook::Tc, TC_NEXT)] {
            let verdict = match fast_path.test_run(hook, &bytes, 1) {
                Ok((verdict, _)) => verdict,
                // The kernel's skb test run refuses a frame cut inside its IP header (EINVAL);
                // XDP ran it above.
                Err(_) if hook == Hook::Tc && bytes.len() < 14 + 2 * 4 + 40 => {
                    skipped.set(skipped.get() + 1);
                    continue;
                }
                Err(e) => return Err(TestCaseError::fail(format!("{e}: {bytes:02x?}"))),
            };
            prop_assert_eq!(
                verdict == pass_code,
                expected,
                "{}: verdict {} on {:02x?} (host parser: {:?})",
                hook,
                verdict,
                bytes,
                parse(&bytes[..])
            );
        }
        Ok(())
    });
    fast_path.remove_all().expect("clean up");
    println!(
        "TC test runs the kernel refused (frames cut in the IP header): {}",
        skipped.get()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// An earlier agent's maps with another layout (a map of another key or value size at a pin
/// this agent's object names) are refused with what differs and what to do, before anything is
/// loaded against them.
#[test]
fn pinned_maps_of_another_layout_are_refused_with_a_reason() {
    let (first, second) = (TestRoot::new(), TestRoot::new());
    let fast_path = FastPath::open(first.paths()).expect("fast path loads");
    std::fs::create_dir_all(second.paths().maps()).expect("maps dir");
    // The config map (one 16-byte value, key u32) pinned where the ports map belongs.
    let config = aya::maps::MapData::from_pin(first.paths().map(wgpin_common::maps::CONFIG))
        .expect("config map");
    config
        .pin(second.paths().map(wgpin_common::maps::PORTS))
        .expect("pinned under the other root");
    let error = match FastPath::open(second.paths()) {
        Ok(_) => panic!("a map of another layout must be refused"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("map WGPIN_PORTS pinned at")
            && error.contains("has another layout than this agent's")
            && error.contains("value 16 B")
            && error.contains("remove"),
        "{error}"
    );
    drop(config);
    fast_path.remove_all().expect("clean up");
}

/// tcx runs its programs in order, and a program before wgpin's that accepts a packet for good
/// (`TC_ACT_OK`) takes it past the pin. wgpin attaches itself first, and a program that gets
/// ahead of it afterwards is a verification problem (the guard withdraws the peers, attaches
/// first again and restores them).
#[test]
fn a_program_ahead_of_ours_in_the_tcx_chain_is_a_problem() {
    let pair = Pair::new();
    let (ours, other) = (TestRoot::new(), TestRoot::new());
    let (server_ns, interface) = (pair.server_ns.clone(), pair.server_if.clone());
    let (ours_paths, other_paths) = (ours.paths(), other.paths());
    let (before, ahead, again) = in_netns(&server_ns, move || {
        let mut fast_path = FastPath::open(ours_paths).expect("fast path loads");
        fast_path
            .attach(&interface, HookChoice::Tc)
            .expect("attaches");
        let before = fast_path.verify().problems;
        // Another tcx user attaches later and asks to be first.
        let mut intruder = FastPath::open(other_paths).expect("another fast path loads");
        intruder
            .attach(&interface, HookChoice::Tc)
            .expect("attaches first");
        let ahead = fast_path.verify().problems;
        // What the guard does: attach again, first.
        fast_path.detach(&interface);
        fast_path
            .attach(&interface, HookChoice::Tc)
            .expect("attaches again");
        let again = fast_path.verify().problems;
        intruder.remove_all().expect("clean up");
        fast_path.remove_all().expect("clean up");
        (before, ahead, again)
    });
    assert!(before.is_empty(), "{before:?}");
    assert!(
        ahead
            .iter()
            .any(|p| p.starts_with("tc on") && p.contains("run before wgpin's in the tcx chain")),
        "{ahead:?}"
    );
    assert!(again.is_empty(), "first again: {again:?}");
}
