//! Render: `PinnedInterface`s + `PinnedPeer`s + nodes → one `PinnedNodeState` spec per node.
//!
//! Pure and deterministic: the same inputs give the same output, whatever order they come in.
//! Objects that cannot be rendered are left out and reported as [`Problem`]s, which the
//! controller turns into conditions and Events. A peer is never rendered with a weaker pin than
//! it asked for: when in doubt it is left out (fail closed).
//!
//! Precedence between peers (for duplicate keys, overlapping tunnel prefixes and ports) goes to
//! the older object (`metadata.creationTimestamp`), then the name, so a new object can never
//! take something away from an existing one.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt,
};

use ipnet::IpNet;
use wgpin_crds::{
    PinMode, PinnedInterface, PinnedNodeStateSpec, PinnedPeer, RenderedInterface, RenderedPeer,
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    kube::{
        ResourceExt,
        core::{Selector, SelectorExt},
    },
    validate::{FieldError, ValidatedInterface, ValidatedPeer},
};

/// A node as render needs it: its name and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Dedicated-mode port of each peer, keyed by (`PinnedInterface` name, `PinnedPeer` name).
/// Render keeps every assignment it is given that is still valid, so adding or removing one
/// peer never moves another peer's port.
pub type PortAssignments = BTreeMap<(String, String), u16>;

/// Why an object was left out of the rendered state, or needs the user's attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemReason {
    /// The object breaks a single-object rule (the API server would normally have refused it).
    InvalidSpec,
    /// The peer's `spec.interface` names no `PinnedInterface`.
    InterfaceNotFound,
    /// The peer's interface exists but is itself invalid.
    InterfaceInvalid,
    /// An older `PinnedPeer` has the same public key.
    DuplicatePublicKey,
    /// An older `PinnedPeer` on the same interface routes an overlapping tunnel prefix.
    OverlappingAllowedIPs,
    /// No node matches the selectors; nothing is rendered for the object.
    NoNodeSelected,
    /// The interface's dedicated port range has no free port for this peer.
    PortRangeExhausted,
}

impl ProblemReason {
    /// The condition reason (CamelCase, as Kubernetes conditions use).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidSpec => "InvalidSpec",
            Self::InterfaceNotFound => "InterfaceNotFound",
            Self::InterfaceInvalid => "InterfaceInvalid",
            Self::DuplicatePublicKey => "DuplicatePublicKey",
            Self::OverlappingAllowedIPs => "OverlappingAllowedIPs",
            Self::NoNodeSelected => "NoNodeSelected",
            Self::PortRangeExhausted => "PortRangeExhausted",
        }
    }

    /// Every reason.
    pub const ALL: [Self; 7] = [
        Self::InvalidSpec,
        Self::InterfaceNotFound,
        Self::InterfaceInvalid,
        Self::DuplicatePublicKey,
        Self::OverlappingAllowedIPs,
        Self::NoNodeSelected,
        Self::PortRangeExhausted,
    ];

    /// The reason a condition names, if it is one of these.
    pub fn from_condition_reason(reason: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == reason)
    }
}

/// One object's problem, with a message that says what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `PinnedPeer` or `PinnedInterface`.
    pub kind: &'static str,
    pub name: String,
    pub reason: ProblemReason,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?}: {}: {}",
            self.kind,
            self.name,
            self.reason.as_str(),
            self.message
        )
    }
}

/// The result of [`render`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rendered {
    /// The spec of each node that runs at least one interface, by node name.
    pub nodes: BTreeMap<String, PinnedNodeStateSpec>,
    /// Every dedicated-mode port assignment, to be kept for the next render.
    pub ports: PortAssignments,
    /// Problems, sorted by kind, name and reason.
    pub problems: Vec<Problem>,
}

/// A peer that passed every check, with what render needs from it.
struct AcceptedPeer<'a> {
    object: &'a PinnedPeer,
    validated: ValidatedPeer,
}

fn field_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Older objects first, then by name; objects without a timestamp (files) sort by name.
fn precedence(object: &impl ResourceExt) -> (Option<Time>, String) {
    (object.creation_timestamp(), object.name_any())
}

/// Whether a peer needs a dedicated port: `Dedicated` always, `Auto` when a range exists (the
/// node may choose `Dedicated`).
fn needs_dedicated_ports(interface: &PinnedInterface) -> bool {
    match interface.spec.mode {
        PinMode::Dedicated => true,
        PinMode::Auto => interface.spec.listen_port_end.is_some(),
        PinMode::Shared | PinMode::Identity => false,
    }
}

/// Tunnel prefixes already routed on one interface, for overlap checks in O(log n) per prefix.
#[derive(Default)]
struct PrefixIndex {
    exact: HashSet<IpNet>,
    by_network: BTreeSet<(std::net::IpAddr, u8)>,
}

