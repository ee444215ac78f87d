//! Programs N peers into a new WireGuard device through the agent's own backends, reads them
//! back, and prints the timings as one line; the device is deleted and created again for every
//! repetition. The kernel-VM benchmark (`agent/benches/vm_backends.rs`) runs this same code in
//! the guest for kernel WireGuard (generic netlink) and wireguard-go (UAPI).
//!
//! ```sh
//! sudo target/release/examples/program_peers --backend uapi --device wgpp0 --peers 1000 --reps 5 --reads 5
//! # PROGRAM-PEERS backend=uapi peers=1000 reps=5 reads=5 set_messages=1 set_bytes=... \
//! #   create_ms=a,b,.. program_ms=.. read_ms=.. remove_ms=.. delete_ms=.. delete_with_peers_ms=..
//! ```
//!
//! `--backend kernel` needs the `wireguard` module, `--backend uapi` wireguard-go on the PATH
//! (or `--program PATH`). One device, one listen port; each peer has a public key, one allowed
//! /32 and an endpoint (Shared mode). Per repetition: create the device (`Backend::create`),
//! read it once (the agent reads before it writes), program the device key, the port and the N
//! peers in one `Backend::set` (timed: `program_ms`), set the link up, then `--reads` full reads
//! (`Backend::get`, timed: `read_ms`), then remove the N peers in one `Backend::set` (timed:
//! `remove_ms`; what withdrawing every peer costs), then delete the link (timed: `delete_ms`;
//! wireguard-go exits with it). After the repetitions, one more device is created and
//! programmed, read once, and deleted with its N peers (timed: `delete_with_peers_ms`).
//! Every read must hold exactly the N peers written, with the same allowed IPs and endpoints
//! (`diff_peers` finds nothing to do); otherwise the program fails with the reason on stderr.
//! Keys and peers are made before the first repetition and not timed.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_core::Emitable as _;
use rtnetlink::{Handle, LinkUnspec};
use wgpin_agent::wireguard::{
    Backend, DeviceConfig, DeviceState, PeerChange, PeerConfig, SecretKey, Uapi, diff_peers,
    netlink, uapi,
};

/// The first word of the output line.
pub const TAG: &str = "PROGRAM-PEERS";
/// The device's listen port.
const PORT: u16 = 51820;
/// How long wireguard-go may take to go away after its link is deleted.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// `kernel` or `uapi`.
    pub backend: String,
    pub device: String,
    pub peers: usize,
    pub reps: usize,
    pub reads: usize,
    /// The userspace implementation `--backend uapi` starts.
    pub program: String,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut options = Self {
            backend: String::new(),
            device: "wgpp0".into(),
            peers: 1000,
            reps: 5,
            reads: 5,
            program: "wireguard-go".into(),
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .ok_or_else(|| format!("{flag} needs a value"))?
                .clone();
            let number = || {
                value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{flag} {value}: not a positive number"))
            };
            match flag.as_str() {
                "--backend" => options.backend = value.clone(),
                "--device" => options.device = value.clone(),
                "--peers" => options.peers = number()?.min(1 << 20),
                "--reps" => options.reps = number()?,
                "--reads" => options.reads = number()?,
                "--program" => options.program = value.clone(),
                _ => return Err(format!("unknown argument {flag}")),
            }
        }
        if !matches!(options.backend.as_str(), "kernel" | "uapi") {
            return Err("--backend kernel|uapi is required".into());
        }
        Ok(options)
    }
}

/// Peer `n`: allowed IP 10.64.0.0/10 + n, endpoint 198.18.0.0/15 + n, port 51820.
fn peer(n: usize, key: &SecretKey) -> PeerConfig {
    let (a, b, c) = ((n >> 16) as u8, (n >> 8) as u8, n as u8);
    PeerConfig {
        public_key: key.public_key(),
        preshared_key: None,
        endpoint: Some(SocketAddr::from((
            Ipv4Addr::new(198, 18 + (a & 1), b, c),
            PORT,
        ))),
        persistent_keepalive: None,
        allowed_ips: [IpNet::from(IpAddr::V4(Ipv4Addr::new(
            10,
            64 + (a & 63),
            b,
            c,
        )))]
        .into(),
    }
}

fn ms(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64() * 1e3)
}

fn list(samples: &[Duration]) -> String {
    samples.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(",")
}

