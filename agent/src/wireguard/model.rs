//! WireGuard configuration and state, independent of the backend that carries them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::SystemTime,
};

use ipnet::IpNet;
use wgpin_crds::WireGuardKey;

use super::keys::SecretKey;

/// A peer as the agent wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: WireGuardKey,
    pub preshared_key: Option<SecretKey>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds; `None` (or 0 in WireGuard) disables keepalives.
    pub persistent_keepalive: Option<u16>,
    pub allowed_ips: BTreeSet<IpNet>,
}

/// A peer as WireGuard reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerState {
    pub public_key: WireGuardKey,
    pub preshared_key: Option<SecretKey>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub allowed_ips: BTreeSet<IpNet>,
    /// The last completed handshake; `None` when there has been none.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// A device as WireGuard reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    pub public_key: Option<WireGuardKey>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub peers: BTreeMap<WireGuardKey, PeerState>,
}

/// Device settings to write (only what is `Some`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    pub private_key: Option<SecretKey>,
    pub listen_port: Option<u16>,
}

/// One change to a device's peers. Only what differs is sent, so a peer's session survives
/// every change that does not concern it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerChange {
    /// Adds the peer, or updates the fields given. `allowed_ips` replaces the peer's list when
    /// `Some`; `endpoint`, `persistent_keepalive` and `preshared_key` are written when `Some`.
    Upsert {
        public_key: WireGuardKey,
        /// Only update an existing peer, never create one (WireGuard's `update_only`).
        update_only: bool,
        preshared_key: Option<SecretKey>,
        endpoint: Option<SocketAddr>,
        persistent_keepalive: Option<u16>,
        allowed_ips: Option<BTreeSet<IpNet>>,
    },
    /// Removes the peer and its session.
    Remove(WireGuardKey),
}

impl PeerChange {
    /// The change that creates `peer` from nothing.
    pub fn add(peer: &PeerConfig) -> Self {
        Self::Upsert {
            public_key: peer.public_key,
            update_only: false,
            preshared_key: peer.preshared_key.clone(),
            endpoint: peer.endpoint,
            persistent_keepalive: Some(peer.persistent_keepalive.unwrap_or(0)),
            allowed_ips: Some(peer.allowed_ips.clone()),
        }
    }

    pub fn public_key(&self) -> WireGuardKey {
        match self {
            Self::Upsert { public_key, .. } => *public_key,
            Self::Remove(public_key) => *public_key,
        }
    }
}
