//! Kernel WireGuard through generic netlink (the `wireguard` family): the same model as the
//! UAPI backend, carried as `WG_CMD_GET_DEVICE` / `WG_CMD_SET_DEVICE` messages.
//!
//! The codec ([`set_messages`], [`parse_datagram`], [`device_from_replies`]) is pure, unit- and
//! property-tested, and fuzzed (`fuzz/`); it splits a large change over several messages (a
//! netlink message is bounded) without ever replacing a peer's allowed IPs twice. The client
//! ([`Netlink`]) is a thin synchronous socket wrapper; it runs against kernel WireGuard in the
//! kernel-VM tier.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, UNIX_EPOCH},
};

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN,
    NetlinkBuffer, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::{
    GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};
use wgpin_crds::WireGuardKey;

use super::{
    keys::SecretKey,
    model::{DeviceConfig, DeviceState, PeerChange, PeerState},
};

/// Attribute bytes one message may carry; well under the kernel's limits (a netlink attribute
/// length is 16 bits), leaving room for headers.
pub const MESSAGE_BUDGET: usize = 32 * 1024;
/// Encoded size of one allowed IP (nested attribute with family, address, mask), upper bound.
const ALLOWED_IP_COST: usize = 4 + 8 + 20 + 8;
/// Encoded size of a peer without allowed IPs, upper bound.
const PEER_COST: usize = 4 + 36 + 36 + 8 + 32 + 8 + 4;

/// A netlink exchange that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error(
        "the kernel has no WireGuard (generic netlink family \"wireguard\" not found): load the wireguard module, or run a userspace implementation"
    )]
    NoWireGuard,
    #[error("{interface}: the kernel refused the request: {message}")]
    Refused { interface: String, message: String },
    #[error("netlink: {0}")]
    Io(String),
}

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let family = match net.addr() {
        IpAddr::V4(_) => WireguardAddressFamily::Ipv4,
        IpAddr::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.addr()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

/// One peer's attributes, with its allowed IPs cut into chunks that fit the budget. The first
/// chunk carries every field; later chunks only add allowed IPs (update-only, no replace).
fn peer_chunks(change: &PeerChange) -> Vec<(usize, WireguardPeer)> {
    let public_key = *change.public_key().as_bytes();
    let PeerChange::Upsert {
        update_only,
        preshared_key,
        endpoint,
        persistent_keepalive,
        allowed_ips,
        ..
    } = change
    else {
        return vec![(
            PEER_COST,
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(public_key),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ]),
        )];
    };
    let mut flags = WireguardPeerFlags::empty();
    if *update_only {
        flags |= WireguardPeerFlags::UpdateOnly;
    }
    if allowed_ips.is_some() {
        flags |= WireguardPeerFlags::ReplaceAllowedIps;
    }
    let mut first = vec![
        WireguardPeerAttribute::PublicKey(public_key),
        WireguardPeerAttribute::Flags(flags),
    ];
    if let Some(key) = preshared_key {
        first.push(WireguardPeerAttribute::PresharedKey(*key.as_bytes()));
    }
    if let Some(endpoint) = endpoint {
        first.push(WireguardPeerAttribute::Endpoint(*endpoint));
    }
    if let Some(seconds) = persistent_keepalive {
        first.push(WireguardPeerAttribute::PersistentKeepalive(*seconds));
    }
    let ips: Vec<WireguardAllowedIp> = allowed_ips.iter().flatten().map(allowed_ip).collect();
    let per_chunk = (MESSAGE_BUDGET - PEER_COST) / ALLOWED_IP_COST;
    let mut chunks = ips.chunks(per_chunk.max(1));
    let mut out = Vec::new();
    let head = chunks.next().map(<[_]>::to_vec).unwrap_or_default();
    let head_cost = PEER_COST + head.len() * ALLOWED_IP_COST;
    if !head.is_empty() || allowed_ips.is_some() {
        first.push(WireguardPeerAttribute::AllowedIps(head));
    }
    out.push((head_cost, WireguardPeer(first)));
    for chunk in chunks {
        out.push((
            PEER_COST + chunk.len() * ALLOWED_IP_COST,
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(public_key),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::UpdateOnly),
                WireguardPeerAttribute::AllowedIps(chunk.to_vec()),
            ]),
        ));
    }
    out
}

