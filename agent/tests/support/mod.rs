//! Test hosts in network namespaces: two namespaces joined by a veth pair, addresses only from
//! 192.0.2.0/24 and fd00::/8, everything removed on drop. Needs root (the test command runs as
//! root) and mounts bpffs when it is missing.

#![allow(dead_code)]

pub mod cluster;
pub mod vm;

use std::{
    fs::File,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

/// Runs a command, panicking with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Fails the test early, with the fix, when it cannot do what it must.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces and load eBPF programs: run them as root (sudo ./scripts/test.sh)"
    );
    if !wgpin_agent::fastpath::loader::is_bpffs(std::path::Path::new("/sys/fs/bpf")) {
        std::fs::create_dir_all("/sys/fs/bpf").expect("create /sys/fs/bpf");
        run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]);
    }
}

/// A short id unique to this process and call, for names that must not collide between tests
/// running in parallel (interface names have at most 15 bytes).
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:04x}{n:x}", std::process::id() & 0xffff)
}

/// Runs `f` on a thread that has entered network namespace `name`; sockets and netlink calls
/// made there belong to that namespace.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A server namespace and a client namespace joined by a veth pair.
///
/// server: `<server_if>` 192.0.2.1/24, fd00:2::1/64
/// client: `<client_if>` 192.0.2.2-6/24, fd00:2::2-6/64 (pick a source by binding to it)
pub struct Pair {
    pub server_ns: String,
    pub client_ns: String,
    pub server_if: String,
    pub client_if: String,
}

pub const SERVER_V4: &str = "192.0.2.1";
pub const SERVER_V6: &str = "fd00:2::1";

impl Pair {
    pub fn new() -> Self {
        require_root();
        let id = unique_id();
        let pair = Self {
            server_ns: format!("wgpt-{id}-s"),
            client_ns: format!("wgpt-{id}-c"),
            server_if: format!("wp{id}s"),
            client_if: format!("wp{id}c"),
        };
        add_namespaces(&[&pair.server_ns, &pair.client_ns]);
        let addresses = |hosts: std::ops::RangeInclusive<u8>| -> Vec<String> {
            hosts
                .flat_map(|h| [format!("192.0.2.{h}/24"), format!("fd00:2::{h}/64")])
                .collect()
        };
        veth(
            (&pair.server_ns, &pair.server_if, &addresses(1..=1)),
            (&pair.client_ns, &pair.client_if, &addresses(2..=6)),
        );
        // Static neighbours, so that a burst is not queued behind address resolution.
        let server_mac = mac(&pair.server_ns, &pair.server_if);
        for ip in [SERVER_V4, SERVER_V6] {
            run(
                "ip",
                &[
                    "-n",
                    &pair.client_ns,
                    "neigh",
                    "replace",
                    ip,
                    "lladdr",
                    &server_mac,
                    "dev",
                    &pair.client_if,
                    "nud",
                    "permanent",
                ],
            );
        }
        pair
    }

    /// Sets the MTU on both ends.
    pub fn mtu(&self, mtu: u16) {
        let mtu = mtu.to_string();
        run(
            "ip",
            &[
                "-n",
                &self.server_ns,
                "link",
                "set",
                &self.server_if,
                "mtu",
                &mtu,
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &self.client_ns,
                "link",
                "set",
                &self.client_if,
                "mtu",
                &mtu,
            ],
        );
    }
}

impl Default for Pair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        delete_namespaces(&[&self.server_ns, &self.client_ns]);
    }
}

/// Creates network namespaces, loopback up.
pub fn add_namespaces(names: &[&str]) {
    for ns in names {
        run("ip", &["netns", "add", ns]);
        run("ip", &["-n", ns, "link", "set", "lo", "up"]);
    }
}

