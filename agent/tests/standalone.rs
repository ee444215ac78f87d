//! `wgpin-agent standalone` as users run it: the binary in a gateway namespace, manifests in a
//! directory, a peer sending through the tunnel. `kill -9` and a restart lose no packet; a peer
//! added by hand with `wg set` is removed again and reported. Needs root.

mod support;

use std::{net::UdpSocket, time::Duration};

use support::{
    GatewayCleanup, Lan, StandaloneAgent, in_netns, peer_device, run, unique_id, wait_for,
    wait_for_device,
};

/// The agent's guard and resync, faster than their defaults, so the test is quick.
const FAST_TICKS: &[&str] = &["--guard-interval-ms", "100", "--resync-interval-ms", "300"];
use wgpin_agent::wireguard::{SecretKey, Uapi};

#[test]
fn kill_9_and_restart_lose_no_packet_and_drift_is_repaired() {
    let lan = Lan::new();
    let id = unique_id();
    let device = format!("wgt{id}");
    let work = tempfile::tempdir().expect("work dir");
    let bpffs = std::path::PathBuf::from(format!("/sys/fs/bpf/wgpin-sa-{id}"));
    let _cleanup = GatewayCleanup {
        device: device.clone(),
        bpffs: bpffs.clone(),
    };
    let (dir, state, log) = (
        work.path().join("manifests"),
        work.path().join("state"),
        work.path().join("agent.log"),
    );
    std::fs::create_dir_all(&dir).expect("manifests dir");
    let laptop = SecretKey::generate().expect("key");
    std::fs::write(
        dir.join("gateway.yaml"),
        format!(
            "apiVersion: wgpin.io/v1alpha1\nkind: PinnedInterface\nmetadata: {{name: gateway}}\n\
             spec: {{nodeSelector: {{}}, mode: Shared, interfaceName: {device}, listenPort: 51820, addresses: [198.51.100.1/24]}}\n\
             ---\n\
             apiVersion: wgpin.io/v1alpha1\nkind: PinnedPeer\nmetadata: {{name: laptop}}\n\
             spec: {{interface: gateway, publicKey: \"{}\", allowedIPs: [198.51.100.2/32], sources: [192.0.2.2/32]}}\n",
            laptop.public_key()
        ),
    )
    .expect("manifests");

    let mut agent = StandaloneAgent::start(&lan, (&dir, &state, &bpffs), &log, FAST_TICKS);
    let uapi = Uapi::default();
    let gateway_key = wait_for_device(&device, 1, Duration::from_secs(20));
    let _laptop_wg = peer_device(
        &lan.client_ns,
        &format!("wgl{id}"),
        &laptop,
        &gateway_key,
        "192.0.2.1:51820",
        "198.51.100.2",
    );

    // A steady stream through the tunnel while the agent is killed and restarted.
    let receiver = in_netns(&lan.gateway_ns, || {
        UdpSocket::bind("198.51.100.1:7000").expect("bind in the tunnel")
    });
    receiver
        .set_read_timeout(Some(Duration::from_millis(1000)))
        .expect("timeout");
    // Read while the stream flows, so the socket buffer never overflows.
    let reader = std::thread::spawn(move || {
        let mut seen = std::collections::BTreeSet::new();
        let mut buffer = [0u8; 64];
        while let Ok((len, _)) = receiver.recv_from(&mut buffer) {
            if len == 4 {
                seen.insert(u32::from_be_bytes([
                    buffer[0], buffer[1], buffer[2], buffer[3],
                ]));
            }
        }
        seen
    });
    let client_ns = lan.client_ns.clone();
    let sender = std::thread::spawn(move || {
        in_netns(&client_ns, || {
            let socket = UdpSocket::bind("198.51.100.2:0").expect("bind");
            for sequence in 0u32..300 {
                socket
                    .send_to(&sequence.to_be_bytes(), "198.51.100.1:7000")
                    .expect("send");
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    });
    std::thread::sleep(Duration::from_millis(800));
    agent.kill_9();
    std::thread::sleep(Duration::from_millis(500));
    let mut agent = StandaloneAgent::start(&lan, (&dir, &state, &bpffs), &log, FAST_TICKS);
    sender.join().expect("sender");
    let seen = reader.join().expect("reader");
    // The first datagram may be spent on the handshake; everything after it must arrive.
    let missing: Vec<u32> = (1..300).filter(|s| !seen.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "lost across kill -9 and restart: {missing:?}\n{}",
        agent.log()
    );

    // Drift: a peer added by hand is removed again, and said so.
    wait_for("the restarted agent", Duration::from_secs(20), || {
        agent.log().matches("fast path on underlay").count() >= 4
    });
    let stranger = SecretKey::generate().expect("key").public_key().to_base64();
    run(
        "wg",
        &[
            "set",
            &device,
            "peer",
            &stranger,
            "allowed-ips",
            "198.51.100.99/32",
        ],
    );
    wait_for(
        "the hand-made peer to be removed",
        Duration::from_secs(5),
        || {
            uapi.get(&device)
                .map(|d| d.peers.len() == 1)
                .unwrap_or(false)
        },
    );
    wait_for("the drift report", Duration::from_secs(5), || {
        agent.log().contains("configuration drift repaired")
    });
    // A peer changed by hand gets its configuration back.
    run(
        "wg",
        &[
            "set",
            &device,
            "peer",
            &laptop.public_key().to_base64(),
            "allowed-ips",
            "198.51.100.77/32",
        ],
    );
    let wanted: std::collections::BTreeSet<ipnet::IpNet> =
        ["198.51.100.2/32".parse().expect("net")].into();
    wait_for(
        "the hand-changed peer to be restored",
        Duration::from_secs(5),
        || {
            uapi.get(&device)
                .map(|d| {
                    d.peers
                        .get(&laptop.public_key())
                        .is_some_and(|p| p.allowed_ips == wanted)
                })
                .unwrap_or(false)
        },
    );

    // An invalid file is named with its object and field; what was valid stays enforced.
    std::fs::write(
        dir.join("typo.yaml"),
        "apiVersion: wgpin.io/v1alpha1\nkind: PinnedPeer\nmetadata: {name: open}\n\
         spec: {interface: gateway, publicKey: \"TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=\", allowedIPs: [198.51.100.7/32], sources: [0.0.0.0/0]}\n",
    )
    .expect("write invalid manifest");
    wait_for("the error about typo.yaml", Duration::from_secs(5), || {
        let log = agent.log();
        log.contains("typo.yaml (document 1) PinnedPeer/open")
            && log.contains("spec.sources: sources contains a catch-all prefix")
    });
    std::thread::sleep(Duration::from_millis(500));
    let peers = uapi.get(&device).expect("device").peers;
    assert_eq!(
        peers.keys().copied().collect::<Vec<_>>(),
        [laptop.public_key()],
        "the laptop stays, the invalid peer never comes"
    );
    agent.kill_9();
}
