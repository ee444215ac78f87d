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
                    plan.devices.push(DeviceSpec {
                        interface: interface.name.clone(),
                        device: dedicated_device_name(interface, port),
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
}
