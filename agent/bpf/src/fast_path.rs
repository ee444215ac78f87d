use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::{bpf_ktime_get_boot_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::{classifier, fexit, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{FExitContext, TcContext, XdpContext},
};
use wgpin_common::{
    AllowEntry, AllowV4, AllowV6, Config, Counters, DEFAULT_EVENT_INTERVAL_NS,
    DEFAULT_EVENTS_PER_CPU_PER_SECOND, EventBudget, FAMILY_V4, GlobalCounters, IdentityCounters,
    IdentityKey, IdentityLayout, MAX_PEER_SLOTS, MAX_PORT_SLOTS, MAX_PORTS, MAX_PREFIXES,
    MAX_RATE_SOURCES, MAX_SESSIONS, NO_PEER, Packet, Parsed, PeerPinV4, PeerPinV6, PortEntry,
    PortKey, RateState, SessionEntry, SessionKey, SourceKey, VIOLATION_HANDSHAKE_OUT,
    VIOLATION_SESSION, VIOLATION_SOURCE, VIOLATIONS_BYTES, ViolationEvent, allow_prefix_len, parse,
    parse::Udp, peer_pin_prefix_len, session_indices,
};

// Every map is pinned by name, so a restarted or upgraded agent reuses it (and its contents).
#[map(name = "WGPIN_PORTS")]
static PORTS: HashMap<PortKey, PortEntry> = HashMap::pinned(MAX_PORTS, 0);
#[map(name = "WGPIN_ALLOW_V4")]
static ALLOW_V4: LpmTrie<AllowV4, AllowEntry> = LpmTrie::pinned(MAX_PREFIXES, 0);
#[map(name = "WGPIN_ALLOW_V6")]
static ALLOW_V6: LpmTrie<AllowV6, AllowEntry> = LpmTrie::pinned(MAX_PREFIXES, 0);
// Host pins (/32, /128) live in hashes, looked up first: an exact match is the longest prefix
// there is, and a hash lookup costs the same for 1 or 100,000 pins. The tries hold the rest.
#[map(name = "WGPIN_HOSTS_V4")]
static HOSTS_V4: HashMap<AllowV4, AllowEntry> = HashMap::pinned(MAX_PREFIXES, BPF_F_NO_PREALLOC);
#[map(name = "WGPIN_HOSTS_V6")]
static HOSTS_V6: HashMap<AllowV6, AllowEntry> = HashMap::pinned(MAX_PREFIXES, BPF_F_NO_PREALLOC);
#[map(name = "WGPIN_PORT_COUNTERS")]
static PORT_COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_PORT_SLOTS, 0);
#[map(name = "WGPIN_PEER_COUNTERS")]
static PEER_COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_PEER_SLOTS, 0);
#[map(name = "WGPIN_GLOBAL_COUNTERS")]
static GLOBAL_COUNTERS: PerCpuArray<GlobalCounters> = PerCpuArray::pinned(1, 0);
#[map(name = "WGPIN_VIOLATIONS")]
static VIOLATIONS: RingBuf = RingBuf::pinned(VIOLATIONS_BYTES, 0);
#[map(name = "WGPIN_RATE_LIMIT")]
static RATE_LIMIT: LruHashMap<SourceKey, RateState> = LruHashMap::pinned(MAX_RATE_SOURCES, 0);
#[map(name = "WGPIN_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map(name = "WGPIN_EVENT_BUDGET")]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);
#[map(name = "WGPIN_SESSIONS")]
static SESSIONS: LruHashMap<SessionKey, SessionEntry> = LruHashMap::pinned(MAX_SESSIONS, 0);
#[map(name = "WGPIN_IDENTITY_KEYS")]
static IDENTITY_KEYS: HashMap<IdentityKey, SessionEntry> =
    HashMap::pinned(MAX_PEER_SLOTS, BPF_F_NO_PREALLOC);
