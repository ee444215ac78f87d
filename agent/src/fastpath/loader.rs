//! The fast path in the kernel: load or adopt the programs and maps pinned under bpffs, attach
//! to interfaces (XDP, else TC), write the maps in the order [`plan`] gives, verify, and read
//! counters and violation events.
//!
//! Pinned objects (`<root>/maps/*`, `<root>/progs/*`, `<root>/links/{xdp,tc}-<interface>`)
//! outlive the agent: enforcement stays in place across restarts and `kill -9`, and the next
//! agent adopts them. When its own program differs from the attached one (an upgrade), it
//! replaces the program inside the existing link (`bpf_link_update`), atomically, so no packet
//! sees the hook empty.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapInfo, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, LinkInfo, PinnedLink},
        loaded_programs,
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use ipnet::IpNet;
use wgpin_common::{
    AllowEntry, AllowV4, AllowV6, Config, Counters, GlobalCounters, IdentityCounters, IdentityKey,
    IdentityLayout, PeerPinV4, PeerPinV6, PortEntry, PortKey, SessionEntry, SessionKey,
    ViolationEvent, allow_prefix_len, maps, peer_pin_prefix_len, programs,
};

use super::{
    netlink,
    state::{FastPathState, Op, PeerIdentity, PeerPinKey, PinKey, plan},
};

/// Where wgpin pins its objects unless told otherwise.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/wgpin";
/// The bpffs mount point the root must live under.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wgpin-ebpf"));

/// The bpffs paths of every pinned object (one place, as bpfman does).
#[derive(Clone, Debug)]
pub struct BpfPaths {
    root: PathBuf,
}

impl BpfPaths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn programs(&self) -> PathBuf {
        self.root.join("progs")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, hook: Hook, interface: &str) -> PathBuf {
        self.links().join(format!("{hook}-{interface}"))
    }

    /// Identity mode's fexit link on the WireGuard module.
    pub fn session_hook_link(&self) -> PathBuf {
        self.links()
            .join(format!("fexit-{}", wgpin_common::SESSION_HOOK_FUNCTION))
    }
}

impl Default for BpfPaths {
    fn default() -> Self {
        Self::new(DEFAULT_BPFFS_ROOT)
    }
}

/// The hook a program is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    Xdp,
    Tc,
    /// TC egress (tcx), identity mode: handshakes sent to addresses outside the peer's pin.
    Egress,
}

impl Hook {
    /// The program behind the hook.
    fn program(self) -> &'static str {
        match self {
            Self::Xdp => programs::XDP,
            Self::Tc => programs::TC,
            Self::Egress => programs::TC_EGRESS,
        }
    }

    /// The maps the hook's program must use (the verification checks that the attached
    /// program writes and reads this agent's maps, not copies).
    fn maps(self) -> &'static [&'static str] {
        match self {
            // The packet path uses every map but the two only the session hook reads.
            Self::Xdp | Self::Tc => &PACKET_PATH_MAPS,
            Self::Egress => &[
                maps::PORTS,
                maps::SESSIONS,
                maps::PEER_PINS_V4,
                maps::PEER_PINS_V6,
            ],
        }
    }
}

const PACKET_PATH_MAPS: [&str; 16] = [
    maps::PORTS,
    maps::ALLOW_V4,
    maps::ALLOW_V6,
    maps::HOSTS_V4,
    maps::HOSTS_V6,
    maps::PORT_COUNTERS,
    maps::PEER_COUNTERS,
    maps::GLOBAL_COUNTERS,
    maps::VIOLATIONS,
    maps::RATE_LIMIT,
    maps::CONFIG,
    maps::EVENT_BUDGET,
    maps::SESSIONS,
    maps::PEER_PINS_V4,
    maps::PEER_PINS_V6,
    maps::IDENTITY_COUNTERS,
];

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Xdp => "xdp",
            Self::Tc => "tc",
            Self::Egress => "egress",
        })
    }
}

/// Which hook to use on an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HookChoice {
    /// Native XDP; TC on a veth (where native XDP copies every packet and TC is faster), when
    /// XDP cannot attach, or when another program owns the XDP hook.
    #[default]
    Auto,
    /// XDP only (native, then generic).
    Xdp,
    /// TC ingress (tcx) only.
    Tc,
}

/// The fast path on one interface, and why that hook was chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    pub hook: Hook,
    pub reason: String,
}

/// Something is wrong with the fast path; the message says what and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error(
        "{path} is not on a bpffs mount: mount it with `mount -t bpf bpf {BPFFS_MOUNT}` (in Kubernetes, mount the host's {BPFFS_MOUNT} into the agent)"
    )]
    NoBpffs { path: PathBuf },
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: ProgramError,
    },
    #[error("{what}: {source}")]
    Link {
        what: String,
        #[source]
        source: LinkError,
    },
    #[error("{what}: {source}")]
    Map {
        what: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("interface {interface:?}: {message}")]
    Attach { interface: String, message: String },
    #[error(
        "map {name} pinned at {} has another layout than this agent's ({pinned}; this agent: {ours}): \
         it was made by an agent of another version, whose programs still enforce with it. This \
         agent cannot take them over in place: stop it, remove the peers from WireGuard (or accept \
         that they are unprotected), remove {} and start it again",
        path.display(),
        root.display()
    )]
    IncompatiblePins {
        name: String,
        path: PathBuf,
        root: PathBuf,
        pinned: String,
        ours: String,
    },
    #[error("{0}")]
    Netlink(String),
}

fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> FastPathError {
    let what = what.into();
    move |source| FastPathError::Map { what, source }
}

fn prog_err(what: impl Into<String>) -> impl FnOnce(ProgramError) -> FastPathError {
    let what = what.into();
    move |source| FastPathError::Program { what, source }
}

fn link_err(what: impl Into<String>) -> impl FnOnce(LinkError) -> FastPathError {
    let what = what.into();
    move |source| FastPathError::Link { what, source }
}

/// One pinned link held by this agent.
struct HeldLink {
    link: FdLink,
    path: PathBuf,
    /// The attached program last found to use this agent's maps. A loaded program's maps never
    /// change, so verification scans the host's programs only when the link holds another one.
    maps_checked_for: std::cell::Cell<Option<u32>>,
}

impl HeldLink {
    fn new(link: FdLink, path: PathBuf) -> Self {
        Self {
            link,
            path,
            maps_checked_for: std::cell::Cell::new(None),
        }
    }
}

