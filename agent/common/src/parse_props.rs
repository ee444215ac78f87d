//! Property tests of the packet parser the eBPF programs run (proptest, inside `cargo test`).
//!
//! - every frame the craft builder makes parses to what was built (round trip against a model
//!   of the parser's contract, written from the frame's description, not from its bytes);
//! - on any byte string, crafted frames with bytes changed and frames cut anywhere: no panic,
//!   reads bounded by a constant (what the verifier and the TC pull length rely on), a UDP
//!   answer consistent with the bytes it came from, and stable under trailing bytes (Ethernet
//!   padding);
//! - a cut frame never yields a different source or port than the whole frame, and a cut first
//!   fragment or IPv6 chain is dropped rather than passed.
//!
//! The seed is fixed, so `cargo test` runs the same cases every time; explore further with
//! `PROPTEST_RNG_SEED=<n>` and `PROPTEST_CASES=<n>`. Failures found are written to
//! `proptest-regressions/` (commit them: they are replayed first on every run).

use core::cell::Cell;

use proptest::{
    prelude::*,
    test_runner::{Config, RngSeed},
};

use crate::{
    FAMILY_V4, FAMILY_V6,
    craft::{Frame, Ip},
    parse::{MAX_IPV6_EXT_HEADERS, Packet, Parsed, SessionIndices, Udp, parse, session_indices},
};

/// `cases` unless `PROPTEST_CASES` says otherwise; a fixed seed unless `PROPTEST_RNG_SEED` does.
fn config(cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(0x5767_7069_6e00);
    }
    config
}

/// The farthest byte the parser may ever ask for: Ethernet, two VLAN tags, the IPv6 header,
/// `MAX_IPV6_EXT_HEADERS` extension headers of the largest size (2048 bytes), the UDP ports.
const MAX_READ: usize = 14 + 8 + 40 + MAX_IPV6_EXT_HEADERS * 2048 + 4;
/// IPv4: Ethernet, two tags, the longest header (60 bytes), the ports.
const MAX_READ_V4: usize = 14 + 8 + 60 + 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L4 {
    Udp(u16, u16),
    Tcp(u16),
    Icmp,
}

/// A frame as the craft builder is told to build it, so the model can say what it holds.
#[derive(Clone, Debug)]
struct Spec {
    ip: Option<Ip>,
    l4: L4,
    vlans: Vec<u16>,
    ipv4_options: usize,
    fragment: Option<(u16, bool)>,
    ipv6_exts: Vec<(u8, u8)>,
    payload: usize,
}

impl Spec {
    fn frame(&self) -> Frame {
        let mut frame = match (self.ip, self.l4) {
            (None, _) => Frame::arp(),
            (Some(ip), L4::Udp(src, dst)) => Frame::udp(ip, src, dst),
            (Some(ip), L4::Tcp(dst)) => Frame::tcp(ip, dst),
            (Some(ip), L4::Icmp) => Frame::icmp(ip),
        };
        for id in &self.vlans {
            frame = frame.vlan(*id);
        }
        for (kind, len) in &self.ipv6_exts {
            frame = frame.ipv6_ext(*kind, *len);
        }
        if let Some((offset, more)) = self.fragment {
            frame = frame.ipv4_fragment(offset, more);
        }
        frame.ipv4_options(self.ipv4_options).payload(self.payload)
    }

