//! From a node's rendered state to what its kernel and WireGuard must hold. Pure.
//!
//! - the mode each interface runs in ([`resolve_mode`]);
//! - the fast-path state (every pin on every managed port);
//! - the WireGuard devices with their ports, addresses and peers. A peer whose pin cannot be
//!   enforced is left out of its device, so it never goes live without its pin.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use wgpin_crds::{
    PinMode, PinnedNodeStateSpec, RenderedInterface, RenderedPeer, ResolvedMode, SecretKeySelector,
    WireGuardKey,
};

use crate::{
    fastpath::{EnforcedInterface, FastPathState, SlotTable, Unenforceable, desired_state},
    wireguard::{PeerConfig, SecretKey},
};

/// What this node can do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCapabilities {
    /// The backend is kernel WireGuard (netlink); otherwise userspace (UAPI).
    pub kernel_wireguard: bool,
    /// `Identity` mode works here (kernel WireGuard with module BTF and BPF trampolines, and
    /// the module's structs as the session hook reads them), or why not.
    pub identity: Result<(), String>,
}

impl Default for NodeCapabilities {
    fn default() -> Self {
        Self {
            kernel_wireguard: false,
            identity: Err("not probed".into()),
        }
    }
}

/// The mode an interface runs in, and why it is not the one asked for when it is not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub mode: ResolvedMode,
    /// Set when `Identity` was asked for and cannot run here: why, and what runs instead.
    pub fallback: Option<String>,
}

/// The mode `interface` runs in on a node with `capabilities`: `Auto` takes the strongest the
/// node supports; `Identity` where it cannot run falls back to `Shared` (the same port and
/// pins; per-peer detection and eviction instead of per-peer prevention) and says why.
pub fn resolve_mode(interface: &RenderedInterface, capabilities: &NodeCapabilities) -> Resolution {
    let has_range = interface
        .listen_port_end
        .is_some_and(|end| end > interface.listen_port);
    let exact = |mode| Resolution {
        mode,
        fallback: None,
    };
    match (interface.mode, &capabilities.identity) {
        (PinMode::Dedicated, _) => exact(ResolvedMode::Dedicated),
        (PinMode::Shared, _) => exact(ResolvedMode::Shared),
        (PinMode::Identity | PinMode::Auto, Ok(())) => exact(ResolvedMode::Identity),
        (PinMode::Identity, Err(why)) => Resolution {
            mode: ResolvedMode::Shared,
            fallback: Some(format!(
                "Identity cannot run on this node ({why}); running Shared: the same port and pins, with a peer's session evicted when its endpoint leaves its pin instead of refused"
            )),
        },
        (PinMode::Auto, Err(_)) if has_range => exact(ResolvedMode::Dedicated),
        (PinMode::Auto, Err(_)) => exact(ResolvedMode::Shared),
    }
}

/// A peer on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    /// `PinnedPeer` name.
    pub name: String,
    pub config: PeerConfig,
    /// The peer's own pin (its sources), for the endpoint watchdog.
    pub pin: Vec<IpNet>,
}

/// A WireGuard device the node must run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// `PinnedInterface` name; its private key is shared by its devices.
    pub interface: String,
    /// Link name.
    pub device: String,
    pub mode: ResolvedMode,
    pub listen_port: u16,
    pub addresses: Vec<IpNet>,
    pub mtu: Option<u16>,
    pub peers: Vec<PeerSpec>,
}

/// Everything a node must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodePlan {
    pub modes: BTreeMap<String, ResolvedMode>,
    /// Interfaces that asked for a mode this node cannot run, with why and what runs instead.
    pub fallbacks: BTreeMap<String, String>,
    pub fast_path: FastPathState,
    pub devices: Vec<DeviceSpec>,
    /// Interfaces and peers that cannot be enforced here, with why. They are not live.
    pub problems: Vec<Unenforceable>,
}

/// Device name of a dedicated-mode peer: the interface's name and the port's offset.
pub fn dedicated_device_name(interface: &RenderedInterface, port: u16) -> String {
    format!(
        "{}-{}",
        interface.interface_name,
        port.saturating_sub(interface.listen_port)
    )
}

