//! What the fast path's maps should hold, and the order in which to change them. Pure.
//!
//! [`desired_state`] turns the interfaces a node runs (rendered by the operator, with the mode
//! the node resolved) into map contents; [`plan`] lists the map writes that take the kernel from
//! what it holds to that, ordered so that no valid source is ever dropped and no invalid one
//! ever passes: pins are added before ports start to be managed, and ports stop being managed
//! before their pins are removed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use ipnet::IpNet;
use wgpin_common::{AllowEntry, MAX_PEER_SLOTS, MAX_PORT_SLOTS, NO_PEER, PortEntry};
use wgpin_crds::{RenderedInterface, ResolvedMode, WireGuardKey};

/// A source prefix pinned on a managed port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PinKey {
    pub port: u16,
    pub prefix: IpNet,
}

/// Identity mode: a prefix in one peer's own pin (checked for that peer's sessions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerPinKey {
    pub peer_slot: u32,
    pub prefix: IpNet,
}

/// Identity mode: a peer, as the session hook finds it (its public key on its device's port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerIdentity {
    pub port: u16,
    pub public_key: [u8; 32],
}

/// The contents of the maps the agent writes: ports, the allowlists and, for identity mode,
/// each peer's own pin and the peers the session hook records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FastPathState {
    pub ports: BTreeMap<u16, PortEntry>,
    pub pins: BTreeMap<PinKey, AllowEntry>,
    pub peer_pins: BTreeSet<PeerPinKey>,
    /// Peer identity → peer slot.
    pub identities: BTreeMap<PeerIdentity, u32>,
}

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    PutPin(PinKey, AllowEntry),
    PutPeerPin(PeerPinKey),
    PutIdentity(PeerIdentity, u32),
    PutPort(u16, PortEntry),
    DeletePort(u16),
    DeleteIdentity(PeerIdentity),
    DeletePeerPin(PeerPinKey),
    DeletePin(PinKey),
}

/// The writes that take `current` to `desired`, in a safe order. Adding: pins, then each
/// peer's own pins, then identities (from then on the hook ties new sessions to the peer, and
/// its pin is already there), then ports. Removing, the reverse: ports, identities, peer pins,
/// pins. So no valid source is ever dropped and no port is ever checked against a pin that is
/// not complete yet.
pub fn plan(current: &FastPathState, desired: &FastPathState) -> Vec<Op> {
    let mut ops = Vec::new();
    for (key, entry) in &desired.pins {
        if current.pins.get(key) != Some(entry) {
            ops.push(Op::PutPin(*key, *entry));
        }
    }
    for key in desired.peer_pins.difference(&current.peer_pins) {
        ops.push(Op::PutPeerPin(*key));
    }
    for (identity, slot) in &desired.identities {
        if current.identities.get(identity) != Some(slot) {
            ops.push(Op::PutIdentity(*identity, *slot));
        }
    }
    for (port, entry) in &desired.ports {
        if current.ports.get(port) != Some(entry) {
            ops.push(Op::PutPort(*port, *entry));
        }
    }
    for port in current.ports.keys() {
        if !desired.ports.contains_key(port) {
            ops.push(Op::DeletePort(*port));
        }
    }
    for identity in current.identities.keys() {
        if !desired.identities.contains_key(identity) {
            ops.push(Op::DeleteIdentity(*identity));
        }
    }
    for key in current.peer_pins.difference(&desired.peer_pins) {
        ops.push(Op::DeletePeerPin(*key));
    }
    for key in current.pins.keys() {
        if !desired.pins.contains_key(key) {
            ops.push(Op::DeletePin(*key));
        }
    }
    ops
}

