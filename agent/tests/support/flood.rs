//! The flood scenario, shared by `agent/tests/flood.rs` (pass/fail properties, a short flood)
//! and `agent/benches/flood.rs` (figures): the real `wgpin-agent standalone` in a gateway
//! namespace with one Shared-mode interface (wireguard-go), a pinned peer "laptop" running
//! wireguard-go in a second namespace, and trafgen in a third sending spoofed WireGuard
//! handshake initiations at the gateway's port from a new random source every packet.
//!
//! ```text
//!  laptop ns                    gateway ns                               flood ns
//!  wireguard-go 198.51.100.2    wgpin-agent, wireguard-go 198.51.100.1   trafgen
//!  192.0.2.2/25 ─────── veth ── 192.0.2.1/25   192.0.2.129/25 ── veth ── 192.0.2.130/25
//!  (roams to 192.0.2.5)                         fd00:f1::1/64             fd00:f1::2/64
//! ```
//!
//! The laptop is pinned to 192.0.2.0/29; the flood comes from 203.0.113.0/24 (one random byte
//! per packet) and fd00:bad::/64 (64 random bits per packet), never from inside the pin. The
//! tunnel is probed with ICMP echo (a raw socket in the laptop's namespace, through its
//! WireGuard device), so that the only UDP in the gateway's namespace is WireGuard's: every
//! datagram its UDP layer counts must then be one the fast path allowed for the laptop.
//!
//! Everything carries the scenario's id (namespaces `wgfl-<id>-g/-l/-f`,
//! `/sys/fs/bpf/wgpin-flood-<id>`, `<tmp>/wgpin-flood-<id>`) and is removed on drop, processes
//! in the namespaces included.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, PerCpuArray};
use nix::{
    errno::Errno,
    sys::{
        signal::{Signal, kill},
        socket::{
            AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, recvfrom,
            sendto, setsockopt, socket, sockopt,
        },
        time::TimeVal,
    },
    unistd::Pid,
};
use wgpin_agent::{
    fastpath::BpfPaths,
    wireguard::{DeviceConfig, PeerChange, SecretKey, Uapi},
};
use wgpin_common::{
    Counters, GlobalCounters,
    craft::{Frame, Ip},
    maps,
};

use crate::support::{
    WireguardGo, add_addresses, add_namespaces, delete_namespaces, in_netns, mac, peer_device, run,
    wait_for, wait_for_device,
};

/// The gateway's WireGuard port (Shared mode: every peer on it).
pub const PORT: u16 = 51820;
/// The laptop's pin, and its address before and after roaming inside it.
pub const LAPTOP_PIN: &str = "192.0.2.0/29";
pub const LAPTOP_V4: &str = "192.0.2.2";
pub const LAPTOP_ROAMED_V4: &str = "192.0.2.5";
/// The laptop's wireguard-go listens here (`support::peer_device`).
pub const LAPTOP_PORT: u16 = 40000;
const GATEWAY_LAPTOP_SIDE: &str = "192.0.2.1";
const GATEWAY_FLOOD_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 129);
const GATEWAY_FLOOD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xf1, 0, 0, 0, 0, 0, 1);
const FLOOD_V4: &str = "192.0.2.130";
/// Spoofed sources: 203.0.113.0/24 and fd00:bad::/64, the low bits random per packet.
const SPOOF_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 0);
const SPOOF_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xbad, 0, 0, 0, 0, 0, 0);
/// Prefixes of every spoofed source: none may appear in a metric label.
pub const SPOOFED_PREFIXES: [&str; 2] = ["203.0.113.", "fd00:bad:"];
/// The gateway's tunnel address, which the laptop pings.
pub const GATEWAY_TUNNEL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The agent's metrics, on the gateway namespace's loopback.
pub const METRICS_ADDR: &str = "127.0.0.1:9477";
/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, 100 a second on Linux (an ABI
/// constant, whatever the kernel's own HZ).
const USER_HZ: f64 = 100.0;

/// How the agent runs.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub guard_interval_ms: u64,
    pub resync_interval_ms: u64,
}

