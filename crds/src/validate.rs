//! Validation in Rust: the same rules as the CRD schema and its CEL rules (the fixture table in
//! `crds/tests/validation_table.rs` holds both to one verdict), returning parsed, typed values
//! so the code after validation never parses strings again.
//!
//! Used by the operator before it renders, and by the standalone agent, which has no API server
//! to reject bad objects for it.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use kube::core::Selector;

use crate::{
    interface::{INTERFACE_NAME_MAX_LEN, MAX_DEDICATED_PORTS, MTU_RANGE, PinnedInterfaceSpec},
    key::WireGuardKey,
    peer::PinnedPeerSpec,
    schema::{MAX_ALLOWED_IPS, MAX_INTERFACE_ADDRESSES, MAX_SOURCES},
};

/// One problem with one field. `field` is a path such as `spec.sources[2]`, the same shape
/// the API server uses, so users find the line to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// An object that failed validation, with every problem found (not just the first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidObject {
    pub kind: String,
    pub name: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for InvalidObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?} is invalid:", self.kind, self.name)?;
        for error in &self.errors {
            write!(f, "\n  - {error}")?;
        }
        Ok(())
    }
}

/// Decodes an object from JSON into its Rust type as strictly as the API server's strict field
/// validation: a field that does not fit is named, and so is every field the type does not know
/// (a misspelt `source:` must not silently drop a pin).
pub fn decode<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
) -> Result<T, Vec<FieldError>> {
    let mut unknown = Vec::new();
    let mut on_unknown = |path: serde_ignored::Path<'_>| {
        let path = field_path(&path);
        // The derived resource types take their apiVersion and kind from the type itself.
        if path != "apiVersion" && path != "kind" {
            unknown.push(FieldError::new(
                path,
                "unknown field; check its spelling against the API reference",
            ))
        }
    };
    let decoded =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut on_unknown));
    match decoded {
        Ok(value) if unknown.is_empty() => Ok(value),
        Ok(_) => Err(unknown),
        Err(e) => {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            // serde names a missing field in the message, at the path of its parent.
            let missing = message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.strip_suffix('`'));
            Err(vec![match missing {
                Some(field) if path == "." => FieldError::new(field, "Required value"),
                Some(field) => FieldError::new(format!("{path}.{field}"), "Required value"),
                None if path == "." => FieldError::new("<root>", message),
                None => FieldError::new(path, message),
            }])
        }
    }
}

/// A path as the API server writes it (`spec.endpoint.port`, `spec.sources[2]`).
/// `serde_ignored`'s own `Display` writes `?` for every `Option` and newtype on the way
/// (`spec.endpoint.?.port`) and indexes as fields (`spec.sources.2`).
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            parent if parent.is_empty() => key.clone(),
            parent => format!("{parent}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// A `PinnedPeer` spec that passed validation, with its strings parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedPeer {
    pub public_key: WireGuardKey,
    pub allowed_ips: Vec<IpNet>,
    /// The pin; catch-alls only when `allow_any_source`.
    pub sources: Vec<IpNet>,
    pub allow_any_source: bool,
    pub endpoint: Option<SocketAddr>,
    pub node_selector: Option<Selector>,
}

/// A `PinnedInterface` spec that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedInterface {
    pub node_selector: Selector,
    /// Inclusive port range; one port unless `listenPortEnd` reserves more.
    pub ports: std::ops::RangeInclusive<u16>,
    pub addresses: Vec<IpNet>,
}

/// Collects errors while a validator walks a spec.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    fn finish<T>(self, value: T) -> Result<T, Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.0)
        }
    }
}

/// Parses an IP address as the API accepts it: canonical, no zone, not IPv4-mapped IPv6
/// (`::ffff:192.0.2.1` would alias an IPv4 address and slip past an IPv4 pin).
pub fn parse_ip(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| format!("{s} is not an IP address such as 192.0.2.10 or 2001:db8::10"))?;
    reject_mapped(ip)?;
    if ip.to_string() != s {
        return Err(format!("{s} is not in canonical form; write {ip}"));
    }
    Ok(ip)
}

fn reject_mapped(ip: IpAddr) -> Result<(), String> {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Err(format!(
            "{ip} is an IPv4-mapped IPv6 address; write the IPv4 form {}",
            v6.to_ipv4_mapped()
                .map(|v4| v4.to_string())
                .unwrap_or_default()
        )),
        _ => Ok(()),
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s.parse().map_err(|_| {
        format!("{s} is not a CIDR; write a network prefix such as 192.0.2.0/24 or 2001:db8::/32")
    })?;
    reject_mapped(net.addr())?;
    Ok(net)
}