#[map(name = "WGPIN_PEER_PINS_V4")]
static PEER_PINS_V4: LpmTrie<PeerPinV4, AllowEntry> = LpmTrie::pinned(MAX_PREFIXES, 0);
#[map(name = "WGPIN_PEER_PINS_V6")]
static PEER_PINS_V6: LpmTrie<PeerPinV6, AllowEntry> = LpmTrie::pinned(MAX_PREFIXES, 0);
#[map(name = "WGPIN_IDENTITY_LAYOUT")]
static IDENTITY_LAYOUT: Array<IdentityLayout> = Array::pinned(1, 0);
#[map(name = "WGPIN_IDENTITY_COUNTERS")]
static IDENTITY_COUNTERS: PerCpuArray<IdentityCounters> = PerCpuArray::pinned(1, 0);

/// Bytes of headers the TC program makes linear before parsing (Ethernet, VLANs, IPv6 with
/// extension headers, UDP ports).
const TC_PULL_LEN: u32 = 512;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
}

/// Packet data between `data` and `data_end`, read with the bounds check the verifier needs.
struct Data {
    start: usize,
    end: usize,
}

impl Packet for Data {
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let at = self.start + offset;
        if at + N > self.end {
            return None;
        }
        // SAFETY: [at, at + N) lies inside the packet, checked just above.
        Some(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) })
    }
}

