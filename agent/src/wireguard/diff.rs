//! Desired peers against what WireGuard reports: the smallest set of changes, and the peers
//! whose endpoint has left their pin. Pure.
//!
//! Roaming inside the pin is WireGuard working as intended, so an endpoint inside the peer's
//! pin is never reset (a controller that rewrites roaming endpoints cuts mobile peers off every
//! period). Only an endpoint outside the pin, or none at all, is set to the configured one.

use std::{collections::BTreeMap, net::SocketAddr};

use ipnet::IpNet;
use wgpin_crds::WireGuardKey;

use super::{
    keys::SecretKey,
    model::{DeviceState, PeerChange, PeerConfig},
};

/// Whether `endpoint` lies inside `pin`. An IPv4-mapped endpoint (`::ffff:192.0.2.2`, what a
/// dual-stack socket reports for IPv4 traffic) is its IPv4 address: the fast path saw those
/// packets as IPv4 and checked them against the IPv4 pins, so reading it as IPv6 here would
/// evict a peer that is inside its pin, at every guard tick.
pub fn inside_pin(endpoint: &SocketAddr, pin: &[IpNet]) -> bool {
    let ip = endpoint.ip().to_canonical();
    pin.iter().any(|net| net.contains(&ip))
}

/// The changes that take the device's peers to `desired`: removals first, then additions and
/// updates of only the fields that differ. An empty result means nothing to write.
pub fn diff_peers(
    desired: &[PeerConfig],
    actual: &DeviceState,
    pins: &BTreeMap<WireGuardKey, Vec<IpNet>>,
) -> Vec<PeerChange> {
    let wanted: BTreeMap<WireGuardKey, &PeerConfig> =
        desired.iter().map(|p| (p.public_key, p)).collect();
    let mut changes: Vec<PeerChange> = actual
        .peers
        .keys()
        .filter(|key| !wanted.contains_key(key))
        .map(|key| PeerChange::Remove(*key))
        .collect();
    for (key, peer) in &wanted {
        let Some(current) = actual.peers.get(key) else {
            changes.push(PeerChange::add(peer));
            continue;
        };
        let pin = pins.get(key).map(Vec::as_slice).unwrap_or_default();
        let endpoint = match (peer.endpoint, current.endpoint) {
            (Some(want), Some(have)) if want == have || inside_pin(&have, pin) => None,
            (Some(want), _) => Some(want),
            (None, _) => None,
        };
        let keepalive = peer.persistent_keepalive.unwrap_or(0);
        let persistent_keepalive =
            (keepalive != current.persistent_keepalive.unwrap_or(0)).then_some(keepalive);
        let preshared_key = match (&peer.preshared_key, &current.preshared_key) {
            (want, have) if want == have => None,
            (Some(want), _) => Some(want.clone()),
            // Writing the all-zero key removes a preshared key.
            (None, Some(_)) => Some(SecretKey::from_bytes([0; 32])),
            (None, None) => None,
        };
        let allowed_ips =
            (peer.allowed_ips != current.allowed_ips).then(|| peer.allowed_ips.clone());
        if endpoint.is_some()
            || persistent_keepalive.is_some()
            || preshared_key.is_some()
            || allowed_ips.is_some()
        {
            changes.push(PeerChange::Upsert {
                public_key: *key,
                update_only: true,
                preshared_key,
                endpoint,
                persistent_keepalive,
                allowed_ips,
            });
        }
    }
    changes
}

