//! WireGuard, whatever implements it: the configuration model, the diff that keeps sessions
//! alive, node keys, and the backends (UAPI for userspace implementations; the kernel's generic
//! netlink comes with the kernel-VM tier).

pub mod diff;
pub mod keys;
pub mod model;
pub mod uapi;

pub use diff::{diff_peers, endpoints_outside_pins, inside_pin};
pub use keys::{KeyError, SecretKey};
pub use model::{DeviceConfig, DeviceState, PeerChange, PeerConfig, PeerState};
pub use uapi::{Uapi, UapiError};
