//! The wgpin operator's decisions, as plain functions of its inputs.
//!
//! [`render`] turns `PinnedInterface`s, `PinnedPeer`s and nodes into one `PinnedNodeState` spec
//! per node, and reports the objects it had to leave out and why. The controller (watches,
//! server-side apply) calls it; so does the agent in standalone mode, which is the operator and
//! the agent in one process without a cluster. [`roll_up`] turns the agents' reports into
//! `PinnedPeer.status`.

pub mod controller;
pub mod events;
pub mod http;
pub mod interface_status;
pub mod leader;
pub mod metrics;
pub mod process;
pub mod render;
#[cfg(test)]
mod render_props;
pub mod rollup;

pub use render::{NodeInfo, PortAssignments, Problem, ProblemReason, Rendered, render};
pub use rollup::{RollUpInput, roll_up};
