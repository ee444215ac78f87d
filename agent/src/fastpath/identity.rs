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