async fn link_index(rtnl: &Handle, device: &str) -> Result<Option<u32>, String> {
    let mut links = rtnl.link().get().match_name(device.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        // ENODEV
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
        Err(e) => Err(format!("looking up {device}: {e}")),
    }
}

/// The processes of a userspace WireGuard serving `device` (`PROGRAM DEVICE`, the command line
/// wireguard-go keeps after it daemonizes), zombies left out.
pub fn userspace_pids(program: &str, device: &str) -> Vec<i32> {
    let name = program.rsplit('/').next().unwrap_or(program).to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .collect();
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let zombie = stat.rsplit(')').next()?.trim_start().starts_with('Z');
            let ours = args.len() == 2
                && args[0].rsplit(|b| *b == b'/').next() == Some(name.as_bytes())
                && args[1] == device.as_bytes();
            (ours && !zombie).then_some(pid)
        })
        .collect()
}

/// One repetition's timings.
struct Rep {
    create: Duration,
    program: Duration,
    reads: Vec<Duration>,
    remove: Duration,
    delete: Duration,
}

/// A new device with the peers programmed: its link index, how long the creation and the
/// programming took.
fn create_and_program(
    rt: &tokio::runtime::Runtime,
    rtnl: &Handle,
    backend: &Backend,
    device: &str,
    config: &DeviceConfig,
    desired: &[PeerConfig],
) -> Result<(u32, Duration, Duration), String> {
    if rt.block_on(link_index(rtnl, device))?.is_some() {
        return Err(format!("{device} exists already: pick another --device"));
    }
    let started = Instant::now();
    rt.block_on(backend.create(rtnl, device))?;
    let create = started.elapsed();
    let empty = backend.get(device)?;
    if !empty.peers.is_empty() {
        return Err(format!(
            "{device}: a new device has {} peers",
            empty.peers.len()
        ));
    }

    let changes: Vec<PeerChange> = desired.iter().map(PeerChange::add).collect();
    let started = Instant::now();
    backend.set(device, config, &changes)?;
    let program = started.elapsed();

    let index = rt
        .block_on(link_index(rtnl, device))?
        .ok_or_else(|| format!("{device} vanished"))?;
    Ok((index, create, program))
}