    /// What the parser must say about this frame.
    fn expected(&self) -> Parsed {
        if self.vlans.len() > 2 {
            // A third tag is not looked into: the frame is not IP to the parser.
            return Parsed::NotUdp;
        }
        // Where the UDP payload starts: Ethernet, the tags, the IP header as built, UDP.
        let l2 = 14 + 4 * self.vlans.len();
        let udp = |family, src: &[u8], dst: &[u8], ports: (u16, u16), ip_len: usize| {
            let mut source = [0u8; 16];
            source[..src.len()].copy_from_slice(src);
            let mut destination = [0u8; 16];
            destination[..dst.len()].copy_from_slice(dst);
            Parsed::Udp(Udp {
                family,
                src: source,
                dst: destination,
                src_port_be: ports.0.to_be_bytes(),
                dst_port_be: ports.1.to_be_bytes(),
                payload: l2 + ip_len + 8,
            })
        };
        match self.ip {
            None => Parsed::NotUdp,
            Some(Ip::V4(src, dst)) => match self.l4 {
                L4::Udp(..) if self.fragment.is_some_and(|(offset, _)| offset != 0) => {
                    Parsed::LaterFragment
                }
                L4::Udp(s, d) => udp(FAMILY_V4, &src, &dst, (s, d), 20 + self.ipv4_options),
                _ => Parsed::NotUdp,
            },
            Some(Ip::V6(src, dst)) => {
                let ext_len: usize = self
                    .ipv6_exts
                    .iter()
                    .map(|(kind, len)| match kind {
                        51 => 4 * (usize::from(*len) + 2),
                        _ => 8 * (usize::from(*len) + 1),
                    })
                    .sum::<usize>()
                    + if self.fragment.is_some() { 8 } else { 0 };
                // The chain as built: extension headers, the fragment header, the L4 header.
                let mut headers: Vec<Option<(u16, bool)>> =
                    self.ipv6_exts.iter().map(|_| None).collect();
                if let Some(fragment) = self.fragment {
                    headers.push(Some(fragment));
                }
                // One step per header, at most MAX_IPV6_EXT_HEADERS + 1 steps in all.
                for step in 0..=MAX_IPV6_EXT_HEADERS {
                    match headers.get(step) {
                        Some(Some((offset, _))) if *offset != 0 => return Parsed::LaterFragment,
                        Some(_) => continue,
                        None => {
                            return match self.l4 {
                                L4::Udp(s, d) => udp(FAMILY_V6, &src, &dst, (s, d), 40 + ext_len),
                                _ => Parsed::NotUdp,
                            };
                        }
                    }
                }
                Parsed::Unparseable
            }
        }
    }
}

fn arb_ip() -> impl Strategy<Value = Ip> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<[u8; 4]>()).prop_map(|(s, d)| Ip::V4(s, d)),
        (any::<[u8; 16]>(), any::<[u8; 16]>()).prop_map(|(s, d)| Ip::V6(s, d)),
    ]
}

fn arb_spec() -> impl Strategy<Value = Spec> {
    let l4 = prop_oneof![
        6 => (any::<u16>(), any::<u16>()).prop_map(|(s, d)| L4::Udp(s, d)),
        1 => any::<u16>().prop_map(L4::Tcp),
        1 => Just(L4::Icmp),
    ];
    let ext = (prop::sample::select(vec![0u8, 43, 51, 60]), 0u8..4);
    (
        prop::option::weighted(0.95, arb_ip()),
        l4,
        prop::collection::vec(any::<u16>(), 0..=3),
        0usize..=10,
        prop::option::weighted(0.3, (prop_oneof![Just(0u16), 0u16..0x2000], any::<bool>())),
        prop::collection::vec(ext, 0..=MAX_IPV6_EXT_HEADERS + 2),
        0usize..48,
    )
        .prop_map(
            |(ip, l4, vlans, options, fragment, ipv6_exts, payload)| Spec {
                ip,
                l4,
                vlans,
                ipv4_options: options * 4,
                fragment,
                ipv6_exts: if matches!(ip, Some(Ip::V6(..))) {
                    ipv6_exts
                } else {
                    Vec::new()
                },
                payload,
            },
        )
}

/// A frame as bytes: crafted, crafted then changed, or anything at all.
fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
    let mutated = (
        arb_spec(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(spec, changes, cut, do_cut)| {
            let mut bytes = spec.frame().bytes();
            for (at, value) in changes {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
            if do_cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        });
    prop_oneof![
        3 => mutated,
        1 => prop::collection::vec(any::<u8>(), 0..160),
    ]
}

/// A packet over a byte slice that remembers the farthest byte the parser asked for.
struct Recording<'a> {
    bytes: &'a [u8],
    farthest: Cell<usize>,
}

