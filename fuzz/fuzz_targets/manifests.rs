//! Manifests as standalone mode reads them, through to the maps: YAML documents, the CRD schema
//! with its CEL rules (`Admission`), strict decoding and the Rust validation, render (the
//! operator's), the node plan and the fast-path state (the agent's). Any text: no panic, and
//!
//! - the two validators agree on every spec: what the schema accepts (then pruned of nulls, as
//!   the API server stores it) Rust accepts, and what Rust accepts the schema does (objects
//!   whose kind or metadata either refuses are left out: those are the API server's to check);
//! - a rendered peer carries exactly the sources its spec validated to (canonical, none
//!   IPv4-mapped, a catch-all only with `allowAnySource`);
//! - every pin in the fast-path state is a source of a peer rendered on that port, of the same
//!   family as written, and a dedicated port holds its own peer's pins only.
//!
//! Render takes every object that decodes, valid or not (a cluster whose CRD is older than its
//! operator can hold anything); the plan runs as a userspace and as an identity-capable node.
#![no_main]

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::LazyLock,
};

use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wgpin_agent::{
    dataplane::{NodeCapabilities, plan_node},
    fastpath::SlotTable,
    wireguard::SecretKey,
};
use wgpin_common::NO_PEER;
use wgpin_crds::{
    PinMode, PinnedInterface, PinnedPeer, ResolvedMode,
    admission::{Admission, prune_nulls},
    kube::ResourceExt,
    validate::{FieldError, decode, parse_prefix},
};
use wgpin_operator::{NodeInfo, PortAssignments, render};

static ADMISSION: LazyLock<Admission> = LazyLock::new(Admission::new);

/// Whether an error is about the object around the spec: its kind, apiVersion or metadata,
/// which are the API server's to check (the validators held to one verdict check specs; and
/// with a bad name the schema runs no CEL rule).
fn outside_the_spec(error: &FieldError) -> bool {
    error.field == "kind" || error.field == "apiVersion" || error.field.starts_with("metadata")
}

