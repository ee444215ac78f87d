//! What wgpin's eBPF programs and the agent share: map names and sizes, the `#[repr(C)]`
//! layouts of keys, values and events, and the packet parser itself.
//!
//! The parser ([`parse`]) is generic over [`Packet`], so the eBPF programs run exactly the code
//! the host unit tests exercise. Addresses and ports are stored big-endian as they appear on the
//! wire, so the kernel side copies them from the packet without conversion.

#![cfg_attr(not(test), no_std)]

#[cfg(any(test, feature = "craft"))]
pub mod craft;
pub mod parse;
#[cfg(test)]
mod parse_props;

pub use parse::{Packet, Parsed, SessionIndices, parse, session_indices};

/// Map names, shared so that the loader finds what the programs declare.
pub mod maps {
    /// Managed UDP ports: [`super::PortKey`] → [`super::PortEntry`].
    pub const PORTS: &str = "WGPIN_PORTS";
    /// IPv4 allowlist: LPM trie over [`super::AllowV4`] → [`super::AllowEntry`].
    pub const ALLOW_V4: &str = "WGPIN_ALLOW_V4";
    /// IPv6 allowlist: LPM trie over [`super::AllowV6`] → [`super::AllowEntry`].
    pub const ALLOW_V6: &str = "WGPIN_ALLOW_V6";
    /// IPv4 host pins (/32): exact-match hash over [`super::AllowV4`], looked up before the
    /// trie, so the common case costs the same whatever the number of pins.
    pub const HOSTS_V4: &str = "WGPIN_HOSTS_V4";
    /// IPv6 host pins (/128); see [`HOSTS_V4`].
    pub const HOSTS_V6: &str = "WGPIN_HOSTS_V6";
    /// Per-CPU counters per port slot.
    pub const PORT_COUNTERS: &str = "WGPIN_PORT_COUNTERS";
    /// Per-CPU counters per peer slot.
    pub const PEER_COUNTERS: &str = "WGPIN_PEER_COUNTERS";
    /// Per-CPU counters of the program itself ([`super::GlobalCounters`]), one entry.
    pub const GLOBAL_COUNTERS: &str = "WGPIN_GLOBAL_COUNTERS";
    /// Ring buffer of [`super::ViolationEvent`]s.
    pub const VIOLATIONS: &str = "WGPIN_VIOLATIONS";
    /// Per-source rate limit for violation events: [`super::SourceKey`] → [`super::RateState`].
    pub const RATE_LIMIT: &str = "WGPIN_RATE_LIMIT";
    /// Settings written by the agent ([`super::Config`]), one entry.
    pub const CONFIG: &str = "WGPIN_CONFIG";
    /// Per-CPU budget of violation events per second ([`super::EventBudget`]), one entry:
    /// checked before the per-source rate limit, so a flood from many sources costs a counter
    /// increment per packet, not a map insert.
    pub const EVENT_BUDGET: &str = "WGPIN_EVENT_BUDGET";
    /// Identity mode: which peer owns each local session index, written by the hook on
    /// `wg_index_hashtable_insert`: [`super::SessionKey`] → [`super::SessionEntry`] (LRU).
    pub const SESSIONS: &str = "WGPIN_SESSIONS";
    /// Identity mode: the peers whose sessions the hook records, by public key:
    /// [`super::IdentityKey`] → [`super::SessionEntry`]. Written by the agent.
    pub const IDENTITY_KEYS: &str = "WGPIN_IDENTITY_KEYS";
    /// Identity mode: each peer's own pin, IPv4: LPM trie over [`super::PeerPinV4`] →
    /// [`super::AllowEntry`].
    pub const PEER_PINS_V4: &str = "WGPIN_PEER_PINS_V4";
    /// Identity mode: each peer's own pin, IPv6; see [`PEER_PINS_V4`].
    pub const PEER_PINS_V6: &str = "WGPIN_PEER_PINS_V6";
    /// Identity mode: where the hook finds the fields it reads in the WireGuard module's
    /// structs ([`super::IdentityLayout`]), learned from the module's BTF; one entry.
    pub const IDENTITY_LAYOUT: &str = "WGPIN_IDENTITY_LAYOUT";
    /// Identity mode: per-CPU counters ([`super::IdentityCounters`]), one entry.
    pub const IDENTITY_COUNTERS: &str = "WGPIN_IDENTITY_COUNTERS";