/// trafgen must be there; install it the way the project does (`scripts/lib.sh`'s
/// `ensure_apt`, as `scripts/setup.sh --test` does), or fail saying how to get it.
pub fn ensure_trafgen() {
    let have = || {
        Command::new("sh")
            .args(["-c", "command -v trafgen && command -v timeout"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have() {
        return;
    }
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lib.sh");
    eprintln!(
        "trafgen is missing: installing netsniff-ng through {}",
        lib.display()
    );
    let output = Command::new("bash")
        .arg("-c")
        .arg(r#"source "$1" && ensure_apt netsniff-ng coreutils"#)
        .arg("bash")
        .arg(&lib)
        .output();
    assert!(
        have(),
        "trafgen (Debian package netsniff-ng) is not on PATH, and installing it did not help: \
         run `sudo scripts/setup.sh --test` (or `apt-get install netsniff-ng`). Installer: {}",
        match output {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => e.to_string(),
        }
    );
}

/// The three namespaces, the agent, and the laptop's tunnel.
pub struct Scenario {
    pub id: String,
    pub gateway_ns: String,
    pub laptop_ns: String,
    pub flood_ns: String,
    pub gateway_if_laptop: String,
    pub gateway_if_flood: String,
    pub laptop_if: String,
    pub flood_if: String,
    /// The gateway's WireGuard device (the agent creates it) and the laptop's.
    pub device: String,
    pub laptop_device: String,
    pub laptop_key: SecretKey,
    pub gateway_key: String,
    pub work: PathBuf,
    pub bpffs: PathBuf,
    pub agent_pid: u32,
    agent: Option<Child>,
    laptop_wg: Option<WireguardGo>,
}

impl Scenario {
    /// Builds the namespaces, starts the agent and the laptop, and waits until a ping crosses
    /// the tunnel. `id`: at most 8 letters or digits.
    pub fn start(id: &str, options: Options) -> Self {
        assert!(
            !id.is_empty() && id.len() <= 8 && id.chars().all(|c| c.is_ascii_alphanumeric()),
            "a scenario id is 1 to 8 letters or digits (interface names are short): {id:?}"
        );
        let work = std::env::temp_dir().join(format!("wgpin-flood-{id}"));
        let mut scenario = Self {
            id: id.to_string(),
            gateway_ns: format!("wgfl-{id}-g"),
            laptop_ns: format!("wgfl-{id}-l"),
            flood_ns: format!("wgfl-{id}-f"),
            gateway_if_laptop: format!("wf{id}l"),
            gateway_if_flood: format!("wf{id}f"),
            laptop_if: format!("wf{id}lp"),
            flood_if: format!("wf{id}fp"),
            device: format!("wgf{id}"),
            laptop_device: format!("wlf{id}"),
            laptop_key: SecretKey::generate().expect("a key"),
            gateway_key: String::new(),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/wgpin-flood-{id}")),
            work,
            agent_pid: 0,
            agent: None,
            laptop_wg: None,
        };
        // From here on, a panic still removes what was made (Drop).
        std::fs::create_dir_all(scenario.work.join("manifests")).expect("work directory");
        add_namespaces(&[
            &scenario.gateway_ns,
            &scenario.laptop_ns,
            &scenario.flood_ns,
        ]);
        // The flood's veth has a queue per CPU, so that each trafgen process sends on its own
        // (one queue would serialise them on its lock).
        let cpus = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .to_string();
        for (gateway_if, peer_ns, peer_if, queues, gateway_ips, peer_ips) in [
            (
                &scenario.gateway_if_laptop,
                &scenario.laptop_ns,
                &scenario.laptop_if,
                "1",
                vec![format!("{GATEWAY_LAPTOP_SIDE}/25")],
                vec![format!("{LAPTOP_V4}/25")],
            ),
            (
                &scenario.gateway_if_flood,
                &scenario.flood_ns,
                &scenario.flood_if,
                cpus.as_str(),
                vec![
                    format!("{GATEWAY_FLOOD_V4}/25"),
                    format!("{GATEWAY_FLOOD_V6}/64"),
                ],
                vec![format!("{FLOOD_V4}/25"), "fd00:f1::2/64".to_string()],
            ),
        ] {
            run(
                "ip",
                &[
                    "-n",
                    &scenario.gateway_ns,
                    "link",
                    "add",
                    gateway_if,
                    "numtxqueues",
                    queues,
                    "numrxqueues",
                    queues,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    peer_if,
                    "numtxqueues",
                    queues,
                    "numrxqueues",
                    queues,
                    "netns",
                    peer_ns,
                ],
            );
            add_addresses(&scenario.gateway_ns, gateway_if, &gateway_ips);
            add_addresses(peer_ns, peer_if, &peer_ips);
            run(
                "ip",
                &["-n", &scenario.gateway_ns, "link", "set", gateway_if, "up"],
            );
            run("ip", &["-n", peer_ns, "link", "set", peer_if, "up"]);
        }
        // The bench takes the gateway's flood link down to measure the generator alone: its
        // IPv6 address stays meanwhile.
        in_netns(&scenario.gateway_ns, || {
            std::fs::write("/proc/sys/net/ipv6/conf/all/keep_addr_on_down", "1")
                .expect("keep_addr_on_down");
        });
        // Roaming deletes the laptop's first address: the second must then take its place
        // (and keep the subnet's route) rather than go with it.
        let laptop_if = scenario.laptop_if.clone();
        in_netns(&scenario.laptop_ns, move || {
            for conf in ["all", "default", laptop_if.as_str()] {
                std::fs::write(
                    format!("/proc/sys/net/ipv4/conf/{conf}/promote_secondaries"),
                    "1",
                )
                .expect("promote_secondaries");
            }
        });
        std::fs::write(
            scenario.work.join("manifests/gateway.yaml"),
            format!(
                "apiVersion: wgpin.io/v1alpha1\nkind: PinnedInterface\nmetadata: {{name: gateway}}\n\
                 spec: {{nodeSelector: {{}}, mode: Shared, interfaceName: {}, listenPort: {PORT}, addresses: [198.51.100.1/24]}}\n\
                 ---\n\
                 apiVersion: wgpin.io/v1alpha1\nkind: PinnedPeer\nmetadata: {{name: laptop}}\n\
                 spec: {{interface: gateway, publicKey: \"{}\", allowedIPs: [198.51.100.2/32], sources: [{LAPTOP_PIN}]}}\n",
                scenario.device,
                scenario.laptop_key.public_key()
            ),
        )
        .expect("manifests");
        scenario.start_agent(options);
        scenario.gateway_key = wait_for_device(&scenario.device, 1, Duration::from_secs(30));
        scenario.laptop_wg = Some(peer_device(
            &scenario.laptop_ns,
            &scenario.laptop_device,
            &scenario.laptop_key,
            &scenario.gateway_key,
            &format!("{GATEWAY_LAPTOP_SIDE}:{PORT}"),
            "198.51.100.2",
        ));
        // The first echo starts the handshake; wait until one comes back.
        let deadline = Instant::now() + Duration::from_secs(20);
        while ping(&scenario.laptop_ns, Duration::from_millis(100), 5)
            .answered()
            .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "no ping crossed the laptop's tunnel within 20 s\n{}",
                scenario.log()
            );
        }
        scenario
    }

    fn start_agent(&mut self, options: Options) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        // nsenter keeps the mount namespace (and the bpffs on /sys/fs/bpf) that `ip netns
        // exec` would replace; without a PID namespace it execs, so the child is the agent.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.gateway_ns))
            .arg(env!("CARGO_BIN_EXE_wgpin-agent"))
            .args(["standalone", "--dir"])
            .arg(self.work.join("manifests"))
            .args([
                "--node",
                "gateway",
                "--underlay",
                &self.gateway_if_laptop,
                "--underlay",
                &self.gateway_if_flood,
                "--backend",
                "userspace",
                "--metrics-addr",
                METRICS_ADDR,
            ])
            .arg("--state-dir")
            .arg(self.work.join("state"))
            .arg("--bpffs-root")
            .arg(&self.bpffs)
            .args([
                "--guard-interval-ms",
                &options.guard_interval_ms.to_string(),
                "--resync-interval-ms",
                &options.resync_interval_ms.to_string(),
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the agent starts");
        self.agent_pid = child.id();
        self.agent = Some(child);
    }

    pub fn log_path(&self) -> PathBuf {
        self.work.join("agent.log")
    }

    /// The agent's log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Bytes of log so far: the start of a window to read with [`Scenario::log_since`].
    pub fn log_len(&self) -> usize {
        std::fs::metadata(self.log_path()).map_or(0, |m| m.len() as usize)
    }

    pub fn log_since(&self, offset: usize) -> String {
        let mut text = self.log();
        if offset <= text.len() && text.is_char_boundary(offset) {
            text.split_off(offset)
        } else {
            text
        }
    }

    /// One spoofed datagram from the flood namespace's own address (outside the pin), then
    /// waits until the agent has counted it: the violation metrics exist from here on, so
    /// that a series count before a flood compares like with like.
    pub fn prime(&self) {
        let before = self.metrics();
        send_udp_from(&self.flood_ns, FLOOD_V4, GATEWAY_FLOOD_V4, PORT);
        wait_for(
            "the agent to count a violation",
            Duration::from_secs(10),
            || {
                let now = self.metrics();
                sum_of(&now, "wgpin_violation_events_total")
                    > sum_of(&before, "wgpin_violation_events_total")
            },
        );
    }

    /// `/metrics` of the agent: series (name and labels) → value.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let text = in_netns(&self.gateway_ns, || {
            let mut stream =
                std::net::TcpStream::connect(METRICS_ADDR).expect("connect to /metrics");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n\r\n")
                .expect("request /metrics");
            let mut response = String::new();
            stream.read_to_string(&mut response).expect("read /metrics");
            response
        });
        let body = text
            .split_once("\r\n\r\n")
            .map_or(text.as_str(), |(_, body)| body);
        body.lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                Some((series.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    /// The counter slots the agent gave the port and the laptop (its bookkeeping file).
    fn slots(&self) -> (u32, u32) {
        let path = self.work.join("state/bookkeeping.json");
        let text = std::fs::read_to_string(&path).expect("the agent's bookkeeping");
        let book: serde_json::Value = serde_json::from_str(&text).expect("bookkeeping is JSON");
        let slot = |kind: &str, key: &str| {
            book["slots"][kind][key]
                .as_u64()
                .unwrap_or_else(|| panic!("no {kind} slot for {key} in {text}")) as u32
        };
        (slot("ports", &PORT.to_string()), slot("peers", "laptop"))
    }

    fn per_cpu<T: aya::Pod + Default>(&self, map: &str, slot: u32, add: fn(&mut T, &T)) -> T {
        let data = MapData::from_pin(BpfPaths::new(&self.bpffs).map(map))
            .unwrap_or_else(|e| panic!("open the pinned map {map}: {e}"));
        let array = PerCpuArray::<_, T>::try_from(Map::PerCpuArray(data))
            .unwrap_or_else(|e| panic!("{map} is a per-CPU array: {e}"));
        let values = array
            .get(&slot, 0)
            .unwrap_or_else(|e| panic!("read {map}[{slot}]: {e}"));
        let mut total = T::default();
        for value in values.iter() {
            add(&mut total, value);
        }
        total
    }

    /// Every counter the scenario reads, at one instant.
    pub fn snapshot(&self) -> Snapshot {
        let (port_slot, laptop_slot) = self.slots();
        let gateway_if_flood = self.gateway_if_flood.clone();
        // UDP first, the fast path after: a datagram counted by UDP was allowed before it.
        let (udp, gateway_flood_rx_dropped) = in_netns(&self.gateway_ns, move || {
            (udp_counters(), dev_stats(&gateway_if_flood)[3])
        });
        let port = self.per_cpu::<Counters>(maps::PORT_COUNTERS, port_slot, Counters::add);
        let laptop = self.per_cpu::<Counters>(maps::PEER_COUNTERS, laptop_slot, Counters::add);
        let global = self.per_cpu::<GlobalCounters>(maps::GLOBAL_COUNTERS, 0, GlobalCounters::add);
        let laptop_udp = in_netns(&self.laptop_ns, udp_counters);
        let flood_if = self.flood_if.clone();
        let flood_sent = in_netns(&self.flood_ns, move || {
            let dev = dev_stats(&flood_if);
            dev[9] + dev[11]
        });
        let peer = Uapi::default().get(&self.device).ok().and_then(|d| {
            d.peers
                .get(&self.laptop_key.public_key())
                .map(|p| (p.rx_bytes, p.endpoint))
        });
        let (agent_rss_kib, agent_hwm_kib) = memory_kib(self.agent_pid);
        let (machine_busy_ticks, machine_softirq_ticks, machine_ticks) = machine_ticks();
        Snapshot {
            at: Instant::now(),
            flood_sent,
            gateway_flood_rx_dropped,
            port,
            laptop,
            global,
            udp_delivered: udp.in_datagrams + udp.no_ports + udp.in_errors,
            udp_rcvbuf_errors: udp.rcvbuf_errors,
            laptop_udp_out: laptop_udp.out_datagrams,
            laptop_wg_rx_bytes: peer.map_or(0, |p| p.0),
            laptop_endpoint: peer.and_then(|p| p.1),
            agent_cpu_ticks: cpu_ticks(self.agent_pid),
            wireguard_cpu_ticks: self
                .gateway_wireguard_pids()
                .iter()
                .map(|p| cpu_ticks(*p))
                .sum(),
            agent_rss_kib,
            agent_hwm_kib,
            machine_busy_ticks,
            machine_softirq_ticks,
            machine_ticks,
        }
    }

    /// A snapshot taken when nothing is in flight: repeated until two in a row agree on what
    /// was allowed and delivered (a keepalive may cross between two reads).
    pub fn quiet_snapshot(&self) -> Snapshot {
        let mut last = self.snapshot();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(50));
            let next = self.snapshot();
            if next.udp_delivered == last.udp_delivered
                && next.port.allowed_packets == last.port.allowed_packets
                && next.port.dropped_packets == last.port.dropped_packets
            {
                return next;
            }
            last = next;
        }
        last
    }

    /// The gateway's wireguard-go processes (started by the agent, daemonized).
    pub fn gateway_wireguard_pids(&self) -> Vec<u32> {
        pids_in(&self.gateway_ns)
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                    args.first().is_some_and(|a| a.ends_with(b"wireguard-go"))
                        && args.contains(&self.device.as_bytes())
                })
            })
            .collect()
    }

    /// The laptop moves to another address inside its pin mid-stream, as a roaming client
    /// does: the new address comes, the old one goes, and its socket sends from the new one
    /// (the endpoint written again through UAPI forgets the old source; the session stays).
    pub fn roam(&self) {
        add_addresses(
            &self.laptop_ns,
            &self.laptop_if,
            &[format!("{LAPTOP_ROAMED_V4}/25")],
        );
        run(
            "ip",
            &[
                "-n",
                &self.laptop_ns,
                "addr",
                "del",
                &format!("{LAPTOP_V4}/25"),
                "dev",
                &self.laptop_if,
            ],
        );
        Uapi::default()
            .set(
                &self.laptop_device,
                &DeviceConfig::default(),
                &[PeerChange::Upsert {
                    public_key: self.gateway_key.parse().expect("gateway key"),
                    update_only: true,
                    preshared_key: None,
                    endpoint: Some(
                        format!("{GATEWAY_LAPTOP_SIDE}:{PORT}")
                            .parse()
                            .expect("endpoint"),
                    ),
                    persistent_keepalive: None,
                    allowed_ips: None,
                }],
            )
            .expect("the laptop's endpoint is written again");
    }

    /// Pings the gateway's tunnel address from the laptop, `count` echoes `interval` apart.
    pub fn ping(&self, interval: Duration, count: usize) -> Pings {
        ping(&self.laptop_ns, interval, count)
    }

    /// The same on a thread of its own.
    pub fn ping_in_background(
        &self,
        interval: Duration,
        count: usize,
    ) -> std::thread::JoinHandle<Pings> {
        let ns = self.laptop_ns.clone();
        std::thread::spawn(move || ping(&ns, interval, count))
    }

    /// Takes the gateway's end of the flood link down (`false`) or up again. While it is down,
    /// the flood's veth drops every packet as it is sent: what the generator costs alone.
    pub fn flood_link(&self, up: bool) {
        run(
            "ip",
            &[
                "-n",
                &self.gateway_ns,
                "link",
                "set",
                &self.gateway_if_flood,
                if up { "up" } else { "down" },
            ],
        );
    }

    /// Starts trafgen in the flood namespace: `senders` processes for `secs` seconds.
    pub fn flood(&self, senders: u32, secs: f64) -> Flood {
        let config = self.work.join("flood.cfg");
        let gateway_mac = mac(&self.gateway_ns, &self.gateway_if_flood);
        let flood_mac = mac(&self.flood_ns, &self.flood_if);
        std::fs::write(&config, trafgen_config(&gateway_mac, &flood_mac))
            .expect("write the trafgen config");
        let child = Command::new("timeout")
            .args(["-s", "INT", "-k", "3", &format!("{secs:.1}")])
            .args(["ip", "netns", "exec", &self.flood_ns, "trafgen"])
            .args(["-o", &self.flood_if])
            .arg("-i")
            .arg(&config)
            .args(["-P", &senders.to_string(), "-Q", "-C"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start trafgen (Debian package netsniff-ng)");
        Flood { child: Some(child) }
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        drop(self.laptop_wg.take());
        // Whatever else runs in these namespaces was started here: the gateway's
        // wireguard-go (daemonized by the agent) and any trafgen left over.
        for ns in [&self.gateway_ns, &self.laptop_ns, &self.flood_ns] {
            for pid in pids_in(ns) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        for ns in [&self.gateway_ns, &self.laptop_ns, &self.flood_ns] {
            for pid in pids_in(ns) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        delete_namespaces(&[&self.gateway_ns, &self.laptop_ns, &self.flood_ns]);
        for device in [&self.device, &self.laptop_device] {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{device}.sock"));
        }
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Processes in network namespace `ns` (`ip netns pids`).
fn pids_in(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A running trafgen (under `timeout`, so it ends on its own even if this process dies).
pub struct Flood {
    child: Option<Child>,
}

impl Flood {
    /// Waits for the flood to end; trafgen's output when it failed.
    pub fn wait(mut self) -> Result<(), String> {
        let Some(child) = self.child.take() else {
            return Ok(());
        };
        let output = child.wait_with_output().map_err(|e| e.to_string())?;
        // timeout's own status when it stopped trafgen is 124; trafgen's after SIGINT is 0.
        if output.status.success() || output.status.code() == Some(124) {
            Ok(())
        } else {
            Err(format!(
                "trafgen ended with {}: {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }
}

impl Flood {
    /// Ends the flood now (timeout passes SIGINT on to trafgen) and waits for it.
    pub fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
            let _ = child.wait();
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // timeout passes the signal on to trafgen.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
            let _ = child.wait();
        }
    }
}

/// The flood's two packets, sent in turn: WireGuard handshake initiations (148 bytes of
/// message) to the gateway's port, IPv4 from 203.0.113.x and IPv6 from fd00:bad::/64, the
/// source's low bits and the source port drawn per packet, checksums computed per packet.
fn trafgen_config(gateway_mac: &str, flood_mac: &str) -> String {
    let mac_bytes = |mac: &str| -> Vec<u8> {
        mac.split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("a MAC address"))
            .collect()
    };
    let (dst_mac, src_mac) = (mac_bytes(gateway_mac), mac_bytes(flood_mac));
    let v4 = Frame::udp(
        Ip::V4(SPOOF_V4.octets(), GATEWAY_FLOOD_V4.octets()),
        5000,
        PORT,
    )
    .wireguard(1, 0x5eed, 0)
    .bytes();
    let v6 = Frame::udp(
        Ip::V6(SPOOF_V6.octets(), GATEWAY_FLOOD_V6.octets()),
        5000,
        PORT,
    )
    .wireguard(1, 0x5eed, 0)
    .bytes();
    // (offset, width, element) replacing the frame's bytes there.
    let v4_dynamic: [(usize, usize, &str); 4] = [
        (14 + 10, 2, "csumip(14, 33)"),
        (14 + 15, 1, "drnd(1)"),
        (34, 2, "drnd(2)"),
        (34 + 6, 2, "csumudp(14, 34)"),
    ];
    let v6_dynamic: [(usize, usize, &str); 3] = [
        (14 + 16, 8, "drnd(8)"),
        (54, 2, "drnd(2)"),
        (54 + 6, 2, "csumudp6(14, 54)"),
    ];
    let mut out = String::new();
    for (mut frame, dynamic) in [(v4, &v4_dynamic[..]), (v6, &v6_dynamic[..])] {
        frame[..6].copy_from_slice(&dst_mac);
        frame[6..12].copy_from_slice(&src_mac);
        let mut parts = Vec::new();
        let mut i = 0;
        while i < frame.len() {
            if let Some((_, width, element)) = dynamic.iter().find(|(at, ..)| *at == i) {
                parts.push((*element).to_string());
                i += width;
            } else {
                parts.push(format!("{:#04x}", frame[i]));
                i += 1;
            }
        }
        let _ = writeln!(out, "{{ {} }}", parts.join(", "));
    }
    out
}

/// Counters read at one instant.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub at: Instant,
    /// The flood's veth: packets handed to it, and refused by it.
    pub flood_sent: u64,
    /// The gateway's flood-side veth: packets dropped before any hook (full backlog).
    pub gateway_flood_rx_dropped: u64,
    /// The fast path's counters for the shared port and for the laptop.
    pub port: Counters,
    pub laptop: Counters,
    pub global: GlobalCounters,
    /// Datagrams that reached UDP in the gateway's namespace (IPv4 and IPv6: queued to a
    /// socket, no socket, or refused), and those refused by a full socket buffer.
    pub udp_delivered: u64,
    pub udp_rcvbuf_errors: u64,
    /// Datagrams sent from the laptop's namespace (only its wireguard-go sends UDP).
    pub laptop_udp_out: u64,
    /// WireGuard's own count of bytes received from the laptop, and its endpoint.
    pub laptop_wg_rx_bytes: u64,
    pub laptop_endpoint: Option<SocketAddr>,
    pub agent_cpu_ticks: u64,
    pub wireguard_cpu_ticks: u64,
    pub agent_rss_kib: u64,
    pub agent_hwm_kib: u64,
    /// The whole machine's CPU time (`/proc/stat`, every CPU): busy, of it in softirq, and all.
    pub machine_busy_ticks: u64,
    pub machine_softirq_ticks: u64,
    pub machine_ticks: u64,
}

impl Snapshot {
    /// Seconds of CPU per second of wall clock between `self` and a later snapshot, in % of
    /// one CPU.
    pub fn cpu_percent(ticks: u64, earlier_ticks: u64, seconds: f64) -> f64 {
        ticks.saturating_sub(earlier_ticks) as f64 / USER_HZ / seconds * 100.0
    }
}

#[derive(Default)]
struct Udp {
    in_datagrams: u64,
    no_ports: u64,
    in_errors: u64,
    rcvbuf_errors: u64,
    out_datagrams: u64,
}

/// The UDP MIB of the calling thread's namespace, IPv4 and IPv6 added up.
fn udp_counters() -> Udp {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("read snmp");
    let snmp6 = std::fs::read_to_string("/proc/thread-self/net/snmp6").expect("read snmp6");
    let mut udp = Udp::default();
    let mut add = |name: &str, value: u64| match name {
        "InDatagrams" => udp.in_datagrams += value,
        "NoPorts" => udp.no_ports += value,
        "InErrors" => udp.in_errors += value,
        "RcvbufErrors" => udp.rcvbuf_errors += value,
        "OutDatagrams" => udp.out_datagrams += value,
        _ => {}
    };
    let mut lines = snmp.lines();
    while let (Some(header), Some(values)) = (lines.next(), lines.next()) {
        if header.starts_with("Udp:") && values.starts_with("Udp:") {
            for (name, value) in header.split_whitespace().zip(values.split_whitespace()) {
                add(name, value.parse().unwrap_or(0));
            }
        }
    }
    for line in snmp6.lines() {
        let mut words = line.split_whitespace();
        if let (Some(name), Some(value)) = (words.next(), words.next())
            && let Some(name) = name.strip_prefix("Udp6")
        {
            add(name, value.parse().unwrap_or(0));
        }
    }
    udp
}

/// `/proc/net/dev` fields of `dev` in the calling thread's namespace.
fn dev_stats(dev: &str) -> Vec<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").expect("read net/dev");
    text.lines()
        .find_map(|line| {
            let (name, rest) = line.split_once(':')?;
            (name.trim() == dev).then(|| {
                rest.split_whitespace()
                    .map(|v| v.parse().unwrap_or(0))
                    .collect()
            })
        })
        .unwrap_or_else(|| panic!("{dev} missing from /proc/net/dev"))
}

/// utime + stime of a process, in USER_HZ ticks (0 once it is gone).
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // "pid (comm) state ppid ...": utime and stime are fields 14 and 15, the 12th and 13th
    // after the command name (which may hold spaces and parentheses).
    let Some(close) = stat.rfind(')') else {
        return 0;
    };
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// The machine's CPU time in USER_HZ ticks, all CPUs: (busy, softirq, total). Busy is all
/// but idle and iowait.
fn machine_ticks() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    // in user time.
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    let total: u64 = (0..8).map(field).sum();
    (total - field(3) - field(4), field(6), total)
}

/// VmRSS and VmHWM of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The sum of every series of metric `name`.
pub fn sum_of(metrics: &BTreeMap<String, f64>, name: &str) -> f64 {
    metrics
        .iter()
        .filter(|(series, _)| {
            series
                .strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
        })
        .map(|(_, value)| value)
        .sum()
}

fn send_udp_from(ns: &str, source: &str, dest: Ipv4Addr, port: u16) {
    let source: IpAddr = source.parse().expect("source address");
    in_netns(ns, move || {
        let socket = UdpSocket::bind(SocketAddr::new(source, 0)).expect("bind");
        socket
            .send_to(
                b"not a WireGuard message",
                SocketAddr::new(IpAddr::V4(dest), port),
            )
            .expect("send");
    });
}

/// Echoes sent through the tunnel: when each left, and its round trip if it came back.
#[derive(Clone, Debug, Default)]
pub struct Pings {
    pub sent: Vec<Instant>,
    pub rtt: Vec<Option<Duration>>,
}

impl Pings {
    /// Round trips of the echoes that came back.
    pub fn answered(&self) -> Vec<Duration> {
        self.rtt.iter().flatten().copied().collect()
    }

    /// The echoes sent in `[from, to)`: (sent, answered).
    pub fn between(&self, from: Instant, to: Instant) -> (usize, usize) {
        let mut sent = 0;
        let mut answered = 0;
        for (at, rtt) in self.sent.iter().zip(&self.rtt) {
            if *at >= from && *at < to {
                sent += 1;
                answered += usize::from(rtt.is_some());
            }
        }
        (sent, answered)
    }

    pub fn loss(&self) -> f64 {
        if self.sent.is_empty() {
            return 0.0;
        }
        1.0 - self.answered().len() as f64 / self.sent.len() as f64
    }

    /// The `q` quantile of the round trips (0 ≤ q ≤ 1), in ms.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let mut rtts = self.answered();
        if rtts.is_empty() {
            return f64::NAN;
        }
        rtts.sort();
        let i = ((rtts.len() - 1) as f64 * q).round() as usize;
        rtts[i].as_secs_f64() * 1e3
    }

    pub fn merge(&mut self, other: Self) {
        self.sent.extend(other.sent);
        self.rtt.extend(other.rtt);
    }
}

/// ICMP echo from namespace `ns` to the gateway's tunnel address: `count` requests, one every
/// `interval`, then up to a second for the last answers. A raw socket (the test runs as root);
/// an answer later than the end counts as lost.
pub fn ping(ns: &str, interval: Duration, count: usize) -> Pings {
    let fd: OwnedFd = in_netns(ns, || {
        socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Icmp,
        )
        .expect("a raw ICMP socket (root)")
    });
    let ident = (std::process::id() as u16) ^ (fd.as_raw_fd() as u16).rotate_left(8);
    let dest = SockaddrIn::from(SocketAddrV4::new(GATEWAY_TUNNEL, 0));
    let mut pings = Pings {
        sent: Vec::with_capacity(count),
        rtt: Vec::with_capacity(count),
    };
    let start = Instant::now();
    let mut buffer = [0u8; 1500];
    loop {
        let now = Instant::now();
        let next_send = start + interval * pings.sent.len() as u32;
        if pings.sent.len() < count && now >= next_send {
            let seq = pings.sent.len() as u16;
            let request = echo_request(ident, seq);
            pings.sent.push(Instant::now());
            pings.rtt.push(None);
            // A send can fail while the tunnel is down (no route, no handshake): lost.
            let _ = sendto(fd.as_raw_fd(), &request, &dest, MsgFlags::empty());
            continue;
        }
        let until = if pings.sent.len() < count {
            next_send
        } else {
            let last = pings.sent.last().copied().unwrap_or(start);
            let end = last + Duration::from_secs(1);
            if now >= end || pings.rtt.iter().all(Option::is_some) {
                break;
            }
            end
        };
        let wait = until
            .saturating_duration_since(now)
            .max(Duration::from_micros(100));
        let timeout = TimeVal::new(wait.as_secs() as _, wait.subsec_micros() as _);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).expect("socket timeout");
        match recvfrom::<SockaddrIn>(fd.as_raw_fd(), &mut buffer) {
            Ok((len, _)) => {
                let arrived = Instant::now();
                if let Some(seq) = echo_reply(&buffer[..len], ident) {
                    let seq = usize::from(seq);
                    if let Some(sent) = pings.sent.get(seq)
                        && pings.rtt[seq].is_none()
                    {
                        pings.rtt[seq] = Some(arrived - *sent);
                    }
                }
            }
            Err(Errno::EAGAIN | Errno::EINTR) => {}
            Err(e) => panic!("receive ICMP: {e}"),
        }
    }
    pings
}

fn echo_request(ident: u16, seq: u16) -> Vec<u8> {
    let mut packet = vec![8u8, 0, 0, 0];
    packet.extend_from_slice(&ident.to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend(std::iter::repeat_n(0x5a, 56));
    let checksum = internet_checksum(&packet);
    packet[2..4].copy_from_slice(&checksum.to_be_bytes());
    packet
}

/// The sequence number of an echo reply to `ident` (a raw socket hands over the IP header).
fn echo_reply(packet: &[u8], ident: u16) -> Option<u16> {
    let header = usize::from(packet.first()? & 0x0f) * 4;
    let icmp = packet.get(header..)?;
    let ours = *icmp.first()? == 0 && icmp.get(4..6)? == ident.to_be_bytes();
    ours.then(|| u16::from_be_bytes([icmp[6], icmp[7]]))
}

fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Violation log lines (one per event, and the per-second summaries) in `log`: their count,
/// and the most in one wall-clock second (by the lines' own timestamps).
pub fn violation_lines(log: &str) -> (usize, usize, usize) {
    let mut per_second: BTreeMap<&str, usize> = BTreeMap::new();
    let mut lines = 0;
    let mut summaries = 0;
    for line in log.lines().filter(|l| l.contains("source violation")) {
        lines += 1;
        summaries += usize::from(line.contains("not logged one by one"));
        // "2026-11-26T16:55:02.123456Z  WARN ...": the second is the first 19 bytes.
        if let Some(second) = line.get(..19) {
            *per_second.entry(second).or_default() += 1;
        }
    }
    let most = per_second.values().copied().max().unwrap_or(0);
    (lines, summaries, most)
}
