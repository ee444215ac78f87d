//! Render, table by table: which node gets what, who wins a conflict, and which ports stay put.

use std::collections::BTreeMap;

use wgpin_crds::{PinnedInterface, PinnedPeer, k8s_openapi::jiff::Timestamp};
use wgpin_operator::{NodeInfo, PortAssignments, ProblemReason, Rendered, render};

const KEY_A: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const KEY_B: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
const KEY_C: &str = "gN65BkIKy1eCE9pP1wdc8ROUtkHLF2PfAqYdyYBz6EA=";
const KEY_D: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
const KEY_E: &str = "mFzaybr7ZsKBKW1HmFdoOZVrSJPrePyFsc9NWVWBjGQ=";

fn interface(yaml: &str) -> PinnedInterface {
    serde_saphyr::from_str(&format!(
        "apiVersion: wgpin.io/v1alpha1\nkind: PinnedInterface\n{yaml}"
    ))
    .expect("interface fixture parses")
}

fn peer(name: &str, created: i64, key: &str, allowed: &str, extra: &str) -> PinnedPeer {
    let mut peer: PinnedPeer = serde_saphyr::from_str(&format!(
        "apiVersion: wgpin.io/v1alpha1\nkind: PinnedPeer\nmetadata: {{name: {name}}}\n\
         spec:\n  interface: gateway\n  publicKey: \"{key}\"\n  allowedIPs: [\"{allowed}\"]\n  sources: [203.0.113.0/24]\n{extra}"
    ))
    .expect("peer fixture parses");
    let ts = Timestamp::from_second(1_700_000_000 + created).expect("valid timestamp");
    peer.metadata.creation_timestamp =
        Some(wgpin_crds::k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(ts));
    peer
}

