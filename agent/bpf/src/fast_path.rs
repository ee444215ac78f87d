use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    helpers::bpf_ktime_get_boot_ns,
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use wgpin_common::{
    AllowEntry, AllowV4, AllowV6, Config, Counters, DEFAULT_EVENT_INTERVAL_NS,
    DEFAULT_EVENTS_PER_CPU_PER_SECOND, EventBudget, FAMILY_V4, GlobalCounters, MAX_PEER_SLOTS,
    MAX_PORT_SLOTS, MAX_PORTS, MAX_PREFIXES, MAX_RATE_SOURCES, NO_PEER, Packet, Parsed, PortEntry,
    PortKey, RateState, SourceKey, VIOLATIONS_BYTES, ViolationEvent, allow_prefix_len, parse,
    parse::Udp,
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

#[classifier]
pub fn wgpin_tc(ctx: TcContext) -> i32 {
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
    match decide(&data, len) {
        // TCX_NEXT: let any later tcx program have its say.
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT as i32,
    }
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
        Parsed::Udp(udp) => check_udp(&udp, len),
    }
}

#[inline(always)]
fn check_udp(udp: &Udp, len: u32) -> Verdict {
    // SAFETY: the value is copied out at once.
    let Some(port) = (unsafe {
        PORTS.get(&PortKey {
            port_be: udp.dst_port_be,
        })
    })
    .copied() else {
        return Verdict::Pass;
    };
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
            report(udp, &port, len);
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

/// Sends a violation event, at most one per source per interval; the ones in between are
/// counted and carried by the next event.
#[inline(always)]
fn report(udp: &Udp, port: &PortEntry, len: u32) {
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
        addr: udp.src,
        family: udp.family,
        _pad: [0; 3],
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
        src_addr: udp.src,
        family: udp.family,
        _pad: 0,
        src_port_be: udp.src_port_be,
        dst_port_be: udp.dst_port_be,
        _pad2: [0; 2],
        port_slot: port.port_slot,
        peer_slot: port.peer_slot,
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
