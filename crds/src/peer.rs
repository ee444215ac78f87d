//! `PinnedPeer`: one WireGuard peer key, pinned to the source prefixes it may come from.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    node_state::{EnforcementState, ResolvedMode, ViolationSummary},
    schema,
};

/// Most nodes listed one by one in a `PinnedPeer`'s status; the rest are only counted.
pub const MAX_STATUS_NODES: usize = 32;
/// Default key inside the preshared-key Secret.
pub const DEFAULT_PRESHARED_KEY_KEY: &str = "presharedKey";

/// A WireGuard peer, pinned: its packets are accepted only from `sources`, on the nodes its
/// `PinnedInterface` selects.
///
/// Rules checked by the API server (and by the agent when it reads objects from files):
/// `sources` is non-empty; a catch-all prefix (`0.0.0.0/0`, `::/0`) needs `allowAnySource:
/// true`, and `allowAnySource: true` needs one; every prefix is a canonical network prefix
/// without duplicates; `endpoint` lies inside `sources`.
///
/// Rules across objects, checked by the operator and reported as conditions: the interface
/// must exist; one public key belongs to one `PinnedPeer` (the oldest wins, the others get
/// `Ready=False` with reason `DuplicatePublicKey`); `allowedIPs` must not overlap another peer's
/// on the same interface; at least one node must be selected.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wgpin.io",
    version = "v1alpha1",
    kind = "PinnedPeer",
    plural = "pinnedpeers",
    shortname = "pp",
    category = "wgpin",
    doc = "A WireGuard peer key pinned to the source prefixes it may come from.",
    status = "PinnedPeerStatus",
    cel,
    printcolumn(json_path = ".spec.interface", name = "Interface", type_ = "string"),
    printcolumn(json_path = ".status.keyPrefix", name = "Key", type_ = "string"),
    printcolumn(json_path = ".spec.sources", name = "Sources", type_ = "string"),
    printcolumn(
        json_path = ".status.nodeCounts.enforced",
        name = "Enforced",
        type_ = "integer"
    ),
    printcolumn(
        json_path = ".status.violations.count",
        name = "Violations",
        type_ = "integer"
    ),
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
#[x_kube(validation = Rule::new("size(self.sources) > 0")
    .message("sources is empty: list the prefixes the peer may connect from (for example 203.0.113.0/24); to allow any source on purpose, write sources: [0.0.0.0/0, ::/0] and allowAnySource: true")
    .field_path(".sources"))]
#[x_kube(validation = Rule::new("(has(self.allowAnySource) && self.allowAnySource) || self.sources.all(s, !isCIDR(s) || cidr(s).prefixLength() != 0)")
    .message("sources contains a catch-all prefix (0.0.0.0/0 or ::/0), which pins nothing: list the prefixes the peer connects from, or set allowAnySource: true to allow any source on purpose")
    .field_path(".sources"))]
#[x_kube(validation = Rule::new("!(has(self.allowAnySource) && self.allowAnySource) || self.sources.exists(s, isCIDR(s) && cidr(s).prefixLength() == 0)")
    .message("allowAnySource is true but sources has no catch-all prefix (0.0.0.0/0 or ::/0): remove allowAnySource, or add the catch-all prefix you mean to allow")
    .field_path(".allowAnySource"))]
#[x_kube(validation = Rule::new("!has(self.endpoint) || !isIP(self.endpoint.address) || self.sources.exists(s, isCIDR(s) && cidr(s).containsIP(self.endpoint.address))")
    .message("endpoint.address lies outside every prefix in sources, so the pin would refuse the peer's own endpoint: fix the endpoint or add its prefix to sources")
    .field_path(".endpoint.address"))]
#[serde(rename_all = "camelCase")]
pub struct PinnedPeerSpec {
    /// Name of the `PinnedInterface` that terminates this peer.
    #[schemars(schema_with = "schema::object_name")]
    pub interface: String,

    /// Narrows the interface's nodes for this peer; unset means all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,

    #[schemars(schema_with = "schema::public_key")]
    pub public_key: String,

    #[serde(rename = "allowedIPs")]
    #[schemars(schema_with = "schema::allowed_ips")]
    pub allowed_ips: Vec<String>,

    #[schemars(schema_with = "schema::sources")]
    pub sources: Vec<String>,

    /// Opt-out of pinning, written out on purpose: allows the catch-all prefixes
    /// (0.0.0.0/0, ::/0) in `sources`, which then admit this peer from anywhere in that family.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_any_source: bool,

    /// Where the node sends the first packet before the peer has connected. Must lie inside
    /// `sources`. Without it, the node waits for the peer to connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,

    /// Seconds between keepalive packets the node sends to the peer (WireGuard's
    /// PersistentKeepalive); unset disables them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub persistent_keepalive_seconds: Option<u16>,

    /// Optional preshared key, read from a Secret on the node. Never written inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key_secret_ref: Option<SecretKeySelector>,
}

/// A peer's address and UDP port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[schemars(schema_with = "schema::ip_address")]
    pub address: String,
    /// UDP port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

/// A key in a Secret. `PinnedPeer` is cluster-scoped, so the namespace is explicit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    #[schemars(schema_with = "schema::object_name")]
    pub namespace: String,
    #[schemars(schema_with = "schema::object_name")]
    pub name: String,
    /// Key in the Secret's data holding the base64 preshared key (`wg genpsk`).
    #[serde(default = "default_psk_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_psk_key() -> String {
    DEFAULT_PRESHARED_KEY_KEY.to_string()
}

/// Status of a `PinnedPeer`, written by the operator from its own checks and the agents'
/// reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PinnedPeerStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling`, `Stalled` (kstatus), `Enforced` and `SourceViolation`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// First characters of the public key, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// Port assigned to this peer in `Dedicated` mode; the same on every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    /// Nodes by enforcement state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_counts: Option<NodeCounts>,
    /// Per-node detail, at most 32 entries: nodes that need attention first, then the rest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<PeerNodeStatus>,
    /// Packets for this peer from outside its pin, over all nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub violations: Option<ViolationSummary>,
}

/// How many nodes are in each enforcement state for one peer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    pub selected: u32,
    pub enforced: u32,
    pub pending: u32,
    pub failed: u32,
}

/// One node's view of a peer, as the remote side needs it to connect.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerNodeStatus {
    pub node: String,
    pub state: EnforcementState,
    /// Mode the node uses for this peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ResolvedMode>,
    /// The node's public key for this peer's device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Port the node listens on for this peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    /// The peer's current endpoint as WireGuard sees it (`address:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Last completed handshake; absent when the peer never connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handshake_time: Option<Time>,
    /// Why the peer is not enforced, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