    /// Every pinned map, for the loader's checks.
    pub const ALL: [&str; 18] = [
        PORTS,
        ALLOW_V4,
        ALLOW_V6,
        HOSTS_V4,
        HOSTS_V6,
        PORT_COUNTERS,
        PEER_COUNTERS,
        GLOBAL_COUNTERS,
        VIOLATIONS,
        RATE_LIMIT,
        CONFIG,
        EVENT_BUDGET,
        SESSIONS,
        IDENTITY_KEYS,
        PEER_PINS_V4,
        PEER_PINS_V6,
        IDENTITY_LAYOUT,
        IDENTITY_COUNTERS,
    ];
}

/// Program names (the eBPF functions).
pub mod programs {
    pub const XDP: &str = "wgpin_xdp";
    pub const TC: &str = "wgpin_tc";
    /// TC egress (identity mode): handshakes WireGuard sends for a peer to an address outside
    /// that peer's pin are dropped, so no session is established from there.
    pub const TC_EGRESS: &str = "wgpin_tc_egress";
    /// fexit on the WireGuard module's `wg_index_hashtable_insert` (identity mode).
    pub const SESSION_HOOK: &str = "wgpin_session_hook";
}

/// The WireGuard module function the identity hook attaches to (fexit): every local session
/// index, for a handshake this side starts or answers, is created there, with its peer.
pub const SESSION_HOOK_FUNCTION: &str = "wg_index_hashtable_insert";

/// Most managed ports (one per peer in dedicated mode).
pub const MAX_PORTS: u32 = 16_384;
/// Most port slots; slot numbers index [`maps::PORT_COUNTERS`].
pub const MAX_PORT_SLOTS: u32 = MAX_PORTS;
/// Most peer slots; slot numbers index [`maps::PEER_COUNTERS`].
pub const MAX_PEER_SLOTS: u32 = 65_536;
/// Most prefixes in each allowlist.
pub const MAX_PREFIXES: u32 = 262_144;
/// Sources tracked by the event rate limit (least recently used ones are forgotten).
pub const MAX_RATE_SOURCES: u32 = 65_536;
/// Session indices the identity hook remembers (least recently used ones are forgotten; a
/// forgotten index is checked against the port's union of pins, as in shared mode). A peer has
/// at most a handful of live indices (a handshake and up to three keypairs).
pub const MAX_SESSIONS: u32 = 65_536;
/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const VIOLATIONS_BYTES: u32 = 256 * 1024;
/// Default interval between two events for the same source.
pub const DEFAULT_EVENT_INTERVAL_NS: u64 = 1_000_000_000;
/// Default number of violations per CPU per second that may reach the per-source rate limit
/// (and so the ring buffer); the rest are only counted.
pub const DEFAULT_EVENTS_PER_CPU_PER_SECOND: u64 = 1_000;
/// A peer slot that names no single peer: the prefix is shared, or the port is shared.
pub const NO_PEER: u32 = u32::MAX;

/// Prefix length of the port part of an allowlist key.
pub const PORT_BITS: u32 = 16;

/// Key of [`maps::PORTS`]: a UDP port, big-endian as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub port_be: [u8; 2],
}

impl PortKey {
    pub const fn new(port: u16) -> Self {
        Self {
            port_be: port.to_be_bytes(),
        }
    }

    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port_be)
    }
}

/// Value of [`maps::PORTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortEntry {
    /// Index into [`maps::PORT_COUNTERS`].
    pub port_slot: u32,
    /// The one peer allowed on this port (dedicated mode), or [`NO_PEER`].
    pub peer_slot: u32,
    /// [`PORT_IDENTITY`] or 0.
    pub flags: u32,
}

/// [`PortEntry::flags`]: the port runs in identity mode; messages that carry a session index
/// are checked against the pin of the peer that owns the session.
pub const PORT_IDENTITY: u32 = 1;

impl PortEntry {
    /// A dedicated port: only `peer_slot`'s sources.
    pub const fn dedicated(port_slot: u32, peer_slot: u32) -> Self {
        Self {
            port_slot,
            peer_slot,
            flags: 0,
        }
    }

    /// A shared port: the union of its peers' sources.
    pub const fn shared(port_slot: u32) -> Self {
        Self {
            port_slot,
            peer_slot: NO_PEER,
            flags: 0,
        }
    }