impl Packet for Recording<'_> {
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.saturating_add(N);
        self.farthest.set(self.farthest.get().max(end));
        self.bytes.load::<N>(offset)
    }
}

/// Where the IP header starts, skipping at most two VLAN tags as the parser does.
fn l3_offset(bytes: &[u8]) -> usize {
    let mut offset = 14;
    for _ in 0..2 {
        match bytes.get(offset - 2..offset) {
            Some([0x81, 0x00]) | Some([0x88, 0xa8]) => offset += 4,
            _ => break,
        }
    }
    offset
}

proptest! {
    #![proptest_config(config(10_000))]

    /// Every crafted frame parses to what was built into it.
    #[test]
    fn crafted_frames_parse_to_what_was_built(spec in arb_spec()) {
        let bytes = spec.frame().bytes();
        prop_assert_eq!(parse(&bytes[..]), spec.expected(), "{:?}", spec);
    }

    /// Any bytes: no panic, bounded reads, and a UDP answer that is the frame's own bytes.
    #[test]
    fn any_bytes_parse_without_panic_and_consistently(bytes in arb_bytes()) {
        let packet = Recording { bytes: &bytes, farthest: Cell::new(0) };
        let parsed = parse(&packet);
        prop_assert_eq!(parsed, parse(&bytes[..]), "deterministic");
        prop_assert!(packet.farthest.get() <= MAX_READ, "read up to {}", packet.farthest.get());
        if let Parsed::Udp(udp) = parsed {
            let l3 = l3_offset(&bytes);
            let ports_at = |udp: &Udp, at: usize| {
                bytes.get(at..at + 4)
                    == Some(&[udp.src_port_be[0], udp.src_port_be[1], udp.dst_port_be[0], udp.dst_port_be[1]][..])
            };
            match udp.family {
                FAMILY_V4 => {
                    prop_assert_eq!(bytes[l3] >> 4, 4);
                    prop_assert_eq!(bytes[l3 + 9], 17, "UDP");
                    prop_assert_eq!(&udp.src[..4], &bytes[l3 + 12..l3 + 16]);
                    prop_assert_eq!(&udp.src[4..], &[0u8; 12][..], "IPv4 uses 4 bytes");
                    let ihl = usize::from(bytes[l3] & 0x0f) * 4;
                    prop_assert!(ihl >= 20);
                    prop_assert!(ports_at(&udp, l3 + ihl));
                    prop_assert_eq!(&udp.dst[..4], &bytes[l3 + 16..l3 + 20]);
                    prop_assert_eq!(udp.payload, l3 + ihl + 8);
                    prop_assert!(packet.farthest.get() <= MAX_READ_V4);
                }
                FAMILY_V6 => {
                    prop_assert_eq!(bytes[l3] >> 4, 6);
                    prop_assert_eq!(&udp.src[..], &bytes[l3 + 8..l3 + 24]);
                    // The ports are the last thing read: right at the end of the farthest read.
                    let at = packet.farthest.get() - 4;
                    prop_assert!(at >= l3 + 40);
                    prop_assert!(ports_at(&udp, at));
                    prop_assert_eq!(&udp.dst[..], &bytes[l3 + 24..l3 + 40]);
                    prop_assert_eq!(udp.payload, at + 8);
                }
                other => prop_assert!(false, "family {}", other),
            }
            // The WireGuard header, if any, is the payload's own bytes.
            if let Some(found) = session_indices(&bytes[..], &udp) {
                let head = &bytes[udp.payload..udp.payload + 12];
                prop_assert_eq!(found.message, head[0]);
                prop_assert_eq!(&head[1..4], &[0u8; 3][..]);
                let at = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
                prop_assert!(found.sender.is_none() || found.sender == Some(at(4)));
                prop_assert!(found.receiver.is_none() || found.receiver == Some(at(4)) || found.receiver == Some(at(8)));
            }
        }
        // Bytes after the frame (Ethernet padding) never change a UDP or later-fragment answer.
        if matches!(parsed, Parsed::Udp(_) | Parsed::LaterFragment) {
            let mut padded = bytes.clone();
            padded.extend_from_slice(&[0x11; 64]);
            prop_assert_eq!(parse(&padded[..]), parsed);
        }
    }

    /// A crafted WireGuard message yields exactly the indices built into it, wherever its UDP
    /// header sits (tags, IPv4 options, IPv6 extension headers).
    #[test]
    fn crafted_wireguard_messages_yield_their_indices(
        spec in arb_spec(),
        message in 1u8..=4,
        first in any::<u32>(),
        second in any::<u32>(),
    ) {
        let frame = spec.frame().wireguard(message, first, second);
        let bytes = frame.bytes();
        if let Parsed::Udp(udp) = parse(&bytes[..]) {
            let expected = match message {
                1 => SessionIndices { message, sender: Some(first), receiver: None },
                2 => SessionIndices { message, sender: Some(first), receiver: Some(second) },
                _ => SessionIndices { message, sender: None, receiver: Some(first) },
            };
            prop_assert_eq!(session_indices(&bytes[..], &udp), Some(expected), "{:?}", spec);
        }
    }

    /// A frame cut anywhere never yields another source or port than the whole frame; a cut
    /// IPv6 chain or first fragment whose IP header survived is dropped, never passed.
    #[test]
    fn cut_frames_never_change_the_answer(spec in arb_spec(), cut in any::<prop::sample::Index>()) {
        let bytes = spec.frame().bytes();
        let whole = parse(&bytes[..]);
        let len = cut.index(bytes.len());
        let part = parse(&bytes[..len]);
        match (whole, part) {
            (_, Parsed::NotUdp) | (_, Parsed::Unparseable) => {}
            (whole, part) => prop_assert_eq!(part, whole, "cut at {}", len),
        }
        let l3 = 14 + 4 * spec.vlans.len().min(3);
        if let Parsed::Udp(_) = whole
            && part != whole
        {
            match spec.ip {
                Some(Ip::V6(..)) if len >= l3 + 40 => {
                    prop_assert_eq!(part, Parsed::Unparseable, "cut at {}", len)
                }
                Some(Ip::V4(..)) if spec.fragment.is_some_and(|(_, more)| more)
                    && len >= l3 + 20 =>
                {
                    prop_assert_eq!(part, Parsed::Unparseable, "cut at {}", len)
                }
                _ => prop_assert_eq!(part, Parsed::NotUdp, "cut at {}", len),
            }
        }
    }
}

