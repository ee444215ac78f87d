//! The fast path's packet parser (`wgpin_common::parse`), the code the eBPF programs run, on any
//! frame: no panic, reads bounded by a constant (what the verifier and the TC pull length rely
//! on), a UDP answer made of the frame's own bytes, the same answer with Ethernet padding after
//! the frame, and WireGuard session indices read from the payload the parser pointed at.
#![no_main]

use std::cell::Cell;

use libfuzzer_sys::fuzz_target;
use wgpin_common::{
    FAMILY_V4, FAMILY_V6,
    parse::{MAX_IPV6_EXT_HEADERS, Packet, Parsed, parse, session_indices},
};

/// The farthest byte the parser may ask for: Ethernet, two VLAN tags, the IPv6 header, the
/// longest extension-header chain it follows (2048 bytes each), the UDP ports.
const MAX_READ: usize = 14 + 8 + 40 + MAX_IPV6_EXT_HEADERS * 2048 + 4;
/// IPv4: Ethernet, two tags, the longest header (60 bytes), the ports.
const MAX_READ_V4: usize = 14 + 8 + 60 + 4;

/// A packet that remembers the farthest byte asked for.
struct Recording<'a> {
    bytes: &'a [u8],
    farthest: Cell<usize>,
}

impl Packet for Recording<'_> {
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.farthest
            .set(self.farthest.get().max(offset.saturating_add(N)));
        self.bytes.load::<N>(offset)
    }
}

/// Where the IP header starts: after at most two VLAN tags, as the parser skips them.
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

fuzz_target!(|bytes: &[u8]| {
    let packet = Recording {
        bytes,
        farthest: Cell::new(0),
    };
    let parsed = parse(&packet);
    assert!(packet.farthest.get() <= MAX_READ, "read past the bound");
    assert_eq!(parse(bytes), parsed, "deterministic");

    if let Parsed::Udp(udp) = parsed {
        let l3 = l3_offset(bytes);
        let ports = [
            udp.src_port_be[0],
            udp.src_port_be[1],
            udp.dst_port_be[0],
            udp.dst_port_be[1],
        ];
        match udp.family {
            FAMILY_V4 => {
                let ihl = usize::from(bytes[l3] & 0x0f) * 4;
                assert_eq!(bytes[l3] >> 4, 4);
                assert_eq!(bytes[l3 + 9], 17, "UDP");
                assert!(ihl >= 20);
                assert_eq!(udp.src[..4], bytes[l3 + 12..l3 + 16]);
                assert_eq!(udp.dst[..4], bytes[l3 + 16..l3 + 20]);
                assert_eq!(udp.src[4..], [0; 12], "IPv4 uses 4 bytes");
                assert_eq!(bytes[l3 + ihl..l3 + ihl + 4], ports);
                assert_eq!(udp.payload, l3 + ihl + 8);
                assert!(packet.farthest.get() <= MAX_READ_V4);
            }
            FAMILY_V6 => {
                assert_eq!(bytes[l3] >> 4, 6);
                assert_eq!(udp.src[..], bytes[l3 + 8..l3 + 24]);
                assert_eq!(udp.dst[..], bytes[l3 + 24..l3 + 40]);
                // The ports are the last thing read.
                let at = packet.farthest.get() - 4;
                assert!(at >= l3 + 40);
                assert_eq!(bytes[at..at + 4], ports);
                assert_eq!(udp.payload, at + 8);
            }
            family => panic!("family {family}"),
        }
        if let Some(found) = session_indices(bytes, &udp) {
            let head = &bytes[udp.payload..udp.payload + 12];
            let at =
                |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
            assert_eq!(found.message, head[0]);
            assert!((1..=4).contains(&head[0]));
            assert_eq!(head[1..4], [0; 3], "reserved bytes");
            assert!(found.sender.is_none_or(|s| s == at(4)));
            assert!(found.receiver.is_none_or(|r| r == at(4) || r == at(8)));
        } else if let Some(head) = bytes.get(udp.payload..udp.payload + 12) {
            assert!(!(1..=4).contains(&head[0]) || head[1..4] != [0; 3]);
        }
    }
    // Bytes after the frame (Ethernet padding) never change a UDP or later-fragment answer.
    if matches!(parsed, Parsed::Udp(_) | Parsed::LaterFragment) {
        let mut padded = bytes.to_vec();
        padded.extend_from_slice(&[0x11; 64]);
        assert_eq!(parse(&padded[..]), parsed, "padding changed the answer");
    }
});
