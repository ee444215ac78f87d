//! WireGuard, whatever implements it: the configuration model, the diff that keeps sessions
//! alive, node keys, and the backends: UAPI for userspace implementations, generic netlink for
//! kernel WireGuard (exercised against a real kernel in the kernel-VM tier).

pub mod backend;
pub mod diff;
pub mod keys;
pub mod model;
pub mod netlink;
#[cfg(test)]
mod props;
pub mod uapi;

pub use backend::Backend;
pub use diff::{diff_peers, endpoints_outside_pins, inside_pin};
pub use keys::{KeyError, SecretKey};
pub use model::{DeviceConfig, DeviceState, PeerChange, PeerConfig, PeerState};
pub use uapi::{Uapi, UapiError};