/// The maps, typed, each holding this agent's file descriptor.
struct Maps {
    ports: HashMap<MapData, PortKey, PortEntry>,
    allow_v4: LpmTrie<MapData, AllowV4, AllowEntry>,
    allow_v6: LpmTrie<MapData, AllowV6, AllowEntry>,
    hosts_v4: HashMap<MapData, AllowV4, AllowEntry>,
    hosts_v6: HashMap<MapData, AllowV6, AllowEntry>,
    port_counters: PerCpuArray<MapData, Counters>,
    peer_counters: PerCpuArray<MapData, Counters>,
    global_counters: PerCpuArray<MapData, GlobalCounters>,
    config: Array<MapData, Config>,
    violations: RingBuf<MapData>,
    sessions: HashMap<MapData, SessionKey, SessionEntry>,
    identity_keys: HashMap<MapData, IdentityKey, SessionEntry>,
    peer_pins_v4: LpmTrie<MapData, PeerPinV4, AllowEntry>,
    peer_pins_v6: LpmTrie<MapData, PeerPinV6, AllowEntry>,
    identity_layout: Array<MapData, IdentityLayout>,
    identity_counters: PerCpuArray<MapData, IdentityCounters>,
    /// Kernel map IDs as loaded, by name: what the pins and the attached programs must match.
    ids: BTreeMap<&'static str, u32>,
}

impl Maps {
    fn take(ebpf: &mut Ebpf, paths: &BpfPaths) -> Result<Self, FastPathError> {
        let mut ids = BTreeMap::new();
        for name in maps::ALL {
            let info = MapInfo::from_pin(paths.map(name))
                .map_err(map_err(format!("reading the pinned map {name}")))?;
            ids.insert(name, info.id());
        }
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or_else(|| map_missing(name));
        Ok(Self {
            ports: HashMap::try_from(take(maps::PORTS)?).map_err(map_err(maps::PORTS))?,
            allow_v4: LpmTrie::try_from(take(maps::ALLOW_V4)?).map_err(map_err(maps::ALLOW_V4))?,
            allow_v6: LpmTrie::try_from(take(maps::ALLOW_V6)?).map_err(map_err(maps::ALLOW_V6))?,
            hosts_v4: HashMap::try_from(take(maps::HOSTS_V4)?).map_err(map_err(maps::HOSTS_V4))?,
            hosts_v6: HashMap::try_from(take(maps::HOSTS_V6)?).map_err(map_err(maps::HOSTS_V6))?,
            port_counters: PerCpuArray::try_from(take(maps::PORT_COUNTERS)?)
                .map_err(map_err(maps::PORT_COUNTERS))?,
            peer_counters: PerCpuArray::try_from(take(maps::PEER_COUNTERS)?)
                .map_err(map_err(maps::PEER_COUNTERS))?,
            global_counters: PerCpuArray::try_from(take(maps::GLOBAL_COUNTERS)?)
                .map_err(map_err(maps::GLOBAL_COUNTERS))?,
            config: Array::try_from(take(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?,
            violations: RingBuf::try_from(take(maps::VIOLATIONS)?)
                .map_err(map_err(maps::VIOLATIONS))?,
            sessions: HashMap::try_from(take(maps::SESSIONS)?).map_err(map_err(maps::SESSIONS))?,
            identity_keys: HashMap::try_from(take(maps::IDENTITY_KEYS)?)
                .map_err(map_err(maps::IDENTITY_KEYS))?,
            peer_pins_v4: LpmTrie::try_from(take(maps::PEER_PINS_V4)?)
                .map_err(map_err(maps::PEER_PINS_V4))?,
            peer_pins_v6: LpmTrie::try_from(take(maps::PEER_PINS_V6)?)
                .map_err(map_err(maps::PEER_PINS_V6))?,
            identity_layout: Array::try_from(take(maps::IDENTITY_LAYOUT)?)
                .map_err(map_err(maps::IDENTITY_LAYOUT))?,
            identity_counters: PerCpuArray::try_from(take(maps::IDENTITY_COUNTERS)?)
                .map_err(map_err(maps::IDENTITY_COUNTERS))?,
            ids,
        })
    }
}

/// The loaded (or adopted) fast path.
pub struct FastPath {
    paths: BpfPaths,
    ebpf: Ebpf,
    links: BTreeMap<(Hook, String), HeldLink>,
    maps: Maps,
    /// Identity mode's fexit on the WireGuard module, once enabled.
    session_hook: Option<HeldLink>,
}

/// A violation event, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// What was violated: [`wgpin_common::VIOLATION_SOURCE`], `VIOLATION_SESSION` or
    /// `VIOLATION_HANDSHAKE_OUT` (then `source` is where WireGuard tried to send the handshake).
    pub kind: u8,
    pub source: IpAddr,
    pub source_port: u16,
    pub port: u16,
    pub port_slot: u32,
    pub peer_slot: u32,
    /// Violations from the same source folded into this event by the rate limit.
    pub suppressed: u64,
    pub packet_len: u32,
    /// CLOCK_BOOTTIME nanoseconds.
    pub time_ns: u64,
}

impl From<ViolationEvent> for Violation {
    fn from(event: ViolationEvent) -> Self {
        let source = if event.family == wgpin_common::FAMILY_V4 {
            IpAddr::from([
                event.src_addr[0],
                event.src_addr[1],
                event.src_addr[2],
                event.src_addr[3],
            ])
        } else {
            IpAddr::from(event.src_addr)
        };
        Self {
            kind: event.kind,
            source,
            source_port: u16::from_be_bytes(event.src_port_be),
            port: u16::from_be_bytes(event.dst_port_be),
            port_slot: event.port_slot,
            peer_slot: event.peer_slot,
            suppressed: event.suppressed,
            packet_len: event.packet_len,
            time_ns: event.time_ns,
        }
    }
}

/// The outcome of [`FastPath::verify`]: empty when everything holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    pub problems: Vec<String>,
}

