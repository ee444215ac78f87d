//! Property test of [`desired_state`]: whatever rendered state the agent is handed (it comes
//! from the API server or a directory, so treat it as input: pins that overlap between peers,
//! shared prefixes, IPv4-mapped and other aliasing forms, invalid strings, empty pins, ports
//! claimed twice), the maps it asks for never admit more than the pins say.
//!
//! - every pinned prefix is one a peer wrote, on a port that peer's interface owns, and only
//!   from a peer whose whole pin parsed (a peer with one bad source is left out entirely and
//!   reported, never enforced with the rest of its pin);
//! - `Dedicated`: a port admits exactly its peer's pin; `Shared`: exactly the union of the
//!   enforceable peers' pins, a prefix belonging to one peer only when no other lists it;
//! - no IPv4-mapped prefix ever reaches the maps.
//!
//! Fixed seed; `PROPTEST_RNG_SEED` and `PROPTEST_CASES` explore further.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use proptest::{
    prelude::*,
    test_runner::{Config, RngSeed},
};
use wgpin_common::NO_PEER;
use wgpin_crds::{PinMode, RenderedInterface, RenderedPeer, ResolvedMode};

use super::state::{EnforcedInterface, SlotTable, desired_state};

fn config(cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(0x5767_7069_6e05);
    }
    config
}

const SOURCES: [&str; 12] = [
    "203.0.113.0/24",
    "203.0.113.0/25",
    "203.0.113.7/32",
    "192.0.2.2/32",
    "2001:db8:40::/48",
    "64:ff9b::c000:202/128",
    "0.0.0.0/0",
    // Not prefixes the API accepts:
    "::ffff:192.0.2.2/128",
    "::ffff:0:0/96",
    "192.0.2.2/24",
    "2001:DB8::/32",
    "office",
];

fn arb_interface(index: usize) -> impl Strategy<Value = (RenderedInterface, ResolvedMode)> {
    let peer = (
        prop::sample::select(vec!["a", "b", "c", "d", "e"]),
        prop_oneof![
            6 => prop::sample::subsequence(SOURCES[..7].to_vec(), 1..4),
            2 => prop::collection::vec(prop::sample::select(SOURCES.to_vec()), 0..4),
        ],
        prop::option::weighted(0.8, prop_oneof![Just(51900u16), 51901u16..51904]),
    );
    (
        prop::collection::vec(peer, 0..5),
        prop_oneof![Just(51820u16), Just(51821), Just(51901)],
        prop::sample::select(vec![
            ResolvedMode::Dedicated,
            ResolvedMode::Shared,
            ResolvedMode::Identity,
        ]),
    )
        .prop_map(move |(peers, port, mode)| {
            let mut names = BTreeSet::new();
            let peers = peers
                .into_iter()
                .filter(|(name, ..)| names.insert(*name))
                .map(|(name, sources, dedicated_port)| RenderedPeer {
                    name: format!("{name}{index}"),
                    generation: None,
                    public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
                    allowed_ips: vec![],
                    sources: sources.into_iter().map(str::to_string).collect(),
                    endpoint: None,
                    persistent_keepalive_seconds: None,
                    preshared_key_secret_ref: None,
                    dedicated_port,
                })
                .collect();
            let interface = RenderedInterface {
                name: format!("if{index}"),
                mode: PinMode::Auto,
                interface_name: format!("wgpin{index}"),
                listen_port: port,
                listen_port_end: None,
                addresses: vec![],
                mtu: None,
                peers,
            };
            (interface, mode)
        })
}

proptest! {
    #![proptest_config(config(3_000))]

    #[test]
    fn the_maps_never_admit_more_than_the_pins(
        interfaces in (arb_interface(0), arb_interface(1))
    ) {
        let interfaces = [interfaces.0, interfaces.1];
        let enforced: Vec<EnforcedInterface<'_>> = interfaces
            .iter()
            .map(|(rendered, mode)| EnforcedInterface { rendered, mode: *mode })
            .collect();
        let mut slots = SlotTable::default();
        let (state, problems) = desired_state(&enforced, &mut slots);

        let reported: BTreeSet<(String, Option<String>)> =
            problems.iter().map(|p| (p.interface.clone(), p.peer.clone())).collect();
        let parse = |s: &String| wgpin_crds::validate::parse_prefix(s).ok();
        // What each port may admit, from the peers that are enforced there.
        let mut expected: BTreeMap<u16, BTreeMap<IpNet, BTreeSet<u32>>> = BTreeMap::new();
        for (rendered, mode) in &interfaces {
            if reported.contains(&(rendered.name.clone(), None)) {
                continue;
            }
            for peer in &rendered.peers {
                let left_out = reported.contains(&(rendered.name.clone(), Some(peer.name.clone())));
                let pin: Option<Vec<IpNet>> = peer.sources.iter().map(parse).collect();
                let port = match mode {
                    ResolvedMode::Dedicated => peer.dedicated_port,
                    _ => Some(rendered.listen_port),
                };
                match (pin, port, left_out) {
                    (Some(pin), Some(port), false) if !pin.is_empty() => {
                        let slot = slots.peers.get(&peer.name).copied()
                            .ok_or_else(|| TestCaseError::fail("enforced peer without a slot"))?;
                        for net in pin {
                            expected.entry(port).or_default().entry(net).or_default().insert(slot);
                        }
                    }
                    // A peer with any bad source, or no port, must have been reported.
                    (pin, port, left_out) => prop_assert!(
                        left_out,
                        "{} not reported: pin {:?}, port {:?}", peer.name, pin, port
                    ),
                }
            }
        }
        let mut actual: BTreeMap<u16, BTreeMap<IpNet, u32>> = BTreeMap::new();
        for (key, entry) in &state.pins {
            prop_assert!(state.ports.contains_key(&key.port), "pin on an unmanaged port {:?}", key);
            prop_assert!(!matches!(key.prefix.addr(), std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()));
            actual.entry(key.port).or_default().insert(key.prefix, entry.peer_slot);
        }
        for (port, pins) in &actual {
            let wanted = expected.get(port).cloned().unwrap_or_default();
            let have: BTreeSet<&IpNet> = pins.keys().collect();
            let want: BTreeSet<&IpNet> = wanted.keys().collect();
            prop_assert_eq!(have, want, "port {}", port);
            for (net, slot) in pins {
                let owners = &wanted[net];
                if owners.len() == 1 {
                    prop_assert!(owners.contains(slot), "{} on {} attributed to {}", net, port, slot);
                } else {
                    prop_assert_eq!(*slot, NO_PEER, "{} on {} is shared", net, port);
                }
            }
        }
        for port in expected.keys() {
            prop_assert!(actual.contains_key(port), "port {} lost its pins", port);
        }
    }
}