/// Deletes the link; for a userspace WireGuard, until its process and socket are gone too.
fn delete(
    rt: &tokio::runtime::Runtime,
    rtnl: &Handle,
    backend: &Backend,
    options: &Options,
    index: u32,
) -> Result<Duration, String> {
    let device = options.device.as_str();
    let started = Instant::now();
    rt.block_on(rtnl.link().del(index).execute())
        .map_err(|e| format!("deleting {device}: {e}"))?;
    if let Backend::Userspace { uapi, .. } = backend {
        while uapi.exists(device) || !userspace_pids(&options.program, device).is_empty() {
            if started.elapsed() > EXIT_TIMEOUT {
                return Err(format!(
                    "{} {device} still runs {EXIT_TIMEOUT:?} after its link was deleted",
                    options.program
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(started.elapsed())
}

/// Checks that a read holds exactly what was written.
fn check(
    device: &str,
    state: &DeviceState,
    config: &DeviceConfig,
    desired: &[PeerConfig],
) -> Result<(), String> {
    if state.peers.len() != desired.len() {
        return Err(format!(
            "{device} holds {} peers, {} were written",
            state.peers.len(),
            desired.len()
        ));
    }
    let left = diff_peers(desired, state, &BTreeMap::new());
    if let Some(first) = left.first() {
        return Err(format!(
            "{device} does not hold what was written: {} changes left, first {first:?}",
            left.len()
        ));
    }
    let key = config.private_key.as_ref().map(SecretKey::public_key);
    if state.listen_port != config.listen_port || state.public_key != key {
        return Err(format!(
            "{device}: listen port {:?} and key {:?} read back",
            state.listen_port, state.public_key
        ));
    }
    Ok(())
}

fn rep(
    rt: &tokio::runtime::Runtime,
    rtnl: &Handle,
    backend: &Backend,
    options: &Options,
    config: &DeviceConfig,
    desired: &[PeerConfig],
) -> Result<Rep, String> {
    let device = options.device.as_str();
    let (index, create, program) = create_and_program(rt, rtnl, backend, device, config, desired)?;
    rt.block_on(
        rtnl.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute(),
    )
    .map_err(|e| format!("setting {device} up: {e}"))?;
    // wireguard-go starts its peers when it sees the link go up; let that settle (untimed).
    if options.backend == "uapi" {
        std::thread::sleep(Duration::from_millis(500));
    }
    backend.get(device)?;

    let mut reads = Vec::new();
    for _ in 0..options.reads {
        let started = Instant::now();
        let state = backend.get(device)?;
        reads.push(started.elapsed());
        check(device, &state, config, desired)?;
    }

    let removes: Vec<PeerChange> = desired
        .iter()
        .map(|p| PeerChange::Remove(p.public_key))
        .collect();
    let started = Instant::now();
    backend.set(device, &DeviceConfig::default(), &removes)?;
    let remove = started.elapsed();
    let left = backend.get(device)?.peers.len();
    if left != 0 {
        return Err(format!(
            "{device} holds {left} peers after removing them all"
        ));
    }
    let delete = delete(rt, rtnl, backend, options, index)?;
    Ok(Rep {
        create,
        program,
        reads,
        remove,
        delete,
    })
}

/// Runs the measurement; returns the output line.
pub fn run(options: &Options) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    // The rtnetlink socket registers with the runtime it is made in.
    let _entered = rt.enter();
    let (connection, rtnl, _) =
        rtnetlink::new_connection().map_err(|e| format!("rtnetlink: {e}"))?;
    rt.spawn(connection);
    let backend = match options.backend.as_str() {
        "kernel" => Backend::kernel(),
        _ => Backend::userspace(Uapi::default(), options.program.clone()),
    };

    let keys = (0..options.peers)
        .map(|_| SecretKey::generate().map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let desired: Vec<PeerConfig> = keys.iter().enumerate().map(|(n, k)| peer(n, k)).collect();
    let config = DeviceConfig {
        private_key: Some(SecretKey::generate().map_err(|e| e.to_string())?),
        listen_port: Some(PORT),
    };
    let changes: Vec<PeerChange> = desired.iter().map(PeerChange::add).collect();
    let removes: Vec<PeerChange> = desired
        .iter()
        .map(|p| PeerChange::Remove(p.public_key))
        .collect();
    // What one `set` writes: netlink messages and their bytes, or one UAPI request.
    let written = |config: &DeviceConfig, changes: &[PeerChange]| {
        if options.backend == "kernel" {
            let messages = netlink::set_messages(&options.device, config, changes);
            let bytes = messages.iter().map(|m| m.buffer_len()).sum::<usize>();
            (messages.len(), bytes)
        } else {
            (1, uapi::encode_set(config, changes).len())
        }
    };
    let (messages, bytes) = written(&config, &changes);
    let (remove_messages, remove_bytes) = written(&DeviceConfig::default(), &removes);

    let mut reps = Vec::new();
    for _ in 0..options.reps {
        reps.push(rep(&rt, &rtnl, &backend, options, &config, &desired)?);
    }
    // Once more, deleting the device with its peers (what removing an interface does).
    let (index, _, _) =
        create_and_program(&rt, &rtnl, &backend, &options.device, &config, &desired)?;
    check(
        &options.device,
        &backend.get(&options.device)?,
        &config,
        &desired,
    )?;
    let delete_full = delete(&rt, &rtnl, &backend, options, index)?;
    let pick = |f: fn(&Rep) -> Duration| reps.iter().map(f).collect::<Vec<_>>();
    let reads: Vec<Duration> = reps.iter().flat_map(|r| r.reads.clone()).collect();
    Ok(format!(
        "{TAG} backend={} peers={} reps={} reads={} set_messages={messages} set_bytes={bytes} \
         remove_messages={remove_messages} remove_bytes={remove_bytes} \
         create_ms={} program_ms={} read_ms={} remove_ms={} delete_ms={} \
         delete_with_peers_ms={}",
        options.backend,
        options.peers,
        options.reps,
        options.reads,
        list(&pick(|r| r.create)),
        list(&pick(|r| r.program)),
        list(&reads),
        list(&pick(|r| r.remove)),
        list(&pick(|r| r.delete)),
        ms(delete_full),
    ))
}

/// The command line: prints the line, or the error on stderr; returns the exit status.
pub fn cli(args: &[String]) -> i32 {
    match Options::parse(args).and_then(|options| run(&options)) {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => {
            eprintln!("program_peers: {e}");
            1
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(cli(&args));
}
