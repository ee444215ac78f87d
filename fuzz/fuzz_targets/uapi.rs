//! The UAPI reply parser (`wireguard::uapi::parse_get`), which reads what a userspace WireGuard
//! (or whatever listens on its socket) answers to `get=1`: any text gives a device or an error
//! that prints, never a panic; and a device read is written back by `encode_set` and read again
//! as the same peers, so the agent's diff never chases a difference of its own making.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgpin_agent::wireguard::{
    DeviceConfig, PeerChange,
    uapi::{encode_set, parse_get},
};

fuzz_target!(|bytes: &[u8]| {
    let reply = String::from_utf8_lossy(bytes);
    let device = match parse_get("wg0", &reply) {
        Ok(device) => device,
        Err(error) => {
            assert!(error.to_string().starts_with("wg0: "), "{error}");
            return;
        }
    };
    for (key, peer) in &device.peers {
        assert_eq!(key, &peer.public_key);
        assert_ne!(peer.persistent_keepalive, Some(0), "0 is no keepalive");
    }
    let changes: Vec<PeerChange> = device
        .peers
        .values()
        .map(|peer| PeerChange::Upsert {
            public_key: peer.public_key,
            update_only: false,
            preshared_key: peer.preshared_key.clone(),
            endpoint: peer.endpoint,
            persistent_keepalive: Some(peer.persistent_keepalive.unwrap_or(0)),
            allowed_ips: Some(peer.allowed_ips.clone()),
        })
        .collect();
    let request = encode_set(
        &DeviceConfig {
            private_key: None,
            listen_port: device.listen_port,
        },
        &changes,
    );
    let again = match parse_get("wg0", &request) {
        Ok(again) => again,
        Err(error) => panic!("what encode_set wrote does not read back: {error}\n{request}"),
    };
    assert_eq!(again.listen_port, device.listen_port);
    assert_eq!(again.peers.len(), device.peers.len());
    for (key, want) in &device.peers {
        let have = &again.peers[key];
        assert_eq!(have.preshared_key, want.preshared_key);
        assert_eq!(have.endpoint, want.endpoint);
        assert_eq!(have.persistent_keepalive, want.persistent_keepalive);
        assert_eq!(have.allowed_ips, want.allowed_ips);
    }
});
