//! The pin against a stolen key, for real: wireguard-go on a gateway, the legitimate peer and
//! an attacker holding the same private key in their own namespaces, the real eBPF programs,
//! the agent's data plane in between. Needs root.

mod support;

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use support::{Lan, in_netns, peer_device, send_udp, tunnel_datagrams, unique_id};
use wgpin_agent::{
    dataplane::{DataPlane, DataPlaneConfig, Effect, NodeCapabilities, Writes},
    fastpath::{BpfPaths, HookChoice, Op},
    wireguard::{Backend, SecretKey, Uapi},
};
use wgpin_crds::{EnforcementState, PinMode, PinnedNodeStateSpec, RenderedInterface, RenderedPeer};

/// Where a test keeps its bpffs pins and agent state; removed at the end.
struct Scratch {
    bpffs: PathBuf,
    state: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Self {
            bpffs: PathBuf::from(format!("/sys/fs/bpf/wgpin-dp-{}", unique_id())),
            state: tempfile::tempdir().expect("state dir"),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

fn rendered_peer(
    name: &str,
    key: &SecretKey,
    tunnel_ip: &str,
    source: &str,
    dedicated_port: Option<u16>,
) -> RenderedPeer {
    RenderedPeer {
        name: name.into(),
        generation: Some(1),
        public_key: key.public_key().to_base64(),
        allowed_ips: vec![format!("{tunnel_ip}/32")],
        sources: vec![source.into()],
        endpoint: None,
        persistent_keepalive_seconds: None,
        preshared_key_secret_ref: None,
        dedicated_port,
    }
}

fn gateway_spec(device: &str, mode: PinMode, peers: Vec<RenderedPeer>) -> PinnedNodeStateSpec {
    PinnedNodeStateSpec {
        node_name: "gateway".into(),
        interfaces: vec![RenderedInterface {
            name: "gateway".into(),
            mode,
            interface_name: device.into(),
            listen_port: 51820,
            listen_port_end: (mode == PinMode::Dedicated).then_some(51829),
            addresses: vec!["198.51.100.1/24".into()],
            mtu: Some(1420),
            peers,
        }],
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Work for the gateway thread.
type Command = Box<dyn FnOnce(&mut DataPlane, &tokio::runtime::Runtime) + Send>;

/// The gateway's data plane, on a thread of its own inside the gateway namespace. Commands
/// run there, one at a time.
struct Gateway {
    commands: std::sync::mpsc::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    fn start(lan: &Lan, scratch: &Scratch) -> Self {
        let config = DataPlaneConfig {
            state_dir: scratch.state.path().to_path_buf(),
            bpffs: BpfPaths::new(&scratch.bpffs),
            underlay: vec![
                lan.gateway_if_client.clone(),
                lan.gateway_if_attacker.clone(),
            ],
            hook: HookChoice::Auto,
            backend: std::sync::Arc::new(Backend::userspace(Uapi::default(), "wireguard-go")),
            secrets_dir: None,
        };
        let (commands, inbox) = std::sync::mpsc::channel::<Command>();
        let ns = lan.gateway_ns.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            in_netns(&ns, move || {
                let rt = runtime();
                let mut dataplane = rt
                    .block_on(async { DataPlane::new(config) })
                    .expect("data plane starts");
                ready_tx.send(()).expect("ready");
                while let Ok(command) = inbox.recv() {
                    command(&mut dataplane, &rt);
                }
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("data plane ready");
        Self {
            commands,
            thread: Some(thread),
        }
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DataPlane, &tokio::runtime::Runtime) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.commands
            .send(Box::new(move |dp, rt| {
                let _ = tx.send(f(dp, rt));
            }))
            .expect("gateway thread alive");
        rx.recv_timeout(Duration::from_secs(60))
            .expect("command finished")
    }

    fn reconcile(&self, spec: PinnedNodeStateSpec) -> Writes {
        self.run(move |dp, rt| {
            rt.block_on(dp.reconcile(&spec, &NodeCapabilities::default()))
                .expect("reconcile")
        })
    }

    fn public_key(&self) -> String {
        self.run(|dp, _| {
            dp.status(std::time::SystemTime::now())
                .into_iter()
                .find_map(|i| i.public_key)
                .expect("the gateway interface has a key")
        })
    }

    /// The gateway's view of a peer: (endpoint, handshake seen).
    fn peer(&self, name: &'static str) -> (Option<String>, bool, EnforcementState) {
        self.run(move |dp, _| {
            let status = dp.status(std::time::SystemTime::now());
            let peer = status
                .iter()
                .flat_map(|i| i.peers.iter())
                .find(|p| p.name == name)
                .expect("peer in status")
                .clone();
            (
                peer.endpoint,
                peer.last_handshake_time.is_some(),
                peer.state,
            )
        })
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Remove every device (and with it its wireguard-go) before the namespace goes.
        let (tx, _rx) = std::sync::mpsc::channel::<()>();
        let _ = self.commands.send(Box::new(move |dp, rt| {
            let _ = rt.block_on(dp.reconcile(
                &PinnedNodeStateSpec::default(),
                &NodeCapabilities::default(),
            ));
            let _ = tx.send(());
        }));
        let (closed, _) = std::sync::mpsc::channel();
        self.commands = closed;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A gateway running the data plane on a LAN of its own. The gateway is declared first, so it
/// is dropped (and its devices removed) before its namespaces and pins go.
struct Testbed {
    gateway: Gateway,
    lan: Lan,
    scratch: Scratch,
    id: String,
}

impl Testbed {
    fn new() -> Self {
        let lan = Lan::new();
        let scratch = Scratch::new();
        let gateway = Gateway::start(&lan, &scratch);
        Self {
            gateway,
            lan,
            scratch,
            id: unique_id(),
        }
    }
}

/// The laptop: tunnel address 198.51.100.2, pinned to the client's 192.0.2.2.
fn laptop_peer(key: &SecretKey, dedicated_port: Option<u16>) -> RenderedPeer {
    rendered_peer(
        "laptop",
        key,
        "198.51.100.2",
        "192.0.2.2/32",
        dedicated_port,
    )
}

#[test]
fn dedicated_mode_refuses_a_stolen_key_from_anywhere_else() {
    stolen_key_from_an_unpinned_address_is_refused(PinMode::Dedicated);
}

#[test]
fn shared_mode_refuses_a_stolen_key_from_an_unpinned_address() {
    stolen_key_from_an_unpinned_address_is_refused(PinMode::Shared);
}

fn stolen_key_from_an_unpinned_address_is_refused(mode: PinMode) {
    let Testbed {
        gateway, lan, id, ..
    } = &Testbed::new();
    let laptop = SecretKey::generate().expect("key");
    let dedicated_port = (mode == PinMode::Dedicated).then_some(51820);
    let spec = gateway_spec(
        &format!("wgd{id}"),
        mode,
        vec![laptop_peer(&laptop, dedicated_port)],
    );

    let first = gateway.reconcile(spec.clone());
    assert!(first.fast_path > 0 && first.wireguard > 0, "{first:?}");
    assert_eq!(
        gateway.reconcile(spec.clone()),
        Writes::default(),
        "a reconcile without change writes nothing"
    );
    let gateway_key = gateway.public_key();

    // The rightful peer connects.
    let _client = peer_device(
        &lan.client_ns,
        &format!("wgc{id}"),
        &laptop,
        &gateway_key,
        "192.0.2.1:51820",
        "198.51.100.2",
    );
    assert!(
        tunnel_datagrams(lan, &lan.client_ns, "198.51.100.2") > 0,
        "the pinned peer gets through"
    );
    let (endpoint, handshake, state) = gateway.peer("laptop");
    assert_eq!(endpoint.as_deref(), Some("192.0.2.2:40000"));
    assert!(handshake);
    assert_eq!(state, EnforcementState::Enforced);

    // The attacker with the same key, from its own address: nothing, and the endpoint stays.
    let _attacker = peer_device(
        &lan.attacker_ns,
        &format!("wga{id}"),
        &laptop,
        &gateway_key,
        "192.0.2.129:51820",
        "198.51.100.2",
    );
    assert_eq!(
        tunnel_datagrams(lan, &lan.attacker_ns, "198.51.100.2"),
        0,
        "the stolen key gets nothing through"
    );
    let (endpoint, _, _) = gateway.peer("laptop");
    assert_eq!(
        endpoint.as_deref(),
        Some("192.0.2.2:40000"),
        "the endpoint never moved"
    );
    let attacker_view = Uapi::default()
        .get(&format!("wga{id}"))
        .expect("attacker device");
    assert!(
        attacker_view
            .peers
            .values()
            .all(|p| p.last_handshake.is_none()),
        "the attacker never completed a handshake"
    );
    let violations = gateway.run(|dp, _| dp.fast_path_mut().drain_violations());
    assert!(
        violations
            .iter()
            .any(|v| v.source.to_string() == "192.0.2.130" && v.port == 51820),
        "the attacker is reported: {violations:?}"
    );
    assert!(
        gateway.reconcile(spec).wireguard == 0,
        "the attack changed nothing to repair"
    );
}

/// Identity mode asked for on userspace WireGuard (no kernel functions to hook) runs Shared,
/// and says so; Shared mode then evicts a stolen key used from another peer's pinned address.
#[test]
fn identity_on_userspace_wireguard_falls_back_to_shared_which_evicts_a_stolen_key() {
    let Testbed {
        gateway, lan, id, ..
    } = &Testbed::new();
    let (laptop, phone) = (
        SecretKey::generate().expect("key"),
        SecretKey::generate().expect("key"),
    );
    // The attacker's address is pinned for the phone, so the fast path lets it through.
    let spec = gateway_spec(
        &format!("wgs{id}"),
        PinMode::Identity,
        vec![
            laptop_peer(&laptop, None),
            rendered_peer("phone", &phone, "198.51.100.3", "192.0.2.130/32", None),
        ],
    );
    let capabilities = gateway.run(|dp, rt| rt.block_on(dp.probe_capabilities()));
    let why = capabilities
        .identity
        .clone()
        .expect_err("no identity mode on wireguard-go");
    assert!(why.contains("userspace WireGuard"), "{why}");
    gateway.run(move |dp, rt| {
        rt.block_on(dp.reconcile(&spec, &capabilities))
            .expect("reconcile")
    });
    let status = gateway.run(|dp, _| dp.status(std::time::SystemTime::now()));
    assert_eq!(status[0].mode, Some(wgpin_crds::ResolvedMode::Shared));
    let fallback = status[0]
        .mode_fallback
        .clone()
        .expect("the fallback is reported");
    assert!(
        fallback.contains("Identity cannot run on this node (userspace WireGuard")
            && fallback.contains("running Shared"),
        "{fallback}"
    );
    let gateway_key = gateway.public_key();
    let _client = peer_device(
        &lan.client_ns,
        &format!("wgc{id}"),
        &laptop,
        &gateway_key,
        "192.0.2.1:51820",
        "198.51.100.2",
    );
    assert!(tunnel_datagrams(lan, &lan.client_ns, "198.51.100.2") > 0);

    let _attacker = peer_device(
        &lan.attacker_ns,
        &format!("wga{id}"),
        &laptop,
        &gateway_key,
        "192.0.2.129:51820",
        "198.51.100.2",
    );
    let started = Instant::now();
    send_udp(
        &lan.attacker_ns,
        "198.51.100.2",
        "198.51.100.1",
        7000,
        1,
        64,
    );
    let mut evicted = Vec::new();
    while evicted.is_empty() && started.elapsed() < Duration::from_secs(5) {
        evicted = gateway.run(|dp, _| dp.guard().evictions);
        std::thread::sleep(Duration::from_millis(20));
    }
    let detection = started.elapsed();
    assert_eq!(evicted.len(), 1, "the hijack is detected and evicted");
    assert_eq!(evicted[0].peer, "laptop");
    assert_eq!(evicted[0].endpoint.ip().to_string(), "192.0.2.130");
    println!("shared-mode detection and eviction took {detection:?}");
    let (endpoint, _, state) = gateway.peer("laptop");
    assert_ne!(
        endpoint
            .as_deref()
            .map(|e| e.parse::<SocketAddr>().expect("addr").ip().to_string()),
        Some("192.0.2.130".into())
    );
    assert_eq!(
        state,
        EnforcementState::Enforced,
        "the peer is back, waiting for its rightful owner"
    );
}

#[test]
fn a_detached_fast_path_withdraws_every_peer_until_it_is_back() {
    let Testbed {
        gateway,
        scratch,
        id,
        ..
    } = &Testbed::new();
    let laptop = SecretKey::generate().expect("key");
    let spec = gateway_spec(
        &format!("wgw{id}"),
        PinMode::Shared,
        vec![laptop_peer(&laptop, None)],
    );
    gateway.reconcile(spec.clone());
    assert_eq!(gateway.peer("laptop").2, EnforcementState::Enforced);

    // Someone removes the pin of one of the fast path's links.
    let link = std::fs::read_dir(scratch.bpffs.join("links"))
        .expect("links")
        .flatten()
        .next()
        .expect("a link")
        .path();
    std::fs::remove_file(&link).expect("unpin");
    let started = Instant::now();
    let report = gateway.run(|dp, _| dp.guard());
    assert!(report.withdrawn.is_some(), "{report:?}");
    assert_eq!(gateway.peer("laptop").2, EnforcementState::Withdrawn);
    println!(
        "withdrawn {:?} after the fast path was lost",
        started.elapsed()
    );

    // Re-attached by the guard: verified again, then the next reconcile restores the peer.
    let report = gateway.run(|dp, _| dp.guard());
    assert!(report.recovered, "{report:?}");
    gateway.reconcile(spec);
    assert_eq!(gateway.peer("laptop").2, EnforcementState::Enforced);
}

/// The fail-closed order, as the reconciles record it: a pin is in the fast path before its
/// peer is written to WireGuard, and a peer leaves WireGuard before its pin leaves.
#[test]
fn peers_go_live_after_their_pins_and_leave_before_them() {
    let Testbed { gateway, id, .. } = &Testbed::new();
    let laptop = SecretKey::generate().expect("key");
    let with = gateway_spec(
        &format!("wgo{id}"),
        PinMode::Shared,
        vec![laptop_peer(&laptop, None)],
    );
    let without = gateway_spec(&format!("wgo{id}"), PinMode::Shared, vec![]);
    let laptop_key = laptop.public_key();
    let is_laptop_pin = |op: &Op| matches!(op, Op::PutPin(k, _) | Op::DeletePin(k) if k.prefix.to_string() == "192.0.2.2/32");
    let position = |journal: &[Effect], what: &dyn Fn(&Effect) -> bool| {
        journal
            .iter()
            .position(what)
            .unwrap_or_else(|| panic!("not in the journal: {journal:#?}"))
    };

    gateway.reconcile(with);
    let adding = gateway.run(|dp, _| dp.journal().to_vec());
    let pin_in = position(
        &adding,
        &|e| matches!(e, Effect::FastPath(op @ Op::PutPin(..)) if is_laptop_pin(op)),
    );
    let peer_in = position(
        &adding,
        &|e| matches!(e, Effect::PeersWritten { peers, .. } if peers.contains(&laptop_key)),
    );
    assert!(pin_in < peer_in, "the pin first: {adding:#?}");

    gateway.reconcile(without);
    let removing = gateway.run(|dp, _| dp.journal().to_vec());
    let peer_out = position(
        &removing,
        &|e| matches!(e, Effect::PeerRemoved { peer, .. } if *peer == laptop_key),
    );
    let pin_out = position(
        &removing,
        &|e| matches!(e, Effect::FastPath(op @ Op::DeletePin(..)) if is_laptop_pin(op)),
    );
    assert!(peer_out < pin_out, "the peer first: {removing:#?}");
}

#[test]
fn routes_follow_the_peers_allowed_ips_and_an_unchanged_state_writes_no_link() {
    let Testbed {
        gateway, lan, id, ..
    } = &Testbed::new();
    let device = format!("wgr{id}");
    let (laptop, phone) = (
        SecretKey::generate().expect("key"),
        SecretKey::generate().expect("key"),
    );
    let both = gateway_spec(
        &device,
        PinMode::Shared,
        vec![
            laptop_peer(&laptop, None),
            rendered_peer("phone", &phone, "198.51.100.3", "192.0.2.3/32", None),
        ],
    );
    let routes = || {
        support::run(
            "ip",
            &["-n", &lan.gateway_ns, "route", "show", "dev", &device],
        )
    };
    gateway.reconcile(both);
    let before = routes();
    assert!(
        before.contains("198.51.100.2 ") && before.contains("198.51.100.3 "),
        "{before}"
    );

    // The phone goes: its route goes with it; the laptop's stays.
    let one = gateway_spec(&device, PinMode::Shared, vec![laptop_peer(&laptop, None)]);
    let writes = gateway.reconcile(one.clone());
    assert!(writes.links >= 1, "{writes:?}");
    let after = routes();
    assert!(
        after.contains("198.51.100.2 ") && !after.contains("198.51.100.3 "),
        "{after}"
    );
    assert_eq!(
        gateway.reconcile(one),
        Writes::default(),
        "nothing changed: no link, address or route write either"
    );
}