fn node(name: &str, labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn gateway(mode_and_ports: &str) -> PinnedInterface {
    interface(&format!(
        "metadata: {{name: gateway}}\nspec:\n  nodeSelector: {{matchLabels: {{wgpin.io/gateway: \"true\"}}}}\n  interfaceName: wgpin0\n{mode_and_ports}"
    ))
}

fn nodes() -> Vec<NodeInfo> {
    vec![
        node("gw-a", &[("wgpin.io/gateway", "true"), ("zone", "a")]),
        node("gw-b", &[("wgpin.io/gateway", "true"), ("zone", "b")]),
        node("worker", &[]),
    ]
}

/// node → interface → peer names.
fn layout(rendered: &Rendered) -> BTreeMap<String, Vec<(String, Vec<String>)>> {
    rendered
        .nodes
        .iter()
        .map(|(node, spec)| {
            let interfaces = spec
                .interfaces
                .iter()
                .map(|i| {
                    (
                        i.name.clone(),
                        i.peers.iter().map(|p| p.name.clone()).collect(),
                    )
                })
                .collect();
            (node.clone(), interfaces)
        })
        .collect()
}

fn problems(rendered: &Rendered) -> Vec<(String, ProblemReason)> {
    rendered
        .problems
        .iter()
        .map(|p| (p.name.clone(), p.reason))
        .collect()
}

fn port_of(rendered: &Rendered, peer: &str) -> Option<u16> {
    rendered
        .ports
        .get(&("gateway".to_string(), peer.to_string()))
        .copied()
}

#[test]
fn selected_nodes_get_the_interface_and_its_peers() {
    let interfaces = [gateway("  listenPort: 51820\n")];
    let peers = [
        peer("bob", 2, KEY_B, "198.51.100.3/32", ""),
        peer("alice", 1, KEY_A, "198.51.100.2/32", ""),
        peer(
            "carol",
            3,
            KEY_C,
            "198.51.100.4/32",
            "  nodeSelector: {matchLabels: {zone: b}}\n",
        ),
    ];
    let rendered = render(&interfaces, &peers, &nodes(), &PortAssignments::new());
    let expected: BTreeMap<String, Vec<(String, Vec<String>)>> = [
        (
            "gw-a".to_string(),
            vec![(
                "gateway".to_string(),
                vec!["alice".to_string(), "bob".to_string()],
            )],
        ),
        (
            "gw-b".to_string(),
            vec![(
                "gateway".to_string(),
                vec!["alice".into(), "bob".into(), "carol".into()],
            )],
        ),
    ]
    .into();
    assert_eq!(
        layout(&rendered),
        expected,
        "worker runs nothing; carol only in zone b"
    );
    assert!(rendered.problems.is_empty(), "{:?}", rendered.problems);
    assert!(
        rendered.ports.is_empty(),
        "auto without a range needs no dedicated ports"
    );

    let alice = &rendered.nodes["gw-a"].interfaces[0].peers[0];
    assert_eq!(alice.sources, ["203.0.113.0/24"]);
    assert_eq!(alice.public_key, KEY_A);
    assert_eq!(rendered.nodes["gw-a"].node_name, "gw-a");
}

/// (what the case shows, the peers, the problems expected).
type ConflictCase = (&'static str, Vec<PinnedPeer>, Vec<(String, ProblemReason)>);

#[test]
fn the_older_peer_wins_conflicts() {
    let interfaces = [gateway("  listenPort: 51820\n")];
    let cases: [ConflictCase; 4] = [
        (
            "same key: the younger one is left out",
            vec![
                peer("young", 5, KEY_A, "198.51.100.3/32", ""),
                peer("old", 1, KEY_A, "198.51.100.2/32", ""),
            ],
            vec![("young".into(), ProblemReason::DuplicatePublicKey)],
        ),
        (
            "younger prefix inside an older one",
            vec![
                peer("old", 1, KEY_A, "198.51.100.0/24", ""),
                peer("young", 5, KEY_B, "198.51.100.7/32", ""),
            ],
            vec![("young".into(), ProblemReason::OverlappingAllowedIPs)],
        ),
        (
            "younger prefix around an older one",
            vec![
                peer("old", 1, KEY_A, "198.51.100.7/32", ""),
                peer("young", 5, KEY_B, "198.51.0.0/16", ""),
            ],
            vec![("young".into(), ProblemReason::OverlappingAllowedIPs)],
        ),
        (
            "same name order does not matter, age does",
            vec![
                peer("a-young", 9, KEY_A, "198.51.100.2/32", ""),
                peer("z-old", 1, KEY_A, "198.51.100.3/32", ""),
            ],
            vec![("a-young".into(), ProblemReason::DuplicatePublicKey)],
        ),
    ];
    for (name, peers, expected) in cases {
        let rendered = render(&interfaces, &peers, &nodes(), &PortAssignments::new());
        assert_eq!(problems(&rendered), expected, "{name}");
        let on_gw_a: Vec<&str> = rendered.nodes["gw-a"].interfaces[0]
            .peers
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(
            on_gw_a.len(),
            1,
            "{name}: only the winner is rendered, got {on_gw_a:?}"
        );
        assert_ne!(on_gw_a[0], expected[0].0, "{name}");
    }
}

#[test]
fn objects_that_cannot_be_rendered_are_reported() {
    let interfaces = [
        gateway("  listenPort: 51820\n"),
        interface(
            "metadata: {name: broken}\nspec: {nodeSelector: {}, interfaceName: wgpin1, listenPort: 51830, mtu: 100}",
        ),
        interface(
            "metadata: {name: nowhere}\nspec: {nodeSelector: {matchLabels: {absent: x}}, interfaceName: wgpin2, listenPort: 51840}",
        ),
    ];
    let mut orphan = peer("orphan", 1, KEY_A, "198.51.100.2/32", "");
    orphan.spec.interface = "missing".into();
    let mut on_broken = peer("on-broken", 2, KEY_B, "198.51.100.3/32", "");
    on_broken.spec.interface = "broken".into();
    let mut invalid = peer("invalid", 3, KEY_C, "198.51.100.4/32", "");
    invalid.spec.sources = vec!["0.0.0.0/0".into()];
    let mut unscheduled = peer("unscheduled", 4, KEY_D, "198.51.100.5/32", "");
    unscheduled.spec.interface = "nowhere".into();

    let rendered = render(
        &interfaces,
        &[orphan, on_broken, invalid, unscheduled],
        &nodes(),
        &PortAssignments::new(),
    );
    assert_eq!(
        problems(&rendered),
        [
            ("broken".to_string(), ProblemReason::InvalidSpec),
            ("nowhere".to_string(), ProblemReason::NoNodeSelected),
            ("invalid".to_string(), ProblemReason::InvalidSpec),
            ("on-broken".to_string(), ProblemReason::InterfaceInvalid),
            ("orphan".to_string(), ProblemReason::InterfaceNotFound),
            ("unscheduled".to_string(), ProblemReason::NoNodeSelected),
        ]
    );
    let invalid_message = &rendered
        .problems
        .iter()
        .find(|p| p.name == "invalid")
        .expect("reported")
        .message;
    assert!(
        invalid_message.contains("spec.sources") && invalid_message.contains("allowAnySource"),
        "{invalid_message}"
    );
    // Nothing of them reaches a node; the valid interface still runs, empty.
    assert_eq!(
        layout(&rendered),
        [
            ("gw-a".to_string(), vec![("gateway".to_string(), vec![])]),
            ("gw-b".to_string(), vec![("gateway".to_string(), vec![])])
        ]
        .into()
    );
}

#[test]
fn dedicated_ports_never_move_when_other_peers_come_and_go() {
    let interfaces = [gateway(
        "  mode: Dedicated\n  listenPort: 51820\n  listenPortEnd: 51823\n",
    )];
    let a = peer("a", 1, KEY_A, "198.51.100.2/32", "");
    let b = peer("b", 2, KEY_B, "198.51.100.3/32", "");
    let c = peer("c", 3, KEY_C, "198.51.100.4/32", "");
    let d = peer("d", 4, KEY_D, "198.51.100.5/32", "");
    let e = peer("e", 5, KEY_E, "198.51.100.6/32", "");

    let first = render(
        &interfaces,
        &[a.clone(), b.clone(), c.clone()],
        &nodes(),
        &PortAssignments::new(),
    );
    assert_eq!(
        [
            port_of(&first, "a"),
            port_of(&first, "b"),
            port_of(&first, "c")
        ],
        [Some(51820), Some(51821), Some(51822)]
    );

    // b goes, d comes: a and c keep their ports, d takes the lowest free one (b's).
    let second = render(
        &interfaces,
        &[c.clone(), d.clone(), a.clone()],
        &nodes(),
        &first.ports,
    );
    assert_eq!(
        [
            port_of(&second, "a"),
            port_of(&second, "c"),
            port_of(&second, "d")
        ],
        [Some(51820), Some(51822), Some(51821)]
    );
    assert_eq!(
        port_of(&second, "b"),
        None,
        "a deleted peer's port is released"
    );

    // Two more than fit: the youngest is reported, nobody else moves.
    let third = render(
        &interfaces,
        &[a.clone(), c.clone(), d.clone(), b.clone(), e.clone()],
        &nodes(),
        &second.ports,
    );
    assert_eq!(
        [
            port_of(&third, "a"),
            port_of(&third, "c"),
            port_of(&third, "d"),
            port_of(&third, "b")
        ],
        [Some(51820), Some(51822), Some(51821), Some(51823)]
    );
    assert_eq!(port_of(&third, "e"), None);
    assert_eq!(
        problems(&third),
        [("e".to_string(), ProblemReason::PortRangeExhausted)]
    );

    // The assignment reaches the rendered peers, the same on every node.
    for node in ["gw-a", "gw-b"] {
        let rendered_d = third.nodes[node].interfaces[0]
            .peers
            .iter()
            .find(|p| p.name == "d")
            .expect("d rendered");
        assert_eq!(rendered_d.dedicated_port, Some(51821), "{node}");
    }

    // A remembered port outside a shrunken range is reassigned.
    let narrow = [gateway(
        "  mode: Dedicated\n  listenPort: 51820\n  listenPortEnd: 51821\n",
    )];
    let fourth = render(&narrow, &[a, c], &nodes(), &third.ports);
    assert_eq!(
        [port_of(&fourth, "a"), port_of(&fourth, "c")],
        [Some(51820), Some(51821)]
    );
}

#[test]
fn shared_and_identity_modes_assign_no_dedicated_ports() {
    for mode in ["Shared", "Identity"] {
        let interfaces = [gateway(&format!(
            "  mode: {mode}\n  listenPort: 51820\n  listenPortEnd: 51830\n"
        ))];
        let rendered = render(
            &interfaces,
            &[peer("a", 1, KEY_A, "198.51.100.2/32", "")],
            &nodes(),
            &PortAssignments::new(),
        );
        assert!(rendered.ports.is_empty(), "{mode}");
        assert_eq!(
            rendered.nodes["gw-a"].interfaces[0].peers[0].dedicated_port, None,
            "{mode}"
        );
    }
}

#[test]
fn output_does_not_depend_on_input_order() {
    let interfaces = [
        gateway("  mode: Auto\n  listenPort: 51820\n  listenPortEnd: 51829\n"),
        interface(
            "metadata: {name: edge}\nspec: {nodeSelector: {}, interfaceName: wgedge, listenPort: 51900}",
        ),
    ];
    let mut peers = vec![
        peer("a", 1, KEY_A, "198.51.100.2/32", ""),
        peer("b", 2, KEY_B, "198.51.100.3/32", ""),
        peer("c", 3, KEY_C, "198.51.100.4/32", ""),
        peer("dup", 4, KEY_A, "198.51.100.5/32", ""),
    ];
    let mut edge = peer("e", 0, KEY_E, "198.51.100.2/32", "");
    edge.spec.interface = "edge".into();
    peers.push(edge);

    let mut nodes = nodes();
    let baseline = render(&interfaces, &peers, &nodes, &PortAssignments::new());
    let mut reversed_interfaces = interfaces.clone();
    reversed_interfaces.reverse();
    for rotation in 0..peers.len() {
        peers.rotate_left(1);
        nodes.rotate_left(1);
        let again = render(
            &reversed_interfaces,
            &peers,
            &nodes,
            &PortAssignments::new(),
        );
        assert_eq!(again, baseline, "rotation {rotation}");
    }
    // The same tunnel prefix on two interfaces is no conflict; the worker runs only `edge`.
    assert_eq!(
        layout(&baseline)["worker"],
        [("edge".to_string(), vec!["e".to_string()])]
    );
}

/// Hostile objects on one shared port: pins that overlap (a /24 holding another peer's /25)
/// and the same prefix on two peers are no conflict (only tunnel prefixes are): every peer is
/// rendered with exactly the sources it wrote, never another's. A name of 253 characters and
/// a name in Unicode (which the API server would refuse) are rendered as they are, never a
/// crash; aliasing spellings of an IPv4 address are refused with the field that holds them.
#[test]
fn overlapping_and_shared_pins_render_each_peer_with_its_own_sources() {
    let interfaces = [gateway("  mode: Shared\n  listenPort: 51820\n")];
    let long = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    let mut peers = vec![
        peer("a", 1, KEY_A, "198.51.100.2/32", ""),
        peer(&long, 2, KEY_B, "198.51.100.3/32", ""),
        peer("ünïcode", 3, KEY_C, "198.51.100.4/32", ""),
        peer("mapped", 4, KEY_D, "198.51.100.5/32", ""),
        peer("zeros", 5, KEY_E, "198.51.100.6/32", ""),
    ];
    // The fixture pins 203.0.113.0/24; these replace it.
    let own = [
        vec!["203.0.113.0/24"],
        vec!["203.0.113.0/25", "192.0.2.0/24"],
        vec!["192.0.2.0/24", "2001:db8:40::/48", "::c000:201/128"],
        vec!["::ffff:192.0.2.1/128"],
        vec!["192.000.002.001/32"],
    ];
    for (peer, list) in peers.iter_mut().zip(&own) {
        peer.spec.sources = list.iter().map(ToString::to_string).collect();
    }
    let rendered = render(&interfaces, &peers, &nodes(), &PortAssignments::new());
    assert_eq!(
        problems(&rendered),
        [
            ("mapped".to_string(), ProblemReason::InvalidSpec),
            ("zeros".to_string(), ProblemReason::InvalidSpec),
        ]
    );
    assert!(
        rendered.problems[0].message.contains("spec.sources[0]")
            && rendered.problems[0].message.contains("IPv4-mapped"),
        "{}",
        rendered.problems[0].message
    );
    for node in ["gw-a", "gw-b"] {
        let state = &rendered.nodes[node];
        let peers: BTreeMap<&str, &Vec<String>> = state.interfaces[0]
            .peers
            .iter()
            .map(|p| (p.name.as_str(), &p.sources))
            .collect();
        assert_eq!(peers.len(), 3, "{node}: {peers:?}");
        for (name, list) in [
            ("a", &own[0]),
            (long.as_str(), &own[1]),
            ("ünïcode", &own[2]),
        ] {
            assert_eq!(peers[name], list, "{node}: {name}'s own sources");
        }
    }
}
