//! Applies a [`NodePlan`] in the fail-closed order and keeps it true.
//!
//! 1. WireGuard first loses what is going away: peers no longer wanted leave before their pins.
//! 2. The fast path gets the new pins, and is verified.
//! 3. Only then do devices get their peers; a peer never goes live before its pin.
//!
//! Between reconciles, [`DataPlane::guard`] checks the fast path (every peer is withdrawn from
//! WireGuard when it is detached or its maps are replaced, and restored once it is verified
//! again) and evicts any peer whose endpoint has left its pin (in `Shared` mode a stolen key
//! from a source pinned for another peer gets that far).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::SystemTime,
};

use ipnet::IpNet;
use wgpin_crds::{
    EnforcementState, InterfaceStatus, PeerEnforcementStatus, PinnedNodeStateSpec, ResolvedMode,
    WireGuardKey,
    k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp},
};

use super::{
    links,
    plan::{DeviceSpec, NodeCapabilities, NodePlan, plan_node},
    ports,
};
use crate::{
    fastpath::{Attachment, BpfPaths, FastPath, FastPathError, HookChoice, Op, SlotTable},
    secrets::{SecretSource, SecretsDir},
    wireguard::{
        Backend, DeviceConfig, DeviceState, PeerChange, SecretKey, diff_peers,
        endpoints_outside_pins,
    },
};

/// How the data plane is set up on this node.
#[derive(Clone, Debug)]
pub struct DataPlaneConfig {
    /// Node keys and the agent's own bookkeeping (slots, devices it created).
    pub state_dir: PathBuf,
    pub bpffs: BpfPaths,
    /// Interfaces the fast path attaches to (where WireGuard's packets arrive).
    pub underlay: Vec<String>,
    pub hook: HookChoice,
    /// Kernel WireGuard or a userspace implementation.
    pub backend: Arc<Backend>,
    /// Standalone mode's stand-in for Secrets: `<dir>/<namespace>/<name>/<key>`. In-cluster
    /// mode reads the Secrets instead ([`DataPlane::set_secret_source`]).
    pub secrets_dir: Option<PathBuf>,
}

/// What the agent remembers across restarts.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Bookkeeping {
    slots: SlotTable,
    /// Devices this agent created (and may delete).
    devices: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error(transparent)]
    FastPath(#[from] FastPathError),
    #[error("{0}")]
    Setup(String),
}

/// A peer evicted because its endpoint left its pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Eviction {
    pub interface: String,
    pub device: String,
    pub peer: String,
    pub endpoint: SocketAddr,
    /// Identity mode: only the endpoint was put back (to the peer's last one inside its pin);
    /// its session stays, since no session can have been made from outside the pin.
    pub session_kept: bool,
}

/// What [`DataPlane::guard`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuardReport {
    pub evictions: Vec<Eviction>,
    /// The fast path failed verification: the problems, and that every peer was withdrawn.
    pub withdrawn: Option<Vec<String>>,
    /// The fast path was verified again after a withdrawal; the next reconcile restores peers.
    pub recovered: bool,
}

/// One change a reconcile made, in the order it made them (see [`DataPlane::journal`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// A peer left a WireGuard device.
    PeerRemoved {
        device: String,
        peer: WireGuardKey,
    },
    /// A write to the fast path's maps.
    FastPath(Op),
    DeviceCreated(String),
    DeviceDeleted(String),
    /// Peers added to or updated on a device (device settings may have changed too).
    PeersWritten {
        device: String,
        peers: Vec<WireGuardKey>,
    },
}

/// Writes one reconcile made, for "no change writes nothing".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Writes {
    pub fast_path: usize,
    pub wireguard: usize,
    pub links: usize,
}

/// The data plane of one node.
pub struct DataPlane {
    config: DataPlaneConfig,
    fast_path: FastPath,
    attachments: Vec<Attachment>,
    rtnl: rtnetlink::Handle,
    book: Bookkeeping,
    keys: BTreeMap<String, SecretKey>,
    /// Where preshared keys come from: `secrets_dir` unless a mode sets another source.
    secrets: Arc<dyn SecretSource>,
    plan: NodePlan,
    /// Peers are out of WireGuard because the fast path could not be verified.
    withdrawn: bool,
    /// Identity mode: each peer's last endpoint inside its pin, to put back when a handshake
    /// from elsewhere moved it (WireGuard moves it before the egress check drops the answer).
    /// By device; rebuilt at every guard tick, so peers and devices that are gone drop out.
    last_good: BTreeMap<String, BTreeMap<WireGuardKey, SocketAddr>>,
    /// What the node can do, once probed ([`DataPlane::probe_capabilities`]).
    capabilities: Option<NodeCapabilities>,
    /// What the last reconcile changed, in order.
    journal: Vec<Effect>,
}

