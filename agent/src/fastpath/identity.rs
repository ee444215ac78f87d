//! Identity mode's hook in the WireGuard module: what it relies on, checked against the
//! module's BTF (pure, [`check_module`]), and loading it (`FastPath::enable_identity`).
//!
//! Why one fexit on `wg_index_hashtable_insert` and nothing else:
//! - every session index this side hands out goes through it: the index of an initiation it
//!   sends (`wg_noise_handshake_create_initiation`), of a response it sends
//!   (`wg_noise_handshake_create_response`), and of the keypair that follows (the index moves to
//!   it with `wg_index_hashtable_replace`, same index, same peer);
//! - its arguments carry the peer (`entry->peer`) and its return value the index, so one hook
//!   gives (port, index) → peer before the handshake message carrying that index is sent, which
//!   is what the egress check needs to stop a response to a stolen key's address;
//! - its signature has been the same since WireGuard entered Linux (5.6).
//!
//! `wg_noise_handshake_consume_initiation` would name the peer of an incoming initiation, but
//! not where the packet came from; `wg_socket_set_peer_endpoint` only reports a roam after the
//! fact (shared mode already sees that by reading endpoints). Removed indices need no hook: the
//! map is an LRU, and a forgotten or stale index only falls back to the port's union of pins.

use wgpin_common::{IdentityLayout, SESSION_HOOK_FUNCTION};

use super::btf::Btf;

/// The kernel module identity mode hooks.
pub const MODULE: &str = "wireguard";

/// What the hook needs from this kernel's WireGuard module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleFacts {
    /// The id of `wg_index_hashtable_insert` in the module's BTF (`attach_btf_id`).
    pub function_id: u32,
    /// Where the hook reads its fields ([`IdentityLayout::valid`] set).
    pub layout: IdentityLayout,
}

