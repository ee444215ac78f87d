//! Userspace WireGuard (wireguard-go, boringtun) through its UAPI socket,
//! `/var/run/wireguard/<interface>.sock`: the cross-platform configuration protocol of
//! key=value lines ("get=1" reads, "set=1" writes, each answered with "errno=N").
//!
//! The codec ([`encode_set`], [`parse_get`]) is pure and tested on literal protocol text; the
//! client ([`Uapi`]) is a thin socket wrapper tested against Debian's wireguard-go.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    time::{Duration, UNIX_EPOCH},
};

use wgpin_crds::WireGuardKey;
use zeroize::Zeroize as _;

use super::{
    keys::SecretKey,
    model::{DeviceConfig, DeviceState, PeerChange, PeerState},
};

/// Where userspace implementations put their sockets.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/wireguard";
/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A UAPI exchange that failed; messages name the interface and what to check.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error(
        "{interface}: cannot reach {path}: {source} (is the userspace WireGuard for it running?)"
    )]
    Connect {
        interface: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{interface}: {source}")]
    Io {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    // `saturating_abs`: `abs` of i32::MIN overflows, and the errno comes from the other side.
    #[error("{interface}: WireGuard refused the request: errno={errno} ({})", std::io::Error::from_raw_os_error(errno.saturating_abs()))]
    Errno { interface: String, errno: i32 },
    #[error("{interface}: unexpected reply line {line:?}")]
    Protocol { interface: String, line: String },
}

fn hex(bytes: &[u8; 32]) -> String {
    let mut out = String::with_capacity(64);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    // Hex digits only: `from_str_radix` alone would also take a sign ("+f").
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Parses an endpoint as userspace implementations print it. wireguard-go prints an IPv6
/// link-local endpoint with its zone by name (`[fe80::1%eth0]:51820`, Go's `netip.AddrPort`),
/// which `SocketAddr` does not parse: such a zone is dropped (scope id 0). The address and port,
/// which the pin check needs, are kept exactly; refusing the line instead would make one peer's
/// endpoint fail the read of the whole device, and with it every peer's pin check.
fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    if let Ok(endpoint) = text.parse() {
        return Some(endpoint);
    }
    let (address, rest) = text.strip_prefix('[')?.split_once('%')?;
    let (zone, port) = rest.split_once("]:")?;
    let zone_ok = !zone.is_empty()
        && zone.len() <= 15
        && zone
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.@".contains(&b));
    if !zone_ok {
        return None;
    }
    let address: std::net::Ipv6Addr = address.parse().ok()?;
    let port: u16 = port.parse().ok()?;
    Some(SocketAddr::V6(std::net::SocketAddrV6::new(
        address, port, 0, 0,
    )))
}

fn endpoint_text(endpoint: &SocketAddr) -> String {
    // SocketAddr's Display already brackets IPv6 ("[fd00::1]:51820"), as UAPI wants.
    endpoint.to_string()
}

/// The body of a `set=1` request (without the terminating blank line).
pub fn encode_set(device: &DeviceConfig, changes: &[PeerChange]) -> String {
    let mut out = String::from("set=1\n");
    if let Some(key) = &device.private_key {
        let _ = writeln!(out, "private_key={}", hex(key.as_bytes()));
    }
    if let Some(port) = device.listen_port {
        let _ = writeln!(out, "listen_port={port}");
    }
    for change in changes {
        match change {
            PeerChange::Remove(key) => {
                let _ = writeln!(out, "public_key={}\nremove=true", hex(key.as_bytes()));
            }
            PeerChange::Upsert {
                public_key,
                update_only,
                preshared_key,
                endpoint,
                persistent_keepalive,
                allowed_ips,
            } => {
                let _ = writeln!(out, "public_key={}", hex(public_key.as_bytes()));
                if *update_only {
                    out.push_str("update_only=true\n");
                }
                if let Some(key) = preshared_key {
                    let _ = writeln!(out, "preshared_key={}", hex(key.as_bytes()));
                }
                if let Some(endpoint) = endpoint {
                    let _ = writeln!(out, "endpoint={}", endpoint_text(endpoint));
                }
                if let Some(seconds) = persistent_keepalive {
                    let _ = writeln!(out, "persistent_keepalive_interval={seconds}");
                }
                if let Some(allowed) = allowed_ips {
                    out.push_str("replace_allowed_ips=true\n");
                    for net in allowed {
                        let _ = writeln!(out, "allowed_ip={net}");
                    }
                }
            }
        }
    }
    out
}

/// Parses the reply to `get=1` (up to, not including, the blank line). `errno` other than 0 is
/// an error.
pub fn parse_get(interface: &str, reply: &str) -> Result<DeviceState, UapiError> {
    let protocol = |line: &str| UapiError::Protocol {
        interface: interface.to_string(),
        line: line.to_string(),
    };
    let mut device = DeviceState::default();
    let mut peer: Option<PeerState> = None;
    let mut handshake_secs: u64 = 0;
    let mut handshake_nanos: u32 = 0;
    let finish = |peer: &mut Option<PeerState>, device: &mut DeviceState, secs: u64, nanos: u32| {
        if let Some(mut done) = peer.take() {
            done.last_handshake = (secs != 0 || nanos != 0)
                .then(|| UNIX_EPOCH.checked_add(Duration::new(secs, nanos)))
                .flatten();
            device.peers.insert(done.public_key, done);
        }
    };
    for line in reply.lines() {
        if line.is_empty() {
            break;
        }
        let (key, value) = line.split_once('=').ok_or_else(|| protocol(line))?;
        match (key, peer.as_mut()) {
            ("errno", _) => {
                let errno: i32 = value.parse().map_err(|_| protocol(line))?;
                if errno != 0 {
                    return Err(UapiError::Errno {
                        interface: interface.to_string(),
                        errno,
                    });
                }
            }
            ("public_key", _) => {
                finish(&mut peer, &mut device, handshake_secs, handshake_nanos);
                (handshake_secs, handshake_nanos) = (0, 0);
                let bytes = unhex(value).ok_or_else(|| protocol(line))?;
                peer = Some(PeerState {
                    public_key: WireGuardKey::from_bytes(bytes),
                    preshared_key: None,
                    endpoint: None,
                    persistent_keepalive: None,
                    allowed_ips: Default::default(),
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                });
            }
            ("private_key", None) => {
                let mut bytes = unhex(value).ok_or_else(|| protocol(line))?;
                device.public_key = Some(SecretKey::from_bytes(bytes).public_key());
                bytes.zeroize();
            }
            ("listen_port", None) => {
                device.listen_port = Some(value.parse().map_err(|_| protocol(line))?)
            }
            ("fwmark", None) => device.fwmark = Some(value.parse().map_err(|_| protocol(line))?),
            ("preshared_key", Some(peer)) => {
                let bytes = unhex(value).ok_or_else(|| protocol(line))?;
                peer.preshared_key = (bytes != [0; 32]).then(|| SecretKey::from_bytes(bytes));
            }
            ("endpoint", Some(peer)) => {
                peer.endpoint = Some(parse_endpoint(value).ok_or_else(|| protocol(line))?)
            }
            ("persistent_keepalive_interval", Some(peer)) => {
                let seconds: u16 = value.parse().map_err(|_| protocol(line))?;
                peer.persistent_keepalive = (seconds != 0).then_some(seconds);
            }
            ("allowed_ip", Some(peer)) => {
                peer.allowed_ips
                    .insert(value.parse().map_err(|_| protocol(line))?);
            }
            // Checked here so that `finish` cannot overflow: `SystemTime + Duration` panics
            // past the end of time, and `Duration::new` when the nanoseconds carry over.
            ("last_handshake_time_sec", Some(_)) => {
                handshake_secs = value
                    .parse()
                    .ok()
                    .filter(|secs| {
                        // Room for the nanoseconds too: up to one more second.
                        UNIX_EPOCH
                            .checked_add(Duration::from_secs(*secs))
                            .and_then(|time| time.checked_add(Duration::from_secs(1)))
                            .is_some()
                    })
                    .ok_or_else(|| protocol(line))?
            }
            ("last_handshake_time_nsec", Some(_)) => {
                handshake_nanos = value
                    .parse()
                    .ok()
                    .filter(|nanos| *nanos < 1_000_000_000)
                    .ok_or_else(|| protocol(line))?
            }
            ("rx_bytes", Some(peer)) => {
                peer.rx_bytes = value.parse().map_err(|_| protocol(line))?
            }
            ("tx_bytes", Some(peer)) => {
                peer.tx_bytes = value.parse().map_err(|_| protocol(line))?
            }
            // protocol_version and keys later implementations add are not needed.
            _ => {}
        }
    }
    finish(&mut peer, &mut device, handshake_secs, handshake_nanos);
    Ok(device)
}

/// A UAPI client for the sockets in one directory.
#[derive(Clone, Debug)]
pub struct Uapi {
    socket_dir: PathBuf,
}

impl Default for Uapi {
    fn default() -> Self {
        Self::new(DEFAULT_SOCKET_DIR)
    }
}

impl Uapi {
    pub fn new(socket_dir: impl Into<PathBuf>) -> Self {
        Self {
            socket_dir: socket_dir.into(),
        }
    }

    /// The socket of `interface`.
    pub fn socket_path(&self, interface: &str) -> PathBuf {
        self.socket_dir.join(format!("{interface}.sock"))
    }

    /// Whether a userspace WireGuard serves `interface`.
    pub fn exists(&self, interface: &str) -> bool {
        UnixStream::connect(self.socket_path(interface)).is_ok()
    }

    fn exchange(&self, interface: &str, request: &str) -> Result<String, UapiError> {
        let path = self.socket_path(interface);
        let io = |source| UapiError::Io {
            interface: interface.to_string(),
            source,
        };
        let mut stream = UnixStream::connect(&path).map_err(|source| UapiError::Connect {
            interface: interface.to_string(),
            path: path.clone(),
            source,
        })?;
        stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
        stream.write_all(request.as_bytes()).map_err(io)?;
        stream.write_all(b"\n").map_err(io)?;
        let mut reader = BufReader::new(stream);
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).map_err(io)? == 0 || line == "\n" {
                break;
            }
            reply.push_str(&line);
        }
        Ok(reply)
    }

    /// Reads the device's configuration and peers.
    pub fn get(&self, interface: &str) -> Result<DeviceState, UapiError> {
        let mut reply = self.exchange(interface, "get=1\n")?;
        let parsed = parse_get(interface, &reply);
        reply.zeroize();
        parsed
    }

    /// Writes device settings and peer changes in one request.
    pub fn set(
        &self,
        interface: &str,
        device: &DeviceConfig,
        changes: &[PeerChange],
    ) -> Result<(), UapiError> {
        let mut request = encode_set(device, changes);
        let reply = self.exchange(interface, &request);
        request.zeroize();
        let reply = reply?;
        for line in reply.lines() {
            match line.split_once('=') {
                Some(("errno", "0")) => return Ok(()),
                Some(("errno", errno)) => {
                    return Err(UapiError::Errno {
                        interface: interface.to_string(),
                        errno: errno.parse().unwrap_or(-1),
                    });
                }
                _ => {}
            }
        }
        Err(UapiError::Protocol {
            interface: interface.to_string(),
            line: reply,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const PRIVATE_HEX: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const PEER_HEX: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";
    const PSK_HEX: &str = "188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52";

    /// A reply in the shape the cross-platform UAPI documentation gives.
    const GET_REPLY: &str =
        "private_key=e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a
listen_port=12912
public_key=b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33
preshared_key=188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52
allowed_ip=192.168.4.4/32
endpoint=[abcd:23::33%2]:51820
last_handshake_time_sec=0
last_handshake_time_nsec=0
public_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376
tx_bytes=38333
rx_bytes=2224
allowed_ip=192.168.4.6/32
persistent_keepalive_interval=111
endpoint=182.122.22.19:3233
last_handshake_time_sec=1700000000
last_handshake_time_nsec=5
protocol_version=1
errno=0
";

    #[test]
    fn parses_a_documented_reply() {
        let device = parse_get("wg0", GET_REPLY).expect("parses");
        assert_eq!(device.listen_port, Some(12912));
        let private = SecretKey::from_bytes(unhex(PRIVATE_HEX).expect("hex"));
        assert_eq!(device.public_key, Some(private.public_key()));
        let first = &device.peers[&WireGuardKey::from_bytes(unhex(PEER_HEX).expect("hex"))];
        assert_eq!(
            first.preshared_key.as_ref().map(|k| *k.as_bytes()),
            unhex(PSK_HEX)
        );
        assert_eq!(
            first.endpoint,
            Some("[abcd:23::33%2]:51820".parse().expect("scoped addr"))
        );
        assert_eq!(first.last_handshake, None, "0 means never");
        let second = device
            .peers
            .values()
            .find(|p| p.rx_bytes == 2224)
            .expect("second peer");
        assert_eq!(second.persistent_keepalive, Some(111));
        assert_eq!(second.tx_bytes, 38333);
        assert_eq!(
            second.last_handshake,
            Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert_eq!(
            second.allowed_ips,
            ["192.168.4.6/32".parse().expect("net")].into()
        );
    }

    #[test]
    fn errno_and_garbage_are_errors() {
        assert!(matches!(
            parse_get("wg0", "errno=2\n"),
            Err(UapiError::Errno { errno: 2, .. })
        ));
        assert!(matches!(
            parse_get("wg0", "nonsense\n"),
            Err(UapiError::Protocol { .. })
        ));
        assert!(matches!(
            parse_get("wg0", "listen_port=x\n"),
            Err(UapiError::Protocol { .. })
        ));
    }

    #[test]
    fn encodes_only_what_changes() {
        let peer = WireGuardKey::from_bytes(unhex(PEER_HEX).expect("hex"));
        let gone = WireGuardKey::from_bytes([7; 32]);
        let request = encode_set(
            &DeviceConfig {
                private_key: None,
                listen_port: Some(51820),
            },
            &[
                PeerChange::Remove(gone),
                PeerChange::Upsert {
                    public_key: peer,
                    update_only: true,
                    preshared_key: None,
                    endpoint: Some("[fd00::2]:51821".parse().expect("addr")),
                    persistent_keepalive: Some(25),
                    allowed_ips: Some(BTreeSet::from(["198.51.100.2/32".parse().expect("net")])),
                },
            ],
        );
        assert_eq!(
            request,
            format!(
                "set=1\nlisten_port=51820\npublic_key={}\nremove=true\npublic_key={PEER_HEX}\nupdate_only=true\n\
                 endpoint=[fd00::2]:51821\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=198.51.100.2/32\n",
                "07".repeat(32)
            )
        );
    }
}
