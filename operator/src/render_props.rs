//! Property tests of [`render`] (proptest, inside `cargo test`): random clusters of interfaces,
//! peers (valid or not, duplicate keys, overlapping tunnel prefixes, overlapping and aliasing
//! pins, Unicode and 253-character names) and nodes.
//!
//! - render never panics, and gives the same result for the same objects in any order;
//! - a peer is rendered only if its spec validates, and then with exactly the sources it wrote
//!   (each canonical, none IPv4-mapped, a catch-all only with `allowAnySource`): never a wider
//!   pin;
//! - every peer is rendered on some node or reported with a reason: never silently dropped;
//! - a peer's key is rendered once per interface and node, its tunnel prefixes overlap no other
//!   rendered peer's on that interface, a dedicated port lies in the interface's range and
//!   belongs to one peer.
//!
//! Fixed seed; `PROPTEST_RNG_SEED` and `PROPTEST_CASES` explore further. Failures are kept in
//! `operator/proptest-regressions/` and replayed first.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use proptest::{
    prelude::*,
    test_runner::{Config, RngSeed},
};
use serde_json::json;
use wgpin_crds::{
    PinnedInterface, PinnedPeer,
    k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp},
    kube::ResourceExt,
};

use crate::render::{NodeInfo, PortAssignments, ProblemReason, render};

fn config(cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(0x5767_7069_6e03);
    }
    config
}

const KEYS: [&str; 4] = [
    "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
    "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=",
    "gN65BkIKy1eCE9pP1wdc8ROUtkHLF2PfAqYdyYBz6EA=",
    "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
];

/// Pins from a small pool, so that peers share and nest them; a few are invalid on purpose
/// (mapped, host bits, catch-all, not a prefix).
const SOURCES: [&str; 14] = [
    "203.0.113.0/24",
    "203.0.113.0/25",
    "203.0.113.7/32",
    "192.0.2.0/24",
    "192.0.2.2/32",
    "2001:db8:40::/48",
    "2001:db8:40::7/128",
    "64:ff9b::c000:202/128",
    "::c000:202/128",
    // Catch-alls and invalid ones from here on.
    "0.0.0.0/0",
    "::/0",
    "::ffff:192.0.2.2/128",
    "203.0.113.7/24",
    "office",
];

const ALLOWED: [&str; 6] = [
    "198.51.100.2/32",
    "198.51.100.3/32",
    "198.51.100.0/24",
    "fd00:99::2/128",
    "fd00:99::/64",
    "10.0.0.0/8",
];

const INTERFACES: [&str; 3] = ["gateway", "edge", "core"];

fn arb_name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z][a-z0-9]{0,6}",
        1 => Just(format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61))),
        1 => "[a-zäöü😀]{1,8}",
    ]
}

fn arb_interface() -> impl Strategy<Value = PinnedInterface> {
    (
        prop::sample::select(INTERFACES.to_vec()),
        prop::sample::select(vec!["Auto", "Dedicated", "Shared", "Identity"]),
        prop_oneof![8 => Just("wgpin0"), 2 => Just("wg-edge"), 1 => Just("wgpïn0"), 1 => Just("")],
        prop_oneof![8 => Just(51820u16), 2 => Just(51821), 1 => Just(0)],
        prop::option::of(0u16..8),
        prop::option::of(prop::sample::select(vec!["a", "b"])),
    )
        .prop_map(|(name, mode, device, port, span, role)| {
            let mut spec = json!({
                "nodeSelector": role.map_or(json!({}), |r| json!({"matchLabels": {"role": r}})),
                "interfaceName": device,
                "listenPort": port,
                "mode": mode,
            });
            if let Some(span) = span {
                spec["listenPortEnd"] = json!(port.saturating_add(span));
            }
            serde_json::from_value(json!({
                "apiVersion": "wgpin.io/v1alpha1",
                "kind": "PinnedInterface",
                "metadata": {"name": name},
                "spec": spec,
            }))
            .expect("interface object")
        })
}