/// Deletes network namespaces; a namespace's veth ends go with it, and their peers too.
pub fn delete_namespaces(names: &[&str]) {
    for ns in names {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
}

/// A veth pair between two namespaces, both ends up with their addresses.
fn veth(a: (&str, &str, &[String]), b: (&str, &str, &[String])) {
    run(
        "ip",
        &[
            "-n", a.0, "link", "add", a.1, "type", "veth", "peer", "name", b.1, "netns", b.0,
        ],
    );
    for (ns, dev, addresses) in [a, b] {
        add_addresses(ns, dev, addresses);
        run("ip", &["-n", ns, "link", "set", dev, "up"]);
    }
}

/// Adds addresses to a device (IPv6 without duplicate address detection, so they are usable
/// at once).
pub fn add_addresses(ns: &str, dev: &str, addresses: &[String]) {
    for address in addresses {
        let mut args = vec!["-n", ns, "addr", "add", address.as_str(), "dev", dev];
        if address.contains(':') {
            args.push("nodad");
        }
        run("ip", &args);
    }
}

/// The MAC address of `dev` in `ns`.
pub fn mac(ns: &str, dev: &str) -> String {
    let out = run("ip", &["-n", ns, "-o", "link", "show", "dev", dev]);
    out.split_whitespace()
        .skip_while(|word| *word != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC address for {dev} in {ns}: {out}"))
        .to_string()
}

/// A UDP receiver in the server namespace, counting datagrams per source address.
pub struct Receiver {
    socket: UdpSocket,
}

impl Receiver {
    /// Binds to every address of the namespace on `port` (IPv6 socket, dual-stack).
    pub fn bind(ns: &str, port: u16) -> Self {
        let socket = in_netns(ns, move || {
            UdpSocket::bind(SocketAddr::from(([0u16; 8], port)))
                .unwrap_or_else(|e| panic!("bind [::]:{port}: {e}"))
        });
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("set timeout");
        Self { socket }
    }

    /// Every datagram received until the socket stays quiet for 300 ms: (source, length).
    pub fn drain(&self) -> Vec<(IpAddr, usize)> {
        let mut buffer = vec![0u8; 65536];
        let mut out = Vec::new();
        while let Ok((len, from)) = self.socket.recv_from(&mut buffer) {
            let ip = match from.ip() {
                IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map(IpAddr::V4)
                    .unwrap_or(IpAddr::V6(v6)),
                v4 => v4,
            };
            out.push((ip, len));
            if out.len() > 100_000 {
                break;
            }
        }
        out
    }
}

/// Sends `count` datagrams of `len` bytes from `source` (an address of the client namespace)
/// to `dest`:`port`.
pub fn send_udp(ns: &str, source: &str, dest: &str, port: u16, count: usize, len: usize) {
    let source: IpAddr = source.parse().expect("source address");
    let dest: IpAddr = dest.parse().expect("destination address");
    in_netns(ns, move || {
        let socket = UdpSocket::bind(SocketAddr::new(source, 0))
            .unwrap_or_else(|e| panic!("bind {source}: {e}"));
        let payload = vec![0x5au8; len];
        for _ in 0..count {
            socket
                .send_to(&payload, SocketAddr::new(dest, port))
                .unwrap_or_else(|e| panic!("send to {dest}:{port}: {e}"));
        }
    });
}

/// A wireguard-go process serving `interface` inside `ns`, killed on drop.
pub struct WireguardGo {
    pub interface: String,
    child: std::process::Child,
}

impl WireguardGo {
    pub fn start(ns: &str, interface: &str) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "wireguard-go", "-f", interface])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("wireguard-go starts (apt-get install wireguard-go)");
        let socket = format!("/var/run/wireguard/{interface}.sock");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "wireguard-go did not open {socket}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            interface: interface.to_string(),
            child,
        }
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.interface));
    }
}

/// A gateway namespace with two underlay links: one to a client namespace (192.0.2.0/25) and
/// one to an attacker namespace (192.0.2.128/25).
///
/// gateway: `<gateway_if_client>` 192.0.2.1/25, `<gateway_if_attacker>` 192.0.2.129/25
/// client: 192.0.2.2/25; attacker: 192.0.2.130/25
pub struct Lan {
    pub gateway_ns: String,
    pub client_ns: String,
    pub attacker_ns: String,
    pub gateway_if_client: String,
    pub gateway_if_attacker: String,
}

impl Lan {
    pub fn new() -> Self {
        require_root();
        let id = unique_id();
        let lan = Self {
            gateway_ns: format!("wgpl-{id}-g"),
            client_ns: format!("wgpl-{id}-c"),
            attacker_ns: format!("wgpl-{id}-a"),
            gateway_if_client: format!("wl{id}c"),
            gateway_if_attacker: format!("wl{id}a"),
        };
        add_namespaces(&[&lan.gateway_ns, &lan.client_ns, &lan.attacker_ns]);
        for (gateway_if, peer_ns, gateway_ip, peer_ip) in [
            (
                &lan.gateway_if_client,
                &lan.client_ns,
                "192.0.2.1/25",
                "192.0.2.2/25",
            ),
            (
                &lan.gateway_if_attacker,
                &lan.attacker_ns,
                "192.0.2.129/25",
                "192.0.2.130/25",
            ),
        ] {
            veth(
                (&lan.gateway_ns, gateway_if, &[gateway_ip.to_string()]),
                (peer_ns, &format!("{gateway_if}p"), &[peer_ip.to_string()]),
            );
        }
        lan
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        delete_namespaces(&[&self.gateway_ns, &self.client_ns, &self.attacker_ns]);
    }
}

