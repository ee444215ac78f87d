//! Generic-netlink replies as the kernel-WireGuard client reads them: datagrams walked message by
//! message (`wireguard::netlink::parse_datagram`), the WireGuard attributes decoded
//! (netlink-packet-wireguard) and folded into one device (`device_from_replies`), and the
//! family lookup's replies (`nlctrl`). Any bytes: an error or a device, never a panic or a hang.
//!
//! Input: the datagrams of one exchange, each preceded by its length (u16, little-endian); a
//! length past the end takes what is left.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netlink_packet_generic::{GenlMessage, ctrl::GenlCtrl};
use netlink_packet_wireguard::WireguardMessage;
use wgpin_agent::wireguard::netlink::{device_from_replies, parse_datagram};

fn datagrams(mut bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let [low, high, rest @ ..] = bytes {
        let len = usize::from(u16::from_le_bytes([*low, *high])).min(rest.len());
        let (datagram, next) = rest.split_at(len);
        out.push(datagram);
        bytes = next;
    }
    out
}

fuzz_target!(|bytes: &[u8]| {
    let datagrams = datagrams(bytes);
    let mut replies: Vec<GenlMessage<WireguardMessage>> = Vec::new();
    for datagram in &datagrams {
        match parse_datagram(datagram, "wg0", true, &mut replies) {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => {
                let _ = error.to_string();
                break;
            }
        }
    }
    let payloads: Vec<WireguardMessage> = replies.into_iter().map(|r| r.payload).collect();
    let device = device_from_replies(&payloads);
    for (key, peer) in &device.peers {
        assert_eq!(key, &peer.public_key);
        assert_ne!(peer.persistent_keepalive, Some(0), "0 is no keepalive");
    }

    // The same bytes as replies to the family lookup and to a request (ACK-terminated).
    let mut family: Vec<GenlMessage<GenlCtrl>> = Vec::new();
    for datagram in &datagrams {
        if !matches!(
            parse_datagram(datagram, "wireguard", false, &mut family),
            Ok(false)
        ) {
            break;
        }
    }
});