    /// A shared port where sessions are checked per peer.
    pub const fn identity(port_slot: u32) -> Self {
        Self {
            port_slot,
            peer_slot: NO_PEER,
            flags: PORT_IDENTITY,
        }
    }

    pub const fn is_identity(&self) -> bool {
        self.flags & PORT_IDENTITY != 0
    }
}

/// Allowlist key data for IPv4: the managed port then the source address, both big-endian.
/// The LPM prefix length counts [`PORT_BITS`] for the port plus the source prefix length, so one
/// trie holds every port's pins and a lookup only ever matches its own port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowV4 {
    pub port_be: [u8; 2],
    pub addr: [u8; 4],
}

/// Allowlist key data for IPv6; see [`AllowV4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowV6 {
    pub port_be: [u8; 2],
    pub addr: [u8; 16],
}

/// Key of [`maps::SESSIONS`]: a session index WireGuard chose, on the port of its device.
/// `index` is the 4 bytes of the wire (and of the kernel's `__le32`) read as a native `u32`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub port_be: [u8; 2],
    pub _pad: [u8; 2],
    pub index: u32,
}

/// Value of [`maps::SESSIONS`] and [`maps::IDENTITY_KEYS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionEntry {
    pub peer_slot: u32,
}

/// Key of [`maps::IDENTITY_KEYS`]: a peer's public key on the port of its device.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey {
    pub port_be: [u8; 2],
    pub _pad: [u8; 2],
    pub public_key: [u8; 32],
}

/// Per-peer pin key data for IPv4: the peer slot (big-endian, so the trie's prefix starts
/// with it) then the address. The prefix length counts [`PEER_BITS`] plus the source prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerPinV4 {
    pub slot_be: [u8; 4],
    pub addr: [u8; 4],
}

/// Per-peer pin key data for IPv6; see [`PeerPinV4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerPinV6 {
    pub slot_be: [u8; 4],
    pub addr: [u8; 16],
}

/// Prefix length of the slot part of a per-peer pin key.
pub const PEER_BITS: u32 = 32;

/// LPM prefix length of a source prefix of `len` bits in one peer's pin.
pub const fn peer_pin_prefix_len(len: u8) -> u32 {
    PEER_BITS + len as u32
}

/// Value of [`maps::IDENTITY_LAYOUT`]: byte offsets in the WireGuard module's structs, read
/// from its BTF by the agent (`index_hashtable_entry.peer`, `wg_peer.device`,
/// `wg_device.incoming_port`, `wg_peer.handshake.remote_static`). The hook does nothing while
/// `valid` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityLayout {
    pub entry_peer: u32,
    pub peer_device: u32,
    pub device_port: u32,
    pub peer_public_key: u32,
    pub valid: u32,
    pub _pad: u32,
}

/// What identity mode counts (per CPU in the map; the agent sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityCounters {
    /// Session indices recorded for a managed peer.
    pub sessions_learned: u64,
    /// Session indices of devices or peers identity mode does not manage.
    pub sessions_ignored: u64,
    /// Hook runs that could not read a field (the layout does not fit this kernel).
    pub read_errors: u64,
    /// Packets on an identity port whose session index the hook never saw (judged by the
    /// port's union of pins, as in shared mode).
    pub unknown_sessions: u64,
    /// Packets of a known session from a source outside its peer's pin (dropped on ingress).
    pub ingress_dropped: u64,
    /// Handshakes WireGuard sent for a peer to an address outside its pin (dropped on egress).
    pub egress_dropped: u64,
}

impl IdentityCounters {
    /// Adds another CPU's counts.
    pub fn add(&mut self, other: &Self) {
        self.sessions_learned = self.sessions_learned.wrapping_add(other.sessions_learned);
        self.sessions_ignored = self.sessions_ignored.wrapping_add(other.sessions_ignored);
        self.read_errors = self.read_errors.wrapping_add(other.read_errors);
        self.unknown_sessions = self.unknown_sessions.wrapping_add(other.unknown_sessions);
        self.ingress_dropped = self.ingress_dropped.wrapping_add(other.ingress_dropped);
        self.egress_dropped = self.egress_dropped.wrapping_add(other.egress_dropped);
    }
}