/// A peer-side wireguard-go device using `key`, pointed at the gateway.
pub fn peer_device(
    ns: &str,
    device: &str,
    key: &wgpin_agent::wireguard::SecretKey,
    gateway_key: &str,
    gateway: &str,
    tunnel_ip: &str,
) -> WireguardGo {
    use wgpin_agent::wireguard::{DeviceConfig, PeerChange, PeerConfig, Uapi};
    let wg = WireguardGo::start(ns, device);
    let gateway_public = gateway_key.parse().expect("gateway key");
    Uapi::default()
        .set(
            device,
            &DeviceConfig {
                private_key: Some(key.clone()),
                listen_port: Some(40000),
            },
            &[PeerChange::add(&PeerConfig {
                public_key: gateway_public,
                preshared_key: None,
                endpoint: Some(gateway.parse().expect("endpoint")),
                persistent_keepalive: None,
                allowed_ips: ["198.51.100.1/32".parse().expect("net")].into(),
            })],
        )
        .expect("peer configured");
    run(
        "ip",
        &[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{tunnel_ip}/24"),
            "dev",
            device,
        ],
    );
    run("ip", &["-n", ns, "link", "set", device, "up"]);
    wg
}

/// Datagrams that came out of the gateway's tunnel (198.51.100.1:7000) after `from_ns` sent
/// three through its own tunnel address `source`.
pub fn tunnel_datagrams(lan: &Lan, from_ns: &str, source: &str) -> usize {
    let receiver = Receiver::bind(&lan.gateway_ns, 7000);
    send_udp(from_ns, source, "198.51.100.1", 7000, 3, 64);
    std::thread::sleep(Duration::from_millis(500));
    receiver.drain().len()
}

/// Polls `done` every 50 ms until it holds; fails the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the gateway's WireGuard `device` has exactly `peers` peers and returns its
/// public key (the key a peer configures to reach it).
pub fn wait_for_device(device: &str, peers: usize, timeout: Duration) -> String {
    let uapi = wgpin_agent::wireguard::Uapi::default();
    wait_for(
        &format!("the gateway device {device} with {peers} peer(s)"),
        timeout,
        || uapi.get(device).is_ok_and(|d| d.peers.len() == peers),
    );
    uapi.get(device)
        .expect("device")
        .public_key
        .expect("key")
        .to_base64()
}

/// Kills an agent's wireguard-go processes (they outlive their namespace) and removes its
/// pins, on drop. `device` is a prefix: dedicated devices are `<device>-<n>`.
pub struct GatewayCleanup {
    pub device: String,
    pub bpffs: std::path::PathBuf,
}

impl Drop for GatewayCleanup {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-f", &format!("^wireguard-go {}", self.device)])
            .status();
        let _ = std::fs::remove_dir_all(&self.bpffs);
    }
}

/// `wgpin-agent standalone` in `lan`'s gateway namespace with its two underlay interfaces, its
/// stderr appended to `log`; `extra` arguments after the common ones. Killed (`kill -9`) on drop.
pub struct StandaloneAgent {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl StandaloneAgent {
    pub fn start(
        lan: &Lan,
        dirs: (&std::path::Path, &std::path::Path, &std::path::Path),
        log: &std::path::Path,
        extra: &[&str],
    ) -> Self {
        let (manifests, state, bpffs) = dirs;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        // nsenter keeps the mount namespace (and the bpffs on /sys/fs/bpf) that
        // `ip netns exec` would replace.
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lan.gateway_ns))
            .arg(env!("CARGO_BIN_EXE_wgpin-agent"))
            .args(["standalone", "--dir"])
            .arg(manifests)
            .args(["--node", "gateway"])
            .args(["--underlay", &lan.gateway_if_client])
            .args(["--underlay", &lan.gateway_if_attacker])
            .arg("--state-dir")
            .arg(state)
            .arg("--bpffs-root")
            .arg(bpffs)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("agent starts");
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for StandaloneAgent {
    fn drop(&mut self) {
        self.kill_9();
    }
}
