//! The wgpin node agent.
//!
//! - [`manifests`]: standalone mode's input, `PinnedInterface` and `PinnedPeer` manifests read
//!   from a directory and checked as the API server would;
//! - [`fastpath`]: the eBPF allowlists in front of WireGuard's ports;
//! - [`wireguard`]: WireGuard configuration, node keys and backends;
//! - [`dataplane`]: both of them together, in the fail-closed order;
//! - [`enforcer`]: the enforcement loop's body, shared by both modes;
//! - [`cluster`]: the agent in a cluster, enforcing its node's `PinnedNodeState`;
//! - [`standalone`]: the agent without Kubernetes, reading manifests from a directory;
//! - [`secrets`]: preshared keys, from files (standalone) or from the node's own Secrets
//!   (in a cluster);
//! - [`metrics`]: Prometheus metrics and health endpoints.

pub mod cluster;
pub mod dataplane;
pub mod enforcer;
pub mod fastpath;
pub mod manifests;
pub mod metrics;
pub mod secrets;
pub mod standalone;
pub mod wireguard;