#[xdp]
pub fn wgpin_xdp(ctx: XdpContext) -> u32 {
    let data = Data {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let len = (data.end - data.start) as u32;
    match decide(&data, len) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// The headers of a TC packet made linear (up to [`TC_PULL_LEN`]), and the packet's length.
#[inline(always)]
fn linear_headers(ctx: &TcContext) -> (Data, u32) {
    let len = ctx.len();
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let wanted = if len < TC_PULL_LEN { len } else { TC_PULL_LEN };
    if linear < wanted {
        // Best effort: if it fails, a header left outside the linear data reads as truncated.
        let _ = ctx.pull_data(wanted);
    }
    let data = Data {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    (data, len)
}

#[classifier]
pub fn wgpin_tc(ctx: TcContext) -> i32 {
    let (data, len) = linear_headers(&ctx);
    match decide(&data, len) {
        // TCX_NEXT: let any later tcx program have its say.
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT as i32,
    }
}

/// Egress on the underlay (identity mode): a handshake WireGuard sends from an identity port
/// for a peer, to an address outside that peer's pin, is dropped and reported against the peer.
/// That is how a stolen key used from another pinned peer's address gets no session: the
/// initiation cannot be told apart on the wire (its sender is encrypted), but WireGuard's answer
/// carries an index the session hook has tied to the peer.
#[classifier]
pub fn wgpin_tc_egress(ctx: TcContext) -> i32 {
    let (data, len) = linear_headers(&ctx);
    match check_egress(&data, len) {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT as i32,
    }
}

#[inline(always)]
fn check_egress(data: &Data, len: u32) -> Verdict {
    let Parsed::Udp(udp) = parse(data) else {
        return Verdict::Pass;
    };
    // SAFETY: the value is copied out at once.
    let Some(port) = (unsafe {
        PORTS.get(&PortKey {
            port_be: udp.src_port_be,
        })
    })
    .copied() else {
        return Verdict::Pass;
    };
    if !port.is_identity() {
        return Verdict::Pass;
    }
    // Initiations and responses carry this side's (sender) index first.
    let Some(sender) = session_indices(data, &udp).and_then(|m| m.sender) else {
        return Verdict::Pass;
    };
    let Some(peer_slot) = session_owner(udp.src_port_be, sender) else {
        return Verdict::Pass;
    };
    if in_peer_pin(peer_slot, udp.family, &udp.dst) {
        return Verdict::Pass;
    }
    bump_identity(|c| &mut c.egress_dropped);
    count(&PORT_COUNTERS, port.port_slot, len, Verdict::Drop);
    count(&PEER_COUNTERS, peer_slot, len, Verdict::Drop);
    report(
        &Offender {
            addr: udp.dst,
            family: udp.family,
            remote_port_be: udp.dst_port_be,
            local_port_be: udp.src_port_be,
            kind: VIOLATION_HANDSHAKE_OUT,
        },
        port.port_slot,
        peer_slot,
        len,
    );
    Verdict::Drop
}

/// The peer that owns session `index` on `port_be`, as the session hook recorded it.
#[inline(always)]
fn session_owner(port_be: [u8; 2], index: u32) -> Option<u32> {
    let key = SessionKey {
        port_be,
        _pad: [0; 2],
        index,
    };
    // SAFETY: the value is copied out at once.
    unsafe { SESSIONS.get(&key) }.map(|entry| entry.peer_slot)
}

/// Whether `addr` lies in the pin of the peer in `peer_slot`.
#[inline(always)]
fn in_peer_pin(peer_slot: u32, family: u8, addr: &[u8; 16]) -> bool {
    let slot_be = peer_slot.to_be_bytes();
    if family == FAMILY_V4 {
        let data = PeerPinV4 {
            slot_be,
            addr: [addr[0], addr[1], addr[2], addr[3]],
        };
        PEER_PINS_V4
            .get(&Key::new(peer_pin_prefix_len(32), data))
            .is_some()
    } else {
        let data = PeerPinV6 {
            slot_be,
            addr: *addr,
        };
        PEER_PINS_V6
            .get(&Key::new(peer_pin_prefix_len(128), data))
            .is_some()
    }
}

#[inline(always)]
fn bump_identity(field: fn(&mut IdentityCounters) -> &mut u64) {
    if let Some(counters) = IDENTITY_COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        *field(unsafe { &mut *counters }) += 1;
    }
}

/// fexit on `wg_index_hashtable_insert(table, entry) -> __le32 index`: WireGuard just gave
/// `entry` (a handshake it starts or answers, or a keypair) a session index. Records which
/// managed peer owns it, found by the peer's public key on its device's port. Field offsets
/// come from the module's BTF through [`IDENTITY_LAYOUT`]; every read is a checked probe read,
/// so a layout that does not fit is counted, never a fault.
#[fexit(function = "wg_index_hashtable_insert")]
pub fn wgpin_session_hook(ctx: FExitContext) -> i32 {
    if learn_session(&ctx).is_err() {
        bump_identity(|c| &mut c.read_errors);
    }
    0
}

#[inline(always)]
fn learn_session(ctx: &FExitContext) -> Result<(), i32> {
    let Some(layout) = IDENTITY_LAYOUT.get(0).copied() else {
        return Ok(());
    };
    if layout.valid == 0 {
        return Ok(());
    }
    // Arguments then the return value, each one 8-byte slot.
    let entry: u64 = ctx.arg(1);
    let index: u64 = ctx.arg(2);
    // SAFETY: checked kernel reads (bpf_probe_read_kernel): a bad address returns an error.
    let peer: u64 =
        unsafe { bpf_probe_read_kernel((entry + u64::from(layout.entry_peer)) as *const u64)? };
    // SAFETY: as above.
    let device: u64 =
        unsafe { bpf_probe_read_kernel((peer + u64::from(layout.peer_device)) as *const u64)? };
    // SAFETY: as above.
    let port: u16 =
        unsafe { bpf_probe_read_kernel((device + u64::from(layout.device_port)) as *const u16)? };
    let mut identity = IdentityKey {
        port_be: port.to_be_bytes(),
        _pad: [0; 2],
        public_key: [0; 32],
    };
    // SAFETY: as above; the destination is a 32-byte buffer.
    unsafe {
        bpf_probe_read_kernel_buf(
            (peer + u64::from(layout.peer_public_key)) as *const u8,
            &mut identity.public_key,
        )?
    };
    // SAFETY: the value is copied out at once.
    let Some(owner) = (unsafe { IDENTITY_KEYS.get(&identity) }).copied() else {
        bump_identity(|c| &mut c.sessions_ignored);
        return Ok(());
    };
    let key = SessionKey {
        port_be: identity.port_be,
        _pad: [0; 2],
        index: index as u32,
    };
    SESSIONS.insert(&key, &owner, 0).map_err(|e| e as i32)?;
    bump_identity(|c| &mut c.sessions_learned);
    Ok(())
}

#[inline(always)]
fn decide(data: &Data, len: u32) -> Verdict {
    match parse(data) {
        Parsed::NotUdp | Parsed::LaterFragment => Verdict::Pass,
        Parsed::Unparseable => {
            if let Some(global) = GLOBAL_COUNTERS.get_ptr_mut(0) {
                // SAFETY: per-CPU value, no concurrent writer on this CPU.
                unsafe { (*global).unparseable_dropped += 1 };
            }
            Verdict::Drop
        }
        Parsed::Udp(udp) => check_udp(data, &udp, len),
    }
}

/// Identity mode, a message that names one of this side's sessions (response, cookie reply,
/// data): the session's peer, if the hook recorded it. Initiations name none.
#[inline(always)]
fn identity_owner(data: &Data, udp: &Udp) -> Option<u32> {
    let receiver = session_indices(data, udp)?.receiver?;
    let owner = session_owner(udp.dst_port_be, receiver);
    if owner.is_none() {
        bump_identity(|c| &mut c.unknown_sessions);
    }
    owner
}

#[inline(always)]
fn check_udp(data: &Data, udp: &Udp, len: u32) -> Verdict {
    // SAFETY: the value is copied out at once.
    let Some(port) = (unsafe {
        PORTS.get(&PortKey {
            port_be: udp.dst_port_be,
        })
    })
    .copied() else {
        return Verdict::Pass;
    };
    if port.is_identity()
        && let Some(peer_slot) = identity_owner(data, udp)
    {
        // The session's own peer decides, not the port's union of pins.
        if in_peer_pin(peer_slot, udp.family, &udp.src) {
            count(&PORT_COUNTERS, port.port_slot, len, Verdict::Pass);
            count(&PEER_COUNTERS, peer_slot, len, Verdict::Pass);
            return Verdict::Pass;
        }
        bump_identity(|c| &mut c.ingress_dropped);
        count(&PORT_COUNTERS, port.port_slot, len, Verdict::Drop);
        count(&PEER_COUNTERS, peer_slot, len, Verdict::Drop);
        report(
            &Offender::source(udp, VIOLATION_SESSION),
            port.port_slot,
            peer_slot,
            len,
        );
        return Verdict::Drop;
    }
    let allowed = if udp.family == FAMILY_V4 {
        let data = AllowV4 {
            port_be: udp.dst_port_be,
            addr: [udp.src[0], udp.src[1], udp.src[2], udp.src[3]],
        };
        // SAFETY: the value is copied out at once.
        match unsafe { HOSTS_V4.get(&data) } {
            Some(entry) => Some(*entry),
            None => ALLOW_V4.get(&Key::new(allow_prefix_len(32), data)).copied(),
        }
    } else {
        let data = AllowV6 {
            port_be: udp.dst_port_be,
            addr: udp.src,
        };
        // SAFETY: the value is copied out at once.
        match unsafe { HOSTS_V6.get(&data) } {
            Some(entry) => Some(*entry),
            None => ALLOW_V6
                .get(&Key::new(allow_prefix_len(128), data))
                .copied(),
        }
    };
    match allowed {
        Some(entry) => {
            count(&PORT_COUNTERS, port.port_slot, len, Verdict::Pass);
            let peer = if entry.peer_slot != NO_PEER {
                entry.peer_slot
            } else {
                port.peer_slot
            };
            if peer != NO_PEER {
                count(&PEER_COUNTERS, peer, len, Verdict::Pass);
            }
            Verdict::Pass
        }
        None => {
            count(&PORT_COUNTERS, port.port_slot, len, Verdict::Drop);
            if port.peer_slot != NO_PEER {
                count(&PEER_COUNTERS, port.peer_slot, len, Verdict::Drop);
            }
            report(
                &Offender::source(udp, VIOLATION_SOURCE),
                port.port_slot,
                port.peer_slot,
                len,
            );
            Verdict::Drop
        }
    }
}

#[inline(always)]
fn count(map: &PerCpuArray<Counters>, slot: u32, len: u32, verdict: Verdict) {
    let Some(counters) = map.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    let counters = unsafe { &mut *counters };
    match verdict {
        Verdict::Pass => {
            counters.allowed_packets += 1;
            counters.allowed_bytes += u64::from(len);
        }
        Verdict::Drop => {
            counters.dropped_packets += 1;
            counters.dropped_bytes += u64::from(len);
        }
    }
}

#[inline(always)]
fn bump_global(field: fn(&mut GlobalCounters) -> &mut u64) {
    if let Some(global) = GLOBAL_COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        *field(unsafe { &mut *global }) += 1;
    }
}

/// Who broke a pin: the remote address and port, and the managed port.
struct Offender {
    addr: [u8; 16],
    family: u8,
    remote_port_be: [u8; 2],
    local_port_be: [u8; 2],
    kind: u8,
}

impl Offender {
    /// The sender of an incoming packet.
    #[inline(always)]
    fn source(udp: &Udp, kind: u8) -> Self {
        Self {
            addr: udp.src,
            family: udp.family,
            remote_port_be: udp.src_port_be,
            local_port_be: udp.dst_port_be,
            kind,
        }
    }
}

/// Sends a violation event, at most one per source and peer per interval; the ones in between
/// are counted and carried by the next event.
#[inline(always)]
fn report(offender: &Offender, port_slot: u32, peer_slot: u32, len: u32) {
    let config = CONFIG.get(0).copied().unwrap_or_default();
    let budget = if config.events_per_cpu_per_second != 0 {
        config.events_per_cpu_per_second
    } else {
        DEFAULT_EVENTS_PER_CPU_PER_SECOND
    };
    // A per-CPU budget first: past it, a flood costs a counter increment per packet, not a
    // clock read and an insert into the (shared, locked) per-source map. Only every 1024th
    // packet over the budget reads the clock, to open the next one-second window.
    let Some(window) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    let window = unsafe { &mut *window };
    if window.used >= budget {
        window.over += 1;
        if window.over & 1023 != 0 {
            bump_global(|g| &mut g.events_rate_limited);
            return;
        }
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if now.wrapping_sub(window.window_start_ns) >= 1_000_000_000 {
        window.window_start_ns = now;
        window.used = 0;
        window.over = 0;
    }
    if window.used >= budget {
        bump_global(|g| &mut g.events_rate_limited);
        return;
    }
    window.used += 1;
    let interval = if config.event_interval_ns != 0 {
        config.event_interval_ns
    } else {
        DEFAULT_EVENT_INTERVAL_NS
    };
    let source = SourceKey {
        addr: offender.addr,
        family: offender.family,
        _pad: [0; 3],
        peer_slot,
    };
    let mut suppressed = 0;
    match RATE_LIMIT.get_ptr_mut(&source) {
        Some(state) => {
            // SAFETY: a map value pointer; races between CPUs only blur the folded count.
            let state = unsafe { &mut *state };
            if now.wrapping_sub(state.last_event_ns) < interval {
                state.suppressed += 1;
                bump_global(|g| &mut g.events_rate_limited);
                return;
            }
            suppressed = state.suppressed;
            state.last_event_ns = now;
            state.suppressed = 0;
        }
        None => {
            let state = RateState {
                last_event_ns: now,
                suppressed: 0,
            };
            let _ = RATE_LIMIT.insert(&source, &state, 0);
        }
    }
    let Some(mut entry) = VIOLATIONS.reserve::<ViolationEvent>(0) else {
        bump_global(|g| &mut g.events_lost);
        return;
    };
    entry.write(ViolationEvent {
        time_ns: now,
        suppressed,
        src_addr: offender.addr,
        family: offender.family,
        kind: offender.kind,
        src_port_be: offender.remote_port_be,
        dst_port_be: offender.local_port_be,
        _pad2: [0; 2],
        port_slot,
        peer_slot,
        packet_len: len,
        _pad3: [0; 4],
    });
    entry.submit(0);
    bump_global(|g| &mut g.events_sent);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