/// Longest link name Linux takes (`IFNAMSIZ` less the terminating NUL).
const LINK_NAME_MAX_LEN: usize = 15;

/// Why `name` cannot be a WireGuard device's link name, if it cannot: the rule of
/// `PinnedInterface.spec.interfaceName` (a letter, then letters, digits, '_' or '-'), at most
/// what Linux takes. The rendered state is input (from the API server or a file): a name the
/// operator never renders (253 characters, Unicode, a path) is a clear condition here rather
/// than a netlink error half-way through an apply.
fn link_name_problem(name: &str) -> Option<String> {
    let usable = name.len() <= LINK_NAME_MAX_LEN
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    (!usable).then(|| {
        format!(
            "{name:?} is not a usable WireGuard device name: 1 to {LINK_NAME_MAX_LEN} characters, a letter first, then letters, digits, '_' or '-'"
        )
    })
}

/// Plans the node. `preshared_key` resolves a Secret reference (a peer whose key cannot be
/// found is not enforced rather than run without it).
pub fn plan_node(
    spec: &PinnedNodeStateSpec,
    capabilities: &NodeCapabilities,
    slots: &mut SlotTable,
    preshared_key: &dyn Fn(&SecretKeySelector) -> Result<SecretKey, String>,
) -> NodePlan {
    let mut plan = NodePlan::default();
    let mut runnable = Vec::new();
    for interface in &spec.interfaces {
        let Resolution { mode, fallback } = resolve_mode(interface, capabilities);
        plan.modes.insert(interface.name.clone(), mode);
        if let Some(fallback) = fallback {
            plan.fallbacks.insert(interface.name.clone(), fallback);
        }
        if let Some(reason) = link_name_problem(&interface.interface_name) {
            // Nothing of it runs: no port managed, no device, no peer live.
            plan.problems
                .push(Unenforceable::new(&interface.name, None, reason));
            continue;
        }
        runnable.push(EnforcedInterface {
            rendered: interface,
            mode,
        });
    }
    let (fast_path, problems) = desired_state(&runnable, slots);
    plan.fast_path = fast_path;
    let left_out: BTreeSet<(String, Option<String>)> = problems
        .iter()
        .map(|p| (p.interface.clone(), p.peer.clone()))
        .collect();
    plan.problems.extend(problems);

    for enforced in runnable {
        let interface = enforced.rendered;
        if left_out.contains(&(interface.name.clone(), None)) {
            continue;
        }
        let addresses: Vec<IpNet> = interface
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let mut peers = Vec::new();
        for peer in &interface.peers {
            if left_out.contains(&(interface.name.clone(), Some(peer.name.clone()))) {
                continue;
            }
            match peer_spec(peer, preshared_key) {
                Ok(spec) => peers.push((peer, spec)),
                Err(reason) => {
                    // Its pin may already be in the fast path; without WireGuard it is harmless.
                    plan.problems.push(Unenforceable::new(
                        &interface.name,
                        Some(&peer.name),
                        reason,
                    ))
                }
            }
        }
        match enforced.mode {
            ResolvedMode::Dedicated => {
                for (rendered, spec) in peers {
                    let Some(port) = rendered.dedicated_port else {
                        continue;
                    };
                    let device = dedicated_device_name(interface, port);
                    if let Some(reason) = link_name_problem(&device) {
                        // A port far past listenPort (hand-written state) makes the name too
                        // long; its pin alone, without WireGuard, is harmless.
                        plan.problems.push(Unenforceable::new(
                            &interface.name,
                            Some(&rendered.name),
                            reason,
                        ));
                        continue;
                    }
                    plan.devices.push(DeviceSpec {
                        interface: interface.name.clone(),
                        device,
                        mode: enforced.mode,
                        listen_port: port,
                        // One host address per device: the subnet's route must not point at
                        // every per-peer device at once; each peer gets routes of its own.
                        addresses: addresses.iter().map(host_only).collect(),
                        mtu: interface.mtu,
                        peers: vec![spec],
                    });
                }
            }
            ResolvedMode::Shared | ResolvedMode::Identity => plan.devices.push(DeviceSpec {
                interface: interface.name.clone(),
                device: interface.interface_name.clone(),
                mode: enforced.mode,
                listen_port: interface.listen_port,
                addresses,
                mtu: interface.mtu,
                peers: peers.into_iter().map(|(_, spec)| spec).collect(),
            }),
        }
    }
    plan
}

