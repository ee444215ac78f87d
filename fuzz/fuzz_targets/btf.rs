//! The BTF reader identity mode trusts for the WireGuard module's layout
//! (`fastpath::btf::Btf::parse`, `parse_split`), then every lookup on whatever parsed: sizes,
//! descriptions, pointees, functions, members, and identity mode's own checks
//! (`fastpath::identity::check_module`). Any bytes: an error that prints, never a panic or a
//! hang.
//!
//! Input: a first byte whose low bit picks the form. 0: the rest is base BTF. 1: a length (u16,
//! little-endian), that many bytes of base BTF, and the rest is split BTF over it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wgpin_agent::fastpath::{btf::Btf, identity::check_module};

/// Every lookup, on whatever parsed.
fn exercise(btf: &Btf) {
    let count = u32::try_from(btf.type_count()).unwrap_or(u32::MAX);
    for id in 0..count.saturating_add(2) {
        let _ = btf.size_of(id).map_err(|e| e.to_string());
        let _ = btf.describe(id);
        let _ = btf.pointee_struct(id);
    }
    let _ = btf
        .function("wg_index_hashtable_insert")
        .map_err(|e| e.to_string());
    for (name, path) in [
        ("wg_peer", &["handshake", "remote_static"][..]),
        ("wg_peer", &["rx_port"]),
        ("wg_peer", &["is_dead"]),
        ("wg_device", &["incoming_port"]),
        ("wg_device", &["odd"]),
        ("index_hashtable_entry", &["peer", "x"]),
        ("index_hashtable_entry", &["index"]),
    ] {
        let _ = btf.member(name, path).map_err(|e| e.to_string());
    }
    let _ = check_module(btf);
}

fuzz_target!(|bytes: &[u8]| {
    let Some((form, rest)) = bytes.split_first() else {
        return;
    };
    if form & 1 == 0 {
        match Btf::parse(rest) {
            Ok(btf) => exercise(&btf),
            Err(error) => drop(error.to_string()),
        }
        return;
    }
    let [low, high, rest @ ..] = rest else {
        return;
    };
    let (base, split) =
        rest.split_at(usize::from(u16::from_le_bytes([*low, *high])).min(rest.len()));
    let Ok(base) = Btf::parse(base) else {
        return;
    };
    match Btf::parse_split(base, split) {
        Ok(btf) => exercise(&btf),
        Err(error) => drop(error.to_string()),
    }
});