/// The `WG_CMD_SET_DEVICE` messages for `device` and `changes`, in order, each within
/// [`MESSAGE_BUDGET`]. Device settings go in the first message only.
pub fn set_messages(
    interface: &str,
    device: &DeviceConfig,
    changes: &[PeerChange],
) -> Vec<WireguardMessage> {
    let new_message = || WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: vec![WireguardAttribute::IfName(interface.to_string())],
    };
    let mut first = new_message();
    if let Some(key) = &device.private_key {
        first
            .attributes
            .push(WireguardAttribute::PrivateKey(*key.as_bytes()));
    }
    if let Some(port) = device.listen_port {
        first.attributes.push(WireguardAttribute::ListenPort(port));
    }
    let mut messages = vec![first];
    let mut peers: Vec<WireguardPeer> = Vec::new();
    let mut used = 0;
    for change in changes {
        for (cost, peer) in peer_chunks(change) {
            if used + cost > MESSAGE_BUDGET && !peers.is_empty() {
                if let Some(last) = messages.last_mut() {
                    last.attributes
                        .push(WireguardAttribute::Peers(std::mem::take(&mut peers)));
                }
                messages.push(new_message());
                used = 0;
            }
            used += cost;
            peers.push(peer);
        }
    }
    if !peers.is_empty()
        && let Some(last) = messages.last_mut()
    {
        last.attributes.push(WireguardAttribute::Peers(peers));
    }
    messages
}

/// Folds the replies of a `WG_CMD_GET_DEVICE` dump into one device. The kernel splits a big
/// device over several replies, continuing a peer's allowed IPs in the next one.
pub fn device_from_replies(replies: &[WireguardMessage]) -> DeviceState {
    let mut device = DeviceState::default();
    for reply in replies {
        for attribute in &reply.attributes {
            match attribute {
                WireguardAttribute::PublicKey(key) => {
                    device.public_key = Some(WireGuardKey::from_bytes(*key))
                }
                WireguardAttribute::ListenPort(port) => device.listen_port = Some(*port),
                WireguardAttribute::Fwmark(mark) => device.fwmark = Some(*mark),
                WireguardAttribute::Peers(peers) => {
                    for peer in peers {
                        merge_peer(&mut device, peer);
                    }
                }
                _ => {}
            }
        }
    }
    device
}

fn merge_peer(device: &mut DeviceState, peer: &WireguardPeer) {
    let Some(key) = peer.0.iter().find_map(|a| match a {
        WireguardPeerAttribute::PublicKey(key) => Some(WireGuardKey::from_bytes(*key)),
        _ => None,
    }) else {
        return;
    };
    let state = device.peers.entry(key).or_insert_with(|| PeerState {
        public_key: key,
        preshared_key: None,
        endpoint: None,
        persistent_keepalive: None,
        allowed_ips: BTreeSet::new(),
        last_handshake: None,
        rx_bytes: 0,
        tx_bytes: 0,
    });
    for attribute in &peer.0 {
        match attribute {
            WireguardPeerAttribute::PresharedKey(key) => {
                state.preshared_key = (*key != [0; 32]).then(|| SecretKey::from_bytes(*key));
            }
            WireguardPeerAttribute::Endpoint(endpoint) => state.endpoint = Some(*endpoint),
            WireguardPeerAttribute::PersistentKeepalive(seconds) => {
                state.persistent_keepalive = (*seconds != 0).then_some(*seconds);
            }
            WireguardPeerAttribute::LastHandshake(time) => {
                // A time the system clock cannot hold (a hostile or broken reply) is no
                // handshake rather than a panic.
                state.last_handshake = if time.seconds > 0 || time.nano_seconds > 0 {
                    Duration::from_secs(u64::try_from(time.seconds).unwrap_or_default())
                        .checked_add(Duration::from_nanos(
                            u64::try_from(time.nano_seconds).unwrap_or_default(),
                        ))
                        .and_then(|since_epoch| UNIX_EPOCH.checked_add(since_epoch))
                } else {
                    None
                };
            }
            WireguardPeerAttribute::RxBytes(bytes) => state.rx_bytes = *bytes,
            WireguardPeerAttribute::TxBytes(bytes) => state.tx_bytes = *bytes,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let address = ip.0.iter().find_map(|a| match a {
                        WireguardAllowedIpAttr::IpAddr(address) => Some(*address),
                        _ => None,
                    });
                    let mask = ip.0.iter().find_map(|a| match a {
                        WireguardAllowedIpAttr::Cidr(mask) => Some(*mask),
                        _ => None,
                    });
                    if let (Some(address), Some(mask)) = (address, mask)
                        && let Ok(net) = IpNet::new(address, mask)
                    {
                        state.allowed_ips.insert(net);
                    }
                }
            }
            _ => {}
        }
    }
}