fn is_mapped(net: &IpNet) -> bool {
    matches!(net.addr(), std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(documents) = serde_saphyr::from_multiple::<Value>(text) else {
        return;
    };
    let mut interfaces: BTreeMap<String, PinnedInterface> = BTreeMap::new();
    let mut peers: BTreeMap<String, PinnedPeer> = BTreeMap::new();
    for document in documents.iter().take(16) {
        let kind = document.get("kind").and_then(Value::as_str);
        if !matches!(kind, Some("PinnedPeer" | "PinnedInterface")) {
            continue;
        }
        let schema = ADMISSION.check(document).err().unwrap_or_default();
        // What the API server stores of an object it accepts: nulls pruned.
        let mut pruned = document.clone();
        prune_nulls(&mut pruned);
        let rust_on = |document: &Value| match kind {
            Some("PinnedPeer") => {
                decode::<PinnedPeer>(document).and_then(|p| p.spec.validate().map(drop))
            }
            _ => decode::<PinnedInterface>(document).and_then(|i| i.spec.validate().map(drop)),
        };
        let (rust, rust_pruned) = (rust_on(document), rust_on(&pruned));
        let outside = schema.iter().any(outside_the_spec)
            || [&rust, &rust_pruned].iter().any(|r| {
                r.as_ref()
                    .err()
                    .is_some_and(|e| e.iter().any(outside_the_spec))
            });
        if !outside {
            // What the API server stores, the operator renders; and what the operator would
            // render, the API server stores.
            assert!(
                !schema.is_empty() || rust_pruned.is_ok(),
                "the schema accepts what Rust refuses: {document}\n  Rust: {rust_pruned:?}"
            );
            assert!(
                rust.is_err() || schema.is_empty(),
                "Rust accepts what the schema refuses: {document}\n  schema+CEL: {schema:?}"
            );
        }
        // Render takes every object that decodes, valid or not.
        match kind {
            Some("PinnedPeer") => {
                if let Ok(peer) = decode::<PinnedPeer>(&pruned) {
                    peers.entry(peer.name_any()).or_insert(peer);
                }
            }
            _ => {
                if let Ok(interface) = decode::<PinnedInterface>(&pruned) {
                    interfaces.entry(interface.name_any()).or_insert(interface);
                }
            }
        }
    }

    let interfaces: Vec<PinnedInterface> = interfaces.into_values().collect();
    let peers: Vec<PinnedPeer> = peers.into_values().collect();
    let nodes = [
        NodeInfo {
            name: "node-a".into(),
            labels: [("role".to_string(), "a".to_string())].into(),
        },
        NodeInfo {
            name: "node-b".into(),
            labels: BTreeMap::new(),
        },
    ];
    let rendered = render(&interfaces, &peers, &nodes, &PortAssignments::new());
    let by_name: BTreeMap<String, &PinnedPeer> = peers.iter().map(|p| (p.name_any(), p)).collect();
    for state in rendered.nodes.values() {
        for interface in &state.interfaces {
            for peer in &interface.peers {
                let object = by_name[&peer.name];
                let validated = match object.spec.validate() {
                    Ok(validated) => validated,
                    Err(errors) => panic!("{} rendered but invalid: {errors:?}", peer.name),
                };
                let sources: Vec<String> =
                    validated.sources.iter().map(ToString::to_string).collect();
                assert_eq!(peer.sources, sources, "{}: the pin as validated", peer.name);
                assert_eq!(
                    peer.sources, object.spec.sources,
                    "{}: as written",
                    peer.name
                );
                assert!(!validated.sources.iter().any(is_mapped));
                assert_eq!(
                    validated.sources.iter().any(|n| n.prefix_len() == 0),
                    object.spec.allow_any_source
                );
            }
        }

        for identity in [Err("userspace WireGuard".to_string()), Ok(())] {
            let capabilities = NodeCapabilities {
                kernel_wireguard: identity.is_ok(),
                identity,
            };
            let mut slots = SlotTable::default();
            let plan = plan_node(state, &capabilities, &mut slots, &|_| {
                Ok(SecretKey::from_bytes([7; 32]))
            });
            // (port, prefix) → the peers whose pins put it there.
            let mut allowed: BTreeMap<(u16, IpNet), BTreeSet<&str>> = BTreeMap::new();
            for interface in &state.interfaces {
                let mode = plan.modes[&interface.name];
                assert!(interface.mode != PinMode::Dedicated || mode == ResolvedMode::Dedicated);
                assert!(interface.mode != PinMode::Shared || mode == ResolvedMode::Shared);
                for peer in &interface.peers {
                    let port = match mode {
                        ResolvedMode::Dedicated => match peer.dedicated_port {
                            Some(port) => port,
                            None => continue,
                        },
                        _ => interface.listen_port,
                    };
                    for source in &peer.sources {
                        let prefix = parse_prefix(source).expect("rendered sources are canonical");
                        allowed
                            .entry((port, prefix))
                            .or_default()
                            .insert(&peer.name);
                    }
                }
            }
            let slot_owner: BTreeMap<u32, &str> = slots
                .peers
                .iter()
                .map(|(name, slot)| (*slot, name.as_str()))
                .collect();
            for (key, entry) in &plan.fast_path.pins {
                let Some(port) = plan.fast_path.ports.get(&key.port) else {
                    panic!("{key:?} on an unmanaged port");
                };
                assert!(!is_mapped(&key.prefix), "{key:?}");
                let owners = allowed
                    .get(&(key.port, key.prefix))
                    .unwrap_or_else(|| panic!("{key:?} is no rendered peer's source"));
                if port.peer_slot != NO_PEER {
                    // A dedicated port: its own peer's pins, attributed to it.
                    let owner = slot_owner[&port.peer_slot];
                    assert!(
                        owners.contains(owner),
                        "{key:?} on {owner}'s dedicated port"
                    );
                    assert_eq!(entry.peer_slot, port.peer_slot);
                }
            }
        }
    }
});