/// `op` applied to `state`, as the kernel's maps take it (for tests of the order).
pub fn apply_op(state: &mut FastPathState, op: &Op) {
    match *op {
        Op::PutPin(key, entry) => {
            state.pins.insert(key, entry);
        }
        Op::PutPeerPin(key) => {
            state.peer_pins.insert(key);
        }
        Op::PutIdentity(identity, slot) => {
            state.identities.insert(identity, slot);
        }
        Op::PutPort(port, entry) => {
            state.ports.insert(port, entry);
        }
        Op::DeletePort(port) => {
            state.ports.remove(&port);
        }
        Op::DeleteIdentity(identity) => {
            state.identities.remove(&identity);
        }
        Op::DeletePeerPin(key) => {
            state.peer_pins.remove(&key);
        }
        Op::DeletePin(key) => {
            state.pins.remove(&key);
        }
    }
}

/// Stable counter slots for ports and peers, so counters keep their meaning across changes
/// and restarts (the agent persists the table). A freed slot is reused lowest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotTable {
    pub ports: BTreeMap<u16, u32>,
    pub peers: BTreeMap<String, u32>,
}

fn allocate<K: Ord + Clone>(table: &mut BTreeMap<K, u32>, key: &K, max: u32) -> Option<u32> {
    if let Some(slot) = table.get(key) {
        return Some(*slot);
    }
    let used: BTreeSet<u32> = table.values().copied().collect();
    let slot = (0..max).find(|slot| !used.contains(slot))?;
    table.insert(key.clone(), slot);
    Some(slot)
}

impl SlotTable {
    pub fn port(&mut self, port: u16) -> Option<u32> {
        allocate(&mut self.ports, &port, MAX_PORT_SLOTS)
    }

    pub fn peer(&mut self, name: &str) -> Option<u32> {
        allocate(&mut self.peers, &name.to_string(), MAX_PEER_SLOTS)
    }

    /// Frees the slots of ports and peers that are gone.
    pub fn retain(&mut self, ports: &BTreeSet<u16>, peers: &BTreeSet<String>) {
        self.ports.retain(|port, _| ports.contains(port));
        self.peers.retain(|name, _| peers.contains(name));
    }
}

/// An interface as the node runs it: the rendered spec and the mode the node resolved.
#[derive(Clone, Copy, Debug)]
pub struct EnforcedInterface<'a> {
    pub rendered: &'a RenderedInterface,
    pub mode: ResolvedMode,
}

/// Why a peer or interface is left out of the fast path (and therefore must not be live).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unenforceable {
    /// `PinnedInterface` name.
    pub interface: String,
    /// `PinnedPeer` name, when it is about one peer.
    pub peer: Option<String>,
    pub reason: String,
}