fn arb_peer() -> impl Strategy<Value = (String, PinnedPeer)> {
    let sources = prop_oneof![
        8 => prop::sample::subsequence(SOURCES[..9].to_vec(), 1..4),
        2 => prop::sample::subsequence(SOURCES.to_vec(), 0..4),
        1 => prop::collection::vec(prop::sample::select(SOURCES.to_vec()), 0..4),
    ];
    let allowed = prop_oneof![
        6 => any::<u16>().prop_map(|n| vec![format!("fd00:aa::{n:x}/128")]),
        3 => prop::sample::subsequence(ALLOWED.to_vec(), 0..3)
            .prop_map(|v| v.into_iter().map(str::to_string).collect()),
        1 => prop::collection::vec(prop::sample::select(ALLOWED.to_vec()).prop_map(str::to_string), 0..3),
    ];
    let key = prop_oneof![
        3 => any::<[u8; 32]>().prop_map(|k| wgpin_crds::WireGuardKey::from_bytes(k).to_base64()),
        1 => prop::sample::select(KEYS.to_vec()).prop_map(str::to_string),
    ];
    (
        arb_name(),
        prop_oneof![8 => prop::sample::select(INTERFACES.to_vec()), 1 => Just("nowhere")],
        key,
        allowed,
        sources,
        // Mostly what the sources call for; sometimes the opposite.
        prop::option::weighted(0.15, any::<bool>()),
        prop::option::weighted(
            0.3,
            prop::sample::select(vec![
                "203.0.113.7",
                "192.0.2.2",
                "2001:db8:40::7",
                "::ffff:192.0.2.2",
            ]),
        ),
        prop::option::of(prop::sample::select(vec!["a", "b"])),
        0i64..5,
    )
        .prop_map(
            |(name, interface, key, allowed, sources, any_source, endpoint, role, age)| {
                let catch_all = sources.iter().any(|s| s.ends_with("/0"));
                let mut spec = json!({
                    "interface": interface,
                    "publicKey": key,
                    "allowedIPs": allowed,
                    "sources": sources,
                    "allowAnySource": any_source.unwrap_or(catch_all),
                });
                if let Some(address) = endpoint {
                    spec["endpoint"] = json!({"address": address, "port": 51820});
                }
                if let Some(role) = role {
                    spec["nodeSelector"] = json!({"matchLabels": {"role": role}});
                }
                let mut peer: PinnedPeer = serde_json::from_value(json!({
                    "apiVersion": "wgpin.io/v1alpha1",
                    "kind": "PinnedPeer",
                    "metadata": {"name": name.clone(), "generation": 1},
                    "spec": spec,
                }))
                .expect("peer object");
                let ts = Timestamp::from_second(1_700_000_000 + age).expect("timestamp");
                peer.metadata.creation_timestamp = Some(Time(ts));
                (name, peer)
            },
        )
}

fn arb_cluster() -> impl Strategy<Value = (Vec<PinnedInterface>, Vec<PinnedPeer>, Vec<NodeInfo>)> {
    (
        prop::collection::vec(arb_interface(), 1..4),
        prop::collection::vec(arb_peer(), 0..12),
        prop::collection::vec(prop::option::of(prop::sample::select(vec!["a", "b"])), 1..4),
    )
        .prop_map(|(interfaces, peers, nodes)| {
            // Names are unique per kind, as the API server keeps them.
            let mut seen = BTreeSet::new();
            let interfaces = interfaces
                .into_iter()
                .filter(|i| seen.insert(i.name_any()))
                .collect();
            let mut seen = BTreeSet::new();
            let peers = peers
                .into_iter()
                .filter(|(n, _)| seen.insert(n.clone()))
                .map(|(_, p)| p)
                .collect();
            let nodes = nodes
                .into_iter()
                .enumerate()
                .map(|(i, role)| NodeInfo {
                    name: format!("node-{i}"),
                    labels: role
                        .map(|r| ("role".to_string(), r.to_string()))
                        .into_iter()
                        .collect(),
                })
                .collect();
            (interfaces, peers, nodes)
        })
}