/// A reply [`parse_datagram`] reads. `check` looks at a message's payload (the generic-netlink
/// header and the attributes) before the parsing library does, and refuses what would make it
/// panic.
pub trait Reply: netlink_packet_core::NetlinkDeserializable + std::fmt::Debug {
    fn check(_payload: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

impl Reply for GenlMessage<GenlCtrl> {
    /// netlink-packet-generic 0.5.0 reads the value of a policy attribute (`CTRL_ATTR_POLICY`,
    /// `CTRL_ATTR_OP_POLICY`) as an attribute without checking its length, and panics on one
    /// that claims more than it holds (found by fuzzing). The reply to a family lookup never
    /// has one (they answer `CTRL_CMD_GETPOLICY`), so a reply with one is refused.
    fn check(payload: &[u8]) -> Result<(), String> {
        // From <linux/genetlink.h>.
        const CTRL_ATTR_POLICY: u16 = 8;
        const CTRL_ATTR_OP_POLICY: u16 = 9;
        let family = payload.get(4..).unwrap_or_default();
        if attributes(family)
            .any(|(kind, _)| kind == CTRL_ATTR_POLICY || kind == CTRL_ATTR_OP_POLICY)
        {
            return Err("a family lookup's reply carries a policy (CTRL_ATTR_POLICY)".into());
        }
        Ok(())
    }
}

impl Reply for GenlMessage<WireguardMessage> {
    /// netlink-packet-wireguard 0.5.0 indexes the first byte of an allowed IP's prefix length
    /// (`WGALLOWEDIP_A_CIDR_MASK`) without checking that it has one: an empty one (found by
    /// fuzzing) panicked inside `NetlinkMessage::deserialize`.
    fn check(payload: &[u8]) -> Result<(), String> {
        // From <linux/wireguard.h>.
        const WGDEVICE_A_PEERS: u16 = 8;
        const WGPEER_A_ALLOWEDIPS: u16 = 9;
        const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;
        let device = payload.get(4..).unwrap_or_default();
        for peers in attributes_of_kind(device, WGDEVICE_A_PEERS) {
            for (_, peer) in attributes(peers) {
                for allowed_ips in attributes_of_kind(peer, WGPEER_A_ALLOWEDIPS) {
                    for (_, allowed_ip) in attributes(allowed_ips) {
                        if attributes_of_kind(allowed_ip, WGALLOWEDIP_A_CIDR_MASK)
                            .any(<[u8]>::is_empty)
                        {
                            return Err(
                                "an allowed IP has an empty prefix length (WGALLOWEDIP_A_CIDR_MASK)"
                                    .into(),
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The netlink attributes in `bytes`, as (type without its flags, value), walked as
/// netlink-packet-core walks them; the walk ends at the first malformed one (which the library
/// refuses itself).
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let (length, kind) = match bytes {
            [l0, l1, t0, t1, ..] => (
                usize::from(u16::from_le_bytes([*l0, *l1])),
                u16::from_le_bytes([*t0, *t1]) & netlink_packet_core::NLA_TYPE_MASK,
            ),
            _ => return None,
        };
        let value = bytes.get(4..length)?;
        bytes = bytes.get(length.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, value))
    })
}

fn attributes_of_kind(bytes: &[u8], kind: u16) -> impl Iterator<Item = &[u8]> {
    attributes(bytes).filter_map(move |(k, value)| (k == kind).then_some(value))
}

/// Reads one datagram of replies as [`Netlink`] receives them: each message's payload is added to
/// `out`. `Ok(true)` ends the exchange (DONE ends a dump, the ACK a request), `Ok(false)` asks for
/// the next datagram, and an error reply is [`NetlinkError::Refused`]. Pure, so that hostile
/// replies are fuzzed through the code the client runs (`fuzz/fuzz_targets/netlink.rs`).
pub fn parse_datagram<T: Reply>(
    datagram: &[u8],
    interface: &str,
    dump: bool,
    out: &mut Vec<T>,
) -> Result<bool, NetlinkError> {
    let mut rest = datagram;
    while !rest.is_empty() {
        let buffer = NetlinkBuffer::new_checked(rest).map_err(io)?;
        // What the library hands to `T` (every type but its own four, 0 too).
        if !matches!(
            buffer.message_type(),
            NLMSG_NOOP | NLMSG_ERROR | NLMSG_DONE | NLMSG_OVERRUN
        ) {
            T::check(buffer.payload())
                .map_err(|reason| NetlinkError::Io(format!("malformed reply: {reason}")))?;
        }
        let message: NetlinkMessage<T> = NetlinkMessage::deserialize(rest).map_err(io)?;
        let length = message.header.length as usize;
        match message.payload {
            NetlinkPayload::InnerMessage(inner) => out.push(inner),
            NetlinkPayload::Done(_) => return Ok(true),
            // An ACK (error code 0) ends a request; a dump ends with DONE instead.
            NetlinkPayload::Error(error) if error.code.is_none() && !dump => return Ok(true),
            NetlinkPayload::Error(error) if error.code.is_none() => {}
            NetlinkPayload::Error(error) => {
                // Not `error.to_io()`: it takes `abs` of the code, which overflows on i32::MIN
                // (found by fuzzing).
                let errno = error.code.map_or(0, |code| code.get()).saturating_abs();
                return Err(NetlinkError::Refused {
                    interface: interface.to_string(),
                    message: std::io::Error::from_raw_os_error(errno).to_string(),
                });
            }
            _ => {}
        }
        // `deserialize` checked that the length is at least a header and at most what is left.
        match rest.get(length..) {
            Some(next) if length > 0 => rest = next,
            _ => break,
        }
    }
    Ok(false)
}

/// A synchronous generic-netlink client for kernel WireGuard.
pub struct Netlink {
    socket: Socket,
    family: u16,
    sequence: u32,
}

fn io(e: impl std::fmt::Display) -> NetlinkError {
    NetlinkError::Io(e.to_string())
}

impl Netlink {
    /// Opens a socket in the current network namespace and resolves the `wireguard` family.
    pub fn connect() -> Result<Self, NetlinkError> {
        let mut client = Self::open()?;
        client.family = client.resolve_family("wireguard")?;
        Ok(client)
    }

    /// A generic-netlink socket in the current network namespace, no family resolved yet.
    fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(io)?;
        socket.bind_auto().map_err(io)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
        socket.set_non_blocking(false).map_err(io)?;
        Ok(Self {
            socket,
            family: 0,
            sequence: 0,
        })
    }

    fn send<T>(&mut self, mut message: NetlinkMessage<T>) -> Result<u32, NetlinkError>
    where
        T: netlink_packet_core::NetlinkSerializable + std::fmt::Debug,
    {
        self.sequence = self.sequence.wrapping_add(1);
        message.header.sequence_number = self.sequence;
        message.finalize();
        let mut buffer = vec![0; message.buffer_len()];
        message.serialize(&mut buffer);
        self.socket.send(&buffer, 0).map_err(io)?;
        Ok(self.sequence)
    }

    /// Reads replies until DONE (for dumps) or the ACK; returns the payloads.
    fn receive<T: Reply>(&mut self, interface: &str, dump: bool) -> Result<Vec<T>, NetlinkError> {
        let mut out = Vec::new();
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let size = self.socket.recv(&mut &mut buffer[..], 0).map_err(io)?;
            let datagram = buffer.get(..size).unwrap_or(&buffer);
            if parse_datagram(datagram, interface, dump, &mut out)? {
                return Ok(out);
            }
        }
    }

    /// The id of the generic-netlink family `name` (`wireguard`, or `nlctrl` in a test);
    /// `NoWireGuard` when the kernel has no such family.
    fn resolve_family(&mut self, name: &str) -> Result<u16, NetlinkError> {
        let mut request = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(name.into())],
        });
        request.finalize();
        let mut message = NetlinkMessage::from(request);
        // The ACK ends the exchange for `receive`: without it the kernel sends the family and
        // nothing more, and the read after it would wait forever.
        message.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        self.send(message)?;
        let replies: Vec<GenlMessage<GenlCtrl>> = match self.receive(name, false) {
            Ok(replies) => replies,
            Err(NetlinkError::Refused { .. }) => return Err(NetlinkError::NoWireGuard),
            Err(e) => return Err(e),
        };
        replies
            .iter()
            .flat_map(|reply| reply.payload.nlas.iter())
            .find_map(|nla| match nla {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or(NetlinkError::NoWireGuard)
    }

    /// Reads a device.
    pub fn get(&mut self, interface: &str) -> Result<DeviceState, NetlinkError> {
        let mut request = GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(interface.to_string())],
        });
        request.set_resolved_family_id(self.family);
        request.finalize();
        let mut message = NetlinkMessage::from(request);
        message.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        self.send(message)?;
        let replies: Vec<GenlMessage<WireguardMessage>> = self.receive(interface, true)?;
        let payloads: Vec<WireguardMessage> = replies.into_iter().map(|r| r.payload).collect();
        Ok(device_from_replies(&payloads))
    }

