//! The packet parser of the fast path, shared by the eBPF programs and the host tests.
//!
//! It answers one question: is this a UDP datagram (or the first fragment of one), and if so
//! from which address and port to which port? Everything else passes untouched, except packets
//! built to hide such a datagram from a parser (a first fragment too short to hold the UDP
//! header, an IPv6 extension-header chain longer than any real one): those are dropped, because
//! the kernel would still hand them to WireGuard.
//!
//! Fragments: only the first fragment carries the ports. Dropping it is enough, since the
//! kernel never reassembles a datagram without its first fragment; later fragments pass.

/// Read access to the bytes of a packet. The eBPF side implements it with bounds checks the
/// verifier accepts; the host side over a byte slice.
pub trait Packet {
    /// The `N` bytes at `offset`, or `None` when the packet data ends before them.
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl Packet for [u8] {
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        let bytes = self.get(offset..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Some(out)
    }
}

/// A UDP datagram (or first fragment) as the fast path checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Udp {
    /// [`crate::FAMILY_V4`] or [`crate::FAMILY_V6`].
    pub family: u8,
    /// Source address; IPv4 uses the first 4 bytes.
    pub src: [u8; 16],
    /// Destination address; IPv4 uses the first 4 bytes.
    pub dst: [u8; 16],
    pub src_port_be: [u8; 2],
    pub dst_port_be: [u8; 2],
    /// Offset of the UDP payload in the frame (it may lie past the end of a short packet).
    pub payload: usize,
}

impl Udp {
    pub const fn dst_port(&self) -> u16 {
        u16::from_be_bytes(self.dst_port_be)
    }

    pub const fn src_port(&self) -> u16 {
        u16::from_be_bytes(self.src_port_be)
    }
}

/// What the parser found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not IP, not UDP, or too malformed for the kernel to deliver: pass.
    NotUdp,
    /// A UDP datagram or the first fragment of one: check its source against its port.
    Udp(Udp),
    /// A later fragment: carries no ports; its first fragment decides.
    LaterFragment,
    /// Could carry UDP to a managed port that the parser cannot see: drop.
    Unparseable,
}

const ETH_HLEN: usize = 14;
const UDP_HLEN: usize = 8;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// More extension headers than any real packet carries; a longer chain is dropped.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

/// Parses an Ethernet frame (up to two VLAN tags).
#[inline(always)]
pub fn parse<P: Packet + ?Sized>(packet: &P) -> Parsed {
    let Some(eth) = packet.load::<ETH_HLEN>(0) else {
        return Parsed::NotUdp;
    };
    let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let mut offset = ETH_HLEN;
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(tag) = packet.load::<4>(offset) else {
            return Parsed::NotUdp;
        };
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        offset += 4;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(packet, offset),
        ETH_P_IPV6 => parse_ipv6(packet, offset),
        _ => Parsed::NotUdp,
    }
}

#[inline(always)]
fn parse_ipv4<P: Packet + ?Sized>(packet: &P, offset: usize) -> Parsed {
    let Some(header) = packet.load::<20>(offset) else {
        return Parsed::NotUdp;
    };
    if header[0] >> 4 != 4 || header[9] != IPPROTO_UDP {
        return Parsed::NotUdp;
    }
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header_len < 20 {
        return Parsed::NotUdp;
    }
    let flags_fragment = u16::from_be_bytes([header[6], header[7]]);
    let more_fragments = flags_fragment & 0x2000 != 0;
    if flags_fragment & 0x1fff != 0 {
        return Parsed::LaterFragment;
    }
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&header[12..16]);
    let mut dst = [0u8; 16];
    dst[..4].copy_from_slice(&header[16..20]);
    match packet.load::<4>(offset + header_len) {
        Some(ports) => Parsed::Udp(Udp {
            family: crate::FAMILY_V4,
            src,
            dst,
            src_port_be: [ports[0], ports[1]],
            dst_port_be: [ports[2], ports[3]],
            payload: offset + header_len + UDP_HLEN,
        }),
        // A first fragment without the whole UDP header hides its ports.
        None if more_fragments => Parsed::Unparseable,
        None => Parsed::NotUdp,
    }
}

