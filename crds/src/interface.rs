//! `PinnedInterface`: a WireGuard endpoint that wgpin stands up on a set of nodes.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema;

/// Longest `interfaceName`: Linux allows 15 bytes, and dedicated mode appends `-<n>` (up to
/// `-9999`) for the per-peer devices.
pub const INTERFACE_NAME_MAX_LEN: usize = 10;
/// Pattern of `interfaceName`: what `ip link` accepts, minus characters that need quoting.
pub const INTERFACE_NAME_PATTERN: &str = "^[a-zA-Z][a-zA-Z0-9_-]*$";
/// Most ports one interface may reserve for dedicated mode (keeps device names within 15 bytes).
pub const MAX_DEDICATED_PORTS: u32 = 10_000;
/// WireGuard needs 1280 to carry IPv6; 9000 is the usual jumbo frame.
pub const MTU_RANGE: (u16, u16) = (1280, 9000);

/// A WireGuard endpoint that wgpin stands up on every node its `nodeSelector` selects.
///
/// The interface's private key is generated on each node and never leaves it; each node's
/// public key is published in that node's `PinnedNodeState` status and in the status of the
/// `PinnedPeer`s it terminates.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wgpin.io",
    version = "v1alpha1",
    kind = "PinnedInterface",
    plural = "pinnedinterfaces",
    shortname = "pif",
    category = "wgpin",
    doc = "A WireGuard endpoint that wgpin runs on the nodes it selects.",
    status = "PinnedInterfaceStatus",
    cel,
    printcolumn(json_path = ".spec.interfaceName", name = "Device", type_ = "string"),
    printcolumn(json_path = ".spec.mode", name = "Mode", type_ = "string"),
    printcolumn(json_path = ".spec.listenPort", name = "Port", type_ = "integer"),
    printcolumn(json_path = ".status.selectedNodes", name = "Nodes", type_ = "integer"),
    printcolumn(json_path = ".status.peers", name = "Peers", type_ = "integer"),
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
#[x_kube(validation = Rule::new(
    "!has(self.listenPortEnd) || (self.listenPortEnd >= self.listenPort && self.listenPortEnd - self.listenPort < 10000)"
).message("listenPortEnd must be at least listenPort and reserve at most 10000 ports").field_path(".listenPortEnd"))]
#[serde(rename_all = "camelCase")]
pub struct PinnedInterfaceSpec {
    /// Nodes that run this interface. `{}` selects every node; `PinnedPeer.spec.nodeSelector`
    /// can narrow it per peer.
    pub node_selector: LabelSelector,

    /// How the pin is enforced; see the project README. `Auto` picks the strongest mode each
    /// node supports: `Identity` on kernel WireGuard with module BTF, otherwise `Dedicated`
    /// when `listenPortEnd` reserves a range, otherwise `Shared`. Each node reports the mode it
    /// uses in its `PinnedNodeState` status.
    #[serde(default)]
    pub mode: PinMode,

    /// Name of the WireGuard device on the node (`ip link`). In `Dedicated` mode each peer gets
    /// its own device, named `<interfaceName>-<n>` where n is its port's offset in the range.
    #[schemars(length(min = 1, max = 10), regex(pattern = INTERFACE_NAME_PATTERN))]
    pub interface_name: String,

    /// UDP port WireGuard listens on: the one port of `Shared` and `Identity` modes, and the
    /// first port of the `Dedicated` range.
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port: u16,

    /// Last port (inclusive) of the range reserved for `Dedicated` mode: one port, and one
    /// device, per peer. Each peer keeps its port for as long as it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port_end: Option<u16>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::interface_addresses")]
    pub addresses: Vec<String>,

    /// MTU of the WireGuard device(s). Left to the backend's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1280, max = 9000))]
    pub mtu: Option<u16>,
}

/// How a node enforces the pins of an interface's peers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum PinMode {
    /// The strongest mode the node supports.
    #[default]
    Auto,
    /// One port and one device per peer; the fast path allows each port only its peer's pin.
    Dedicated,
    /// One port for all peers; the fast path allows the union of the pins, and the agent evicts
    /// a peer whose endpoint moves outside its own pin.
    Shared,
    /// One port; kernel hooks tell the fast path which session belongs to which peer, so every
    /// packet is checked against its own peer's pin. Kernel WireGuard only.
    Identity,
}

/// Status of a `PinnedInterface`, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PinnedInterfaceStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling`, `Stalled` (kstatus) and `NodesSelected`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Number of nodes the selector selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_nodes: Option<u32>,
    /// Number of `PinnedPeer`s that reference this interface and are valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<u32>,
    /// How many nodes run the interface in each mode, as their agents report it (`Auto`
    /// resolved; a node whose agent has not reported yet is not counted).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub modes: BTreeMap<String, u32>,
}