/// Parses a network prefix as the API accepts it: canonical, host bits clear, not IPv4-mapped.
///
/// Other IPv6 forms that embed an IPv4 address (IPv4-compatible `::c000:202`, NAT64
/// `64:ff9b::c000:202`) are accepted when written canonically, as the IPv6 prefixes they
/// literally are: the fast path keeps the families apart, so such a pin admits IPv6 packets
/// from those addresses only and never the IPv4 address inside (their dotted spellings, such as
/// `::192.0.2.2/128`, are not canonical and are refused).
pub fn parse_prefix(s: &str) -> Result<IpNet, String> {
    let net = parse_cidr(s)?;
    let canonical = net.trunc();
    if canonical.to_string() != s {
        return Err(format!(
            "{s} is not written as its network prefix; write {canonical}"
        ));
    }
    Ok(canonical)
}

/// Parses an interface address with prefix length (`198.51.100.1/24`), canonical.
pub fn parse_interface_address(s: &str) -> Result<IpNet, String> {
    let net = parse_cidr(s)
        .map_err(|_| format!("{s} is not an address with prefix length such as 198.51.100.1/24"))?;
    if net.to_string() != s {
        return Err(format!("{s} is not in canonical form; write {net}"));
    }
    Ok(net)
}

/// Parses a list of prefixes, reporting each bad item at its index and each duplicate.
fn prefix_list(
    errors: &mut Errors,
    field: &str,
    items: &[String],
    max: u64,
    parse: fn(&str) -> Result<IpNet, String>,
) -> Vec<IpNet> {
    if items.len() as u64 > max {
        errors.add(
            field,
            format!(
                "has {} entries, at most {max} are allowed; merge them into shorter prefixes",
                items.len()
            ),
        );
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut parsed = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if let Some(first) = seen.insert(item.as_str(), i) {
            errors.add(
                format!("{field}[{i}]"),
                format!("{item} is listed twice (also at {field}[{first}]); remove one"),
            );
            continue;
        }
        match parse(item) {
            Ok(net) => parsed.push(net),
            Err(message) => errors.add(format!("{field}[{i}]"), message),
        }
    }
    parsed
}

fn object_name(errors: &mut Errors, field: &str, value: &str) {
    let valid_label = |label: &str| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if value.is_empty() || value.len() > 253 || !value.split('.').all(valid_label) {
        errors.add(
            field,
            format!(
                "{value:?} is not a valid object name: lower-case letters, digits, '-' and '.', at most 253 characters"
            ),
        );
    }
}

