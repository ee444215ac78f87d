//! The UAPI backend against Debian's wireguard-go: what we write is what `wg` and our reader
//! see, a changed peer keeps its session, and two peers configured this way talk.

mod support;

use std::{collections::BTreeMap, time::Duration};

use support::{Pair, WireguardGo, run, send_udp, unique_id};
use wgpin_agent::wireguard::{DeviceConfig, PeerChange, PeerConfig, SecretKey, Uapi, diff_peers};

fn peer(key: &SecretKey, endpoint: Option<&str>, allowed: &[&str]) -> PeerConfig {
    PeerConfig {
        public_key: key.public_key(),
        preshared_key: None,
        endpoint: endpoint.map(|e| e.parse().expect("endpoint")),
        persistent_keepalive: None,
        allowed_ips: allowed.iter().map(|a| a.parse().expect("prefix")).collect(),
    }
}

#[test]
fn configures_wireguard_go_and_reads_it_back() {
    let pair = Pair::new();
    let interface = format!("wgu{}", unique_id());
    let _wg = WireguardGo::start(&pair.server_ns, &interface);
    let uapi = Uapi::default();

    let node_key = SecretKey::generate().expect("key");
    let (alice, bob) = (
        SecretKey::generate().expect("key"),
        SecretKey::generate().expect("key"),
    );
    let mut desired = vec![
        peer(&alice, Some("192.0.2.2:51820"), &["198.51.100.2/32"]),
        peer(&bob, None, &["198.51.100.3/32", "fd00:99::3/128"]),
    ];
    desired[1].persistent_keepalive = Some(25);
    desired[1].preshared_key = Some(SecretKey::generate().expect("psk"));

    let before = uapi.get(&interface).expect("get");
    let changes = diff_peers(&desired, &before, &BTreeMap::new());
    assert_eq!(changes.len(), 2, "two additions");
    uapi.set(
        &interface,
        &DeviceConfig {
            private_key: Some(node_key.clone()),
            listen_port: Some(51820),
        },
        &changes,
    )
    .expect("set");

    let after = uapi.get(&interface).expect("get");
    assert_eq!(after.public_key, Some(node_key.public_key()));
    assert_eq!(after.listen_port, Some(51820));
    for want in &desired {
        let have = &after.peers[&want.public_key];
        assert_eq!(have.allowed_ips, want.allowed_ips);
        assert_eq!(have.endpoint, want.endpoint);
        assert_eq!(have.persistent_keepalive, want.persistent_keepalive);
        assert_eq!(have.preshared_key, want.preshared_key);
    }
    assert!(
        diff_peers(&desired, &after, &BTreeMap::new()).is_empty(),
        "read back equals desired"
    );

    // The `wg` tool sees the same device.
    let dump = run("wg", &["show", &interface, "dump"]);
    assert!(
        dump.contains(&alice.public_key().to_base64()) && dump.contains("192.0.2.2:51820"),
        "{dump}"
    );

    // Removing one peer leaves the other untouched.
    let changes = diff_peers(&desired[1..], &after, &BTreeMap::new());
    assert_eq!(changes, [PeerChange::Remove(alice.public_key())]);
    uapi.set(&interface, &DeviceConfig::default(), &changes)
        .expect("remove");
    let last = uapi.get(&interface).expect("get");
    assert_eq!(last.peers.len(), 1);
    assert_eq!(
        last.peers[&bob.public_key()].allowed_ips,
        desired[1].allowed_ips
    );

    // A device nobody serves is named in the error, with the hint.
    let error = uapi
        .get(&format!("{interface}x"))
        .expect_err("no such device");
    assert!(
        error
            .to_string()
            .contains("is the userspace WireGuard for it running?"),
        "{error}"
    );
}

/// Two wireguard-go devices configured through UAPI complete a handshake and carry traffic.
#[test]
fn two_peers_configured_over_uapi_talk() {
    let pair = Pair::new();
    let id = unique_id();
    let (server_if, client_if) = (format!("wgs{id}"), format!("wgc{id}"));
    let _server = WireguardGo::start(&pair.server_ns, &server_if);
    let _client = WireguardGo::start(&pair.client_ns, &client_if);
    let uapi = Uapi::default();
    let (server_key, client_key) = (
        SecretKey::generate().expect("key"),
        SecretKey::generate().expect("key"),
    );

    uapi.set(
        &server_if,
        &DeviceConfig {
            private_key: Some(server_key.clone()),
            listen_port: Some(51820),
        },
        &[PeerChange::add(&peer(
            &client_key,
            None,
            &["198.51.100.2/32"],
        ))],
    )
    .expect("server");
    uapi.set(
        &client_if,
        &DeviceConfig {
            private_key: Some(client_key.clone()),
            listen_port: Some(51821),
        },
        &[PeerChange::add(&peer(
            &server_key,
            Some("192.0.2.1:51820"),
            &["198.51.100.1/32"],
        ))],
    )
    .expect("client");
    for (ns, dev, addr) in [
        (&pair.server_ns, &server_if, "198.51.100.1/24"),
        (&pair.client_ns, &client_if, "198.51.100.2/24"),
    ] {
        run("ip", &["-n", ns, "addr", "add", addr, "dev", dev]);
        run("ip", &["-n", ns, "link", "set", dev, "up"]);
    }
    let receiver = support::Receiver::bind(&pair.server_ns, 7000);
    send_udp(&pair.client_ns, "198.51.100.2", "198.51.100.1", 7000, 3, 64);
    std::thread::sleep(Duration::from_millis(300));
    let received = receiver.drain();
    assert!(!received.is_empty(), "no datagram came through the tunnel");
    let state = uapi.get(&server_if).expect("get");
    let client = &state.peers[&client_key.public_key()];
    assert!(client.last_handshake.is_some(), "handshake recorded");
    assert_eq!(
        client.endpoint,
        Some("192.0.2.2:51821".parse().expect("addr")),
        "roamed to the client's real address"
    );
    assert!(client.rx_bytes > 0);
}
