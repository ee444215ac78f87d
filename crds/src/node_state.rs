//! `PinnedNodeState`: what one node must enforce (spec, rendered by the operator) and what it
//! enforces (status, written by the node's agent).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    interface::PinMode,
    peer::{Endpoint, SecretKeySelector},
};

/// The rendered state of one node, named after the node.
///
/// Written only by the operator (spec) and the node's agent (status); users read it. Private
/// keys never appear here: each node generates its own and publishes only the public key.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "wgpin.io",
    version = "v1alpha1",
    kind = "PinnedNodeState",
    plural = "pinnednodestates",
    shortname = "pns",
    category = "wgpin",
    doc = "What one node must enforce (spec, from the operator) and enforces (status, from its agent).",
    status = "PinnedNodeStateStatus",
    printcolumn(json_path = ".spec.nodeName", name = "Node", type_ = "string"),
    printcolumn(
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        name = "Ready",
        type_ = "string"
    ),
    printcolumn(
        json_path = ".metadata.creationTimestamp",
        name = "Age",
        type_ = "date"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PinnedNodeStateSpec {
    /// The node this state is for.
    pub node_name: String,
    /// Interfaces to run on the node, sorted by name.
    #[serde(default)]
    pub interfaces: Vec<RenderedInterface>,
}

/// One `PinnedInterface` as a node must run it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RenderedInterface {
    /// Name of the `PinnedInterface`.
    pub name: String,
    /// The mode asked for; the agent resolves `Auto` and reports the result.
    pub mode: PinMode,
    /// WireGuard device name (the prefix of the per-peer devices in `Dedicated` mode).
    pub interface_name: String,
    pub listen_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port_end: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Peers terminated on this node, sorted by name.
    #[serde(default)]
    pub peers: Vec<RenderedPeer>,
}

/// One `PinnedPeer` as a node must enforce it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RenderedPeer {
    /// Name of the `PinnedPeer`.
    pub name: String,
    /// `metadata.generation` of the `PinnedPeer` this was rendered from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    pub public_key: String,
    #[serde(rename = "allowedIPs")]
    pub allowed_ips: Vec<String>,
    /// The pin. Never empty: a catch-all appears here only when the peer opted out on purpose.
    pub sources: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive_seconds: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key_secret_ref: Option<SecretKeySelector>,
    /// This peer's own port in `Dedicated` mode; absent when the interface has no range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedicated_port: Option<u16>,
}

/// What the agent reports for its node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PinnedNodeStateStatus {
    /// The generation of the spec the agent last applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `FastPathVerified`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceStatus>,
}

/// One interface as the node runs it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    /// Name of the `PinnedInterface`.
    pub name: String,
    /// The mode in use (`Auto` resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ResolvedMode>,
    /// Set when the mode asked for cannot run on this node (`Identity` without kernel
    /// WireGuard, module BTF or BPF trampolines): why, and what runs instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode_fallback: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<WireGuardBackend>,
    /// The fast-path hook in use, for example `xdp` or `tc`, with the underlay interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast_path: Option<String>,
    /// The node's public key for this interface (shared by its per-peer devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerEnforcementStatus>,
}

/// A mode as a node runs it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ResolvedMode {
    Dedicated,
    Shared,
    Identity,
}

/// The WireGuard implementation a node uses.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum WireGuardBackend {
    /// Linux kernel WireGuard, configured over generic netlink.
    Kernel,
    /// A userspace implementation (wireguard-go, boringtun), configured over its UAPI socket.
    Userspace,
}

/// Where a peer is in the fail-closed sequence on one node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum EnforcementState {
    /// Not yet live: its pin is being installed, or it waits for one.
    Pending,
    /// Pin verified in the fast path, then the peer added to WireGuard.
    Enforced,
    /// Cannot be enforced; `message` says why. The peer is not in WireGuard.
    Failed,
    /// Was live and was removed from WireGuard because its pin could not be kept.
    Withdrawn,
}

/// One peer on one node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerEnforcementStatus {
    /// Name of the `PinnedPeer`.
    pub name: String,
    pub state: EnforcementState,
    /// Generation of the `PinnedPeer` this state is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    /// Current endpoint as WireGuard sees it (`address:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Last completed handshake; absent when the peer never connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handshake_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub violations: Option<ViolationSummary>,
    /// Why the peer is not enforced, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Packets for a peer that came from outside its pin.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ViolationSummary {
    /// Packets dropped or sessions evicted since the state was created.
    pub count: u64,
    /// The most recent offending source (`address:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_source: Option<String>,
    /// The node that saw it (in `PinnedPeer` status only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_time: Option<Time>,
}
