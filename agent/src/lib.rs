//! The wgpin node agent.
//!
//! Today it holds standalone mode's first half: reading `PinnedInterface` and `PinnedPeer`
//! manifests from a directory ([`manifests`]) and rendering this node's `PinnedNodeState` with
//! the operator's own render function. The fast path and the WireGuard backends come next.

pub mod manifests;