#[inline(always)]
fn parse_ipv6<P: Packet + ?Sized>(packet: &P, offset: usize) -> Parsed {
    let Some(header) = packet.load::<40>(offset) else {
        return Parsed::NotUdp;
    };
    if header[0] >> 4 != 6 {
        return Parsed::NotUdp;
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&header[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&header[24..40]);
    let mut next = header[6];
    let mut offset = offset + 40;
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_UDP => {
                return match packet.load::<4>(offset) {
                    Some(ports) => Parsed::Udp(Udp {
                        family: crate::FAMILY_V6,
                        src,
                        dst,
                        src_port_be: [ports[0], ports[1]],
                        dst_port_be: [ports[2], ports[3]],
                        payload: offset + UDP_HLEN,
                    }),
                    None => Parsed::Unparseable,
                };
            }
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let Some(ext) = packet.load::<2>(offset) else {
                    return Parsed::Unparseable;
                };
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            IPV6_AH => {
                let Some(ext) = packet.load::<2>(offset) else {
                    return Parsed::Unparseable;
                };
                next = ext[0];
                offset += (usize::from(ext[1]) + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let Some(fragment) = packet.load::<4>(offset) else {
                    return Parsed::Unparseable;
                };
                if u16::from_be_bytes([fragment[2], fragment[3]]) & 0xfff8 != 0 {
                    return Parsed::LaterFragment;
                }
                next = fragment[0];
                offset += 8;
            }
            // TCP, ICMPv6, ESP, no next header, ...
            _ => return Parsed::NotUdp,
        }
    }
    Parsed::Unparseable
}

/// WireGuard message types (the first byte; the next three are zero on the wire).
pub const MESSAGE_INITIATION: u8 = 1;
pub const MESSAGE_RESPONSE: u8 = 2;
pub const MESSAGE_COOKIE_REPLY: u8 = 3;
pub const MESSAGE_DATA: u8 = 4;

/// The session indices in a WireGuard message's header: `sender` is the index the sending
/// side chose (initiation, response), `receiver` the one the receiving side chose (response,
/// cookie reply, data). Each is the 4 wire bytes read as a little-endian `u32`, the value the
/// kernel's `__le32` holds on a little-endian machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionIndices {
    pub message: u8,
    pub sender: Option<u32>,
    pub receiver: Option<u32>,
}