fn host_only(address: &IpNet) -> IpNet {
    let len = match address.addr() {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    IpNet::new(address.addr(), len).unwrap_or(*address)
}

fn peer_spec(
    peer: &RenderedPeer,
    preshared_key: &dyn Fn(&SecretKeySelector) -> Result<SecretKey, String>,
) -> Result<PeerSpec, String> {
    let public_key: WireGuardKey = peer
        .public_key
        .parse()
        .map_err(|e| format!("public key {e}"))?;
    let allowed_ips = peer
        .allowed_ips
        .iter()
        .map(|a| {
            a.parse::<IpNet>()
                .map_err(|e| format!("allowedIPs {a}: {e}"))
        })
        .collect::<Result<BTreeSet<_>, _>>()?;
    let pin = peer
        .sources
        .iter()
        .map(|s| s.parse::<IpNet>().map_err(|e| format!("source {s}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let endpoint = match &peer.endpoint {
        Some(endpoint) => Some(SocketAddr::new(
            endpoint
                .address
                .parse()
                .map_err(|e| format!("endpoint {}: {e}", endpoint.address))?,
            endpoint.port,
        )),
        None => None,
    };
    let preshared_key = match &peer.preshared_key_secret_ref {
        Some(reference) => Some(preshared_key(reference)?),
        None => None,
    };
    Ok(PeerSpec {
        name: peer.name.clone(),
        config: PeerConfig {
            public_key,
            preshared_key,
            endpoint,
            persistent_keepalive: peer.persistent_keepalive_seconds,
            allowed_ips,
        },
        pin,
    })
}

#[cfg(test)]
mod tests {
    use wgpin_crds::{Endpoint, PinnedNodeStateSpec};

    use super::*;

    fn rendered_peer(name: &str, key: &str, port: Option<u16>) -> RenderedPeer {
        RenderedPeer {
            name: name.into(),
            generation: Some(1),
            public_key: key.into(),
            allowed_ips: vec!["198.51.100.2/32".into()],
            sources: vec!["203.0.113.0/24".into()],
            endpoint: Some(Endpoint {
                address: "203.0.113.5".into(),
                port: 51820,
            }),
            persistent_keepalive_seconds: Some(25),
            preshared_key_secret_ref: None,
            dedicated_port: port,
        }
    }

    fn interface(mode: PinMode, end: Option<u16>, peers: Vec<RenderedPeer>) -> RenderedInterface {
        RenderedInterface {
            name: "gateway".into(),
            mode,
            interface_name: "wgpin0".into(),
            listen_port: 51820,
            listen_port_end: end,
            addresses: vec!["198.51.100.1/24".into()],
            mtu: Some(1420),
            peers,
        }
    }

    const A: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const B: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

    #[test]
    fn modes_resolve_to_the_strongest_the_node_supports() {
        let userspace = NodeCapabilities {
            kernel_wireguard: false,
            identity: Err("userspace WireGuard".into()),
        };
        let kernel = NodeCapabilities {
            kernel_wireguard: true,
            identity: Ok(()),
        };
        let cases = [
            (
                PinMode::Auto,
                Some(51829),
                &userspace,
                ResolvedMode::Dedicated,
            ),
            (PinMode::Auto, None, &userspace, ResolvedMode::Shared),
            (PinMode::Auto, Some(51820), &userspace, ResolvedMode::Shared),
            (PinMode::Auto, None, &kernel, ResolvedMode::Identity),
            (PinMode::Auto, Some(51829), &kernel, ResolvedMode::Identity),
            (PinMode::Identity, None, &kernel, ResolvedMode::Identity),
            (PinMode::Shared, Some(51829), &kernel, ResolvedMode::Shared),
            (
                PinMode::Dedicated,
                None,
                &userspace,
                ResolvedMode::Dedicated,
            ),
        ];
        for (mode, end, caps, expected) in cases {
            assert_eq!(
                resolve_mode(&interface(mode, end, vec![]), caps),
                Resolution {
                    mode: expected,
                    fallback: None
                },
                "{mode:?} {end:?} {caps:?}"
            );
        }
        // Identity where it cannot run: Shared, and why.
        let fallback = resolve_mode(&interface(PinMode::Identity, None, vec![]), &userspace);
        assert_eq!(fallback.mode, ResolvedMode::Shared);
        let why = fallback.fallback.expect("a reason");
        assert!(
            why.contains("userspace WireGuard") && why.contains("running Shared"),
            "{why}"
        );
    }

    #[test]
    fn dedicated_mode_gives_each_peer_a_device_of_its_own() {
        let spec = PinnedNodeStateSpec {
            node_name: "gw".into(),
            interfaces: vec![interface(
                PinMode::Auto,
                Some(51829),
                vec![
                    rendered_peer("alice", A, Some(51820)),
                    rendered_peer("bob", B, Some(51823)),
                ],
            )],
        };
        let plan = plan_node(
            &spec,
            &NodeCapabilities::default(),
            &mut SlotTable::default(),
            &|_| Err("none".into()),
        );
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        let devices: Vec<(&str, u16, Vec<String>, Vec<&str>)> = plan
            .devices
            .iter()
            .map(|d| {
                (
                    d.device.as_str(),
                    d.listen_port,
                    d.addresses.iter().map(ToString::to_string).collect(),
                    d.peers.iter().map(|p| p.name.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            devices,
            [
                (
                    "wgpin0-0",
                    51820,
                    vec!["198.51.100.1/32".to_string()],
                    vec!["alice"]
                ),
                (
                    "wgpin0-3",
                    51823,
                    vec!["198.51.100.1/32".to_string()],
                    vec!["bob"]
                ),
            ]
        );
        assert_eq!(
            plan.fast_path.ports.keys().copied().collect::<Vec<_>>(),
            [51820, 51823]
        );
        assert_eq!(
            plan.devices[0].peers[0].pin,
            ["203.0.113.0/24".parse::<IpNet>().expect("net")]
        );
    }

    #[test]
    fn shared_mode_runs_one_device_and_unresolvable_keys_keep_a_peer_out() {
        let mut with_psk = rendered_peer("bob", B, None);
        with_psk.preshared_key_secret_ref = Some(SecretKeySelector {
            namespace: "wgpin-system".into(),
            name: "bob-psk".into(),
            key: "presharedKey".into(),
        });
        let spec = PinnedNodeStateSpec {
            node_name: "gw".into(),
            interfaces: vec![interface(
                PinMode::Shared,
                None,
                vec![rendered_peer("alice", A, None), with_psk],
            )],
        };
        let plan = plan_node(
            &spec,
            &NodeCapabilities::default(),
            &mut SlotTable::default(),
            &|s| Err(format!("Secret {}/{} not found", s.namespace, s.name)),
        );
        assert_eq!(plan.devices.len(), 1);
        assert_eq!(plan.devices[0].device, "wgpin0");
        assert_eq!(
            plan.devices[0].addresses,
            ["198.51.100.1/24".parse::<IpNet>().expect("net")]
        );
        let peers: Vec<&str> = plan.devices[0]
            .peers
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(
            peers,
            ["alice"],
            "bob needs a preshared key that cannot be read"
        );
        assert_eq!(plan.problems.len(), 1);
        assert!(
            plan.problems[0]
                .to_string()
                .contains("Secret wgpin-system/bob-psk not found")
        );
    }

    // ---- hostile and huge objects, from the manifests through render to the maps ----

    const C: &str = "gN65BkIKy1eCE9pP1wdc8ROUtkHLF2PfAqYdyYBz6EA=";
    const D: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn pinned_interface(spec: serde_json::Value) -> wgpin_crds::PinnedInterface {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedInterface",
            "metadata": {"name": "gateway"}, "spec": spec,
        }))
        .expect("interface")
    }

    fn pinned_peer(
        name: &str,
        key: &str,
        allowed: &str,
        sources: &[&str],
    ) -> wgpin_crds::PinnedPeer {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "wgpin.io/v1alpha1", "kind": "PinnedPeer", "metadata": {"name": name},
            "spec": {"interface": "gateway", "publicKey": key, "allowedIPs": [allowed], "sources": sources},
        }))
        .expect("peer")
    }

    /// Render (the operator's) for one node, then the node's plan.
    fn render_and_plan(
        interface: &wgpin_crds::PinnedInterface,
        peers: &[wgpin_crds::PinnedPeer],
        capabilities: &NodeCapabilities,
    ) -> (
        wgpin_operator::Rendered,
        PinnedNodeStateSpec,
        NodePlan,
        SlotTable,
    ) {
        let node = wgpin_operator::NodeInfo {
            name: "gw".into(),
            labels: BTreeMap::new(),
        };
        let rendered = wgpin_operator::render(
            std::slice::from_ref(interface),
            peers,
            &[node],
            &wgpin_operator::PortAssignments::new(),
        );
        let spec = rendered.nodes.get("gw").cloned().unwrap_or_default();
        let mut slots = SlotTable::default();
        let plan = plan_node(&spec, capabilities, &mut slots, &|_| Err("none".into()));
        (rendered, spec, plan, slots)
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("net")).collect()
    }

    /// Three peers on one port whose pins overlap (alice's /24 holds bob's /25) and share a
    /// prefix (bob's and carol's 192.0.2.0/24), in every mode: all three are rendered and
    /// enforced, and each one's own allowlist is exactly its sources. `Dedicated`: its port's
    /// pins; `Identity`: its per-peer pins; `Shared`: its pin for the endpoint check (the port
    /// admits the union, a prefix belonging to a peer only when no other lists it).
    #[test]
    fn overlapping_pins_and_a_shared_prefix_stay_each_peers_own() {
        use std::net::SocketAddr;

        use wgpin_common::NO_PEER;

        use crate::wireguard::inside_pin;

        let own: [(&str, &str, &[&str]); 3] = [
            ("alice", A, &["203.0.113.0/24"]),
            ("bob", B, &["203.0.113.0/25", "192.0.2.0/24"]),
            ("carol", C, &["192.0.2.0/24", "2001:db8:40::/48"]),
        ];
        let peers: Vec<wgpin_crds::PinnedPeer> = own
            .iter()
            .enumerate()
            .map(|(i, (name, key, sources))| {
                pinned_peer(name, key, &format!("198.51.100.{}/32", i + 2), sources)
            })
            .collect();
        let kernel = NodeCapabilities {
            kernel_wireguard: true,
            identity: Ok(()),
        };
        for (mode, end, capabilities) in [
            ("Shared", None, NodeCapabilities::default()),
            ("Identity", None, kernel),
            ("Dedicated", Some(51829), NodeCapabilities::default()),
        ] {
            let mut spec = serde_json::json!({"nodeSelector": {}, "interfaceName": "wgpin0", "listenPort": 51820, "mode": mode});
            if let Some(end) = end {
                spec["listenPortEnd"] = serde_json::json!(end);
            }
            let (rendered, _, plan, slots) =
                render_and_plan(&pinned_interface(spec), &peers, &capabilities);
            assert!(
                rendered.problems.is_empty(),
                "{mode}: {:?}",
                rendered.problems
            );
            assert!(plan.problems.is_empty(), "{mode}: {:?}", plan.problems);
            let specs: BTreeMap<&str, &PeerSpec> = plan
                .devices
                .iter()
                .flat_map(|d| &d.peers)
                .map(|p| (p.name.as_str(), p))
                .collect();
            assert_eq!(specs.len(), 3, "{mode}: every peer is live");
            for (name, _, sources) in &own {
                let sources = nets(sources);
                assert_eq!(specs[name].pin, sources, "{mode}: {name}'s own pin");
                let slot = slots.peers[*name];
                let mine: BTreeSet<IpNet> = match mode {
                    "Dedicated" => {
                        let device = plan
                            .devices
                            .iter()
                            .find(|d| d.peers[0].name == *name)
                            .expect("a device of its own");
                        assert_eq!(plan.fast_path.ports[&device.listen_port].peer_slot, slot);
                        plan.fast_path
                            .pins
                            .iter()
                            .filter(|(k, _)| k.port == device.listen_port)
                            .map(|(k, entry)| {
                                assert_eq!(entry.peer_slot, slot, "{name}'s port");
                                k.prefix
                            })
                            .collect()
                    }
                    "Identity" => plan
                        .fast_path
                        .peer_pins
                        .iter()
                        .filter(|k| k.peer_slot == slot)
                        .map(|k| k.prefix)
                        .collect(),
                    _ => specs[name].pin.iter().copied().collect(),
                };
                assert_eq!(mine, sources.into_iter().collect(), "{mode}: {name}");
            }
            if mode != "Dedicated" {
                let on_port: BTreeMap<String, u32> = plan
                    .fast_path
                    .pins
                    .iter()
                    .map(|(k, e)| {
                        assert_eq!(k.port, 51820);
                        (k.prefix.to_string(), e.peer_slot)
                    })
                    .collect();
                let expected: BTreeMap<String, u32> = [
                    ("203.0.113.0/24", slots.peers["alice"]),
                    ("203.0.113.0/25", slots.peers["bob"]),
                    ("192.0.2.0/24", NO_PEER),
                    ("2001:db8:40::/48", slots.peers["carol"]),
                ]
                .into_iter()
                .map(|(p, s)| (p.to_string(), s))
                .collect();
                assert_eq!(
                    on_port, expected,
                    "{mode}: the union, shared prefixes to no one"
                );
            }
            // Bob from inside alice's /24 but outside his /25: outside his own pin (evicted in
            // Shared mode, his handshake answer dropped in Identity mode).
            let roamed: SocketAddr = "203.0.113.200:40000".parse().expect("addr");
            assert!(!inside_pin(&roamed, &specs["bob"].pin), "{mode}");
            assert!(inside_pin(&roamed, &specs["alice"].pin), "{mode}");
        }
    }

    /// Aliasing spellings of 192.0.2.1: the IPv4-mapped ones (any spelling), leading zeros, a
    /// zero-padded length, upper case, are refused at render with a reason; canonical NAT64,
    /// IPv4-compatible and IPv4-translated prefixes are IPv6 pins that never admit 192.0.2.1.
    /// The same spellings in a hand-written node state (bypassing render) keep their peer out.
    #[test]
    fn aliasing_forms_never_admit_the_ipv4_address_they_alias() {
        use std::net::{IpAddr, Ipv4Addr, SocketAddr};

        use crate::wireguard::inside_pin;

        let aliased = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let refused: [&str; 7] = [
            "::ffff:192.0.2.1/128",
            "0:0:0:0:0:ffff:c000:201/128",
            "::FFFF:C000:201/128",
            "::ffff:0:0/96",
            "192.000.002.001/32",
            "192.0.2.1/024",
            "::192.0.2.1/128",
        ];
        let mut peers = vec![pinned_peer(
            "v6",
            A,
            "198.51.100.2/32",
            &[
                "::c000:201/128",
                "64:ff9b::c000:201/128",
                "::ffff:0:c000:201/128",
            ],
        )];
        let keys = [B, C, D];
        for (i, source) in refused.iter().enumerate() {
            peers.push(pinned_peer(
                &format!("alias-{i}"),
                keys[i % 3],
                &format!("198.51.100.{}/32", i + 10),
                &[source],
            ));
        }
        let interface = pinned_interface(
            serde_json::json!({"nodeSelector": {}, "interfaceName": "wgpin0", "listenPort": 51820, "mode": "Shared"}),
        );
        let (rendered, spec, plan, _) =
            render_and_plan(&interface, &peers, &NodeCapabilities::default());
        for (i, source) in refused.iter().enumerate() {
            let problem = rendered
                .problems
                .iter()
                .find(|p| p.name == format!("alias-{i}"))
                .unwrap_or_else(|| panic!("{source} not refused"));
            assert_eq!(problem.reason, wgpin_operator::ProblemReason::InvalidSpec);
            assert!(
                problem.message.contains("spec.sources[0]"),
                "{}",
                problem.message
            );
        }
        let names: Vec<&str> = spec.interfaces[0]
            .peers
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["v6"]);
        assert!(
            !plan
                .fast_path
                .pins
                .keys()
                .any(|k| k.prefix.contains(&aliased))
        );
        assert!(
            plan.fast_path
                .pins
                .keys()
                .all(|k| k.prefix.addr().is_ipv6())
        );
        let pin = &plan.devices[0].peers[0].pin;
        for endpoint in ["192.0.2.1:51820", "[::ffff:192.0.2.1]:51820"] {
            let endpoint: SocketAddr = endpoint.parse().expect("addr");
            assert!(!inside_pin(&endpoint, pin), "{endpoint}");
        }

        // The same spellings straight into a node state: each peer is left out, with why.
        let mut hostile = spec.clone();
        let template = hostile.interfaces[0].peers[0].clone();
        for (i, source) in refused.iter().enumerate() {
            let mut peer = template.clone();
            peer.name = format!("alias-{i}");
            peer.sources = vec![source.to_string()];
            hostile.interfaces[0].peers.push(peer);
        }
        let plan = plan_node(
            &hostile,
            &NodeCapabilities::default(),
            &mut SlotTable::default(),
            &|_| Err("none".into()),
        );
        let left_out: BTreeSet<&str> = plan
            .problems
            .iter()
            .filter_map(|p| p.peer.as_deref())
            .collect();
        assert_eq!(left_out.len(), refused.len(), "{:?}", plan.problems);
        assert!(
            !plan
                .fast_path
                .pins
                .keys()
                .any(|k| k.prefix.contains(&aliased))
        );
        let live: Vec<&str> = plan.devices[0]
            .peers
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(live, ["v6"]);
    }

    /// Names the operator never renders, in a node state: a device name of 253 characters, in
    /// Unicode or with a slash leaves its interface out with why; a dedicated port so far past
    /// the listen port that the device name grows past 15 characters leaves that peer out.
    /// Peer names of 253 characters or in Unicode are only labels: planned as they are.
    #[test]
    fn hostile_names_in_a_node_state_are_a_clear_condition() {
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        let mut spec = PinnedNodeStateSpec {
            node_name: "gw".into(),
            interfaces: Vec::new(),
        };
        for (name, device) in [
            ("long", long.as_str()),
            ("unicode", "wgpïn0"),
            ("path", "wg/0"),
            ("empty", ""),
        ] {
            let mut bad = interface(PinMode::Shared, None, vec![rendered_peer(name, A, None)]);
            bad.name = name.into();
            bad.interface_name = device.into();
            bad.listen_port = 51800 + spec.interfaces.len() as u16;
            spec.interfaces.push(bad);
        }
        let mut dedicated = interface(
            PinMode::Dedicated,
            Some(65535),
            vec![
                rendered_peer(&long, A, Some(51820)),
                rendered_peer("günther", B, Some(65535)),
            ],
        );
        dedicated.name = "dedicated".into();
        dedicated.interface_name = "wgpin01234".into();
        spec.interfaces.push(dedicated);
        let plan = plan_node(
            &spec,
            &NodeCapabilities::default(),
            &mut SlotTable::default(),
            &|_| Err("none".into()),
        );
        let problems: Vec<(String, Option<String>)> = plan
            .problems
            .iter()
            .map(|p| (p.interface.clone(), p.peer.clone()))
            .collect();
        assert_eq!(
            problems,
            [
                ("long".into(), None),
                ("unicode".into(), None),
                ("path".into(), None),
                ("empty".into(), None),
                ("dedicated".into(), Some("günther".into())),
            ]
        );
        assert!(
            plan.problems[1]
                .reason
                .contains("not a usable WireGuard device name"),
            "{}",
            plan.problems[1]
        );
        assert!(
            plan.problems[4].reason.contains("wgpin01234-13715"),
            "{}",
            plan.problems[4]
        );
        assert_eq!(
            plan.fast_path.ports.keys().copied().collect::<Vec<_>>(),
            [51820, 65535]
        );
        let devices: Vec<(&str, &str)> = plan
            .devices
            .iter()
            .map(|d| (d.device.as_str(), d.peers[0].name.as_str()))
            .collect();
        assert_eq!(devices, [("wgpin01234-0", long.as_str())]);
    }

    fn rss_kib() -> (u64, u64) {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// A PinnedPeer with 10,000 sources: render refuses it (at most 256) with the count, fast.
    /// A node state carrying such a peer anyway (the PinnedNodeState schema does not bound it;
    /// hand-written or from a newer operator) is planned exactly: 10,000 pins, not one more, in
    /// every mode. Time and memory are printed (`--nocapture`), not asserted.
    #[test]
    fn ten_thousand_sources_through_render_plan_and_fast_path() {
        use std::time::Instant;

        let sources: Vec<String> = (0..10_000u32)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let source_refs: Vec<&str> = sources.iter().map(String::as_str).collect();
        let interface = pinned_interface(
            serde_json::json!({"nodeSelector": {}, "interfaceName": "wgpin0", "listenPort": 51820, "listenPortEnd": 51829}),
        );
        let peers = [
            pinned_peer("huge", A, "198.51.100.2/32", &source_refs),
            pinned_peer("normal", B, "198.51.100.3/32", &["203.0.113.0/24"]),
        ];
        let (rss_before, _) = rss_kib();
        let start = Instant::now();
        let (rendered, spec, _, _) =
            render_and_plan(&interface, &peers, &NodeCapabilities::default());
        let render_time = start.elapsed();
        let problem = rendered
            .problems
            .iter()
            .find(|p| p.name == "huge")
            .expect("refused");
        assert!(
            problem.message.contains("has 10000 entries, at most 256"),
            "{}",
            problem.message
        );
        assert_eq!(
            spec.interfaces[0].peers.len(),
            1,
            "the normal peer is rendered"
        );

        // The same peer in a node state, as the agent may be handed it.
        let mut hostile = spec.clone();
        let mut huge = hostile.interfaces[0].peers[0].clone();
        huge.name = "huge".into();
        huge.public_key = A.into();
        huge.sources = sources.clone();
        huge.dedicated_port = Some(51829);
        hostile.interfaces[0].peers.push(huge);
        let state_bytes = serde_json::to_vec(&hostile).map(|v| v.len()).unwrap_or(0);
        let kernel = NodeCapabilities {
            kernel_wireguard: true,
            identity: Ok(()),
        };
        for (mode, capabilities) in [
            (PinMode::Dedicated, NodeCapabilities::default()),
            (PinMode::Shared, NodeCapabilities::default()),
            (PinMode::Identity, kernel),
        ] {
            hostile.interfaces[0].mode = mode;
            let mut slots = SlotTable::default();
            let start = Instant::now();
            let plan = plan_node(&hostile, &capabilities, &mut slots, &|_| Err("none".into()));
            let plan_time = start.elapsed();
            assert!(plan.problems.is_empty(), "{mode:?}: {:?}", plan.problems);
            assert_eq!(
                plan.fast_path.pins.len(),
                10_001,
                "{mode:?}: exactly the pins"
            );
            let slot = slots.peers["huge"];
            let huge_pins = plan
                .fast_path
                .pins
                .values()
                .filter(|e| e.peer_slot == slot)
                .count();
            assert_eq!(huge_pins, 10_000, "{mode:?}");
            if mode == PinMode::Identity {
                assert_eq!(plan.fast_path.peer_pins.len(), 10_001);
            }
            let pin = &plan
                .devices
                .iter()
                .flat_map(|d| &d.peers)
                .find(|p| p.name == "huge")
                .expect("live")
                .pin;
            assert_eq!(pin.len(), 10_000);
            let (rss, peak) = rss_kib();
            // The maps' contents as the agent holds them: key and value of each pin, plus a
            // B-tree's overhead (about a third more).
            let entry = std::mem::size_of::<crate::fastpath::PinKey>()
                + std::mem::size_of::<wgpin_common::AllowEntry>();
            let state_kib =
                (plan.fast_path.pins.len() + plan.fast_path.peer_pins.len()) * entry * 4 / 3 / 1024;
            println!(
                "10,000-source peer, {mode:?}: render (refuses it) {render_time:?}; plan and fast-path state {plan_time:?}; \
                 node state {} KiB as JSON; fast-path state ~{state_kib} KiB; process RSS {} MiB (+{} MiB since the start of this test, peak {} MiB, all tests together)",
                state_bytes / 1024,
                rss / 1024,
                rss.saturating_sub(rss_before) / 1024,
                peak / 1024,
            );
        }
    }
}