impl Verification {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn ensure_dir(path: &Path) -> Result<(), FastPathError> {
    std::fs::create_dir_all(path).map_err(|source| FastPathError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Whether `path` lies on a bpffs mount.
// The magic's type differs between architectures (i64 on x86_64, u32 elsewhere).
#[allow(clippy::unnecessary_cast)]
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type().0 as i64 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

impl FastPath {
    /// Loads the programs, reusing every map already pinned under `paths` (with its contents)
    /// and adopting every pinned link. Links whose program differs from this agent's are
    /// upgraded in place.
    pub fn open(paths: BpfPaths) -> Result<Self, FastPathError> {
        let parent = paths.root().parent().unwrap_or(Path::new(BPFFS_MOUNT));
        if !is_bpffs(parent) {
            return Err(FastPathError::NoBpffs {
                path: parent.to_path_buf(),
            });
        }
        for dir in [
            paths.root().to_path_buf(),
            paths.maps(),
            paths.programs(),
            paths.links(),
        ] {
            ensure_dir(&dir)?;
        }
        check_pinned_layouts(&paths)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(paths.maps())
            .load(OBJECT)
            .map_err(|e| FastPathError::Load(Box::new(e)))?;

        let xdp: &mut Xdp = program(&mut ebpf, programs::XDP)?;
        xdp.load()
            .map_err(prog_err("loading the XDP program (verifier)"))?;
        let tc: &mut SchedClassifier = program(&mut ebpf, programs::TC)?;
        tc.load()
            .map_err(prog_err("loading the TC program (verifier)"))?;
        let egress: &mut SchedClassifier = program(&mut ebpf, programs::TC_EGRESS)?;
        egress
            .load()
            .map_err(prog_err("loading the TC egress program (verifier)"))?;
        for name in [programs::XDP, programs::TC, programs::TC_EGRESS] {
            let path = paths.programs().join(name);
            // The previous agent's pin, if any; its program lives on while links use it.
            let _ = std::fs::remove_file(&path);
            let program = ebpf.program_mut(name).ok_or_else(|| map_missing(name))?;
            program.pin(&path).map_err(|e| FastPathError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }

        let maps = Maps::take(&mut ebpf, &paths)?;
        let mut fast_path = Self {
            paths,
            ebpf,
            links: BTreeMap::new(),
            maps,
            session_hook: None,
        };
        fast_path.adopt_links()?;
        Ok(fast_path)
    }

    pub fn paths(&self) -> &BpfPaths {
        &self.paths
    }

    /// Takes over the links pinned by an earlier agent, upgrading their program if it differs.
    fn adopt_links(&mut self) -> Result<(), FastPathError> {
        let entries =
            std::fs::read_dir(self.paths.links()).map_err(|source| FastPathError::Io {
                path: self.paths.links(),
                source,
            })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let (hook, interface) = match name.split_once('-') {
                Some(("xdp", interface)) => (Hook::Xdp, interface.to_string()),
                Some(("tc", interface)) => (Hook::Tc, interface.to_string()),
                Some(("egress", interface)) => (Hook::Egress, interface.to_string()),
                _ => continue,
            };
            let pinned = PinnedLink::from_pin(&path)
                .map_err(link_err(format!("adopting {}", path.display())))?;
            let link = FdLink::from(pinned);
            let link = self.upgrade(hook, &interface, link, false)?;
            self.links
                .insert((hook, interface), HeldLink::new(link, path));
        }
        Ok(())
    }

    /// Puts this agent's programs into every held link, atomically (`bpf_link_update`): the
    /// hook is never empty, and the link and its pin stay the same. Adoption does this by itself
    /// when the attached program differs (an upgrade); this forces it.
    pub fn replace_programs(&mut self) -> Result<(), FastPathError> {
        let keys: Vec<(Hook, String)> = self.links.keys().cloned().collect();
        for (hook, interface) in keys {
            if let Some(held) = self.links.remove(&(hook, interface.clone())) {
                let link = self.upgrade(hook, &interface, held.link, true)?;
                self.links
                    .insert((hook, interface), HeldLink::new(link, held.path));
            }
        }
        Ok(())
    }

    /// Replaces the program inside `link` with this agent's when they differ (an upgrade), or
    /// always when `force`.
    fn upgrade(
        &mut self,
        hook: Hook,
        interface: &str,
        link: FdLink,
        force: bool,
    ) -> Result<FdLink, FastPathError> {
        let name = hook.program();
        let ours = self
            .ebpf
            .program(name)
            .ok_or_else(|| map_missing(name))?
            .info()
            .map_err(prog_err("reading this agent's program"))?;
        let attached_id = link
            .info()
            .map_err(link_err("reading an adopted link"))?
            .program_id();
        let attached_tag = loaded_programs()
            .flatten()
            .find(|p| p.id() == attached_id)
            .map(|p| p.tag());
        if !force && attached_tag == Some(ours.tag()) {
            return Ok(link);
        }
        tracing::info!(interface, %hook, attached_id, "replacing the attached program with this agent's");
        let what = format!("upgrading the {hook} program on {interface}");
        match hook {
            Hook::Xdp => {
                let xdp: &mut Xdp = program(&mut self.ebpf, programs::XDP)?;
                let old = XdpLink::try_from(link).map_err(link_err(what.clone()))?;
                let id = xdp.attach_to_link(old).map_err(prog_err(what.clone()))?;
                let new = xdp.take_link(id).map_err(prog_err(what.clone()))?;
                FdLink::try_from(new).map_err(link_err(what))
            }
            Hook::Tc | Hook::Egress => {
                let tc: &mut SchedClassifier = program(&mut self.ebpf, hook.program())?;
                let old = SchedClassifierLink::try_from(link).map_err(link_err(what.clone()))?;
                let id = tc.attach_to_link(old).map_err(prog_err(what.clone()))?;
                let new = tc.take_link(id).map_err(prog_err(what.clone()))?;
                FdLink::try_from(new).map_err(link_err(what))
            }
        }
    }

    /// The interfaces the fast path is attached to.
    pub fn attachments(&self) -> Vec<(Hook, String)> {
        self.links.keys().cloned().collect()
    }

    /// Attaches the egress check (identity mode) to `interface`, or keeps an adopted link.
    pub fn attach_egress(&mut self, interface: &str) -> Result<(), FastPathError> {
        if self
            .links
            .contains_key(&(Hook::Egress, interface.to_string()))
        {
            return Ok(());
        }
        let tc: &mut SchedClassifier = program(&mut self.ebpf, programs::TC_EGRESS)?;
        let what = format!("attaching TC egress to {interface}");
        let id = tc
            .attach_with_options(interface, TcAttachType::Egress, first_in_tcx())
            .map_err(prog_err(what.clone()))?;
        let link = tc.take_link(id).map_err(prog_err(what.clone()))?;
        let link = FdLink::try_from(link).map_err(|_| FastPathError::Attach {
            interface: interface.to_string(),
            message:
                "TC attached without tcx (kernel older than 6.6?); wgpin needs tcx links to pin"
                    .into(),
        })?;
        let path = self.paths.link(Hook::Egress, interface);
        let _ = std::fs::remove_file(&path);
        let pinned = link.pin(&path).map_err(|e| FastPathError::Attach {
            interface: interface.to_string(),
            message: format!("cannot pin the link at {}: {e}", path.display()),
        })?;
        self.links.insert(
            (Hook::Egress, interface.to_string()),
            HeldLink::new(FdLink::from(pinned), path),
        );
        tracing::info!(interface, "identity egress check attached");
        Ok(())
    }

    /// Detaches the egress check from `interface` (no interface runs identity mode any more).
    pub fn detach_egress(&mut self, interface: &str) {
        if let Some(held) = self.links.remove(&(Hook::Egress, interface.to_string())) {
            let _ = std::fs::remove_file(&held.path);
            drop(held.link);
        }
    }

    /// Attaches to `interface` (the current network namespace's), or keeps an adopted link.
    pub fn attach(
        &mut self,
        interface: &str,
        choice: HookChoice,
    ) -> Result<Attachment, FastPathError> {
        for hook in [Hook::Xdp, Hook::Tc] {
            if self.links.contains_key(&(hook, interface.to_string())) {
                return Ok(Attachment {
                    interface: interface.to_string(),
                    hook,
                    reason: "kept the pinned link".into(),
                });
            }
        }
        let (hook, reason, link) = match choice {
            HookChoice::Tc => {
                let link = self.attach_tc(interface)?;
                (Hook::Tc, "TC was asked for".to_string(), link)
            }
            HookChoice::Xdp => match self.attach_xdp(interface, XdpMode::Driver) {
                Ok(link) => (Hook::Xdp, "native XDP".to_string(), link),
                Err(native) => {
                    let link = self.attach_xdp(interface, XdpMode::Skb)?;
                    (
                        Hook::Xdp,
                        format!("generic XDP (native failed: {native})"),
                        link,
                    )
                }
            },
            HookChoice::Auto => {
                let facts = netlink::link_facts(interface).map_err(FastPathError::Netlink)?;
                if let Some(id) = facts.xdp_program {
                    let link = self.attach_tc(interface)?;
                    (
                        Hook::Tc,
                        format!("another XDP program (id {id}) owns the XDP hook; using TC"),
                        link,
                    )
                } else if facts.veth {
                    let link = self.attach_tc(interface)?;
                    (
                        Hook::Tc,
                        "a veth: native XDP would copy every packet, TC is faster".to_string(),
                        link,
                    )
                } else {
                    match self.attach_xdp(interface, XdpMode::Driver) {
                        Ok(link) => (Hook::Xdp, "native XDP".to_string(), link),
                        Err(native) => {
                            let link = self.attach_tc(interface)?;
                            (
                                Hook::Tc,
                                format!("native XDP cannot attach ({native}); using TC"),
                                link,
                            )
                        }
                    }
                }
            }
        };
        let path = self.paths.link(hook, interface);
        let _ = std::fs::remove_file(&path);
        let pinned = link.pin(&path).map_err(|e| FastPathError::Attach {
            interface: interface.to_string(),
            message: format!("cannot pin the link at {}: {e}", path.display()),
        })?;
        self.links.insert(
            (hook, interface.to_string()),
            HeldLink::new(FdLink::from(pinned), path),
        );
        tracing::info!(interface, %hook, %reason, "fast path attached");
        Ok(Attachment {
            interface: interface.to_string(),
            hook,
            reason,
        })
    }

    fn attach_xdp(&mut self, interface: &str, mode: XdpMode) -> Result<FdLink, FastPathError> {
        let xdp: &mut Xdp = program(&mut self.ebpf, programs::XDP)?;
        let what = format!("attaching XDP to {interface}");
        let id = xdp
            .attach(interface, mode)
            .map_err(prog_err(what.clone()))?;
        let link = xdp.take_link(id).map_err(prog_err(what.clone()))?;
        FdLink::try_from(link).map_err(|_| FastPathError::Attach {
            interface: interface.to_string(),
            message: "the kernel attached XDP without a bpf_link (kernel older than 5.9?); wgpin needs links to pin".into(),
        })
    }

    fn attach_tc(&mut self, interface: &str) -> Result<FdLink, FastPathError> {
        let tc: &mut SchedClassifier = program(&mut self.ebpf, programs::TC)?;
        let what = format!("attaching TC ingress to {interface}");
        let id = tc
            .attach_with_options(interface, TcAttachType::Ingress, first_in_tcx())
            .map_err(prog_err(what.clone()))?;
        let link = tc.take_link(id).map_err(prog_err(what.clone()))?;
        FdLink::try_from(link).map_err(|_| FastPathError::Attach {
            interface: interface.to_string(),
            message:
                "TC attached without tcx (kernel older than 6.6?); wgpin needs tcx links to pin"
                    .into(),
        })
    }

    /// Detaches from `interface` and removes the pins.
    pub fn detach(&mut self, interface: &str) {
        for hook in [Hook::Xdp, Hook::Tc, Hook::Egress] {
            if let Some(held) = self.links.remove(&(hook, interface.to_string())) {
                let _ = std::fs::remove_file(&held.path);
                drop(held.link);
            }
        }
    }

    /// Checks that every link is still attached to its interface with a program that uses the
    /// maps pinned under the root, and that the pinned maps are the ones this agent writes.
    pub fn verify(&self) -> Verification {
        let mut problems = Vec::new();
        let ours = &self.maps.ids;
        for (name, id) in ours {
            match MapInfo::from_pin(self.paths.map(name)) {
                Ok(info) if info.id() == *id => {}
                Ok(info) => problems.push(format!(
                    "map {name} pinned at {} is map {} but the fast path uses map {id}: it was replaced",
                    self.paths.map(name).display(),
                    info.id()
                )),
                Err(e) => problems.push(format!("map {name} is no longer pinned: {e}")),
            }
        }
        for ((hook, interface), held) in &self.links {
            if let Err(problem) = self.verify_link(*hook, interface, held, ours) {
                problems.push(format!("{hook} on {interface}: {problem}"));
            }
        }
        if let Some(held) = &self.session_hook
            && let Err(problem) = verify_pinned(held)
        {
            problems.push(format!(
                "the identity hook on {}: {problem}",
                wgpin_common::SESSION_HOOK_FUNCTION
            ));
        }
        Verification { problems }
    }

    /// Pins this agent's maps again where their pins are gone or hold other maps (someone
    /// removed or replaced them). The attached programs use this agent's maps whatever the pins
    /// say, but [`FastPath::verify`] fails until the pins are right again, and the next agent
    /// adopts what is pinned. Returns the maps it pinned again.
    pub fn repin_maps(&self) -> Result<Vec<&'static str>, FastPathError> {
        ensure_dir(&self.paths.maps())?;
        let mut repinned = Vec::new();
        for (name, id) in &self.maps.ids {
            let path = self.paths.map(name);
            if MapInfo::from_pin(&path).is_ok_and(|info| info.id() == *id) {
                continue;
            }
            // Whatever holds the name now (another map, anything) goes first.
            let _ = std::fs::remove_file(&path);
            MapData::from_id(*id)
                .map_err(map_err(format!(
                    "opening this agent's map {name} (id {id})"
                )))?
                .pin(&path)
                .map_err(|e| FastPathError::Io {
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            repinned.push(*name);
        }
        Ok(repinned)
    }

    /// Whether identity mode's hook is attached (by this agent).
    pub fn identity_enabled(&self) -> bool {
        self.session_hook.is_some()
    }

    /// Whether identity mode's hook is still attached and pinned as this agent left it.
    pub fn identity_hook_verified(&self) -> bool {
        self.session_hook
            .as_ref()
            .is_some_and(|held| verify_pinned(held).is_ok())
    }

    /// Turns identity mode's kernel side on: checks the WireGuard module's BTF for what the
    /// session hook reads, loads the hook against the module, attaches it (fexit on
    /// `wg_index_hashtable_insert`), pins the link (it outlives the agent, like the others; an
    /// earlier agent's link is replaced after the new one is attached, so no index is missed)
    /// and tells the hook where its fields are. The error says why identity mode cannot run
    /// here, for the condition that reports the fallback to shared mode.
    pub fn enable_identity(&mut self) -> Result<(), String> {
        use std::os::fd::AsFd as _;

        let btf =
            super::btf::Btf::from_kernel(super::identity::MODULE).map_err(|e| e.to_string())?;
        let facts = super::identity::check_module(&btf)?;
        let module = wgpin_bpf_sys::module_btf_fd(super::identity::MODULE)
            .map_err(|e| format!("the {} module's BTF object: {e}", super::identity::MODULE))?;
        // The maps stay open until the program is loaded: the instructions hold their fds.
        let (instructions, _maps) = self.relocated(programs::SESSION_HOOK)?;
        let program = wgpin_bpf_sys::load_tracing_program(&wgpin_bpf_sys::TracingProgram {
            name: programs::SESSION_HOOK,
            instructions: &instructions,
            license: c"GPL",
            attach_type: aya_obj::generated::bpf_attach_type::BPF_TRACE_FEXIT,
            attach_btf_id: facts.function_id,
            attach_btf_obj: module.as_fd(),
        })
        .map_err(|e| {
            format!(
                "the kernel refused the identity hook on {}: {e}",
                wgpin_common::SESSION_HOOK_FUNCTION
            )
        })?;
        let program_pin = self.paths.programs().join(programs::SESSION_HOOK);
        let _ = std::fs::remove_file(&program_pin);
        wgpin_bpf_sys::pin(program.as_fd(), &program_pin).map_err(|e| {
            format!(
                "pinning the identity hook at {}: {e}",
                program_pin.display()
            )
        })?;
        // The hook reads nothing until the layout is valid; write it before attaching.
        self.set_identity_layout(facts.layout)
            .map_err(|e| e.to_string())?;
        let mut fexit = aya::programs::FExit::from_pin(&program_pin)
            .map_err(|e| format!("adopting the identity hook from its pin: {e}"))?;
        let id = fexit.attach().map_err(|e| {
            format!(
                "attaching the identity hook to {} (BPF trampolines on module functions): {e}",
                wgpin_common::SESSION_HOOK_FUNCTION
            )
        })?;
        let link = FdLink::from(
            fexit
                .take_link(id)
                .map_err(|e| format!("taking the identity hook's link: {e}"))?,
        );
        let path = self.paths.session_hook_link();
        // An earlier agent's link goes only now: one of the two was attached at every moment.
        let _ = std::fs::remove_file(&path);
        let pinned = link.pin(&path).map_err(|e| {
            format!(
                "pinning the identity hook's link at {}: {e}",
                path.display()
            )
        })?;
        self.session_hook = Some(HeldLink::new(FdLink::from(pinned), path));
        tracing::info!(
            function = wgpin_common::SESSION_HOOK_FUNCTION,
            btf_id = facts.function_id,
            layout = ?facts.layout,
            "identity mode: session hook attached"
        );
        Ok(())
    }

    /// The instructions of one of the object's programs with its map references bound to the
    /// pinned maps (what aya does inside `Ebpf::load`, for a program it cannot load itself),
    /// and those maps, opened: keep them until the program is loaded.
    fn relocated(
        &self,
        name: &str,
    ) -> Result<(Vec<aya_obj::generated::bpf_insn>, Vec<MapData>), String> {
        use std::os::fd::{AsFd as _, AsRawFd as _};

        let mut object =
            aya_obj::Object::parse(OBJECT).map_err(|e| format!("parsing the eBPF object: {e}"))?;
        let definitions = object.maps.clone();
        let mut opened = Vec::new();
        for map in definitions.keys() {
            let data = MapData::from_pin(self.paths.map(map))
                .map_err(|e| format!("opening the pinned map {map}: {e}"))?;
            opened.push((map.clone(), data));
        }
        let text_sections = object
            .functions
            .keys()
            .map(|(section, _)| *section)
            .collect();
        object
            .relocate_maps(
                opened.iter().filter_map(|(map, data)| {
                    definitions
                        .get(map)
                        .map(|def| (map.as_str(), data.fd().as_fd().as_raw_fd(), def))
                }),
                &text_sections,
            )
            .map_err(|e| format!("relocating {name}: {e}"))?;
        object
            .relocate_calls(&text_sections)
            .map_err(|e| format!("relocating {name}'s calls: {e}"))?;
        let program = object
            .programs
            .get(name)
            .ok_or_else(|| format!("{name} is missing from the eBPF object"))?;
        let function = object
            .functions
            .get(&program.function_key())
            .ok_or_else(|| format!("{name}'s code is missing from the eBPF object"))?;
        let instructions = function.instructions.clone();
        Ok((
            instructions,
            opened.into_iter().map(|(_, data)| data).collect(),
        ))
    }

    fn verify_link(
        &self,
        hook: Hook,
        interface: &str,
        held: &HeldLink,
        ours: &BTreeMap<&'static str, u32>,
    ) -> Result<(), String> {
        let info: LinkInfo = held
            .link
            .info()
            .map_err(|e| format!("cannot read the link: {e}"))?;
        match PinnedLink::from_pin(&held.path) {
            Ok(pinned) => {
                let pinned_id = FdLink::from(pinned)
                    .info()
                    .map(|i| i.id())
                    .unwrap_or_default();
                if pinned_id != info.id() {
                    return Err(format!(
                        "the pin at {} now holds another link",
                        held.path.display()
                    ));
                }
            }
            Err(_) => {
                return Err(format!(
                    "the link is no longer pinned at {}",
                    held.path.display()
                ));
            }
        }
        let program_id = info.program_id();
        let attached = match hook {
            Hook::Xdp => netlink::xdp_program_id(interface)? == Some(program_id),
            Hook::Tc | Hook::Egress => {
                let direction = if hook == Hook::Tc {
                    TcAttachType::Ingress
                } else {
                    TcAttachType::Egress
                };
                let chain = SchedClassifier::query_tcx(interface, direction)
                    .map_err(|e| format!("cannot query tcx: {e}"))?
                    .1;
                match chain.iter().position(|p| p.id() == program_id) {
                    // A program before ours decides first: whatever it passes on for good
                    // (TC_ACT_OK) never meets the pin.
                    Some(at) if at > 0 => {
                        let ahead: Vec<String> = chain[..at]
                            .iter()
                            .map(|p| {
                                format!("{} ({})", p.id(), p.name_as_str().unwrap_or("unnamed"))
                            })
                            .collect();
                        return Err(format!(
                            "program(s) {} run before wgpin's in the tcx chain: what they accept skips the pin; wgpin attaches itself first again",
                            ahead.join(", ")
                        ));
                    }
                    found => found.is_some(),
                }
            }
        };
        if !attached {
            return Err(format!(
                "program {program_id} is no longer attached to the interface"
            ));
        }
        if held.maps_checked_for.get() == Some(program_id) {
            return Ok(());
        }
        let program = loaded_programs()
            .flatten()
            .find(|p| p.id() == program_id)
            .ok_or_else(|| format!("program {program_id} is gone"))?;
        let used = program
            .map_ids()
            .map_err(|e| format!("cannot read the program's maps: {e}"))?
            .unwrap_or_default();
        for (name, id) in ours.iter().filter(|(name, _)| hook.maps().contains(name)) {
            if !used.contains(id) {
                return Err(format!(
                    "the attached program does not use map {name} (id {id}) that this agent writes"
                ));
            }
        }
        held.maps_checked_for.set(Some(program_id));
        Ok(())
    }

    /// What the ports map and the allowlists hold now.
    pub fn read_state(&self) -> Result<FastPathState, FastPathError> {
        let mut state = FastPathState::default();
        for entry in self.maps.ports.iter() {
            let (key, value) = entry.map_err(map_err("reading the ports map"))?;
            state.ports.insert(key.port(), value);
        }
        read_pins(&self.maps.hosts_v4, &self.maps.allow_v4, &mut state.pins)?;
        read_pins(&self.maps.hosts_v6, &self.maps.allow_v6, &mut state.pins)?;
        read_peer_pins(&self.maps.peer_pins_v4, &mut state.peer_pins)?;
        read_peer_pins(&self.maps.peer_pins_v6, &mut state.peer_pins)?;
        for entry in self.maps.identity_keys.iter() {
            let (key, value) = entry.map_err(map_err("reading the identity keys"))?;
            state.identities.insert(
                PeerIdentity {
                    port: u16::from_be_bytes(key.port_be),
                    public_key: key.public_key,
                },
                value.peer_slot,
            );
        }
        Ok(state)
    }

    /// What the ports map and the allowlists pinned under `paths` hold, read without loading
    /// or pinning anything: for an observer beside a running agent (a test, a debugging tool),
    /// which must not touch the pins the agent manages.
    pub fn read_pinned(paths: &BpfPaths) -> Result<FastPathState, FastPathError> {
        let open = |name: &'static str| {
            let path = paths.map(name);
            MapData::from_pin(&path)
                .and_then(aya::maps::Map::from_map_data)
                .map_err(map_err(format!(
                    "opening the pinned map {}",
                    path.display()
                )))
        };
        let ports: HashMap<MapData, PortKey, PortEntry> =
            HashMap::try_from(open(maps::PORTS)?).map_err(map_err(maps::PORTS))?;
        let hosts_v4: HashMap<MapData, AllowV4, AllowEntry> =
            HashMap::try_from(open(maps::HOSTS_V4)?).map_err(map_err(maps::HOSTS_V4))?;
        let hosts_v6: HashMap<MapData, AllowV6, AllowEntry> =
            HashMap::try_from(open(maps::HOSTS_V6)?).map_err(map_err(maps::HOSTS_V6))?;
        let allow_v4: LpmTrie<MapData, AllowV4, AllowEntry> =
            LpmTrie::try_from(open(maps::ALLOW_V4)?).map_err(map_err(maps::ALLOW_V4))?;
        let allow_v6: LpmTrie<MapData, AllowV6, AllowEntry> =
            LpmTrie::try_from(open(maps::ALLOW_V6)?).map_err(map_err(maps::ALLOW_V6))?;
        let mut state = FastPathState::default();
        for entry in ports.iter() {
            let (key, value) = entry.map_err(map_err("reading the ports map"))?;
            state.ports.insert(key.port(), value);
        }
        read_pins(&hosts_v4, &allow_v4, &mut state.pins)?;
        read_pins(&hosts_v6, &allow_v6, &mut state.pins)?;
        Ok(state)
    }

    /// The session indices the identity hook recorded: (port, index) → peer slot.
    pub fn sessions(&self) -> Result<BTreeMap<(u16, u32), u32>, FastPathError> {
        let mut out = BTreeMap::new();
        for entry in self.maps.sessions.iter() {
            let (key, value) = entry.map_err(map_err("reading the sessions map"))?;
            out.insert(
                (u16::from_be_bytes(key.port_be), key.index),
                value.peer_slot,
            );
        }
        Ok(out)
    }

    /// Records a session as the identity hook would: for tests of the packet path on hosts
    /// where the hook cannot attach (no kernel WireGuard).
    pub fn record_session(
        &mut self,
        port: u16,
        index: u32,
        peer_slot: u32,
    ) -> Result<(), FastPathError> {
        let key = SessionKey {
            port_be: port.to_be_bytes(),
            _pad: [0; 2],
            index,
        };
        self.maps
            .sessions
            .insert(key, SessionEntry { peer_slot }, 0)
            .map_err(map_err(format!(
                "recording session {index:#x} on port {port}"
            )))
    }

    /// Tells the session hook where to find the fields it reads (identity mode).
    pub fn set_identity_layout(&mut self, layout: IdentityLayout) -> Result<(), FastPathError> {
        self.maps
            .identity_layout
            .set(0, layout, 0)
            .map_err(map_err("writing the identity layout"))
    }

    /// Identity mode's counters, summed over CPUs.
    pub fn identity_counters(&self) -> Result<IdentityCounters, FastPathError> {
        let values = self
            .maps
            .identity_counters
            .get(&0, 0)
            .map_err(map_err("reading the identity counters"))?;
        let mut total = IdentityCounters::default();
        for value in values.iter() {
            total.add(value);
        }
        Ok(total)
    }

    /// Brings the maps to `desired` with the writes [`plan`] orders; returns how many it made.
    pub fn apply(&mut self, desired: &FastPathState) -> Result<usize, FastPathError> {
        self.apply_ops(desired).map(|ops| ops.len())
    }

    /// Like [`FastPath::apply`], returning the writes made, in order.
    pub fn apply_ops(&mut self, desired: &FastPathState) -> Result<Vec<Op>, FastPathError> {
        let current = self.read_state()?;
        let ops = plan(&current, desired);
        for op in &ops {
            self.write(op)?;
        }
        Ok(ops)
    }

    fn write(&mut self, op: &Op) -> Result<(), FastPathError> {
        match *op {
            Op::PutPin(key, entry) => self.pin_write(key, Some(entry)),
            Op::DeletePin(key) => self.pin_write(key, None),
            Op::PutPort(port, entry) => self
                .maps
                .ports
                .insert(PortKey::new(port), entry, 0)
                .map_err(map_err(format!("managing port {port}"))),
            Op::DeletePort(port) => ignore_missing(self.maps.ports.remove(&PortKey::new(port)))
                .map_err(map_err(format!("releasing port {port}"))),
            Op::PutPeerPin(key) => self.peer_pin_write(key, true),
            Op::DeletePeerPin(key) => self.peer_pin_write(key, false),
            Op::PutIdentity(identity, peer_slot) => self
                .maps
                .identity_keys
                .insert(identity_key(&identity), SessionEntry { peer_slot }, 0)
                .map_err(map_err(format!(
                    "recording the identity of peer slot {peer_slot} on port {}",
                    identity.port
                ))),
            Op::DeleteIdentity(identity) => {
                ignore_missing(self.maps.identity_keys.remove(&identity_key(&identity))).map_err(
                    map_err(format!("removing an identity on port {}", identity.port)),
                )
            }
        }
    }

    fn peer_pin_write(&mut self, key: PeerPinKey, put: bool) -> Result<(), FastPathError> {
        let what = format!("pin {} of peer slot {}", key.prefix, key.peer_slot);
        let slot_be = key.peer_slot.to_be_bytes();
        let len = peer_pin_prefix_len(key.prefix.prefix_len());
        let entry = AllowEntry {
            peer_slot: key.peer_slot,
        };
        let maps = &mut self.maps;
        match key.prefix.network() {
            IpAddr::V4(addr) => {
                let key = Key::new(
                    len,
                    PeerPinV4 {
                        slot_be,
                        addr: addr.octets(),
                    },
                );
                if put {
                    maps.peer_pins_v4.insert(&key, entry, 0)
                } else {
                    ignore_missing(maps.peer_pins_v4.remove(&key))
                }
            }
            IpAddr::V6(addr) => {
                let key = Key::new(
                    len,
                    PeerPinV6 {
                        slot_be,
                        addr: addr.octets(),
                    },
                );
                if put {
                    maps.peer_pins_v6.insert(&key, entry, 0)
                } else {
                    ignore_missing(maps.peer_pins_v6.remove(&key))
                }
            }
        }
        .map_err(map_err(what))
    }

    fn pin_write(&mut self, key: PinKey, entry: Option<AllowEntry>) -> Result<(), FastPathError> {
        let what = format!("pin {} on port {}", key.prefix, key.port);
        let port_be = key.port.to_be_bytes();
        let len = key.prefix.prefix_len();
        let host = len == key.prefix.max_prefix_len();
        let maps = &mut self.maps;
        match key.prefix.network() {
            IpAddr::V4(addr) => {
                let data = AllowV4 {
                    port_be,
                    addr: addr.octets(),
                };
                write_pin(
                    &mut maps.hosts_v4,
                    &mut maps.allow_v4,
                    host,
                    data,
                    len,
                    entry,
                )
            }
            IpAddr::V6(addr) => {
                let data = AllowV6 {
                    port_be,
                    addr: addr.octets(),
                };
                write_pin(
                    &mut maps.hosts_v6,
                    &mut maps.allow_v6,
                    host,
                    data,
                    len,
                    entry,
                )
            }
        }
        .map_err(map_err(what))
    }

    /// Sets how many violations per CPU per second may produce events (the rest are counted).
    pub fn set_event_budget(&mut self, per_cpu_per_second: u64) -> Result<(), FastPathError> {
        let mut config = self
            .maps
            .config
            .get(&0, 0)
            .map_err(map_err("reading the config map"))?;
        config.events_per_cpu_per_second = per_cpu_per_second.max(1);
        self.maps
            .config
            .set(0, config, 0)
            .map_err(map_err("writing the event budget"))
    }

    /// Sets the least time between two violation events for one source.
    pub fn set_event_interval(
        &mut self,
        interval: std::time::Duration,
    ) -> Result<(), FastPathError> {
        let mut config = self
            .maps
            .config
            .get(&0, 0)
            .map_err(map_err("reading the config map"))?;
        config.event_interval_ns = u64::try_from(interval.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        self.maps
            .config
            .set(0, config, 0)
            .map_err(map_err("writing the event interval"))
    }

    fn counters_at(
        array: &PerCpuArray<MapData, Counters>,
        map: &str,
        slot: u32,
    ) -> Result<Counters, FastPathError> {
        let values = array
            .get(&slot, 0)
            .map_err(map_err(format!("reading {map}[{slot}]")))?;
        let mut total = Counters::default();
        for value in values.iter() {
            total.add(value);
        }
        Ok(total)
    }

    /// Packets and bytes for a port slot, summed over CPUs.
    pub fn port_counters(&self, slot: u32) -> Result<Counters, FastPathError> {
        Self::counters_at(&self.maps.port_counters, maps::PORT_COUNTERS, slot)
    }

    /// Packets and bytes for a peer slot, summed over CPUs.
    pub fn peer_counters(&self, slot: u32) -> Result<Counters, FastPathError> {
        Self::counters_at(&self.maps.peer_counters, maps::PEER_COUNTERS, slot)
    }

    /// The programs' own counters, summed over CPUs.
    pub fn global_counters(&self) -> Result<GlobalCounters, FastPathError> {
        let values = self
            .maps
            .global_counters
            .get(&0, 0)
            .map_err(map_err("reading the global counters"))?;
        let mut total = GlobalCounters::default();
        for value in values.iter() {
            total.add(value);
        }
        Ok(total)
    }

    /// Every violation event waiting in the ring buffer.
    pub fn drain_violations(&mut self) -> Vec<Violation> {
        let mut out = Vec::new();
        while let Some(item) = self.maps.violations.next() {
            if let Some(event) = ViolationEvent::from_bytes(&item) {
                out.push(Violation::from(event));
            }
        }
        out
    }

    /// The ring buffer's file descriptor, to wait for events (epoll, tokio `AsyncFd`).
    pub fn violations_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.maps.violations.as_fd()
    }

    /// Runs one of the loaded programs on `frame` with `BPF_PROG_TEST_RUN`, `repeat` times,
    /// without attaching it: returns the verdict and the kernel's mean time per run. For
    /// program-level tests and the per-packet cost benchmark.
    pub fn test_run(
        &self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), FastPathError> {
        use aya::programs::{TestRun, TestRunOptions};
        let mut out = vec![0u8; frame.len() + 256];
        let mut options = TestRunOptions::new();
        options.data_in = Some(frame);
        options.data_out = Some(&mut out);
        options.repeat = repeat.max(1);
        let what = format!("test run of the {hook} program");
        let result = match hook {
            Hook::Xdp => {
                let xdp: &Xdp = program_ref(&self.ebpf, programs::XDP)?;
                xdp.test_run(options)
            }
            Hook::Tc | Hook::Egress => {
                let tc: &SchedClassifier = program_ref(&self.ebpf, hook.program())?;
                tc.test_run(options)
            }
        }
        .map_err(prog_err(what))?;
        Ok((result.return_value, result.duration))
    }

    /// Removes every pinned object: programs detach, maps go with their last user. For tests
    /// and `wgpin-agent uninstall`; an agent that merely stops leaves everything in place.
    pub fn remove_all(mut self) -> Result<(), FastPathError> {
        let interfaces: Vec<String> = self.links.keys().map(|(_, i)| i.clone()).collect();
        for interface in interfaces {
            self.detach(&interface);
        }
        std::fs::remove_dir_all(self.paths.root()).map_err(|source| FastPathError::Io {
            path: self.paths.root().to_path_buf(),
            source,
        })
    }
}

/// An allowlist key: a port and a source address of one family.
trait AllowData: aya::Pod {
    fn port(&self) -> u16;
    fn address(&self) -> IpAddr;
}

impl AllowData for AllowV4 {
    fn port(&self) -> u16 {
        u16::from_be_bytes(self.port_be)
    }
    fn address(&self) -> IpAddr {
        IpAddr::from(self.addr)
    }
}

impl AllowData for AllowV6 {
    fn port(&self) -> u16 {
        u16::from_be_bytes(self.port_be)
    }
    fn address(&self) -> IpAddr {
        IpAddr::from(self.addr)
    }
}

/// Writes or removes one pin: a host pin in the exact-match hash, any other in the trie.
fn write_pin<K: AllowData>(
    hosts: &mut HashMap<MapData, K, AllowEntry>,
    trie: &mut LpmTrie<MapData, K, AllowEntry>,
    host: bool,
    data: K,
    len: u8,
    entry: Option<AllowEntry>,
) -> Result<(), aya::maps::MapError> {
    match (host, entry) {
        (true, Some(entry)) => hosts.insert(data, entry, 0),
        (true, None) => ignore_missing(hosts.remove(&data)),
        (false, Some(entry)) => trie.insert(&Key::new(allow_prefix_len(len), data), entry, 0),
        (false, None) => ignore_missing(trie.remove(&Key::new(allow_prefix_len(len), data))),
    }
}

/// Reads every pin of one family, from the hash (host pins) and the trie.
fn read_pins<K: AllowData>(
    hosts: &HashMap<MapData, K, AllowEntry>,
    trie: &LpmTrie<MapData, K, AllowEntry>,
    pins: &mut BTreeMap<PinKey, AllowEntry>,
) -> Result<(), FastPathError> {
    for entry in hosts.iter() {
        let (data, value) = entry.map_err(map_err("reading the host pins"))?;
        let address = data.address();
        let len = if address.is_ipv4() { 32 } else { 128 };
        if let Ok(prefix) = IpNet::new(address, len) {
            pins.insert(
                PinKey {
                    port: data.port(),
                    prefix,
                },
                value,
            );
        }
    }
    for entry in trie.iter() {
        let (key, value) = entry.map_err(map_err("reading the prefix pins"))?;
        let data = key.data();
        let len = key.prefix_len().saturating_sub(wgpin_common::PORT_BITS) as u8;
        if let Ok(prefix) = IpNet::new(data.address(), len) {
            pins.insert(
                PinKey {
                    port: data.port(),
                    prefix,
                },
                value,
            );
        }
    }
    Ok(())
}

/// tcx order for wgpin's programs: first in the chain, so nothing before them decides a packet.
fn first_in_tcx() -> aya::programs::tc::TcAttachOptions {
    aya::programs::tc::TcAttachOptions::TcxOrder(aya::programs::links::LinkOrder::first())
}

/// Every map already pinned under `paths` has the layout this agent's object declares: aya
/// reuses a pinned map by name without comparing, and a program loaded against a map of another
/// layout either fails the verifier with an obscure message or, worse, reads keys and values
/// wrongly.
fn check_pinned_layouts(paths: &BpfPaths) -> Result<(), FastPathError> {
    let object = aya_obj::Object::parse(OBJECT).map_err(|e| FastPathError::Attach {
        interface: String::new(),
        message: format!("the eBPF object does not parse ({e}); the agent binary is broken"),
    })?;
    for (name, map) in &object.maps {
        let path = paths.map(name);
        if !path.exists() {
            continue;
        }
        let pinned =
            MapInfo::from_pin(&path).map_err(map_err(format!("reading the pinned map {name}")))?;
        let layout = |kind: u32, key: u32, value: u32, max: u32| {
            format!("type {kind}, key {key} B, value {value} B, {max} entries")
        };
        let (theirs, ours) = (
            layout(
                pinned.map_type().map_or(u32::MAX, |t| t as u32),
                pinned.key_size(),
                pinned.value_size(),
                pinned.max_entries(),
            ),
            layout(
                map.map_type(),
                map.key_size(),
                map.value_size(),
                map.max_entries(),
            ),
        );
        if theirs != ours {
            return Err(FastPathError::IncompatiblePins {
                name: name.clone(),
                path,
                root: paths.root().to_path_buf(),
                pinned: theirs,
                ours,
            });
        }
    }
    Ok(())
}

/// A pinned link this agent holds is still the one at its pin, and its program still exists.
fn verify_pinned(held: &HeldLink) -> Result<(), String> {
    let info: LinkInfo = held
        .link
        .info()
        .map_err(|e| format!("cannot read the link: {e}"))?;
    let pinned = PinnedLink::from_pin(&held.path)
        .map_err(|_| format!("the link is no longer pinned at {}", held.path.display()))?;
    let pinned_id = FdLink::from(pinned)
        .info()
        .map(|i| i.id())
        .unwrap_or_default();
    if pinned_id != info.id() {
        return Err(format!(
            "the pin at {} now holds another link",
            held.path.display()
        ));
    }
    let program_id = info.program_id();
    if !loaded_programs().flatten().any(|p| p.id() == program_id) {
        return Err(format!("program {program_id} is gone"));
    }
    Ok(())
}

fn identity_key(identity: &PeerIdentity) -> IdentityKey {
    IdentityKey {
        port_be: identity.port.to_be_bytes(),
        _pad: [0; 2],
        public_key: identity.public_key,
    }
}

/// A per-peer pin key: a peer slot and an address of one family.
trait PeerPinData: aya::Pod {
    fn peer_slot(&self) -> u32;
    fn address(&self) -> IpAddr;
}

impl PeerPinData for PeerPinV4 {
    fn peer_slot(&self) -> u32 {
        u32::from_be_bytes(self.slot_be)
    }
    fn address(&self) -> IpAddr {
        IpAddr::from(self.addr)
    }
}

impl PeerPinData for PeerPinV6 {
    fn peer_slot(&self) -> u32 {
        u32::from_be_bytes(self.slot_be)
    }
    fn address(&self) -> IpAddr {
        IpAddr::from(self.addr)
    }
}

fn read_peer_pins<K: PeerPinData>(
    trie: &LpmTrie<MapData, K, AllowEntry>,
    pins: &mut std::collections::BTreeSet<PeerPinKey>,
) -> Result<(), FastPathError> {
    for entry in trie.iter() {
        let (key, _) = entry.map_err(map_err("reading the per-peer pins"))?;
        let data = key.data();
        let len = key.prefix_len().saturating_sub(wgpin_common::PEER_BITS) as u8;
        if let Ok(prefix) = IpNet::new(data.address(), len) {
            pins.insert(PeerPinKey {
                peer_slot: data.peer_slot(),
                prefix,
            });
        }
    }
    Ok(())
}

fn map_missing(name: &str) -> FastPathError {
    FastPathError::Attach {
        interface: String::new(),
        message: format!("{name} is missing from the eBPF object; the agent binary is broken"),
    }
}

fn program_ref<'a, T>(ebpf: &'a Ebpf, name: &str) -> Result<&'a T, FastPathError>
where
    &'a T: TryFrom<&'a aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program(name).ok_or_else(|| map_missing(name))?;
    program
        .try_into()
        .map_err(prog_err(format!("program {name}")))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, FastPathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or_else(|| map_missing(name))?;
    program
        .try_into()
        .map_err(prog_err(format!("program {name}")))
}

/// Removing what is already gone is success (idempotent deletes).
fn ignore_missing(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}