/// LPM prefix length of a source prefix of `len` bits on a port.
pub const fn allow_prefix_len(len: u8) -> u32 {
    PORT_BITS + len as u32
}

/// Value of the allowlists.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowEntry {
    /// The peer whose pin this prefix is, or [`NO_PEER`] when several peers share it.
    pub peer_slot: u32,
}

/// Packet and byte counts, per CPU in the maps; the agent sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub allowed_packets: u64,
    pub allowed_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

impl Counters {
    /// Adds another CPU's counts.
    pub fn add(&mut self, other: &Self) {
        self.allowed_packets = self.allowed_packets.wrapping_add(other.allowed_packets);
        self.allowed_bytes = self.allowed_bytes.wrapping_add(other.allowed_bytes);
        self.dropped_packets = self.dropped_packets.wrapping_add(other.dropped_packets);
        self.dropped_bytes = self.dropped_bytes.wrapping_add(other.dropped_bytes);
    }
    /// What is left of these counts after `other`'s (never below zero).
    pub fn saturating_sub(&self, other: &Self) -> Self {
        Self {
            allowed_packets: self.allowed_packets.saturating_sub(other.allowed_packets),
            allowed_bytes: self.allowed_bytes.saturating_sub(other.allowed_bytes),
            dropped_packets: self.dropped_packets.saturating_sub(other.dropped_packets),
            dropped_bytes: self.dropped_bytes.saturating_sub(other.dropped_bytes),
        }
    }
}

/// What the programs count about themselves.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalCounters {
    /// Violation events written to the ring buffer.
    pub events_sent: u64,
    /// Violations folded into a later event by the per-source rate limit.
    pub events_rate_limited: u64,
    /// Violations whose event found the ring buffer full.
    pub events_lost: u64,
    /// Packets dropped because they could hide UDP to a managed port from the parser (a tiny
    /// first fragment, an over-long IPv6 extension-header chain).
    pub unparseable_dropped: u64,
}

impl GlobalCounters {
    /// Adds another CPU's counts.
    pub fn add(&mut self, other: &Self) {
        self.events_sent = self.events_sent.wrapping_add(other.events_sent);
        self.events_rate_limited = self
            .events_rate_limited
            .wrapping_add(other.events_rate_limited);
        self.events_lost = self.events_lost.wrapping_add(other.events_lost);
        self.unparseable_dropped = self
            .unparseable_dropped
            .wrapping_add(other.unparseable_dropped);
    }
}

/// IP version numbers as stored in events and keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Key of [`maps::RATE_LIMIT`]: a source address (IPv4 in the first 4 bytes) and the peer a
/// violation is attributed to, so one source breaking two peers' pins is reported for each.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
    pub peer_slot: u32,
}

/// Value of [`maps::RATE_LIMIT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    /// When the last event for this source was sent (`bpf_ktime_get_boot_ns`).
    pub last_event_ns: u64,
    /// Violations since then that sent no event.
    pub suppressed: u64,
}

/// [`ViolationEvent::kind`]: a packet for a managed port from a source outside its pin.
pub const VIOLATION_SOURCE: u8 = 0;
/// [`ViolationEvent::kind`] (identity mode): a packet of a peer's session from a source
/// outside that peer's pin.
pub const VIOLATION_SESSION: u8 = 1;
/// [`ViolationEvent::kind`] (identity mode): a handshake WireGuard sent for a peer to an
/// address outside that peer's pin (someone used the peer's key from there). The event's
/// source is that address and its ports are the remote's and the managed one.
pub const VIOLATION_HANDSHAKE_OUT: u8 = 2;

/// A packet for a managed port from a source outside its pin.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViolationEvent {
    /// `bpf_ktime_get_boot_ns` (CLOCK_BOOTTIME) when it was seen.
    pub time_ns: u64,
    /// Violations from this source that the rate limit folded into this event.
    pub suppressed: u64,
    pub src_addr: [u8; 16],
    pub family: u8,
    /// What was violated: [`VIOLATION_SOURCE`], [`VIOLATION_SESSION`] or
    /// [`VIOLATION_HANDSHAKE_OUT`].
    pub kind: u8,
    pub src_port_be: [u8; 2],
    pub dst_port_be: [u8; 2],
    pub _pad2: [u8; 2],
    pub port_slot: u32,
    /// The peer the violation is attributed to: the port's own peer in dedicated mode, the
    /// session's peer in identity mode, else [`NO_PEER`].
    pub peer_slot: u32,
    /// Length of the dropped packet.
    pub packet_len: u32,
    pub _pad3: [u8; 4],
}

