//! The node's data plane: the fast path and WireGuard, changed in the fail-closed order.
//!
//! - [`plan`]: from rendered state to devices, peers and pins (pure);
//! - [`reconcile`]: applies a plan and guards it (fast path verified, endpoints inside pins);
//! - `links`: device MTU, addresses and routes over rtnetlink;
//! - `ports`: who holds a UDP port WireGuard cannot listen on.

mod links;
pub mod plan;
mod ports;
pub mod reconcile;

pub use plan::{DeviceSpec, NodeCapabilities, NodePlan, PeerSpec, plan_node, resolve_mode};
pub use reconcile::{
    DataPlane, DataPlaneConfig, DataPlaneError, Effect, Eviction, GuardReport, Writes,
};