/// The two families never alias: an IPv6 packet whose source embeds an IPv4 address
/// (IPv4-mapped, IPv4-compatible, NAT64) parses as IPv6 with all 16 bytes, so the fast path
/// looks it up in the IPv6 allowlist only and an IPv4 pin never admits it.
#[test]
fn ipv6_sources_that_embed_ipv4_stay_ipv6() {
    let v4 = [192, 0, 2, 2];
    let mut forms = Vec::new();
    for prefix in [
        [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff], // ::ffff:0:0/96, IPv4-mapped
        [0u8; 12],                                    // ::/96, IPv4-compatible
        [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0], // 64:ff9b::/96, NAT64
        [0u8, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0], // ::ffff:0:0:0/96, IPv4-translated
    ] {
        let mut src = [0u8; 16];
        src[..12].copy_from_slice(&prefix);
        src[12..].copy_from_slice(&v4);
        forms.push(src);
    }
    for src in forms {
        let frame = Frame::udp(
            Ip::V6(src, [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            1,
            51820,
        );
        match parse(&frame.bytes()[..]) {
            Parsed::Udp(udp) => {
                assert_eq!(udp.family, FAMILY_V6);
                assert_eq!(udp.src, src);
            }
            other => panic!("{other:?}"),
        }
    }
}