/// Peers rendered over all cases, to check that the generator reaches the interesting part.
static RENDERED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn is_mapped(net: &IpNet) -> bool {
    matches!(net.addr(), IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

proptest! {
    #![proptest_config(config(2_000))]

    fn render_property(
        (interfaces, peers, nodes) in arb_cluster(),
        previous in prop::collection::btree_map(
            (prop::sample::select(INTERFACES.to_vec()).prop_map(str::to_string), "[a-z]{1,3}"),
            51815u16..51830,
            0..4,
        ),
    ) {
        let previous: PortAssignments = previous;
        let rendered = render(&interfaces, &peers, &nodes, &previous);

        // Deterministic, whatever the order of the objects.
        let mut reversed_peers = peers.clone();
        reversed_peers.reverse();
        let mut reversed_interfaces = interfaces.clone();
        reversed_interfaces.reverse();
        prop_assert_eq!(&render(&reversed_interfaces, &reversed_peers, &nodes, &previous), &rendered);
        RENDERED.fetch_add(
            rendered.nodes.values().flat_map(|s| &s.interfaces).map(|i| i.peers.len()).sum(),
            std::sync::atomic::Ordering::Relaxed,
        );

        let by_name: BTreeMap<String, &PinnedPeer> = peers.iter().map(|p| (p.name_any(), p)).collect();
        let interface_by_name: BTreeMap<String, &PinnedInterface> =
            interfaces.iter().map(|i| (i.name_any(), i)).collect();
        let problems: BTreeMap<&str, BTreeSet<ProblemReason>> =
            rendered.problems.iter().fold(BTreeMap::new(), |mut map, p| {
                map.entry(p.name.as_str()).or_default().insert(p.reason);
                map
            });
        let mut rendered_peers = BTreeSet::new();
        for (node, state) in &rendered.nodes {
            prop_assert_eq!(&state.node_name, node);
            for interface in &state.interfaces {
                let object = interface_by_name.get(&interface.name).copied()
                    .ok_or_else(|| TestCaseError::fail("rendered an unknown interface"))?;
                let validated = object.spec.validate().map_err(|e| TestCaseError::fail(format!("invalid interface rendered: {e:?}")))?;
                let mut keys = BTreeSet::new();
                let mut routes: Vec<IpNet> = Vec::new();
                let mut ports = BTreeSet::new();
                for peer in &interface.peers {
                    rendered_peers.insert(peer.name.clone());
                    let object = by_name.get(&peer.name).copied()
                        .ok_or_else(|| TestCaseError::fail("rendered an unknown peer"))?;
                    prop_assert_eq!(&object.spec.interface, &interface.name);
                    let spec = object.spec.validate()
                        .map_err(|e| TestCaseError::fail(format!("{} rendered but invalid: {e:?}", peer.name)))?;
                    // The pin exactly as written: same prefixes, same order, nothing added.
                    prop_assert_eq!(&peer.sources, &object.spec.sources);
                    let pin: Vec<IpNet> = peer.sources.iter().map(|s| s.parse().expect("prefix")).collect();
                    prop_assert_eq!(&pin, &spec.sources);
                    prop_assert!(!pin.is_empty());
                    prop_assert!(!pin.iter().any(is_mapped));
                    prop_assert_eq!(pin.iter().any(|n| n.prefix_len() == 0), object.spec.allow_any_source);
                    if let Some(endpoint) = &peer.endpoint {
                        let ip: IpAddr = endpoint.address.parse().expect("ip");
                        prop_assert!(pin.iter().any(|n| n.contains(&ip)), "endpoint outside the pin");
                    }
                    prop_assert!(keys.insert(peer.public_key.clone()), "key twice on {}", interface.name);
                    for net in &spec.allowed_ips {
                        prop_assert!(!routes.iter().any(|r| r.contains(net) || net.contains(r)), "{} overlaps", net);
                    }
                    routes.extend(spec.allowed_ips.iter().copied());
                    if let Some(port) = peer.dedicated_port {
                        prop_assert!(validated.ports.contains(&port));
                        prop_assert!(ports.insert(port), "port {} twice", port);
                    }
                }
            }
        }
        for (name, peer) in &by_name {
            let reasons = problems.get(name.as_str());
            if peer.spec.validate().is_err() {
                prop_assert!(!rendered_peers.contains(name), "invalid {} rendered", name);
                prop_assert!(reasons.is_some_and(|r| r.contains(&ProblemReason::InvalidSpec)));
            }
            prop_assert!(
                rendered_peers.contains(name) || reasons.is_some(),
                "{} neither rendered nor reported", name
            );
        }
    }
}

#[test]
fn render_never_widens_a_pin_nor_drops_a_peer_silently() {
    render_property();
    let rendered = RENDERED.load(std::sync::atomic::Ordering::Relaxed);
    println!("peers rendered over all cases: {rendered}");
    assert!(
        rendered > 0,
        "the generator never produced a renderable peer"
    );
}

/// One peer with 10,000 sources (what a cluster that skipped the schema could hold), next to
/// a normal one: refused with a short, clear problem, in bounded time; the other is rendered.
#[test]
fn ten_thousand_sources_on_one_peer_leave_it_out_with_a_clear_problem() {
    let interface: PinnedInterface = serde_json::from_value(json!({
        "apiVersion": "wgpin.io/v1alpha1",
        "kind": "PinnedInterface",
        "metadata": {"name": "gateway"},
        "spec": {"nodeSelector": {}, "interfaceName": "wgpin0", "listenPort": 51820},
    }))
    .expect("interface");
    let peer = |name: &str, key: &str, allowed: &str, sources: Vec<String>| -> PinnedPeer {
        serde_json::from_value(json!({
            "apiVersion": "wgpin.io/v1alpha1",
            "kind": "PinnedPeer",
            "metadata": {"name": name},
            "spec": {"interface": "gateway", "publicKey": key, "allowedIPs": [allowed], "sources": sources},
        }))
        .expect("peer")
    };
    let huge: Vec<String> = (0..10_000u32)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    let peers = vec![
        peer("huge", KEYS[0], "198.51.100.2/32", huge),
        peer(
            "normal",
            KEYS[1],
            "198.51.100.3/32",
            vec!["203.0.113.0/24".into()],
        ),
    ];
    let nodes = vec![NodeInfo {
        name: "gw".into(),
        labels: BTreeMap::new(),
    }];
    let start = Instant::now();
    let rendered = render(&[interface], &peers, &nodes, &PortAssignments::new());
    let took = start.elapsed();
    println!("render with a 10,000-source peer: {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let problem = rendered
        .problems
        .iter()
        .find(|p| p.name == "huge")
        .expect("reported");
    assert_eq!(problem.reason, ProblemReason::InvalidSpec);
    assert!(
        problem.message.contains("has 10000 entries, at most 256"),
        "{}",
        problem.message
    );
    assert!(
        problem.message.len() < 200,
        "a short message: {}",
        problem.message
    );
    let names: Vec<&str> = rendered.nodes["gw"].interfaces[0]
        .peers
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["normal"]);
}