impl ViolationEvent {
    /// Size of an event in the ring buffer.
    pub const SIZE: usize = core::mem::size_of::<Self>();

    /// Decodes an event from ring-buffer bytes (native endianness, `#[repr(C)]` layout).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < Self::SIZE {
            return None;
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_ne_bytes(b)
        };
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at..at + 4]);
            u32::from_ne_bytes(b)
        };
        let mut src_addr = [0u8; 16];
        src_addr.copy_from_slice(&bytes[16..32]);
        Some(Self {
            time_ns: u64_at(0),
            suppressed: u64_at(8),
            src_addr,
            family: bytes[32],
            kind: bytes[33],
            src_port_be: [bytes[34], bytes[35]],
            dst_port_be: [bytes[36], bytes[37]],
            _pad2: [0; 2],
            port_slot: u32_at(40),
            peer_slot: u32_at(44),
            packet_len: u32_at(48),
            _pad3: [0; 4],
        })
    }
}

/// Value of [`maps::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Least time between two events for one source; 0 means [`DEFAULT_EVENT_INTERVAL_NS`].
    pub event_interval_ns: u64,
    /// Violations per CPU per second that may produce events; 0 means
    /// [`DEFAULT_EVENTS_PER_CPU_PER_SECOND`].
    pub events_per_cpu_per_second: u64,
}

/// Value of [`maps::EVENT_BUDGET`] (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// Start of the current one-second window (`bpf_ktime_get_boot_ns`).
    pub window_start_ns: u64,
    /// Violations that went on to the per-source rate limit in this window.
    pub used: u64,
    /// Violations past the budget in this window (every 1024th reads the clock).
    pub over: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offsets in `from_bytes` follow the `#[repr(C)]` layout the kernel side writes.
    #[test]
    fn violation_event_layout_round_trips() {
        assert_eq!(ViolationEvent::SIZE, 56);
        let event = ViolationEvent {
            time_ns: 0x0102_0304_0506_0708,
            suppressed: 9,
            src_addr: [7; 16],
            family: FAMILY_V6,
            kind: VIOLATION_SESSION,
            src_port_be: 51821u16.to_be_bytes(),
            dst_port_be: 51820u16.to_be_bytes(),
            _pad2: [0; 2],
            port_slot: 3,
            peer_slot: NO_PEER,
            packet_len: 148,
            _pad3: [0; 4],
        };
        // SAFETY: a plain #[repr(C)] value viewed as its bytes, as the ring buffer holds it.
        #[allow(unsafe_code)]
        let bytes: [u8; ViolationEvent::SIZE] = unsafe { core::mem::transmute(event) };
        assert_eq!(ViolationEvent::from_bytes(&bytes), Some(event));
        assert_eq!(ViolationEvent::from_bytes(&bytes[..40]), None);
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain data with no padding the kernel could leak
    // uninitialised into userspace reads (the explicit `_pad` fields are zeroed by writers).
    #[allow(unsafe_code)]
    mod impls {
        use crate::*;
        unsafe impl aya::Pod for PortKey {}
        unsafe impl aya::Pod for PortEntry {}
        unsafe impl aya::Pod for AllowV4 {}
        unsafe impl aya::Pod for AllowV6 {}
        unsafe impl aya::Pod for AllowEntry {}
        unsafe impl aya::Pod for Counters {}
        unsafe impl aya::Pod for GlobalCounters {}
        unsafe impl aya::Pod for SourceKey {}
        unsafe impl aya::Pod for RateState {}
        unsafe impl aya::Pod for ViolationEvent {}
        unsafe impl aya::Pod for Config {}
        unsafe impl aya::Pod for EventBudget {}
        unsafe impl aya::Pod for SessionKey {}
        unsafe impl aya::Pod for SessionEntry {}
        unsafe impl aya::Pod for IdentityKey {}
        unsafe impl aya::Pod for PeerPinV4 {}
        unsafe impl aya::Pod for PeerPinV6 {}
        unsafe impl aya::Pod for IdentityLayout {}
        unsafe impl aya::Pod for IdentityCounters {}
    }
}
