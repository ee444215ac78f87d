//! Hand-built Ethernet frames for tests of the parser and of the loaded programs
//! (`BPF_PROG_TEST_RUN`). Not used by the agent itself: only with the `craft` feature.

extern crate alloc;
use alloc::vec::Vec;

/// Source and destination addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ip {
    V4([u8; 4], [u8; 4]),
    V6([u8; 16], [u8; 16]),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum L4 {
    Udp { src: u16, dst: u16 },
    Tcp { dst: u16 },
    Icmp,
}

/// A frame under construction; [`Frame::bytes`] renders it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    ip: Option<Ip>,
    l4: L4,
    vlans: Vec<u16>,
    ipv4_options: usize,
    /// (offset in 8-byte units, more fragments)
    fragment: Option<(u16, bool)>,
    /// IPv6 extension headers before the fragment header: (type, length field).
    ipv6_exts: Vec<(u8, u8)>,
    payload: usize,
    /// The first bytes of the payload (the rest is filler).
    payload_head: Vec<u8>,
}

impl Frame {
    fn new(ip: Option<Ip>, l4: L4) -> Self {
        Self {
            ip,
            l4,
            vlans: Vec::new(),
            ipv4_options: 0,
            fragment: None,
            ipv6_exts: Vec::new(),
            payload: 32,
            payload_head: Vec::new(),
        }
    }

    pub fn udp(ip: Ip, src_port: u16, dst_port: u16) -> Self {
        Self::new(
            Some(ip),
            L4::Udp {
                src: src_port,
                dst: dst_port,
            },
        )
    }

    pub fn tcp(ip: Ip, dst_port: u16) -> Self {
        Self::new(Some(ip), L4::Tcp { dst: dst_port })
    }

    pub fn icmp(ip: Ip) -> Self {
        Self::new(Some(ip), L4::Icmp)
    }

    pub fn arp() -> Self {
        Self::new(None, L4::Icmp)
    }

    /// Adds an 802.1Q tag (outermost first).
    pub fn vlan(mut self, id: u16) -> Self {
        self.vlans.push(id);
        self
    }

    /// IPv4 options of `len` bytes (a multiple of 4, at most 40).
    pub fn ipv4_options(mut self, len: usize) -> Self {
        self.ipv4_options = len;
        self
    }

    /// Makes this an IPv4 fragment at `offset` (8-byte units).
    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        self.fragment = Some((offset, more));
        self
    }

    /// Makes this an IPv6 fragment at `offset` (8-byte units), after any extension headers.
    pub fn ipv6_fragment(self, offset: u16, more: bool) -> Self {
        self.ipv4_fragment(offset, more)
    }

    /// Adds an IPv6 extension header of `kind` (0, 43, 60: 8 × (len + 1) bytes; 51: 4 × (len + 2)).
    pub fn ipv6_ext(mut self, kind: u8, len: u8) -> Self {
        self.ipv6_exts.push((kind, len));
        self
    }

    /// Sets the L4 payload length in bytes.
    pub fn payload(mut self, len: usize) -> Self {
        self.payload = len;
        self
    }

    /// Makes the UDP payload a WireGuard message of type `message` (1–4) with its real length,
    /// and the two index fields after the type: sender then receiver for a response, sender for
    /// an initiation, receiver for a cookie reply or data (`second` unused there).
    pub fn wireguard(mut self, message: u8, first: u32, second: u32) -> Self {
        self.payload = match message {
            1 => 148,
            2 => 92,
            3 => 64,
            _ => 32 + 16,
        };
        self.payload_head = [message, 0, 0, 0]
            .into_iter()
            .chain(first.to_le_bytes())
            .chain(second.to_le_bytes())
            .collect();
        self
    }

    fn l4_bytes(&self) -> (u8, Vec<u8>) {
        let mut out = Vec::new();
        let proto = match self.l4 {
            L4::Udp { src, dst } => {
                out.extend_from_slice(&src.to_be_bytes());
                out.extend_from_slice(&dst.to_be_bytes());
                out.extend_from_slice(&((8 + self.payload) as u16).to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                17
            }
            L4::Tcp { dst } => {
                out.extend_from_slice(&40000u16.to_be_bytes());
                out.extend_from_slice(&dst.to_be_bytes());
                out.extend_from_slice(&[0; 8]);
                out.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
                6
            }
            L4::Icmp => {
                out.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
                if matches!(self.ip, Some(Ip::V6(..))) {
                    58
                } else {
                    1
                }
            }
        };
        let start = out.len();
        out.resize(start + self.payload, 0xab);
        if matches!(self.l4, L4::Udp { .. }) {
            let head = self.payload_head.len().min(self.payload);
            out[start..start + head].copy_from_slice(&self.payload_head[..head]);
        }
        (proto, out)
    }

    /// The frame's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2]);
        for id in &self.vlans {
            out.extend_from_slice(&0x8100u16.to_be_bytes());
            out.extend_from_slice(&id.to_be_bytes());
        }
        let (proto, l4) = self.l4_bytes();
        match self.ip {
            None => {
                out.extend_from_slice(&0x0806u16.to_be_bytes());
                out.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
                out.resize(out.len() + 20, 0);
            }
            Some(Ip::V4(src, dst)) => {
                out.extend_from_slice(&0x0800u16.to_be_bytes());
                let header_len = 20 + self.ipv4_options;
                let total = (header_len + l4.len()) as u16;
                let frag = match self.fragment {
                    Some((offset, more)) => offset | if more { 0x2000 } else { 0 },
                    None => 0x4000,
                };
                let mut header = Vec::new();
                header.push(0x40 | (header_len / 4) as u8);
                header.push(0);
                header.extend_from_slice(&total.to_be_bytes());
                header.extend_from_slice(&[0x12, 0x34]);
                header.extend_from_slice(&frag.to_be_bytes());
                header.extend_from_slice(&[64, proto, 0, 0]);
                header.extend_from_slice(&src);
                header.extend_from_slice(&dst);
                header.resize(header_len, 1); // NOP options
                let sum = checksum(&header);
                header[10..12].copy_from_slice(&sum.to_be_bytes());
                out.extend_from_slice(&header);
                out.extend_from_slice(&l4);
            }
            Some(Ip::V6(src, dst)) => {
                out.extend_from_slice(&0x86ddu16.to_be_bytes());
                let mut exts = Vec::new();
                let mut kinds: Vec<u8> = self.ipv6_exts.iter().map(|(kind, _)| *kind).collect();
                if self.fragment.is_some() {
                    kinds.push(44);
                }
                kinds.push(proto);
                for (i, (kind, len)) in self.ipv6_exts.iter().enumerate() {
                    let size = if *kind == 51 {
                        (usize::from(*len) + 2) * 4
                    } else {
                        (usize::from(*len) + 1) * 8
                    };
                    let start = exts.len();
                    exts.push(kinds[i + 1]);
                    exts.push(*len);
                    exts.resize(start + size, 0);
                }
                if let Some((offset, more)) = self.fragment {
                    exts.push(proto);
                    exts.push(0);
                    exts.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                    exts.extend_from_slice(&[0, 0, 0x56, 0x78]);
                }
                out.push(0x60);
                out.extend_from_slice(&[0, 0, 0]);
                out.extend_from_slice(&((exts.len() + l4.len()) as u16).to_be_bytes());
                out.push(kinds[0]);
                out.push(64);
                out.extend_from_slice(&src);
                out.extend_from_slice(&dst);
                out.extend_from_slice(&exts);
                out.extend_from_slice(&l4);
            }
        }
        out
    }
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