    /// Writes device settings and peer changes, message by message, each acknowledged. A failure
    /// part-way leaves the earlier messages applied: the error says which one failed, and the
    /// next reconcile reads back and finishes the job.
    pub fn set(
        &mut self,
        interface: &str,
        device: &DeviceConfig,
        changes: &[PeerChange],
    ) -> Result<(), NetlinkError> {
        let messages = set_messages(interface, device, changes);
        let total = messages.len();
        for (index, payload) in messages.into_iter().enumerate() {
            let mut request = GenlMessage::from_payload(payload);
            request.set_resolved_family_id(self.family);
            request.finalize();
            let mut message = NetlinkMessage::from(request);
            message.header.flags = NLM_F_REQUEST | NLM_F_ACK;
            self.send(message)?;
            let _: Vec<GenlMessage<WireguardMessage>> =
                self.receive(interface, false).map_err(|e| match e {
                    NetlinkError::Refused { interface, message } => NetlinkError::Refused {
                        interface,
                        message: format!("message {} of {total}: {message}", index + 1),
                    },
                    other => other,
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{Emitable as _, ParseableParametrized as _};
    use netlink_packet_generic::GenlHeader;

    use super::*;

    fn key(n: u16) -> WireGuardKey {
        let mut bytes = [0xa5; 32];
        bytes[..2].copy_from_slice(&n.to_be_bytes());
        WireGuardKey::from_bytes(bytes)
    }

    fn nets(count: usize) -> BTreeSet<IpNet> {
        (0..count)
            .map(|i| {
                IpNet::new(
                    IpAddr::from([10u8, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
                    32,
                )
                .expect("net")
            })
            .collect()
    }

    fn upsert(n: u16, allowed: usize) -> PeerChange {
        PeerChange::Upsert {
            public_key: key(n),
            update_only: false,
            preshared_key: Some(SecretKey::from_bytes([9; 32])),
            endpoint: Some("[fd00::2]:51820".parse().expect("addr")),
            persistent_keepalive: Some(25),
            allowed_ips: Some(nets(allowed)),
        }
    }

    /// Emits and parses back, as the kernel would receive it.
    fn round_trip(message: &WireguardMessage) -> (usize, WireguardMessage) {
        let mut buffer = vec![0u8; message.buffer_len()];
        message.emit(&mut buffer);
        let header = GenlHeader {
            cmd: message.cmd.into(),
            version: 1,
        };
        (
            buffer.len(),
            WireguardMessage::parse_with_param(&buffer[..], header).expect("parses"),
        )
    }

    #[test]
    fn a_small_change_is_one_message_with_every_field() {
        let messages = set_messages(
            "wg0",
            &DeviceConfig {
                private_key: Some(SecretKey::from_bytes([1; 32])),
                listen_port: Some(51820),
            },
            &[PeerChange::Remove(key(7)), upsert(2, 2)],
        );
        assert_eq!(messages.len(), 1);
        let (_, parsed) = round_trip(&messages[0]);
        assert_eq!(parsed, messages[0]);
        assert_eq!(
            parsed.attributes[0],
            WireguardAttribute::IfName("wg0".into())
        );
        assert!(
            parsed
                .attributes
                .contains(&WireguardAttribute::ListenPort(51820))
        );
        let WireguardAttribute::Peers(peers) = &parsed.attributes[3] else {
            panic!("peers last: {parsed:?}")
        };
        assert!(
            peers[0]
                .0
                .contains(&WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe))
        );
        assert!(peers[1].0.contains(&WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps
        )));
        assert!(
            peers[1]
                .0
                .contains(&WireguardPeerAttribute::PersistentKeepalive(25))
        );
    }

    #[test]
    fn a_large_change_is_split_without_replacing_twice() {
        let changes: Vec<PeerChange> = (0..300)
            .map(|n| upsert(n, 10))
            .chain([upsert(1000, 5000)])
            .collect();
        let messages = set_messages("wg0", &DeviceConfig::default(), &changes);
        assert!(messages.len() > 2, "{} messages", messages.len());
        let mut replaced = BTreeSet::new();
        let mut allowed: std::collections::BTreeMap<[u8; 32], usize> = Default::default();
        for message in &messages {
            let (size, parsed) = round_trip(message);
            assert!(size <= MESSAGE_BUDGET + 64, "message of {size} bytes");
            for attribute in &parsed.attributes {
                let WireguardAttribute::Peers(peers) = attribute else {
                    continue;
                };
                for peer in peers {
                    let public = peer.0.iter().find_map(|a| match a {
                        WireguardPeerAttribute::PublicKey(k) => Some(*k),
                        _ => None,
                    });
                    let public = public.expect("every chunk names its peer");
                    for a in &peer.0 {
                        match a {
                            WireguardPeerAttribute::Flags(f)
                                if f.contains(WireguardPeerFlags::ReplaceAllowedIps) =>
                            {
                                assert!(replaced.insert(public), "replaced twice");
                            }
                            WireguardPeerAttribute::AllowedIps(ips) => {
                                *allowed.entry(public).or_default() += ips.len()
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        assert_eq!(
            allowed[key(1000).as_bytes()],
            5000,
            "every allowed IP of the big peer, over several chunks"
        );
        assert_eq!(allowed[key(1).as_bytes()], 10);
        assert_eq!(allowed.len(), 301, "every peer");
    }

    #[test]
    fn replies_fold_into_one_device() {
        let peer = |ips: &[&str]| {
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(*key(3).as_bytes()),
                WireguardPeerAttribute::Endpoint("192.0.2.2:40000".parse().expect("addr")),
                WireguardPeerAttribute::LastHandshake(
                    netlink_packet_wireguard::WireguardTimeSpec {
                        seconds: 1_700_000_000,
                        nano_seconds: 0,
                    },
                ),
                WireguardPeerAttribute::RxBytes(5),
                WireguardPeerAttribute::AllowedIps(
                    ips.iter()
                        .map(|s| allowed_ip(&s.parse().expect("net")))
                        .collect(),
                ),
            ])
        };
        let replies = [
            WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![
                    WireguardAttribute::PublicKey(*key(1).as_bytes()),
                    WireguardAttribute::ListenPort(51820),
                    WireguardAttribute::Peers(vec![peer(&["198.51.100.2/32"])]),
                ],
            },
            WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![WireguardAttribute::Peers(vec![peer(&["fd00:99::2/128"])])],
            },
        ];
        let device = device_from_replies(&replies);
        assert_eq!(device.listen_port, Some(51820));
        assert_eq!(device.public_key, Some(key(1)));
        let state = &device.peers[&key(3)];
        assert_eq!(state.allowed_ips.len(), 2, "continued in the second reply");
        assert_eq!(
            state.last_handshake,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(
            state.endpoint,
            Some("192.0.2.2:40000".parse().expect("addr"))
        );
    }

    /// A reply as the kernel sends it: the netlink header, then the generic-netlink message.
    fn datagram(attributes: Vec<WireguardAttribute>, done: bool) -> Vec<u8> {
        let mut reply = GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes,
        });
        reply.set_resolved_family_id(0x15);
        let mut messages = vec![NetlinkMessage::from(reply)];
        if done {
            messages.push(NetlinkMessage::new(
                Default::default(),
                NetlinkPayload::Done(Default::default()),
            ));
        }
        let mut out = Vec::new();
        for mut message in messages {
            message.finalize();
            let mut bytes = vec![0; message.buffer_len()];
            message.serialize(&mut bytes);
            out.extend(bytes);
        }
        out
    }

    #[test]
    fn a_dump_is_read_message_by_message_until_done() {
        let peers = |ip: &str| {
            WireguardAttribute::Peers(vec![WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(*key(3).as_bytes()),
                WireguardPeerAttribute::AllowedIps(vec![allowed_ip(&ip.parse().expect("net"))]),
            ])])
        };
        let mut replies: Vec<GenlMessage<WireguardMessage>> = Vec::new();
        let first = datagram(vec![peers("198.51.100.2/32")], false);
        assert!(!parse_datagram(&first, "wg0", true, &mut replies).expect("parses"));
        let last = datagram(vec![peers("fd00:99::2/128")], true);
        assert!(parse_datagram(&last, "wg0", true, &mut replies).expect("parses"));
        let payloads: Vec<WireguardMessage> = replies.into_iter().map(|r| r.payload).collect();
        assert_eq!(
            device_from_replies(&payloads).peers[&key(3)]
                .allowed_ips
                .len(),
            2
        );
    }

    /// Found by fuzzing (`fuzz/`, target `netlink`): an allowed IP whose prefix length attribute
    /// is empty made netlink-packet-wireguard 0.5.0 index past its end, a panic inside
    /// `NetlinkMessage::deserialize` on the agent's reading of the device. It is refused as a
    /// malformed reply, and the same reply with a prefix length still reads.
    #[test]
    fn an_empty_prefix_length_is_a_malformed_reply_not_a_panic() {
        use netlink_packet_core::DefaultNla;
        let reply = |cidr: Vec<u8>| {
            datagram(
                vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey(*key(3).as_bytes()),
                    WireguardPeerAttribute::AllowedIps(vec![WireguardAllowedIp(vec![
                        WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                        WireguardAllowedIpAttr::IpAddr("198.51.100.2".parse().expect("ip")),
                        WireguardAllowedIpAttr::Other(DefaultNla::new(3, cidr)),
                    ])]),
                ])])],
                true,
            )
        };
        let mut replies: Vec<GenlMessage<WireguardMessage>> = Vec::new();
        match parse_datagram(&reply(vec![]), "wg0", true, &mut replies) {
            Err(NetlinkError::Io(message)) => assert!(
                message.contains("malformed reply") && message.contains("WGALLOWEDIP_A_CIDR_MASK"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(replies.is_empty());
        assert!(parse_datagram(&reply(vec![32]), "wg0", true, &mut replies).expect("parses"));
        let payloads: Vec<WireguardMessage> = replies.into_iter().map(|r| r.payload).collect();
        let allowed = &device_from_replies(&payloads).peers[&key(3)].allowed_ips;
        assert_eq!(
            allowed.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["198.51.100.2/32"]
        );
    }

    /// Found by fuzzing: a policy attribute in a family lookup's reply whose inner attribute
    /// claims more bytes than it holds made netlink-packet-generic 0.5.0 slice past its end.
    #[test]
    fn a_policy_in_a_family_reply_is_a_malformed_reply_not_a_panic() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&28u32.to_le_bytes()); // length
        bytes.extend_from_slice(&0x10u16.to_le_bytes()); // GENL_ID_CTRL
        bytes.extend_from_slice(&[0; 10]); // flags, sequence, port
        bytes.extend_from_slice(&[1, 2, 0, 0]); // CTRL_CMD_NEWFAMILY, version 2
        bytes.extend_from_slice(&8u16.to_le_bytes());
        bytes.extend_from_slice(&8u16.to_le_bytes()); // CTRL_ATTR_POLICY
        bytes.extend_from_slice(&[0xff, 0x00, 0x01, 0x00]); // "255 bytes" in 4
        let mut replies: Vec<GenlMessage<GenlCtrl>> = Vec::new();
        // The family's id, and then 0: the library parses every type as the family's but its
        // own four (NOOP, ERROR, DONE, OVERRUN), so the check must too (the fuzzer's second find).
        for message_type in [0x10u16, 0] {
            bytes[4..6].copy_from_slice(&message_type.to_le_bytes());
            match parse_datagram(&bytes, "wireguard", false, &mut replies) {
                Err(NetlinkError::Io(message)) => {
                    assert!(message.contains("CTRL_ATTR_POLICY"), "{message}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    /// Found by fuzzing: an error reply with the code i32::MIN overflowed in
    /// `ErrorMessage::to_io` (`abs`), a panic where overflow is checked. It is a refusal that
    /// prints.
    #[test]
    fn an_error_code_of_i32_min_is_a_refusal_not_a_panic() {
        let mut error = netlink_packet_core::ErrorMessage::default();
        error.code = std::num::NonZeroI32::new(i32::MIN);
        let mut message: NetlinkMessage<GenlMessage<WireguardMessage>> =
            NetlinkMessage::new(Default::default(), NetlinkPayload::Error(error));
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        let mut replies: Vec<GenlMessage<WireguardMessage>> = Vec::new();
        match parse_datagram(&bytes, "wg0", false, &mut replies) {
            Err(NetlinkError::Refused { interface, message }) => {
                assert_eq!(interface, "wg0");
                assert!(!message.is_empty());
            }
            other => panic!("{other:?}"),
        }
        let mut refused = netlink_packet_core::ErrorMessage::default();
        refused.code = std::num::NonZeroI32::new(-19);
        let mut message: NetlinkMessage<GenlMessage<WireguardMessage>> =
            NetlinkMessage::new(Default::default(), NetlinkPayload::Error(refused));
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        let error = parse_datagram(&bytes, "wg0", true, &mut replies).expect_err("refused");
        assert!(error.to_string().contains("No such device"), "{error}");
    }

    /// A family lookup that succeeds ends: `nlctrl` exists on every kernel, so this runs the
    /// path a kernel with WireGuard takes (the reply, then the ACK) on any host. Before the
    /// request asked for an ACK, the read after the reply blocked forever, and with it the
    /// agent's whole runtime (found by the kernel-VM tier).
    #[test]
    fn family_lookup_of_an_existing_family_returns() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let result = Netlink::open().and_then(|mut client| {
                let first = client.resolve_family("nlctrl")?;
                // The same socket answers the next request: nothing was left unread.
                let second = client.resolve_family("nlctrl")?;
                Ok((first, second))
            });
            let _ = tx.send(result.map_err(|e| e.to_string()));
        });
        let (first, second) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the family lookup returned")
            .expect("nlctrl resolves");
        // GENL_ID_CTRL
        assert_eq!((first, second), (0x10, 0x10));
    }

    /// The non-WireGuard half runs here: the family lookup answers, and on a kernel without
    /// WireGuard (this host) the error says what to do.
    #[test]
    fn family_lookup_reports_a_kernel_without_wireguard() {
        match Netlink::connect() {
            Ok(_) => {} // a kernel with WireGuard: the kernel-VM tier covers it.
            Err(e) => {
                assert!(matches!(e, NetlinkError::NoWireGuard), "{e}");
                assert!(e.to_string().contains("load the wireguard module"), "{e}");
            }
        }
    }
}