impl DataPlane {
    /// Loads or adopts the fast path and attaches it to every underlay interface. Must run in
    /// a tokio runtime, in the node's network namespace.
    pub fn new(config: DataPlaneConfig) -> Result<Self, DataPlaneError> {
        let mut fast_path = FastPath::open(config.bpffs.clone())?;
        let mut attachments = Vec::new();
        for interface in &config.underlay {
            let attachment = fast_path.attach(interface, config.hook)?;
            tracing::info!(interface, hook = %attachment.hook, reason = %attachment.reason, "fast path on underlay");
            attachments.push(attachment);
        }
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            DataPlaneError::Setup(format!(
                "state directory {}: {e}",
                config.state_dir.display()
            ))
        })?;
        let book = std::fs::read(config.state_dir.join("bookkeeping.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let rtnl = links::connect().map_err(DataPlaneError::Setup)?;
        let secrets = Arc::new(SecretsDir::new(config.secrets_dir.clone()));
        Ok(Self {
            config,
            fast_path,
            attachments,
            rtnl,
            book,
            keys: BTreeMap::new(),
            secrets,
            plan: NodePlan::default(),
            withdrawn: false,
            last_good: BTreeMap::new(),
            capabilities: None,
            journal: Vec::new(),
        })
    }

    pub fn fast_path(&self) -> &FastPath {
        &self.fast_path
    }

    /// Takes preshared keys from `source` from the next reconcile on (in-cluster mode: the
    /// Secrets read from the API server).
    pub fn set_secret_source(&mut self, source: Arc<dyn SecretSource>) {
        self.secrets = source;
    }

    /// What this node can do: kernel or userspace WireGuard, and whether identity mode's hook
    /// loads here (the first call loads it; later calls return the answer). With kernel
    /// WireGuard the module may not be loaded yet: a throwaway device loads it, as the first
    /// real device would.
    pub async fn probe_capabilities(&mut self) -> NodeCapabilities {
        if let Some(capabilities) = &self.capabilities {
            return capabilities.clone();
        }
        let kernel_wireguard = matches!(*self.config.backend, Backend::Kernel(_));
        let identity = if !kernel_wireguard {
            Err("userspace WireGuard has no kernel functions to hook".to_string())
        } else {
            if !std::path::Path::new("/sys/module/wireguard").exists() {
                self.load_wireguard_module().await;
            }
            self.fast_path.enable_identity()
        };
        match &identity {
            Ok(()) => tracing::info!("identity mode available: per-peer pins on shared ports"),
            Err(why) => tracing::info!(%why, "identity mode unavailable on this node"),
        }
        let capabilities = NodeCapabilities {
            kernel_wireguard,
            identity,
        };
        self.capabilities = Some(capabilities.clone());
        capabilities
    }

    async fn load_wireguard_module(&self) {
        const PROBE: &str = "wgpin-probe0";
        match self.config.backend.create(&self.rtnl, PROBE).await {
            Ok(()) => {
                let _ = links::delete(&self.rtnl, PROBE).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not create a WireGuard device to load the module")
            }
        }
    }

    pub fn fast_path_mut(&mut self) -> &mut FastPath {
        &mut self.fast_path
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The plan last applied.
    pub fn plan(&self) -> &NodePlan {
        &self.plan
    }

    /// What the last reconcile changed, in the order it changed it: the fail-closed order
    /// made visible (tests assert on it).
    pub fn journal(&self) -> &[Effect] {
        &self.journal
    }

    /// Counter slots of ports and peers, to name what the fast path counts.
    pub fn slots(&self) -> &SlotTable {
        &self.book.slots
    }

    fn save(&self) -> Result<(), DataPlaneError> {
        let path = self.config.state_dir.join("bookkeeping.json");
        let bytes = serde_json::to_vec_pretty(&self.book)
            .map_err(|e| DataPlaneError::Setup(e.to_string()))?;
        std::fs::write(&path, bytes)
            .map_err(|e| DataPlaneError::Setup(format!("{}: {e}", path.display())))
    }

    fn key(&mut self, interface: &str) -> Result<SecretKey, DataPlaneError> {
        if let Some(key) = self.keys.get(interface) {
            return Ok(key.clone());
        }
        let path = self
            .config
            .state_dir
            .join("keys")
            .join(format!("{interface}.key"));
        let key =
            SecretKey::load_or_generate(&path).map_err(|e| DataPlaneError::Setup(e.to_string()))?;
        self.keys.insert(interface.to_string(), key.clone());
        Ok(key)
    }

    fn read_device(&self, device: &str) -> Option<DeviceState> {
        self.config.backend.get(device).ok()
    }

    /// Applies `spec`. Returns the writes made; a second call with the same spec writes nothing.
    pub async fn reconcile(
        &mut self,
        spec: &PinnedNodeStateSpec,
        capabilities: &NodeCapabilities,
    ) -> Result<Writes, DataPlaneError> {
        let secrets = self.secrets.clone();
        let plan = plan_node(spec, capabilities, &mut self.book.slots, &|reference| {
            secrets.preshared_key(reference)
        });
        let mut writes = Writes::default();
        self.journal.clear();
        let wanted: BTreeMap<&str, &DeviceSpec> = plan
            .devices
            .iter()
            .map(|d| (d.device.as_str(), d))
            .collect();

        // 1. Peers leave WireGuard before their pins leave the fast path.
        let known: BTreeSet<String> = self
            .book
            .devices
            .iter()
            .cloned()
            .chain(wanted.keys().map(|d| d.to_string()))
            .collect();
        for device in &known {
            let Some(state) = self.read_device(device) else {
                continue;
            };
            let keep: BTreeSet<WireGuardKey> = wanted
                .get(device.as_str())
                .map(|d| d.peers.iter().map(|p| p.config.public_key).collect())
                .unwrap_or_default();
            let removals: Vec<PeerChange> = state
                .peers
                .keys()
                .filter(|k| !keep.contains(k))
                .map(|k| PeerChange::Remove(*k))
                .collect();
            if !removals.is_empty() {
                self.config
                    .backend
                    .set(device, &DeviceConfig::default(), &removals)
                    .map_err(DataPlaneError::Setup)?;
                writes.wireguard += removals.len();
                self.journal
                    .extend(removals.iter().map(|r| Effect::PeerRemoved {
                        device: device.clone(),
                        peer: r.public_key(),
                    }));
            }
        }

        // Devices no longer wanted go now, peers already gone: their ports may be reused below.
        let obsolete: Vec<String> = self
            .book
            .devices
            .iter()
            .filter(|d| !wanted.contains_key(d.as_str()))
            .cloned()
            .collect();
        for device in obsolete {
            if links::delete(&self.rtnl, &device)
                .await
                .map_err(DataPlaneError::Setup)?
            {
                writes.links += 1;
                self.journal.push(Effect::DeviceDeleted(device.clone()));
            }
            self.book.devices.remove(&device);
        }

        // 2. The fast path, verified: identity mode's egress check first, then the maps.
        let identity = plan.modes.values().any(|m| *m == ResolvedMode::Identity);
        for interface in &self.config.underlay {
            if identity {
                self.fast_path.attach_egress(interface)?;
            } else {
                self.fast_path.detach_egress(interface);
            }
        }
        let ops = self.fast_path.apply_ops(&plan.fast_path)?;
        writes.fast_path = ops.len();
        self.journal.extend(ops.into_iter().map(Effect::FastPath));
        let verification = self.fast_path.verify();
        if !verification.is_ok() {
            self.plan = plan;
            self.save()?;
            return Err(DataPlaneError::Setup(format!(
                "the fast path is not verified, no peer is added: {}",
                verification.problems.join("; ")
            )));
        }
        self.withdrawn = false;

        // 3. Devices, then their peers.
        for device in plan.devices.iter() {
            let key = self.key(&device.interface)?;
            if !self.config.backend.exists(&device.device) {
                // Written down before it exists: an agent killed from here on still knows the
                // device is its own, and deletes it when it is no longer wanted (it would
                // otherwise be left with its port, its process and, once written, its peers).
                if self.book.devices.insert(device.device.clone()) {
                    self.save()?;
                }
                self.config
                    .backend
                    .create(&self.rtnl, &device.device)
                    .await
                    .map_err(DataPlaneError::Setup)?;
                tracing::info!(device = %device.device, backend = ?self.config.backend.kind(), "created WireGuard device");
                writes.links += 1;
                self.journal
                    .push(Effect::DeviceCreated(device.device.clone()));
            }
            self.book.devices.insert(device.device.clone());
            let state = self.read_device(&device.device).unwrap_or_default();
            let mut settings = DeviceConfig::default();
            if state.public_key != Some(key.public_key()) {
                settings.private_key = Some(key);
            }
            if state.listen_port != Some(device.listen_port) {
                settings.listen_port = Some(device.listen_port);
            }
            let desired: Vec<_> = device.peers.iter().map(|p| p.config.clone()).collect();
            let pins: BTreeMap<WireGuardKey, Vec<IpNet>> = device
                .peers
                .iter()
                .map(|p| (p.config.public_key, p.pin.clone()))
                .collect();
            let changes = diff_peers(&desired, &state, &pins);
            if settings != DeviceConfig::default() || !changes.is_empty() {
                self.config
                    .backend
                    .set(&device.device, &settings, &changes)
                    .map_err(|e| match settings.listen_port {
                        Some(port) => ports::explain_listen_error(e, port),
                        None => e,
                    })
                    .map_err(DataPlaneError::Setup)?;
                writes.wireguard +=
                    changes.len() + usize::from(settings != DeviceConfig::default());
                self.journal.push(Effect::PeersWritten {
                    device: device.device.clone(),
                    peers: changes.iter().map(PeerChange::public_key).collect(),
                });
            }
            let routes: Vec<IpNet> = device
                .peers
                .iter()
                .flat_map(|p| p.config.allowed_ips.iter().copied())
                .collect();
            writes.links += links::configure(
                &self.rtnl,
                &device.device,
                device.mtu,
                &device.addresses,
                &routes,
            )
            .await
            .map_err(DataPlaneError::Setup)?;
        }

        self.plan = plan;
        self.save()?;
        Ok(writes)
    }

    /// Between reconciles: fail closed when the fast path is not verified, and evict peers
    /// whose endpoint left their pin.
    pub fn guard(&mut self) -> GuardReport {
        let mut report = GuardReport::default();
        let verification = self.fast_path.verify();
        if !verification.is_ok() {
            if !self.withdrawn {
                tracing::error!(problems = ?verification.problems, "fast path lost: withdrawing every peer from WireGuard");
                self.withdraw_all();
                self.withdrawn = true;
                report.withdrawn = Some(verification.problems);
            }
            self.reattach();
            return report;
        }
        if self.withdrawn {
            report.recovered = true;
            return report;
        }
        let mut good_by_device = BTreeMap::new();
        for device in &self.plan.devices {
            let Some(state) = self.read_device(&device.device) else {
                continue;
            };
            let pins: BTreeMap<WireGuardKey, Vec<IpNet>> = device
                .peers
                .iter()
                .map(|p| (p.config.public_key, p.pin.clone()))
                .collect();
            let outside = endpoints_outside_pins(&state, &pins);
            let identity = device.mode == ResolvedMode::Identity;
            let mut good = BTreeMap::new();
            if identity {
                let mut before = self.last_good.remove(&device.device).unwrap_or_default();
                for (key, peer) in &state.peers {
                    let inside = peer
                        .endpoint
                        .filter(|_| !outside.iter().any(|(k, _)| k == key));
                    if let Some(endpoint) = inside.or_else(|| before.remove(key)) {
                        good.insert(*key, endpoint);
                    }
                }
            }
            for (key, endpoint) in outside {
                let Some(peer) = device.peers.iter().find(|p| p.config.public_key == key) else {
                    continue;
                };
                let last_good = good.get(&key).copied();
                let changes = match last_good {
                    // Identity mode: the egress check let no answer out, so there is no
                    // session from there; only the endpoint moved. Put it back.
                    Some(good) => vec![PeerChange::Upsert {
                        public_key: key,
                        update_only: true,
                        preshared_key: None,
                        endpoint: Some(good),
                        persistent_keepalive: None,
                        allowed_ips: None,
                    }],
                    // Remove and re-add: the session goes; the configured endpoint (inside the
                    // pin) comes back, so the rightful peer can reconnect.
                    None => vec![PeerChange::Remove(key), PeerChange::add(&peer.config)],
                };
                match self
                    .config
                    .backend
                    .set(&device.device, &DeviceConfig::default(), &changes)
                {
                    Ok(()) => report.evictions.push(Eviction {
                        interface: device.interface.clone(),
                        device: device.device.clone(),
                        peer: peer.name.clone(),
                        endpoint,
                        session_kept: last_good.is_some(),
                    }),
                    Err(e) => {
                        tracing::error!(device = %device.device, peer = %peer.name, error = %e, "eviction failed")
                    }
                }
            }
            if identity {
                good_by_device.insert(device.device.clone(), good);
            }
        }
        self.last_good = good_by_device;
        report
    }

    fn withdraw_all(&mut self) {
        for device in &self.book.devices {
            let Some(state) = self.read_device(device) else {
                continue;
            };
            let removals: Vec<PeerChange> =
                state.peers.keys().map(|k| PeerChange::Remove(*k)).collect();
            if let Err(e) = self
                .config
                .backend
                .set(device, &DeviceConfig::default(), &removals)
            {
                tracing::error!(device, error = %e, "could not withdraw peers");
            }
        }
    }

    fn reattach(&mut self) {
        match self.fast_path.repin_maps() {
            Ok(repinned) if !repinned.is_empty() => {
                tracing::warn!(maps = ?repinned, "the fast path's maps were unpinned or replaced: pinned them again")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "the fast path's maps cannot be pinned again"),
        }
        // The hook is loaded again only when it is what was lost, not with every XDP/TC repair.
        if self.fast_path.identity_enabled()
            && !self.fast_path.identity_hook_verified()
            && let Err(why) = self.fast_path.enable_identity()
        {
            tracing::error!(%why, "identity mode's hook cannot be re-attached");
        }
        for interface in self.config.underlay.clone() {
            self.fast_path.detach(&interface);
            match self.fast_path.attach(&interface, self.config.hook) {
                Ok(attachment) => {
                    tracing::info!(interface, hook = %attachment.hook, "fast path re-attached")
                }
                Err(e) => tracing::error!(interface, error = %e, "fast path cannot be re-attached"),
            }
        }
    }

    /// Whether peers are withdrawn because the fast path could not be verified.
    pub fn is_withdrawn(&self) -> bool {
        self.withdrawn
    }

    /// The status of every interface for `PinnedNodeState.status` (and logs in standalone mode).
    pub fn status(&self, now: SystemTime) -> Vec<InterfaceStatus> {
        let mut interfaces: BTreeMap<String, InterfaceStatus> = BTreeMap::new();
        let hook = self
            .attachments
            .iter()
            .map(|a| format!("{}:{}", a.hook, a.interface))
            .collect::<Vec<_>>()
            .join(",");
        for (name, mode) in &self.plan.modes {
            interfaces.insert(
                name.clone(),
                InterfaceStatus {
                    name: name.clone(),
                    mode: Some(*mode),
                    mode_fallback: self.plan.fallbacks.get(name).cloned(),
                    backend: Some(self.config.backend.kind()),
                    fast_path: Some(hook.clone()),
                    public_key: self.keys.get(name).map(|k| k.public_key().to_base64()),
                    peers: Vec::new(),
                },
            );
        }
        for device in &self.plan.devices {
            let state = self.read_device(&device.device);
            for peer in &device.peers {
                let live = state
                    .as_ref()
                    .and_then(|s| s.peers.get(&peer.config.public_key));
                let enforced = live.is_some() && !self.withdrawn;
                let entry = PeerEnforcementStatus {
                    name: peer.name.clone(),
                    state: if enforced {
                        EnforcementState::Enforced
                    } else if self.withdrawn {
                        EnforcementState::Withdrawn
                    } else {
                        EnforcementState::Pending
                    },
                    observed_generation: None,
                    listen_port: Some(device.listen_port),
                    endpoint: live.and_then(|p| p.endpoint).map(|e| e.to_string()),
                    last_handshake_time: live
                        .and_then(|p| p.last_handshake)
                        .and_then(|t| timestamp(t, now)),
                    rx_bytes: live.map(|p| p.rx_bytes),
                    tx_bytes: live.map(|p| p.tx_bytes),
                    violations: None,
                    message: self
                        .withdrawn
                        .then(|| "withdrawn: the fast path is not verified".to_string()),
                };
                if let Some(interface) = interfaces.get_mut(&device.interface) {
                    interface.peers.push(entry);
                }
            }
        }
        for problem in &self.plan.problems {
            let Some(interface) = interfaces.get_mut(&problem.interface) else {
                continue;
            };
            if let Some(peer) = &problem.peer {
                interface.peers.push(PeerEnforcementStatus {
                    name: peer.clone(),
                    state: EnforcementState::Failed,
                    observed_generation: None,
                    listen_port: None,
                    endpoint: None,
                    last_handshake_time: None,
                    rx_bytes: None,
                    tx_bytes: None,
                    violations: None,
                    message: Some(problem.reason.clone()),
                });
            }
        }
        interfaces.into_values().collect()
    }

    /// The mode each interface runs in.
    pub fn modes(&self) -> &BTreeMap<String, ResolvedMode> {
        &self.plan.modes
    }
}

fn timestamp(at: SystemTime, _now: SystemTime) -> Option<Time> {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    Timestamp::from_second(i64::try_from(since.as_secs()).ok()?)
        .ok()
        .map(Time)
}