impl PrefixIndex {
    /// The first indexed prefix that overlaps `net`, if any.
    fn overlap(&self, net: &IpNet) -> Option<IpNet> {
        // A prefix that contains `net`: one of its truncations.
        let containing = (0..=net.prefix_len()).find_map(|len| {
            let candidate = IpNet::new(net.network(), len).ok()?.trunc();
            self.exact.contains(&candidate).then_some(candidate)
        });
        // A prefix inside `net`: its network address lies in `net`'s range.
        containing.or_else(|| {
            self.by_network
                .range((net.network(), 0)..=(net.broadcast(), u8::MAX))
                .find_map(|(addr, len)| {
                    let candidate = IpNet::new(*addr, *len).ok()?;
                    (candidate.prefix_len() >= net.prefix_len()).then_some(candidate)
                })
        })
    }

    fn insert(&mut self, net: IpNet) {
        self.exact.insert(net);
        self.by_network.insert((net.network(), net.prefix_len()));
    }
}

/// Renders the per-node state. `previous` holds the dedicated ports handed out before.
/// Takes the objects owned or shared (`Arc`, as the operator's watch caches hold them).
pub fn render<I: Borrow<PinnedInterface>, P: Borrow<PinnedPeer>>(
    interfaces: &[I],
    peers: &[P],
    nodes: &[NodeInfo],
    previous: &PortAssignments,
) -> Rendered {
    let mut problems = Vec::new();

    // 1. Interfaces: valid ones by name.
    let mut valid_interfaces: BTreeMap<String, (&PinnedInterface, ValidatedInterface)> =
        BTreeMap::new();
    let mut invalid_interfaces = BTreeSet::new();
    for interface in interfaces {
        let interface = interface.borrow();
        let name = interface.name_any();
        match interface.spec.validate() {
            Ok(validated) => {
                valid_interfaces.insert(name, (interface, validated));
            }
            Err(errors) => {
                problems.push(Problem {
                    kind: "PinnedInterface",
                    name: name.clone(),
                    reason: ProblemReason::InvalidSpec,
                    message: field_errors(&errors),
                });
                invalid_interfaces.insert(name);
            }
        }
    }

    // 2. Peers, oldest first: validation, then the cross-object rules.
    let mut ordered: Vec<&PinnedPeer> = peers.iter().map(Borrow::borrow).collect();
    ordered.sort_by_key(|peer| precedence(*peer));
    let mut key_owner: BTreeMap<[u8; 32], String> = BTreeMap::new();
    let mut routed: BTreeMap<&str, PrefixIndex> = BTreeMap::new();
    let mut route_owner: BTreeMap<(String, IpNet), String> = BTreeMap::new();
    let mut accepted: BTreeMap<&str, Vec<AcceptedPeer<'_>>> = BTreeMap::new();
    for peer in ordered {
        let name = peer.name_any();
        let mut problem = |reason, message: String| {
            problems.push(Problem {
                kind: "PinnedPeer",
                name: name.clone(),
                reason,
                message,
            })
        };
        let validated = match peer.spec.validate() {
            Ok(validated) => validated,
            Err(errors) => {
                problem(ProblemReason::InvalidSpec, field_errors(&errors));
                continue;
            }
        };
        let interface_name = peer.spec.interface.as_str();
        if invalid_interfaces.contains(interface_name) {
            problem(
                ProblemReason::InterfaceInvalid,
                format!("PinnedInterface {interface_name:?} is invalid; fix it first"),
            );
            continue;
        }
        if !valid_interfaces.contains_key(interface_name) {
            problem(
                ProblemReason::InterfaceNotFound,
                format!(
                    "spec.interface names PinnedInterface {interface_name:?}, which does not exist; create it or fix the name"
                ),
            );
            continue;
        }
        let key = *validated.public_key.as_bytes();
        if let Some(owner) = key_owner.get(&key) {
            problem(
                ProblemReason::DuplicatePublicKey,
                format!(
                    "PinnedPeer {owner:?} is older and has the same public key; a key belongs to one PinnedPeer, delete one of them"
                ),
            );
            continue;
        }
        let index = routed.entry(interface_name).or_default();
        let overlap = validated
            .allowed_ips
            .iter()
            .find_map(|net| index.overlap(net).map(|other| (*net, other)));
        if let Some((mine, other)) = overlap {
            let owner = route_owner
                .get(&(interface_name.to_string(), other))
                .cloned()
                .unwrap_or_default();
            problem(
                ProblemReason::OverlappingAllowedIPs,
                format!(
                    "allowedIPs {mine} overlaps {other} of the older PinnedPeer {owner:?} on interface {interface_name:?}; WireGuard would route it to only one of them"
                ),
            );
            continue;
        }
        for net in &validated.allowed_ips {
            index.insert(*net);
            route_owner.insert((interface_name.to_string(), *net), name.clone());
        }
        key_owner.insert(key, name.clone());
        accepted
            .entry(interface_name)
            .or_default()
            .push(AcceptedPeer {
                object: peer,
                validated,
            });
    }

    // 3. Dedicated ports per interface (the same on every node), keeping earlier assignments.
    let mut ports = PortAssignments::new();
    for (interface_name, (interface, validated)) in &valid_interfaces {
        if !needs_dedicated_ports(interface) {
            continue;
        }
        let peers = accepted
            .get(interface_name.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut taken = BTreeSet::new();
        for peer in peers {
            let key = (interface_name.clone(), peer.object.name_any());
            if let Some(port) = previous.get(&key)
                && validated.ports.contains(port)
                && taken.insert(*port)
            {
                ports.insert(key, *port);
            }
        }
        let mut free = validated.ports.clone().filter(|port| !taken.contains(port));
        for peer in peers {
            let key = (interface_name.clone(), peer.object.name_any());
            if ports.contains_key(&key) {
                continue;
            }
            match free.next() {
                Some(port) => {
                    ports.insert(key, port);
                }
                None => problems.push(Problem {
                    kind: "PinnedPeer",
                    name: key.1,
                    reason: ProblemReason::PortRangeExhausted,
                    message: format!(
                        "PinnedInterface {interface_name:?} has no free port left in {}-{} for a dedicated port; widen listenPortEnd",
                        validated.ports.start(),
                        validated.ports.end()
                    ),
                }),
            }
        }
    }

    // 4. Per node: the interfaces that select it, with the peers that select it too.
    let mut node_states: BTreeMap<String, PinnedNodeStateSpec> = BTreeMap::new();
    let mut peer_nodes: BTreeMap<String, usize> = BTreeMap::new();
    for (interface_name, (interface, validated)) in &valid_interfaces {
        let selected: Vec<&NodeInfo> = nodes
            .iter()
            .filter(|node| validated.node_selector.matches(&node.labels))
            .collect();
        if selected.is_empty() {
            problems.push(Problem {
                kind: "PinnedInterface",
                name: interface_name.clone(),
                reason: ProblemReason::NoNodeSelected,
                message: "spec.nodeSelector matches no node; label the nodes that should run it or change the selector".into(),
            });
        }
        let peers = accepted
            .get(interface_name.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        for node in selected {
            let rendered_peers: Vec<RenderedPeer> = peers
                .iter()
                .filter(|peer| selects(peer.validated.node_selector.as_ref(), node))
                .map(|peer| {
                    let name = peer.object.name_any();
                    *peer_nodes.entry(name.clone()).or_default() += 1;
                    rendered_peer(peer, ports.get(&(interface_name.clone(), name)).copied())
                })
                .collect();
            let state =
                node_states
                    .entry(node.name.clone())
                    .or_insert_with(|| PinnedNodeStateSpec {
                        node_name: node.name.clone(),
                        interfaces: Vec::new(),
                    });
            state
                .interfaces
                .push(rendered_interface(interface, rendered_peers));
        }
    }
    for peers in accepted.values() {
        for peer in peers {
            let name = peer.object.name_any();
            if !peer_nodes.contains_key(&name) {
                problems.push(Problem {
                    kind: "PinnedPeer",
                    name,
                    reason: ProblemReason::NoNodeSelected,
                    message: "no node runs its interface and matches spec.nodeSelector; nothing enforces or serves this peer".into(),
                });
            }
        }
    }

    // Interfaces come out in name order (BTreeMap); peers were pushed oldest first.
    for state in node_states.values_mut() {
        for interface in &mut state.interfaces {
            interface.peers.sort_by(|a, b| a.name.cmp(&b.name));
        }
    }
    problems.sort_by(|a, b| (a.kind, &a.name, a.reason).cmp(&(b.kind, &b.name, b.reason)));
    Rendered {
        nodes: node_states,
        ports,
        problems,
    }
}

fn selects(selector: Option<&Selector>, node: &NodeInfo) -> bool {
    selector.is_none_or(|selector| selector.matches(&node.labels))
}

fn rendered_interface(interface: &PinnedInterface, peers: Vec<RenderedPeer>) -> RenderedInterface {
    let spec = &interface.spec;
    RenderedInterface {
        name: interface.name_any(),
        mode: spec.mode,
        interface_name: spec.interface_name.clone(),
        listen_port: spec.listen_port,
        listen_port_end: spec.listen_port_end,
        addresses: spec.addresses.clone(),
        mtu: spec.mtu,
        peers,
    }
}

fn rendered_peer(peer: &AcceptedPeer<'_>, dedicated_port: Option<u16>) -> RenderedPeer {
    let spec = &peer.object.spec;
    RenderedPeer {
        name: peer.object.name_any(),
        generation: peer.object.metadata.generation,
        public_key: peer.validated.public_key.to_base64(),
        allowed_ips: peer
            .validated
            .allowed_ips
            .iter()
            .map(ToString::to_string)
            .collect(),
        sources: peer
            .validated
            .sources
            .iter()
            .map(ToString::to_string)
            .collect(),
        endpoint: spec.endpoint.clone(),
        persistent_keepalive_seconds: spec.persistent_keepalive_seconds,
        preshared_key_secret_ref: spec.preshared_key_secret_ref.clone(),
        dedicated_port,
    }
}