/// The header of the WireGuard message in `udp`'s payload, if it is one WireGuard would
/// accept (type 1–4, reserved bytes zero). Lengths are WireGuard's to check.
#[inline(always)]
pub fn session_indices<P: Packet + ?Sized>(packet: &P, udp: &Udp) -> Option<SessionIndices> {
    let header = packet.load::<12>(udp.payload)?;
    if header[1] != 0 || header[2] != 0 || header[3] != 0 {
        return None;
    }
    let at =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (sender, receiver) = match header[0] {
        MESSAGE_INITIATION => (Some(at(4)), None),
        MESSAGE_RESPONSE => (Some(at(4)), Some(at(8))),
        MESSAGE_COOKIE_REPLY | MESSAGE_DATA => (None, Some(at(4))),
        _ => return None,
    };
    Some(SessionIndices {
        message: header[0],
        sender,
        receiver,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::craft::{Frame, Ip};

    /// A UDP answer with the fields these tests check (source and ports); [`summary`] puts a
    /// parse result in the same form. The property tests check every field.
    fn udp(family: u8, src: &[u8], src_port: u16, dst_port: u16) -> Parsed {
        let mut addr = [0u8; 16];
        addr[..src.len()].copy_from_slice(src);
        Parsed::Udp(Udp {
            family,
            src: addr,
            dst: [0; 16],
            src_port_be: src_port.to_be_bytes(),
            dst_port_be: dst_port.to_be_bytes(),
            payload: 0,
        })
    }

    fn summary(parsed: Parsed) -> Parsed {
        match parsed {
            Parsed::Udp(udp) => Parsed::Udp(Udp {
                dst: [0; 16],
                payload: 0,
                ..udp
            }),
            other => other,
        }
    }

    fn parse_summary(bytes: &[u8]) -> Parsed {
        summary(parse(bytes))
    }

    #[test]
    fn destination_and_payload_offset() {
        let Parsed::Udp(udp) = parse(&Frame::udp(V4, 1, 51820).vlan(7).bytes()[..]) else {
            panic!("UDP expected");
        };
        assert_eq!(udp.dst[..4], [192, 0, 2, 1]);
        assert_eq!(udp.payload, 14 + 4 + 20 + 8);
        let Ip::V6(_, dst) = V6 else { unreachable!() };
        let frame = Frame::udp(V6, 1, 51820).ipv6_ext(IPV6_HOPOPTS, 1);
        let Parsed::Udp(udp) = parse(&frame.bytes()[..]) else {
            panic!("UDP expected");
        };
        assert_eq!(udp.dst, dst);
        assert_eq!(udp.payload, 14 + 40 + 16 + 8);
    }

    fn indices(frame: Frame) -> Option<SessionIndices> {
        let bytes = frame.bytes();
        let Parsed::Udp(udp) = parse(&bytes[..]) else {
            panic!("UDP expected");
        };
        session_indices(&bytes[..], &udp)
    }

    #[test]
    fn session_indices_of_each_wireguard_message() {
        let frame =
            |message| Frame::udp(V4, 40000, 51820).wireguard(message, 0x0102_0304, 0xa0b0_c0d0);
        assert_eq!(
            indices(frame(MESSAGE_INITIATION)),
            Some(SessionIndices {
                message: 1,
                sender: Some(0x0102_0304),
                receiver: None
            })
        );
        assert_eq!(
            indices(frame(MESSAGE_RESPONSE)),
            Some(SessionIndices {
                message: 2,
                sender: Some(0x0102_0304),
                receiver: Some(0xa0b0_c0d0)
            })
        );
        for message in [MESSAGE_COOKIE_REPLY, MESSAGE_DATA] {
            assert_eq!(
                indices(frame(message)),
                Some(SessionIndices {
                    message,
                    sender: None,
                    receiver: Some(0x0102_0304)
                })
            );
        }
        // On the wire the index is little-endian: 0x01020304 is 04 03 02 01.
        let bytes = frame(MESSAGE_DATA).bytes();
        assert_eq!(bytes[14 + 20 + 8..14 + 20 + 16], [4, 0, 0, 0, 4, 3, 2, 1]);
        let Ip::V6(..) = V6 else { unreachable!() };
        assert_eq!(
            indices(
                Frame::udp(V6, 1, 51820)
                    .ipv6_ext(IPV6_DSTOPTS, 0)
                    .wireguard(4, 9, 0)
            ),
            Some(SessionIndices {
                message: 4,
                sender: None,
                receiver: Some(9)
            })
        );
    }

    #[test]
    fn no_session_indices_outside_wireguard_messages() {
        // Type 0 and 5, reserved bytes set, a payload too short for the header.
        assert_eq!(indices(Frame::udp(V4, 1, 51820).wireguard(0, 1, 2)), None);
        assert_eq!(indices(Frame::udp(V4, 1, 51820).wireguard(5, 1, 2)), None);
        assert_eq!(
            indices(Frame::udp(V4, 1, 51820).payload(40)),
            None,
            "filler bytes 0xab"
        );
        assert_eq!(
            indices(Frame::udp(V4, 1, 51820).wireguard(4, 1, 2).payload(11)),
            None
        );
        let mut bytes = Frame::udp(V4, 1, 51820).wireguard(4, 1, 2).bytes();
        bytes[14 + 20 + 8 + 2] = 1;
        let Parsed::Udp(udp) = parse(&bytes[..]) else {
            panic!("UDP expected");
        };
        assert_eq!(session_indices(&bytes[..], &udp), None, "reserved byte set");
    }

    const V4: Ip = Ip::V4([203, 0, 113, 7], [192, 0, 2, 1]);
    const V6: Ip = Ip::V6(
        [
            0x20, 0x01, 0x0d, 0xb8, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
        ],
        [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    );

    #[test]
    fn plain_udp_in_both_families() {
        assert_eq!(
            parse_summary(&Frame::udp(V4, 40000, 51820).bytes()[..]),
            udp(4, &[203, 0, 113, 7], 40000, 51820)
        );
        let Ip::V6(src, _) = V6 else { unreachable!() };
        assert_eq!(
            parse_summary(&Frame::udp(V6, 40000, 51820).bytes()[..]),
            udp(6, &src, 40000, 51820)
        );
    }

    #[test]
    fn vlan_tags_and_ipv4_options_are_skipped() {
        let frame = Frame::udp(V4, 1, 51820).vlan(10).vlan(20).ipv4_options(12);
        assert_eq!(
            parse_summary(&frame.bytes()[..]),
            udp(4, &[203, 0, 113, 7], 1, 51820)
        );
    }

    #[test]
    fn other_traffic_is_not_udp() {
        for frame in [
            Frame::tcp(V4, 51820),
            Frame::tcp(V6, 51820),
            Frame::icmp(V4),
            Frame::icmp(V6),
            Frame::arp(),
        ] {
            assert_eq!(parse(&frame.bytes()[..]), Parsed::NotUdp, "{frame:?}");
        }
        assert_eq!(parse(&[0u8; 10][..]), Parsed::NotUdp, "runt frame");
        let truncated = Frame::udp(V4, 1, 51820).bytes();
        assert_eq!(
            parse(&truncated[..30]),
            Parsed::NotUdp,
            "truncated IPv4 header"
        );
    }

    #[test]
    fn ipv4_fragments() {
        let first = Frame::udp(V4, 1, 51820).ipv4_fragment(0, true);
        assert_eq!(
            parse_summary(&first.bytes()[..]),
            udp(4, &[203, 0, 113, 7], 1, 51820)
        );
        let later = Frame::udp(V4, 1, 51820).ipv4_fragment(185, false);
        assert_eq!(parse(&later.bytes()[..]), Parsed::LaterFragment);
        // A first fragment cut inside the UDP header hides the port: dropped.
        let tiny = Frame::udp(V4, 1, 51820).ipv4_fragment(0, true).bytes();
        assert_eq!(parse(&tiny[..14 + 20 + 2]), Parsed::Unparseable);
    }

    #[test]
    fn ipv6_extension_headers_and_fragments() {
        let Ip::V6(src, _) = V6 else { unreachable!() };
        let chained = Frame::udp(V6, 5, 51820)
            .ipv6_ext(IPV6_HOPOPTS, 1)
            .ipv6_ext(IPV6_DSTOPTS, 0)
            .ipv6_ext(IPV6_AH, 4);
        assert_eq!(parse_summary(&chained.bytes()[..]), udp(6, &src, 5, 51820));
        let first = Frame::udp(V6, 5, 51820).ipv6_fragment(0, true);
        assert_eq!(parse_summary(&first.bytes()[..]), udp(6, &src, 5, 51820));
        let later = Frame::udp(V6, 5, 51820).ipv6_fragment(100, false);
        assert_eq!(parse(&later.bytes()[..]), Parsed::LaterFragment);
        let mut long = Frame::udp(V6, 5, 51820);
        for _ in 0..=MAX_IPV6_EXT_HEADERS {
            long = long.ipv6_ext(IPV6_DSTOPTS, 0);
        }
        assert_eq!(
            parse(&long.bytes()[..]),
            Parsed::Unparseable,
            "over-long chain"
        );
        let mut longest_allowed = Frame::udp(V6, 5, 51820);
        for _ in 0..MAX_IPV6_EXT_HEADERS {
            longest_allowed = longest_allowed.ipv6_ext(IPV6_DSTOPTS, 0);
        }
        assert_eq!(
            parse_summary(&longest_allowed.bytes()[..]),
            udp(6, &src, 5, 51820)
        );
        let cut = Frame::udp(V6, 5, 51820).ipv6_ext(IPV6_HOPOPTS, 0).bytes();
        assert_eq!(
            parse(&cut[..14 + 40 + 8 + 2]),
            Parsed::Unparseable,
            "UDP header cut off after a chain"
        );
    }
}