/// Peers whose current endpoint lies outside their pin: someone else holds their key, or they
/// moved somewhere they are not allowed to be. Peers without a pin entry are not judged.
pub fn endpoints_outside_pins(
    actual: &DeviceState,
    pins: &BTreeMap<WireGuardKey, Vec<IpNet>>,
) -> Vec<(WireGuardKey, SocketAddr)> {
    actual
        .peers
        .values()
        .filter_map(|peer| {
            let endpoint = peer.endpoint?;
            let pin = pins.get(&peer.public_key)?;
            (!inside_pin(&endpoint, pin)).then_some((peer.public_key, endpoint))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::wireguard::model::PeerState;

    fn key(n: u8) -> WireGuardKey {
        WireGuardKey::from_bytes([n; 32])
    }

    #[test]
    fn an_ipv4_mapped_endpoint_is_its_ipv4_address() {
        let pin: Vec<IpNet> = vec!["192.0.2.0/24".parse().expect("net")];
        let mapped: SocketAddr = "[::ffff:192.0.2.2]:40000".parse().expect("addr");
        let outside: SocketAddr = "[::ffff:198.51.100.2]:40000".parse().expect("addr");
        assert!(inside_pin(&mapped, &pin));
        assert!(!inside_pin(&outside, &pin));
        // A real IPv6 endpoint stays IPv6: an IPv4 pin never covers it.
        let v6: SocketAddr = "[fd00::c000:202]:40000".parse().expect("addr");
        assert!(!inside_pin(&v6, &pin));
    }

    fn nets(list: &[&str]) -> BTreeSet<IpNet> {
        list.iter().map(|s| s.parse().expect("net")).collect()
    }

    fn config(n: u8, endpoint: Option<&str>) -> PeerConfig {
        PeerConfig {
            public_key: key(n),
            preshared_key: None,
            endpoint: endpoint.map(|e| e.parse().expect("endpoint")),
            persistent_keepalive: Some(25),
            allowed_ips: nets(&["198.51.100.2/32"]),
        }
    }

    fn state_of(config: &PeerConfig, endpoint: Option<&str>) -> PeerState {
        PeerState {
            public_key: config.public_key,
            preshared_key: config.preshared_key.clone(),
            endpoint: endpoint.map(|e| e.parse().expect("endpoint")),
            persistent_keepalive: config.persistent_keepalive,
            allowed_ips: config.allowed_ips.clone(),
            last_handshake: None,
            rx_bytes: 10,
            tx_bytes: 20,
        }
    }

    fn device(peers: Vec<PeerState>) -> DeviceState {
        DeviceState {
            peers: peers.into_iter().map(|p| (p.public_key, p)).collect(),
            ..Default::default()
        }
    }

    fn pins(n: u8, list: &[&str]) -> BTreeMap<WireGuardKey, Vec<IpNet>> {
        [(
            key(n),
            list.iter().map(|s| s.parse().expect("net")).collect(),
        )]
        .into()
    }

    #[test]
    fn an_unchanged_peer_writes_nothing() {
        let peer = config(1, Some("203.0.113.5:51820"));
        let actual = device(vec![state_of(&peer, Some("203.0.113.5:51820"))]);
        assert!(diff_peers(&[peer], &actual, &pins(1, &["203.0.113.0/24"])).is_empty());
    }

    #[test]
    fn roaming_inside_the_pin_is_left_alone_outside_it_is_reset() {
        let peer = config(1, Some("203.0.113.5:51820"));
        let pin = pins(1, &["203.0.113.0/24"]);
        let roamed = device(vec![state_of(&peer, Some("203.0.113.77:40000"))]);
        assert!(diff_peers(std::slice::from_ref(&peer), &roamed, &pin).is_empty());
        let hijacked = device(vec![state_of(&peer, Some("192.0.2.66:40000"))]);
        assert_eq!(
            diff_peers(std::slice::from_ref(&peer), &hijacked, &pin),
            [PeerChange::Upsert {
                public_key: key(1),
                update_only: true,
                preshared_key: None,
                endpoint: peer.endpoint,
                persistent_keepalive: None,
                allowed_ips: None,
            }]
        );
        assert_eq!(
            endpoints_outside_pins(&hijacked, &pin),
            [(key(1), "192.0.2.66:40000".parse().expect("addr"))]
        );
        assert!(endpoints_outside_pins(&roamed, &pin).is_empty());
    }

    #[test]
    fn only_changed_fields_are_written() {
        let mut peer = config(1, None);
        let actual = device(vec![state_of(&peer, Some("203.0.113.5:1"))]);
        peer.allowed_ips = nets(&["198.51.100.2/32", "fd00:99::2/128"]);
        peer.persistent_keepalive = None;
        assert_eq!(
            diff_peers(std::slice::from_ref(&peer), &actual, &BTreeMap::new()),
            [PeerChange::Upsert {
                public_key: key(1),
                update_only: true,
                preshared_key: None,
                endpoint: None,
                persistent_keepalive: Some(0),
                allowed_ips: Some(peer.allowed_ips.clone()),
            }]
        );
    }

    #[test]
    fn removals_come_first_then_additions() {
        let stay = config(1, None);
        let gone = config(2, None);
        let new = config(3, None);
        let actual = device(vec![state_of(&stay, None), state_of(&gone, None)]);
        let changes = diff_peers(&[stay, new.clone()], &actual, &BTreeMap::new());
        assert_eq!(changes, [PeerChange::Remove(key(2)), PeerChange::add(&new)]);
    }

    #[test]
    fn a_removed_preshared_key_is_zeroed() {
        let mut peer = config(1, None);
        peer.preshared_key = Some(SecretKey::from_bytes([9; 32]));
        let actual = device(vec![state_of(&peer, None)]);
        peer.preshared_key = None;
        let changes = diff_peers(&[peer], &actual, &BTreeMap::new());
        assert!(matches!(
            &changes[..],
            [PeerChange::Upsert { preshared_key: Some(psk), .. }] if psk.as_bytes() == &[0; 32]
        ));
    }
}
