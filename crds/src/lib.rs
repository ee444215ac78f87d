//! The wgpin API: `PinnedInterface`, `PinnedPeer` and `PinnedNodeState` (group `wgpin.io`,
//! version `v1alpha1`, all cluster-scoped), their CRD generation and their validation.
//!
//! ```text
//!  PinnedInterface ──selects──▶ Node            (spec.nodeSelector)
//!        ▲
//!        │ spec.interface
//!  PinnedPeer ─────narrows────▶ Node            (optional spec.nodeSelector)
//!        │
//!        ▼ rendered by the operator (or the standalone agent)
//!  PinnedNodeState/<node>   spec: what the node must enforce, status: what the agent enforces
//! ```
//!
//! Validation happens in two places that agree, and both live here:
//! - the CRD schema (types, patterns, bounds, CEL `x-kubernetes-validations`), enforced by the
//!   API server and, without one, by [`admission`] (the standalone agent and the tests);
//! - the Rust functions in [`validate`], used by the operator and the agent.
//!
//! This crate also re-exports the kube and k8s-openapi items the other crates use, so a version
//! bump happens in one place.

// kube's `printcolumn(..., type_ = ...)` repeats keys by design, which this lint mistakes for
// copy-paste.
#![allow(clippy::duplicated_attributes)]

pub mod access;
pub mod admission;
pub mod conditions;
pub mod crd;
pub mod interface;
pub mod key;
pub mod node_state;
pub mod peer;
mod schema;
pub mod validate;
#[cfg(test)]
mod validate_props;

pub use interface::{PinMode, PinnedInterface, PinnedInterfaceSpec, PinnedInterfaceStatus};
pub use key::WireGuardKey;
pub use node_state::{
    EnforcementState, InterfaceStatus, PeerEnforcementStatus, PinnedNodeState, PinnedNodeStateSpec,
    PinnedNodeStateStatus, RenderedInterface, RenderedPeer, ResolvedMode, ViolationSummary,
    WireGuardBackend,
};
pub use peer::{Endpoint, PinnedPeer, PinnedPeerSpec, PinnedPeerStatus, SecretKeySelector};

/// Re-exported so that every crate uses the same kube and k8s-openapi.
pub use k8s_openapi;
pub use kube;

/// API group of every wgpin resource.
pub const API_GROUP: &str = "wgpin.io";
/// API version of every wgpin resource.
pub const API_VERSION: &str = "v1alpha1";
