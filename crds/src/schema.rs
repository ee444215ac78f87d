//! Hand-written schema fragments for the fields whose rules apply per list item (CIDRs, keys).
//!
//! Every rule here has a twin in [`crate::validate`]; the fixture table in
//! `crds/tests/validation_table.rs` runs both and fails when they disagree.

use schemars::{Schema, SchemaGenerator, json_schema};

use crate::key::{KEY_PATTERN, ZERO_KEY};

/// Longest textual CIDR: a full IPv6 address (39 characters) plus `/128`.
pub const CIDR_MAX_LEN: u64 = 43;
/// Longest textual IP address (IPv6, fully written).
pub const IP_MAX_LEN: u64 = 39;
/// Most source prefixes one peer may pin. Bounds CEL cost on the API server and the size of a
/// rendered peer; larger address plans belong in fewer, shorter prefixes.
pub const MAX_SOURCES: u64 = 256;
/// Most tunnel prefixes one peer may route.
pub const MAX_ALLOWED_IPS: u64 = 256;
/// Most addresses on one interface.
pub const MAX_INTERFACE_ADDRESSES: u64 = 16;

/// CEL: the string is a network prefix written canonically (host bits clear, RFC 5952 for IPv6).
/// `string(cidr(x).masked())` is exactly that form, so one comparison checks both.
const CANONICAL_PREFIX_RULE: &str = "isCIDR(self) && string(cidr(self).masked()) == self";
const CANONICAL_PREFIX_MESSAGE: &str = "isCIDR(self) ? self + ' is not written as its network prefix; write ' + string(cidr(self).masked()) : self + ' is not a CIDR; write a network prefix such as 192.0.2.0/24 or 2001:db8::/32'";

fn prefix_list(description: &str, max_items: u64) -> Schema {
    json_schema!({
        "type": "array",
        "description": description,
        "maxItems": max_items,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "maxLength": CIDR_MAX_LEN,
            "x-kubernetes-validations": [{
                "rule": CANONICAL_PREFIX_RULE,
                "messageExpression": CANONICAL_PREFIX_MESSAGE,
                "reason": "FieldValueInvalid",
            }],
        },
    })
}

/// `PinnedPeer.spec.sources`.
pub fn sources(_: &mut SchemaGenerator) -> Schema {
    prefix_list(
        "The pin: network prefixes (IPv4 and IPv6) the peer's packets may come from. Every packet \
         for this peer from any other source is dropped before WireGuard sees it. Required and \
         non-empty; a catch-all prefix (0.0.0.0/0, ::/0) also needs allowAnySource: true.",
        MAX_SOURCES,
    )
}

/// `PinnedPeer.spec.allowedIPs`.
pub fn allowed_ips(_: &mut SchemaGenerator) -> Schema {
    prefix_list(
        "Tunnel prefixes routed to this peer and accepted from it inside the tunnel (WireGuard's \
         AllowedIPs).",
        MAX_ALLOWED_IPS,
    )
}

/// `PinnedInterface.spec.addresses`: interface addresses keep their host part (`198.51.100.1/24`).
pub fn interface_addresses(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "description": "Tunnel addresses of the interface on every selected node, with prefix \
                        length (for example 198.51.100.1/24 or fd00:99::1/64).",
        "maxItems": MAX_INTERFACE_ADDRESSES,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "maxLength": CIDR_MAX_LEN,
            "x-kubernetes-validations": [{
                "rule": "isCIDR(self) && string(cidr(self)) == self",
                "messageExpression": "isCIDR(self) ? self + ' is not in canonical form; write ' + string(cidr(self)) : self + ' is not an address with prefix length such as 198.51.100.1/24'",
                "reason": "FieldValueInvalid",
            }],
        },
    })
}

/// A WireGuard public key.
pub fn public_key(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "description": "WireGuard public key in base64, as `wg pubkey` prints it.",
        "minLength": 44,
        "maxLength": 44,
        "pattern": KEY_PATTERN,
        "x-kubernetes-validations": [{
            "rule": format!("self != '{ZERO_KEY}'"),
            "message": "the all-zero key is not a usable public key",
        }],
    })
}

/// An IP address (no prefix, no zone, canonical form).
pub fn ip_address(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "description": "IP address, canonical form (192.0.2.10 or 2001:db8::10).",
        "maxLength": IP_MAX_LEN,
        "x-kubernetes-validations": [{
            "rule": "isIP(self) && ip.isCanonical(self)",
            "messageExpression": "isIP(self) ? self + ' is not in canonical form; write ' + string(ip(self)) : self + ' is not an IP address such as 192.0.2.10 or 2001:db8::10'",
            "reason": "FieldValueInvalid",
        }],
    })
}

/// A Kubernetes object name (DNS subdomain), for references to other objects.
pub fn object_name(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 253,
        "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    })
}