/// Checks the module's BTF for everything the hook assumes: the function and its signature,
/// and the struct members it reads with their types. The error says what differs, for the
/// condition that reports why identity mode is off.
pub fn check_module(btf: &Btf) -> Result<ModuleFacts, String> {
    let mismatch = |what: String| {
        format!("the {MODULE} module differs from what identity mode reads ({what})")
    };
    let function = btf
        .function(SESSION_HOOK_FUNCTION)
        .map_err(|e| e.to_string())?;
    let signature = || {
        let params: Vec<String> = function
            .params
            .iter()
            .map(|p| btf.describe(p.type_id))
            .collect();
        format!(
            "{} {SESSION_HOOK_FUNCTION}({})",
            btf.describe(function.return_type),
            params.join(", ")
        )
    };
    let entry_param = function.params.get(1).map(|p| p.type_id);
    if function.params.len() != 2
        || function.variadic
        || entry_param.and_then(|id| btf.pointee_struct(id)).as_deref()
            != Some("index_hashtable_entry")
        || btf.size_of(function.return_type).ok() != Some(4)
    {
        return Err(mismatch(format!(
            "{} instead of __le32 {SESSION_HOOK_FUNCTION}(struct index_hashtable *, struct index_hashtable_entry *)",
            signature()
        )));
    }
    let pointer_member = |outer: &str, path: &[&str], pointee: &str| -> Result<u32, String> {
        let member = btf
            .member(outer, path)
            .map_err(|e| mismatch(e.to_string()))?;
        if btf.pointee_struct(member.type_id).as_deref() != Some(pointee) {
            return Err(mismatch(format!(
                "{outer}.{} is {}, expected struct {pointee} *",
                path.join("."),
                btf.describe(member.type_id)
            )));
        }
        Ok(member.offset)
    };
    let sized_member = |outer: &str, path: &[&str], size: u32| -> Result<u32, String> {
        let member = btf
            .member(outer, path)
            .map_err(|e| mismatch(e.to_string()))?;
        if btf.size_of(member.type_id).ok() != Some(size) {
            return Err(mismatch(format!(
                "{outer}.{} is {}, expected {size} bytes",
                path.join("."),
                btf.describe(member.type_id)
            )));
        }
        Ok(member.offset)
    };
    Ok(ModuleFacts {
        function_id: function.id,
        layout: IdentityLayout {
            entry_peer: pointer_member("index_hashtable_entry", &["peer"], "wg_peer")?,
            peer_device: pointer_member("wg_peer", &["device"], "wg_device")?,
            device_port: sized_member("wg_device", &["incoming_port"], 2)?,
            peer_public_key: sized_member("wg_peer", &["handshake", "remote_static"], 32)?,
            valid: 1,
            _pad: 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fastpath::btf::tests::{Builder, LE32, U8, U16, U32, base_blob, wireguard};

    #[test]
    fn the_layout_comes_from_the_modules_btf() {
        let facts = check_module(&wireguard()).expect("the synthetic module fits");
        assert_eq!(
            facts.function_id, 32,
            "the split's FUNC, not the base's decoy"
        );
        assert_eq!(
            facts.layout,
            IdentityLayout {
                entry_peer: 0,
                peer_device: 0,
                device_port: 40,
                // wg_peer.handshake at 24, noise_handshake.remote_static at 36.
                peer_public_key: 60,
                valid: 1,
                _pad: 0,
            }
        );
    }

    /// A module like WireGuard's, with one thing changed.
    #[derive(Clone, Copy)]
    struct Module {
        extra_param: bool,
        key_len: u32,
        port_member: &'static str,
        entry_peer_is_device: bool,
    }

    const AS_EXPECTED: Module = Module {
        extra_param: false,
        key_len: 32,
        port_member: "incoming_port",
        entry_peer_is_device: false,
    };

    fn module(m: Module) -> Btf {
        let base = Btf::parse(&base_blob()).expect("base");
        let mut b = Builder::split_over(&base);
        let device = b.strukt("wg_device", 8, &[(m.port_member, U16, 0)]);
        let device_ptr = b.ptr(device);
        let key = b.array(U8, U32, m.key_len);
        let handshake = b.strukt("noise_handshake", m.key_len, &[("remote_static", key, 0)]);
        let peer = b.strukt(
            "wg_peer",
            8 + m.key_len,
            &[("device", device_ptr, 0), ("handshake", handshake, 64)],
        );
        let peer_ptr = b.ptr(peer);
        let entry = b.strukt(
            "index_hashtable_entry",
            16,
            &[
                (
                    "peer",
                    if m.entry_peer_is_device {
                        device_ptr
                    } else {
                        peer_ptr
                    },
                    0,
                ),
                ("index", LE32, 64),
            ],
        );
        let entry_ptr = b.ptr(entry);
        let table = b.strukt("index_hashtable", 0, &[]);
        let table_ptr = b.ptr(table);
        let mut params = vec![("table", table_ptr), ("entry", entry_ptr)];
        if m.extra_param {
            params.push(("flags", U32));
        }
        let proto = b.proto(LE32, &params);
        b.func(SESSION_HOOK_FUNCTION, proto);
        Btf::parse_split(base, &b.finish())
            .expect("split")
            .with_origin("BTF of module \"wireguard\"")
    }

    #[test]
    fn a_module_as_expected_passes() {
        let facts = check_module(&module(AS_EXPECTED)).expect("fits");
        assert_eq!(
            (
                facts.layout.entry_peer,
                facts.layout.peer_device,
                facts.layout.device_port,
                facts.layout.peer_public_key
            ),
            (0, 0, 0, 8)
        );
    }

    /// Every assumption the hook makes is checked, and the message names what differs.
    #[test]
    fn a_module_that_differs_is_refused_with_what_differs() {
        let cases = [
            (
                Module {
                    extra_param: true,
                    ..AS_EXPECTED
                },
                "(struct index_hashtable *, struct index_hashtable_entry *, u32) instead of",
            ),
            (
                Module {
                    key_len: 16,
                    ..AS_EXPECTED
                },
                "wg_peer.handshake.remote_static is u8[16], expected 32 bytes",
            ),
            (
                Module {
                    port_member: "port",
                    ..AS_EXPECTED
                },
                "incoming_port",
            ),
            (
                Module {
                    entry_peer_is_device: true,
                    ..AS_EXPECTED
                },
                "index_hashtable_entry.peer is struct wg_device *, expected struct wg_peer *",
            ),
        ];
        for (variant, expected) in cases {
            let error = check_module(&module(variant)).expect_err("refused");
            assert!(
                error.contains("the wireguard module differs from what identity mode reads")
                    && error.contains(expected),
                "{error}\nexpected to contain: {expected}"
            );
        }
        // A module without the function at all (renamed in some kernel).
        let base = Btf::parse(&base_blob()).expect("base");
        let mut b = Builder::split_over(&base);
        b.strukt("wg_device", 8, &[("incoming_port", U16, 0)]);
        let btf = Btf::parse_split(base, &b.finish())
            .expect("split")
            .with_origin("BTF of module \"wireguard\"");
        let error = check_module(&btf).expect_err("refused");
        assert!(error.contains(SESSION_HOOK_FUNCTION), "{error}");
    }
}