impl Unenforceable {
    pub fn new(interface: &str, peer: Option<&str>, reason: impl Into<String>) -> Self {
        Self {
            interface: interface.to_string(),
            peer: peer.map(str::to_string),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Unenforceable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.peer {
            Some(peer) => write!(
                f,
                "peer {peer:?} on interface {:?}: {}",
                self.interface, self.reason
            ),
            None => write!(f, "interface {:?}: {}", self.interface, self.reason),
        }
    }
}

/// The fast-path state for the interfaces a node runs. Peers that cannot be enforced are left
/// out and reported; the caller must not make them live.
pub fn desired_state(
    interfaces: &[EnforcedInterface<'_>],
    slots: &mut SlotTable,
) -> (FastPathState, Vec<Unenforceable>) {
    let mut state = FastPathState::default();
    let mut problems = Vec::new();
    // Which interface (and, for a dedicated port, which peer) owns each port, to refuse a
    // second owner: a dedicated port admits one peer's pin, never the union of two.
    let mut port_owner: BTreeMap<u16, (String, Option<String>)> = BTreeMap::new();
    let mut claim = |port: u16,
                     interface: &str,
                     peer: Option<&str>,
                     problems: &mut Vec<Unenforceable>|
     -> bool {
        match port_owner.get(&port) {
            Some((owner, _)) if owner != interface => {
                problems.push(Unenforceable::new(
                    interface,
                    peer,
                    format!("UDP port {port} is already used by interface {owner:?} on this node"),
                ));
                false
            }
            Some((_, owner)) if owner.as_deref() != peer => {
                problems.push(Unenforceable::new(
                    interface,
                    peer,
                    format!(
                        "UDP port {port} is already the dedicated port of peer {:?}",
                        owner.as_deref().unwrap_or_default()
                    ),
                ));
                false
            }
            _ => {
                port_owner.insert(port, (interface.to_string(), peer.map(str::to_string)));
                true
            }
        }
    };

    for interface in interfaces {
        let rendered = interface.rendered;
        let name = rendered.name.as_str();
        match interface.mode {
            ResolvedMode::Dedicated => {
                for peer in &rendered.peers {
                    let unenforceable =
                        |reason: String| Unenforceable::new(name, Some(&peer.name), reason);
                    let Some(port) = peer.dedicated_port else {
                        problems.push(unenforceable(
                            "has no dedicated port (the interface's port range is full)".into(),
                        ));
                        continue;
                    };
                    if !claim(port, name, Some(&peer.name), &mut problems) {
                        continue;
                    }
                    let (Some(port_slot), Some(peer_slot)) =
                        (slots.port(port), slots.peer(&peer.name))
                    else {
                        problems.push(unenforceable("no counter slot left on this node".into()));
                        continue;
                    };
                    let prefixes = match parse_sources(&peer.sources) {
                        Ok(prefixes) => prefixes,
                        Err(reason) => {
                            problems.push(unenforceable(reason));
                            continue;
                        }
                    };
                    for prefix in prefixes {
                        state
                            .pins
                            .insert(PinKey { port, prefix }, AllowEntry { peer_slot });
                    }
                    state
                        .ports
                        .insert(port, PortEntry::dedicated(port_slot, peer_slot));
                }
            }
            mode @ (ResolvedMode::Shared | ResolvedMode::Identity) => {
                let identity = mode == ResolvedMode::Identity;
                let port = rendered.listen_port;
                if !claim(port, name, None, &mut problems) {
                    continue;
                }
                let Some(port_slot) = slots.port(port) else {
                    problems.push(Unenforceable::new(
                        name,
                        None,
                        "no counter slot left on this node",
                    ));
                    continue;
                };
                let mut pins: BTreeMap<PinKey, AllowEntry> = BTreeMap::new();
                for peer in &rendered.peers {
                    let unenforceable =
                        |reason: String| Unenforceable::new(name, Some(&peer.name), reason);
                    let prefixes = match parse_sources(&peer.sources) {
                        Ok(prefixes) => prefixes,
                        Err(reason) => {
                            problems.push(unenforceable(reason));
                            continue;
                        }
                    };
                    let public_key = if identity {
                        match peer.public_key.parse::<WireGuardKey>() {
                            Ok(key) => Some(*key.as_bytes()),
                            Err(e) => {
                                problems.push(unenforceable(format!("public key {e}")));
                                continue;
                            }
                        }
                    } else {
                        None
                    };
                    let Some(peer_slot) = slots.peer(&peer.name) else {
                        problems.push(unenforceable("no counter slot left on this node".into()));
                        continue;
                    };
                    if let Some(public_key) = public_key {
                        state
                            .peer_pins
                            .extend(prefixes.iter().map(|prefix| PeerPinKey {
                                peer_slot,
                                prefix: *prefix,
                            }));
                        state
                            .identities
                            .insert(PeerIdentity { port, public_key }, peer_slot);
                    }
                    for prefix in prefixes {
                        pins.entry(PinKey { port, prefix })
                            // The same prefix pinned by two peers belongs to neither alone
                            // (but one peer listing it twice still owns it).
                            .and_modify(|entry| {
                                if entry.peer_slot != peer_slot {
                                    entry.peer_slot = NO_PEER;
                                }
                            })
                            .or_insert(AllowEntry { peer_slot });
                    }
                }
                state.pins.extend(pins);
                let entry = if identity {
                    PortEntry::identity(port_slot)
                } else {
                    PortEntry::shared(port_slot)
                };
                state.ports.insert(port, entry);
            }
        }
    }
    let ports: BTreeSet<u16> = state.ports.keys().copied().collect();
    let peers: BTreeSet<String> = interfaces
        .iter()
        .flat_map(|i| i.rendered.peers.iter().map(|p| p.name.clone()))
        .collect();
    slots.retain(&ports, &peers);
    (state, problems)
}

fn parse_sources(sources: &[String]) -> Result<Vec<IpNet>, String> {
    if sources.is_empty() {
        // Rendered state never has this; refuse rather than leave the port wide open.
        return Err("has no sources: refusing to enforce an empty pin".into());
    }
    sources
        .iter()
        .map(|s| wgpin_crds::validate::parse_prefix(s).map_err(|e| format!("source {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use wgpin_crds::{PinMode, RenderedPeer};

    use super::*;

    fn peer(name: &str, sources: &[&str], dedicated_port: Option<u16>) -> RenderedPeer {
        RenderedPeer {
            name: name.into(),
            generation: None,
            public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
            allowed_ips: vec![],
            sources: sources.iter().map(|s| s.to_string()).collect(),
            endpoint: None,
            persistent_keepalive_seconds: None,
            preshared_key_secret_ref: None,
            dedicated_port,
        }
    }

    fn interface(name: &str, port: u16, peers: Vec<RenderedPeer>) -> RenderedInterface {
        RenderedInterface {
            name: name.into(),
            mode: PinMode::Auto,
            interface_name: "wgpin0".into(),
            listen_port: port,
            listen_port_end: None,
            addresses: vec![],
            mtu: None,
            peers,
        }
    }

    fn pin(port: u16, prefix: &str) -> PinKey {
        PinKey {
            port,
            prefix: prefix.parse().expect("prefix"),
        }
    }

    #[test]
    fn dedicated_mode_gives_each_port_one_peer() {
        let gateway = interface(
            "gateway",
            51820,
            vec![
                peer("alice", &["203.0.113.0/24", "fd00:40::/48"], Some(51820)),
                peer("bob", &["198.51.100.7/32"], Some(51821)),
            ],
        );
        let mut slots = SlotTable::default();
        let (state, problems) = desired_state(
            &[EnforcedInterface {
                rendered: &gateway,
                mode: ResolvedMode::Dedicated,
            }],
            &mut slots,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            state.ports,
            [
                (51820, PortEntry::dedicated(0, 0)),
                (51821, PortEntry::dedicated(1, 1))
            ]
            .into()
        );
        assert_eq!(
            state.pins,
            [
                (pin(51820, "203.0.113.0/24"), AllowEntry { peer_slot: 0 }),
                (pin(51820, "fd00:40::/48"), AllowEntry { peer_slot: 0 }),
                (pin(51821, "198.51.100.7/32"), AllowEntry { peer_slot: 1 }),
            ]
            .into()
        );
    }

    #[test]
    fn shared_mode_holds_the_union_and_marks_shared_prefixes() {
        let gateway = interface(
            "gateway",
            51820,
            vec![
                peer("alice", &["203.0.113.0/24", "192.0.2.0/24"], None),
                peer("bob", &["192.0.2.0/24"], None),
            ],
        );
        let mut slots = SlotTable::default();
        let (state, problems) = desired_state(
            &[EnforcedInterface {
                rendered: &gateway,
                mode: ResolvedMode::Shared,
            }],
            &mut slots,
        );
        assert!(problems.is_empty());
        assert_eq!(state.ports, [(51820, PortEntry::shared(0))].into());
        assert_eq!(
            state.pins,
            [
                (
                    pin(51820, "192.0.2.0/24"),
                    AllowEntry { peer_slot: NO_PEER }
                ),
                (pin(51820, "203.0.113.0/24"), AllowEntry { peer_slot: 0 }),
            ]
            .into()
        );
    }

    #[test]
    fn unenforceable_peers_are_left_out_and_reported() {
        let a = interface(
            "a",
            51820,
            vec![
                peer("no-port", &["192.0.2.0/24"], None),
                peer("ok", &["192.0.2.0/24"], Some(51821)),
            ],
        );
        let b = interface("b", 51821, vec![peer("clash", &["198.51.100.0/24"], None)]);
        let c = interface(
            "c",
            51830,
            vec![
                peer("empty", &[], None),
                peer("fine", &["203.0.113.0/24"], None),
            ],
        );
        let mut slots = SlotTable::default();
        let (state, problems) = desired_state(
            &[
                EnforcedInterface {
                    rendered: &a,
                    mode: ResolvedMode::Dedicated,
                },
                EnforcedInterface {
                    rendered: &b,
                    mode: ResolvedMode::Shared,
                },
                EnforcedInterface {
                    rendered: &c,
                    mode: ResolvedMode::Shared,
                },
            ],
            &mut slots,
        );
        let reported: Vec<(String, Option<String>)> = problems
            .iter()
            .map(|p| (p.interface.clone(), p.peer.clone()))
            .collect();
        assert_eq!(
            reported,
            [
                ("a".into(), Some("no-port".into())),
                ("b".into(), None),
                ("c".into(), Some("empty".into()))
            ]
        );
        assert!(
            problems[1]
                .to_string()
                .contains("already used by interface \"a\""),
            "{}",
            problems[1]
        );
        assert_eq!(
            state.ports.keys().copied().collect::<Vec<_>>(),
            [51821, 51830]
        );
        assert!(
            !state
                .pins
                .keys()
                .any(|k| k.port == 51821 && k.prefix.to_string() == "198.51.100.0/24")
        );
    }

    /// Two peers of one interface handed the same dedicated port (a rendered state the
    /// operator never writes, but the agent takes it as input): the port admitted the union of
    /// both pins and named only the second peer. The first keeps it; the second is left out.
    #[test]
    fn a_dedicated_port_is_never_shared_by_two_peers() {
        let gateway = interface(
            "gateway",
            51820,
            vec![
                peer("alice", &["192.0.2.2/32"], Some(51900)),
                peer("bob", &["198.51.100.0/24"], Some(51900)),
            ],
        );
        let mut slots = SlotTable::default();
        let (state, problems) = desired_state(
            &[EnforcedInterface {
                rendered: &gateway,
                mode: ResolvedMode::Dedicated,
            }],
            &mut slots,
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].peer.as_deref(), Some("bob"));
        assert!(
            problems[0]
                .to_string()
                .contains("already the dedicated port of peer \"alice\""),
            "{}",
            problems[0]
        );
        assert_eq!(
            state.pins,
            [(pin(51900, "192.0.2.2/32"), AllowEntry { peer_slot: 0 })].into()
        );
        assert_eq!(state.ports[&51900].peer_slot, 0);
    }

    #[test]
    fn slots_are_stable_and_reused() {
        let mut slots = SlotTable::default();
        assert_eq!(slots.peer("a"), Some(0));
        assert_eq!(slots.peer("b"), Some(1));
        assert_eq!(slots.peer("a"), Some(0));
        slots.retain(&BTreeSet::new(), &["b".to_string()].into());
        assert_eq!(slots.peer("c"), Some(0), "a's slot is free again");
        assert_eq!(slots.peer("b"), Some(1));
    }

    #[test]
    fn plan_adds_pins_before_ports_and_removes_ports_before_pins() {
        let mut current = FastPathState::default();
        current.ports.insert(1000, PortEntry::shared(0));
        current
            .pins
            .insert(pin(1000, "192.0.2.0/24"), AllowEntry { peer_slot: 0 });
        current
            .pins
            .insert(pin(1000, "203.0.113.0/24"), AllowEntry { peer_slot: 1 });
        current.ports.insert(2000, PortEntry::dedicated(1, 2));
        current
            .pins
            .insert(pin(2000, "198.51.100.0/24"), AllowEntry { peer_slot: 2 });

        let mut desired = FastPathState::default();
        desired.ports.insert(1000, PortEntry::shared(0));
        desired
            .pins
            .insert(pin(1000, "192.0.2.0/25"), AllowEntry { peer_slot: 0 });
        desired
            .pins
            .insert(pin(1000, "203.0.113.0/24"), AllowEntry { peer_slot: 1 });
        desired.ports.insert(3000, PortEntry::dedicated(2, 3));
        desired
            .pins
            .insert(pin(3000, "fd00::/8"), AllowEntry { peer_slot: 3 });

        let ops = plan(&current, &desired);
        assert_eq!(
            ops,
            [
                Op::PutPin(pin(1000, "192.0.2.0/25"), AllowEntry { peer_slot: 0 }),
                Op::PutPin(pin(3000, "fd00::/8"), AllowEntry { peer_slot: 3 }),
                Op::PutPort(3000, PortEntry::dedicated(2, 3)),
                Op::DeletePort(2000),
                Op::DeletePin(pin(1000, "192.0.2.0/24")),
                Op::DeletePin(pin(2000, "198.51.100.0/24")),
            ]
        );
        assert!(plan(&desired, &desired).is_empty(), "no change, no write");
    }

    /// Replaying the plan step by step, no intermediate state drops an address both states
    /// allow, or allows one neither does.
    #[test]
    fn every_intermediate_state_is_safe() {
        use std::net::IpAddr;
        let allows = |state: &FastPathState, port: u16, ip: IpAddr| -> bool {
            !state.ports.contains_key(&port)
                || state
                    .pins
                    .keys()
                    .any(|k| k.port == port && k.prefix.contains(&ip))
        };
        let mut current = FastPathState::default();
        current.ports.insert(1000, PortEntry::dedicated(0, 0));
        current
            .pins
            .insert(pin(1000, "192.0.2.0/24"), AllowEntry { peer_slot: 0 });
        let mut desired = FastPathState::default();
        desired.ports.insert(1000, PortEntry::dedicated(0, 0));
        desired
            .pins
            .insert(pin(1000, "192.0.2.128/25"), AllowEntry { peer_slot: 0 });
        desired
            .pins
            .insert(pin(1000, "203.0.113.0/24"), AllowEntry { peer_slot: 0 });
        desired.ports.insert(2000, PortEntry::dedicated(1, 1));
        desired
            .pins
            .insert(pin(2000, "198.51.100.0/24"), AllowEntry { peer_slot: 1 });

        let probes: Vec<(u16, IpAddr)> = [
            (1000, "192.0.2.1"),
            (1000, "192.0.2.200"),
            (1000, "203.0.113.9"),
            (1000, "198.51.100.1"),
            (2000, "198.51.100.1"),
            (2000, "192.0.2.1"),
        ]
        .iter()
        .map(|(p, ip)| (*p, ip.parse().expect("ip")))
        .collect();
        let mut state = current.clone();
        for op in plan(&current, &desired) {
            apply_op(&mut state, &op);
            for (port, ip) in &probes {
                let before = allows(&current, *port, *ip);
                let after = allows(&desired, *port, *ip);
                let now = allows(&state, *port, *ip);
                assert!(
                    !(before && after) || now,
                    "{op:?} dropped {ip} on {port}, allowed before and after"
                );
                // A port newly managed is never open: it only becomes managed with its pins.
                if current.ports.contains_key(port) || state.ports.contains_key(port) {
                    assert!(before || after || !now, "{op:?} let {ip} through on {port}");
                }
            }
        }
        assert_eq!(state, desired);
    }
}