fn selector(
    errors: &mut Errors,
    field: &str,
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> Selector {
    Selector::try_from(selector.clone()).unwrap_or_else(|e| {
        errors.add(field, format!("is not a valid label selector: {e}"));
        Selector::default()
    })
}

impl PinnedPeerSpec {
    /// Checks every single-object rule; see the type's docs for the list.
    pub fn validate(&self) -> Result<ValidatedPeer, Vec<FieldError>> {
        let mut errors = Errors::default();
        object_name(&mut errors, "spec.interface", &self.interface);

        let node_selector = self
            .node_selector
            .as_ref()
            .map(|s| selector(&mut errors, "spec.nodeSelector", s));

        let public_key = self
            .public_key
            .parse::<WireGuardKey>()
            .map_err(|e| errors.add("spec.publicKey", e.to_string()))
            .ok();

        let allowed_ips = prefix_list(
            &mut errors,
            "spec.allowedIPs",
            &self.allowed_ips,
            MAX_ALLOWED_IPS,
            parse_prefix,
        );
        let sources = prefix_list(
            &mut errors,
            "spec.sources",
            &self.sources,
            MAX_SOURCES,
            parse_prefix,
        );

        if self.sources.is_empty() {
            errors.add(
                "spec.sources",
                "sources is empty: list the prefixes the peer may connect from (for example \
                 203.0.113.0/24); to allow any source on purpose, write sources: [0.0.0.0/0, ::/0] \
                 and allowAnySource: true",
            );
        }
        let has_catch_all = sources.iter().any(|net| net.prefix_len() == 0);
        if has_catch_all && !self.allow_any_source {
            errors.add(
                "spec.sources",
                "sources contains a catch-all prefix (0.0.0.0/0 or ::/0), which pins nothing: list \
                 the prefixes the peer connects from, or set allowAnySource: true to allow any \
                 source on purpose",
            );
        }
        if self.allow_any_source && !has_catch_all {
            errors.add(
                "spec.allowAnySource",
                "allowAnySource is true but sources has no catch-all prefix (0.0.0.0/0 or ::/0): \
                 remove allowAnySource, or add the catch-all prefix you mean to allow",
            );
        }

        let endpoint = self.endpoint.as_ref().and_then(|endpoint| {
            if endpoint.port == 0 {
                errors.add("spec.endpoint.port", "must be a UDP port from 1 to 65535");
            }
            match parse_ip(&endpoint.address) {
                Ok(ip) => {
                    if !sources.iter().any(|net| net.contains(&ip)) {
                        errors.add(
                            "spec.endpoint.address",
                            "endpoint.address lies outside every prefix in sources, so the pin \
                             would refuse the peer's own endpoint: fix the endpoint or add its \
                             prefix to sources",
                        );
                    }
                    Some(SocketAddr::new(ip, endpoint.port))
                }
                Err(message) => {
                    errors.add("spec.endpoint.address", message);
                    None
                }
            }
        });

        if self.persistent_keepalive_seconds == Some(0) {
            errors.add(
                "spec.persistentKeepaliveSeconds",
                "must be from 1 to 65535 seconds; leave it unset to send no keepalives",
            );
        }
        if let Some(secret) = &self.preshared_key_secret_ref {
            object_name(
                &mut errors,
                "spec.presharedKeySecretRef.namespace",
                &secret.namespace,
            );
            object_name(&mut errors, "spec.presharedKeySecretRef.name", &secret.name);
            if secret.key.is_empty() || secret.key.len() > 253 {
                errors.add(
                    "spec.presharedKeySecretRef.key",
                    "must name a key of the Secret (1 to 253 characters)",
                );
            }
        }

        let validated = public_key.map(|public_key| ValidatedPeer {
            public_key,
            allowed_ips,
            sources,
            allow_any_source: self.allow_any_source,
            endpoint,
            node_selector,
        });
        match validated {
            Some(peer) => errors.finish(peer),
            None => Err(errors.0),
        }
    }
}

impl PinnedInterfaceSpec {
    /// Checks every single-object rule of a `PinnedInterface`.
    pub fn validate(&self) -> Result<ValidatedInterface, Vec<FieldError>> {
        let mut errors = Errors::default();
        let node_selector = selector(&mut errors, "spec.nodeSelector", &self.node_selector);

        let name_ok = !self.interface_name.is_empty()
            && self.interface_name.len() <= INTERFACE_NAME_MAX_LEN
            && self
                .interface_name
                .starts_with(|c: char| c.is_ascii_alphabetic())
            && self
                .interface_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            errors.add(
                "spec.interfaceName",
                format!(
                    "{:?} is not a usable device name: 1 to {INTERFACE_NAME_MAX_LEN} characters, a letter first, then letters, digits, '_' or '-'",
                    self.interface_name
                ),
            );
        }

        if self.listen_port == 0 {
            errors.add("spec.listenPort", "must be a UDP port from 1 to 65535");
        }
        let end = self.listen_port_end.unwrap_or(self.listen_port);
        if let Some(listen_port_end) = self.listen_port_end {
            let span = u32::from(listen_port_end).checked_sub(u32::from(self.listen_port));
            if span.is_none_or(|span| span >= MAX_DEDICATED_PORTS) {
                errors.add(
                    "spec.listenPortEnd",
                    "listenPortEnd must be at least listenPort and reserve at most 10000 ports",
                );
            }
        }

        let addresses = prefix_list(
            &mut errors,
            "spec.addresses",
            &self.addresses,
            MAX_INTERFACE_ADDRESSES,
            parse_interface_address,
        );

        if let Some(mtu) = self.mtu
            && !(MTU_RANGE.0..=MTU_RANGE.1).contains(&mtu)
        {
            errors.add(
                "spec.mtu",
                format!(
                    "{mtu} is out of range: WireGuard needs {} to {}",
                    MTU_RANGE.0, MTU_RANGE.1
                ),
            );
        }

        errors.finish(ValidatedInterface {
            node_selector,
            ports: self.listen_port..=end.max(self.listen_port),
            addresses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_must_be_canonical_network_prefixes() {
        assert_eq!(
            parse_prefix("192.0.2.0/24").map(|n| n.to_string()),
            Ok("192.0.2.0/24".into())
        );
        assert_eq!(
            parse_prefix("192.0.2.7/24"),
            Err("192.0.2.7/24 is not written as its network prefix; write 192.0.2.0/24".into())
        );
        assert!(
            parse_prefix("2001:DB8::/32").is_err(),
            "upper case is not canonical"
        );
        assert!(
            parse_prefix("192.0.2.0").is_err(),
            "a prefix needs a length"
        );
        assert!(
            parse_prefix("::ffff:192.0.2.0/120").is_err(),
            "IPv4-mapped aliases an IPv4 pin"
        );
    }

    #[test]
    fn ips_reject_mapped_and_non_canonical() {
        assert!(parse_ip("203.0.113.5").is_ok());
        assert!(parse_ip("::ffff:203.0.113.5").is_err());
        assert!(parse_ip("2001:0db8::1").is_err());
        assert!(parse_ip("fe80::1%eth0").is_err());
    }

    #[test]
    fn interface_addresses_keep_their_host_part() {
        assert!(parse_interface_address("198.51.100.1/24").is_ok());
        assert!(parse_interface_address("198.51.100.1").is_err());
    }
}
