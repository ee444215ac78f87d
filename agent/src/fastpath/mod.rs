//! The fast path: eBPF source allowlists in front of WireGuard's ports.
//!
//! - [`state`]: what the maps should hold and the safe order of writes (pure, unit-tested);
//! - [`loader`]: loading, pinning, adopting, attaching, verifying and reading the programs
//!   (tested for real in network namespaces, `agent/tests/fastpath.rs`);
//! - `netlink`: the XDP owner of an interface.

pub mod btf;
pub mod identity;
pub mod loader;
mod netlink;
#[cfg(test)]
mod props;
pub mod state;

pub use loader::{
    Attachment, BpfPaths, FastPath, FastPathError, Hook, HookChoice, Verification, Violation,
};
pub use state::{
    EnforcedInterface, FastPathState, Op, PinKey, SlotTable, Unenforceable, apply_op,
    desired_state, plan,
};
