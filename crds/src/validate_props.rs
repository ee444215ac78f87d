//! Property tests of validation (proptest, inside `cargo test`).
//!
//! - prefixes and addresses: exactly one spelling of each is accepted (the canonical one), so
//!   the duplicate check and every comparison downstream see one string per pin; no spelling
//!   of an IPv4-mapped IPv6 address or prefix is ever accepted, in sources, allowedIPs or an
//!   endpoint;
//! - the two validators (the CRD schema with its CEL rules, as the API server runs it, and the
//!   Rust rules the operator and the standalone agent run) agree on every spelling thrown at
//!   them, not only on the fixture table's;
//! - any JSON-ish object: `decode`, `validate` and admission answer, never panic, and `decode`
//!   names every field it does not know, at any depth;
//! - huge and odd objects (10,000 sources, 253- and 254-character names, Unicode) are refused
//!   with a message that names the field, in bounded time.
//!
//! Fixed seed (same cases every run); `PROPTEST_RNG_SEED` and `PROPTEST_CASES` explore further.
//! Failures are kept in `crds/proptest-regressions/` and replayed first.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use proptest::{
    prelude::*,
    test_runner::{Config, RngSeed},
};
use serde_json::{Value, json};

use crate::{
    PinnedInterface, PinnedPeer,
    admission::Admission,
    validate::{FieldError, decode, parse_interface_address, parse_ip, parse_prefix},
};

fn config(cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(0x5767_7069_6e02);
    }
    config
}

const KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

fn peer_object(spec: Value) -> Value {
    let mut base = json!({
        "interface": "gateway",
        "publicKey": KEY,
        "allowedIPs": ["198.51.100.2/32"],
        "sources": ["203.0.113.0/24"],
    });
    if let (Some(base), Value::Object(spec)) = (base.as_object_mut(), spec) {
        base.extend(spec);
    }
    json!({
        "apiVersion": "wgpin.io/v1alpha1",
        "kind": "PinnedPeer",
        "metadata": {"name": "p"},
        "spec": base,
    })
}

/// The Rust side, as the operator and the standalone agent run it.
fn rust_peer(object: &Value) -> Result<(), Vec<FieldError>> {
    let peer: PinnedPeer = decode(object)?;
    peer.spec.validate().map(drop)
}

fn rust_interface(object: &Value) -> Result<(), Vec<FieldError>> {
    let interface: PinnedInterface = decode(object)?;
    interface.spec.validate().map(drop)
}

fn is_mapped(net: &IpNet) -> bool {
    matches!(net.addr(), IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

fn arb_v4() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        any::<u32>().prop_map(Ipv4Addr::from),
        prop::sample::select(vec![
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(192, 0, 2, 2),
            Ipv4Addr::new(127, 0, 0, 1),
        ]),
    ]
}

fn arb_v6() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        any::<u128>().prop_map(Ipv6Addr::from),
        // Few groups set: where `::` and the dotted forms come in.
        (any::<u128>(), any::<u128>()).prop_map(|(a, mask)| Ipv6Addr::from(a & mask & (mask >> 7))),
        arb_v4().prop_map(|v4| v4.to_ipv6_mapped()),
        // IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::/96), IPv4-translated (::ffff:0:a.b.c.d).
        arb_v4().prop_map(|v4| Ipv6Addr::from(u128::from(u32::from(v4)))),
        arb_v4().prop_map(|v4| Ipv6Addr::from((0x64_ff9b_u128 << 96) | u128::from(u32::from(v4)))),
        arb_v4()
            .prop_map(|v4| Ipv6Addr::from((0xffff_u128 << 32 << 16) | u128::from(u32::from(v4)))),
    ]
}

/// Every way of writing an IPv6 address that parsers commonly take.
fn spellings_v6(ip: Ipv6Addr) -> Vec<String> {
    let groups = ip.segments();
    let full: Vec<String> = groups.iter().map(|g| format!("{g:x}")).collect();
    let padded: Vec<String> = groups.iter().map(|g| format!("{g:04x}")).collect();
    let v4 = Ipv4Addr::new(
        (groups[6] >> 8) as u8,
        groups[6] as u8,
        (groups[7] >> 8) as u8,
        groups[7] as u8,
    );
    vec![
        ip.to_string(),
        ip.to_string().to_uppercase(),
        full.join(":"),
        padded.join(":"),
        format!("{}:{v4}", full[..6].join(":")),
        format!("::{v4}"),
        format!("::ffff:{v4}"),
        format!("::ffff:{:x}:{:x}", groups[6], groups[7]),
        format!("64:ff9b::{v4}"),
    ]
}

fn spellings_v4(ip: Ipv4Addr) -> Vec<String> {
    let o = ip.octets();
    vec![
        ip.to_string(),
        format!("{:03}.{:03}.{:03}.{:03}", o[0], o[1], o[2], o[3]),
        format!("0x{:x}.{}.{}.{}", o[0], o[1], o[2], o[3]),
        u32::from(ip).to_string(),
        format!("{}.{}.{}", o[0], o[1], u16::from_be_bytes([o[2], o[3]])),
    ]
}

/// An IP address in some spelling, good or bad.
fn arb_ip_text() -> impl Strategy<Value = String> {
    let v4 = (arb_v4(), any::<prop::sample::Index>())
        .prop_map(|(ip, i)| i.get(&spellings_v4(ip)).clone());
    let v6 = (arb_v6(), any::<prop::sample::Index>())
        .prop_map(|(ip, i)| i.get(&spellings_v6(ip)).clone());
    let odd = prop::sample::select(vec![
        "fe80::1%eth0",
        "fe80::1%2",
        " 192.0.2.1",
        "192.0.2.1 ",
        "192.0.2.1\n",
        "[::1]",
        "::ffff:192.0.2.1",
        "::FFFF:192.0.2.1",
        "0:0:0:0:0:ffff:c000:201",
        "::192.0.2.1",
        "64:ff9b::192.0.2.1",
        "",
        "1.2.3",
        "::",
        "0.0.0.0",
        "١٩٢.٠.٢.١",
    ])
    .prop_map(str::to_string);
    prop_oneof![4 => v4, 6 => v6, 2 => odd, 1 => "[0-9a-fA-F:.%]{0,40}", 1 => "\\PC{0,12}"]
}

/// A prefix in some spelling, good or bad: any address spelling, a length in range or not,
/// written plainly or not, host bits set or clear.
fn arb_prefix_text() -> impl Strategy<Value = String> {
    let length = prop_oneof![
        8 => (0u8..=128).prop_map(|l| l.to_string()),
        1 => prop::sample::select(vec!["", "024", "+24", " 24", "129", "-1", "33", "4294967296"])
            .prop_map(str::to_string),
    ];
    let net_v4 = (
        arb_v4(),
        0u8..=32,
        any::<bool>(),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(ip, len, trunc, i)| {
            let net = IpNet::new(IpAddr::V4(ip), len).expect("len");
            let ip = match (trunc, net.trunc().addr()) {
                (true, IpAddr::V4(ip)) => ip,
                _ => ip,
            };
            format!("{}/{len}", i.get(&spellings_v4(ip)))
        });
    let net_v6 = (
        arb_v6(),
        0u8..=128,
        any::<bool>(),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(ip, len, trunc, i)| {
            let net = IpNet::new(IpAddr::V6(ip), len).expect("len");
            let ip = match (trunc, net.trunc().addr()) {
                (true, IpAddr::V6(ip)) => ip,
                _ => ip,
            };
            format!("{}/{len}", i.get(&spellings_v6(ip)))
        });
    let free = (arb_ip_text(), length).prop_map(|(ip, len)| format!("{ip}/{len}"));
    let odd = prop::sample::select(vec![
        "::ffff:0:0/96",
        "::ffff:0.0.0.0/96",
        "::ffff:192.0.2.0/120",
        "::ffff:c000:200/120",
        "::/96",
        "::/80",
        "::fffe:0:0/95",
        "64:ff9b::/96",
        "64:ff9b::c000:202/128",
        "::c000:202/128",
        "::192.0.2.2/128",
        "0.0.0.0/0",
        "::/0",
        "fe80::%eth0/64",
        "192.0.2.0/24 ",
    ])
    .prop_map(str::to_string);
    prop_oneof![4 => net_v4, 6 => net_v6, 3 => free, 2 => odd, 1 => "\\PC{0,16}"]
}

proptest! {
    #![proptest_config(config(10_000))]

    /// A prefix is accepted only in its one canonical spelling, as itself, never mapped.
    #[test]
    fn prefixes_are_accepted_only_as_written_canonically(text in arb_prefix_text()) {
        if let Ok(net) = parse_prefix(&text) {
            prop_assert_eq!(net.to_string(), text.clone());
            prop_assert_eq!(net, net.trunc());
            prop_assert!(!is_mapped(&net), "{}", text);
            // allowAnySource is judged on the parsed value: only a /0 is a catch-all.
            prop_assert_eq!(net.prefix_len() == 0, text == "0.0.0.0/0" || text == "::/0");
        }
        if let Ok(ip) = parse_ip(text.split('/').next().unwrap_or_default()) {
            prop_assert!(!matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()));
        }
        if let Ok(net) = parse_interface_address(&text) {
            prop_assert_eq!(net.to_string(), text.clone());
            prop_assert!(!is_mapped(&net), "{}", text);
        }
    }

    /// Every network, written canonically, is accepted as itself, except the mapped ones,
    /// which are refused with a message that says what to write instead.
    #[test]
    fn every_canonical_prefix_is_accepted_and_mapped_ones_are_refused(
        v4 in any::<u32>(),
        v6 in any::<u128>(),
        len4 in 0u8..=32,
        len6 in 0u8..=128,
    ) {
        let nets = [
            IpNet::new(IpAddr::V4(Ipv4Addr::from(v4)), len4).expect("len").trunc(),
            IpNet::new(IpAddr::V6(Ipv6Addr::from(v6)), len6).expect("len").trunc(),
        ];
        for net in nets {
            let text = net.to_string();
            if is_mapped(&net) {
                let message = parse_prefix(&text).expect_err("mapped");
                prop_assert!(message.contains("IPv4-mapped"), "{}", message);
            } else {
                prop_assert_eq!(parse_prefix(&text), Ok(net));
            }
        }
        // The mapped twin of the IPv4 prefix, in each spelling: refused.
        let v4net = IpNet::new(IpAddr::V4(Ipv4Addr::from(v4)), len4).expect("len").trunc();
        let IpAddr::V4(network) = v4net.addr() else { unreachable!() };
        for spelling in spellings_v6(network.to_ipv6_mapped()) {
            let text = format!("{spelling}/{}", 96 + len4);
            if let Ok(net) = parse_prefix(&text) {
                // Only a spelling that is not the mapped address parses (the NAT64 or
                // IPv4-compatible ones), and then as the plain IPv6 prefix it literally is.
                prop_assert!(!is_mapped(&net), "{} accepted as {}", text, net);
            }
            prop_assert!(parse_ip(&spelling).map_or(true, |ip| ip.is_ipv6() && !matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())));
        }
    }
}

proptest! {
    #![proptest_config(config(250))]

    /// The CRD's CEL rules and the Rust rules give the same verdict on any spelling of a
    /// source, an allowed IP and an endpoint address.
    #[test]
    fn schema_and_rust_agree_on_any_spelling(
        source in arb_prefix_text(),
        allowed in arb_prefix_text(),
        address in arb_ip_text(),
    ) {
        let admission = admission();
        let objects = [
            peer_object(json!({"sources": [source], "allowAnySource": source.ends_with("/0")})),
            peer_object(json!({"allowedIPs": [allowed]})),
            peer_object(json!({
                "sources": ["0.0.0.0/0", "::/0"],
                "allowAnySource": true,
                "endpoint": {"address": address, "port": 51820},
            })),
        ];
        for object in &objects {
            let by_schema = admission.check(object);
            let by_rust = rust_peer(object);
            prop_assert_eq!(
                by_schema.is_ok(),
                by_rust.is_ok(),
                "{}\n  schema+CEL: {:?}\n  Rust: {:?}",
                object["spec"],
                by_schema,
                by_rust
            );
        }
    }
}

fn admission() -> &'static Admission {
    static ADMISSION: std::sync::OnceLock<Admission> = std::sync::OnceLock::new();
    ADMISSION.get_or_init(Admission::new)
}

/// JSON-ish values for fuzzing objects: the field names the types know (and near misses) as
/// keys, any kind of value under them.
fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(vec![0i64, -1, 65535, 65536, 1280, 9000, i64::MIN])
            .prop_map(Value::from),
        arb_prefix_text().prop_map(Value::String),
        arb_ip_text().prop_map(Value::String),
        Just(Value::String(KEY.into())),
        "\\PC{0,20}".prop_map(Value::String),
        "[a-z0-9.-]{0,12}".prop_map(Value::String),
    ];
    let key = prop_oneof![
        prop::sample::select(vec![
            "interface",
            "publicKey",
            "allowedIPs",
            "sources",
            "allowAnySource",
            "endpoint",
            "address",
            "port",
            "persistentKeepaliveSeconds",
            "presharedKeySecretRef",
            "namespace",
            "name",
            "key",
            "nodeSelector",
            "matchLabels",
            "matchExpressions",
            "operator",
            "values",
            "interfaceName",
            "listenPort",
            "listenPortEnd",
            "mode",
            "addresses",
            "mtu",
            "source",
            "AllowedIPs",
            "",
        ])
        .prop_map(str::to_string),
        "\\PC{0,8}",
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config(1_500))]

    /// Any spec, valid or not, of either kind: decode, validate and admission answer with
    /// field errors (every one naming a field and saying something), never a panic.
    #[test]
    fn any_object_is_judged_without_panic(spec in arb_value(), kind in any::<bool>()) {
        let kind = if kind { "PinnedPeer" } else { "PinnedInterface" };
        let object = json!({
            "apiVersion": "wgpin.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": "x"},
            "spec": spec,
        });
        let rust = if kind == "PinnedPeer" { rust_peer(&object) } else { rust_interface(&object) };
        let schema = admission().check(&object);
        for errors in [rust.err(), schema.err()].into_iter().flatten() {
            prop_assert!(!errors.is_empty());
            for error in errors {
                prop_assert!(!error.field.is_empty() && !error.message.is_empty(), "{:?}", error);
            }
        }
    }

    /// Any valid peer with spec fields mixed in from anywhere: a pin that validates is exactly
    /// the sources written, each a canonical prefix, a catch-all only with allowAnySource.
    #[test]
    fn a_validated_pin_is_exactly_the_sources_written(
        sources in prop::collection::vec(arb_prefix_text(), 0..6),
        allow_any in any::<bool>(),
    ) {
        let object = peer_object(json!({"sources": sources, "allowAnySource": allow_any}));
        let peer: PinnedPeer = decode(&object).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        if let Ok(validated) = peer.spec.validate() {
            let written: Vec<String> = validated.sources.iter().map(ToString::to_string).collect();
            prop_assert_eq!(&written, &sources);
            prop_assert!(!validated.sources.is_empty());
            let catch_all = validated.sources.iter().any(|n| n.prefix_len() == 0);
            prop_assert_eq!(catch_all, allow_any);
            prop_assert!(!validated.sources.iter().any(is_mapped));
        }
    }

    /// `decode` names a field it does not know, at whatever depth it was put, as the API
    /// server would (`spec.endpoint.x`, `spec.nodeSelector.matchExpressions[0].x`).
    #[test]
    fn decode_names_every_unknown_field(
        (pointer, at) in prop::sample::select(vec![
            ("", ""),
            ("/spec", "spec"),
            ("/spec/endpoint", "spec.endpoint"),
            ("/spec/presharedKeySecretRef", "spec.presharedKeySecretRef"),
            ("/spec/nodeSelector", "spec.nodeSelector"),
            ("/spec/nodeSelector/matchExpressions/0", "spec.nodeSelector.matchExpressions[0]"),
            ("/metadata", "metadata"),
        ]),
        name in "[a-zA-Z][a-zA-Z0-9]{0,10}",
        value in arb_value(),
    ) {
        let mut object = peer_object(json!({
            "endpoint": {"address": "203.0.113.7", "port": 51820},
            "presharedKeySecretRef": {"namespace": "wgpin-system", "name": "psk"},
            "nodeSelector": {
                "matchLabels": {"zone": "a"},
                "matchExpressions": [{"key": "tier", "operator": "Exists"}],
            },
        }));
        let known = [
            "apiVersion", "kind", "metadata", "spec", "status", "interface", "publicKey",
            "allowedIPs", "sources", "allowAnySource", "endpoint", "persistentKeepaliveSeconds",
            "presharedKeySecretRef", "nodeSelector", "address", "port", "namespace", "name",
            "key", "matchLabels", "matchExpressions", "operator", "values",
        ];
        // Metadata takes many fields (labels, annotations, ...): only check a clear miss there.
        prop_assume!(!known.iter().any(|k| k.eq_ignore_ascii_case(&name)));
        prop_assume!(at != "metadata" || name.starts_with('x'));
        let Some(Value::Object(target)) = object.pointer_mut(pointer) else {
            return Err(TestCaseError::fail(format!("no object at {pointer}")));
        };
        target.insert(name.clone(), value);
        let path = if at.is_empty() { name.clone() } else { format!("{at}.{name}") };
        let errors = rust_peer(&object).expect_err("an unknown field is an error");
        prop_assert!(errors.iter().any(|e| e.field == path), "{} not named: {:?}", path, errors);
    }
}

/// Unknown fields used to be named `spec.endpoint.?.x` (serde_ignored's `?` for an `Option`)
/// and `...matchExpressions.0.x`; now as the API server names them.
#[test]
fn unknown_fields_are_named_at_their_api_path() {
    let mut object = peer_object(json!({
        "endpoint": {"address": "203.0.113.7", "port": 51820, "adress": "x"},
        "nodeSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists", "value": "x"}]},
    }));
    object["spec"]["presharedKeySecretRef"] = json!({"namespace": "a", "name": "b", "kee": "c"});
    let errors = rust_peer(&object).expect_err("unknown fields");
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.endpoint.adress",
            "spec.nodeSelector.matchExpressions[0].value",
            "spec.presharedKeySecretRef.kee",
        ]
    );
}

/// Runs `f`, prints how long it took, and fails only if it took absurdly long.
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    println!("{what}: {took:?}");
    assert!(took < Duration::from_secs(10), "{what} took {took:?}");
    out
}

#[test]
fn ten_thousand_sources_are_refused_with_the_count() {
    let sources: Vec<String> = (0..10_000u32)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    let object = peer_object(json!({ "sources": sources }));
    let rust = timed("Rust validation of 10,000 sources", || rust_peer(&object));
    let errors = rust.expect_err("refused");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].field, "spec.sources");
    assert!(errors[0].message.contains("has 10000 entries, at most 256"));
    let schema = timed("admission of 10,000 sources", || admission().check(&object));
    let errors = schema.expect_err("refused");
    assert!(
        errors
            .iter()
            .any(|e| e.field == "spec.sources" && e.message.contains("at most 256")),
        "{errors:?}"
    );
    // 10,000 sources that are all bad: one error each, still fast, each naming its index.
    let bad: Vec<String> = (0..10_000u32)
        .map(|i| format!("::ffff:10.{}.{}.0/120", i / 256, i % 256))
        .collect();
    let object = peer_object(json!({ "sources": bad }));
    let errors = timed("Rust validation of 10,000 mapped sources", || {
        rust_peer(&object)
    })
    .expect_err("refused");
    assert_eq!(errors.len(), 10_001);
    assert!(
        errors[1..]
            .iter()
            .all(|e| e.message.contains("IPv4-mapped"))
    );
    assert_eq!(errors[10_000].field, "spec.sources[9999]");
}

#[test]
fn long_and_unicode_names_are_refused_clearly() {
    let ok = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(ok.len(), 253);
    let too_long = format!("{ok}e");
    let label_too_long_is_fine_here = "a".repeat(64);
    for (name, valid) in [
        (ok.as_str(), true),
        (too_long.as_str(), false),
        ("gateway-ü", false),
        ("gäteway", false),
        ("ＧＡＴＥＷＡＹ", false),
        ("gateway\u{200b}", false),
        ("", false),
        ("-gateway", false),
        ("gateway.", false),
        (label_too_long_is_fine_here.as_str(), true),
    ] {
        // As a reference to an interface (spec.interface) and as the object's own name.
        let mut object = peer_object(json!({ "interface": name }));
        object["metadata"]["name"] = json!(name);
        let rust = timed("validation of a name", || rust_peer(&object));
        let schema = timed("admission of a name", || admission().check(&object));
        assert_eq!(rust.is_ok(), valid, "{name:?}: {rust:?}");
        assert_eq!(schema.is_ok(), valid, "{name:?}: {schema:?}");
        if !valid {
            let errors = rust.expect_err("refused");
            assert!(
                errors.iter().any(|e| e.field == "spec.interface"
                    && e.message.contains("not a valid object name")),
                "{errors:?}"
            );
            let errors = schema.expect_err("refused");
            assert!(
                errors.iter().any(|e| e.field == "metadata.name"),
                "{errors:?}"
            );
            assert!(
                errors.iter().any(|e| e.field == "spec.interface"),
                "{errors:?}"
            );
        }
    }
    // A device name in Unicode, or longer than Linux allows: refused by both.
    for name in ["wgpïn0", "wgpin012345", "ｗｇ０"] {
        let object = json!({
            "apiVersion": "wgpin.io/v1alpha1",
            "kind": "PinnedInterface",
            "metadata": {"name": "gateway"},
            "spec": {"nodeSelector": {}, "interfaceName": name, "listenPort": 51820},
        });
        let errors = rust_interface(&object).expect_err("refused");
        assert!(
            errors.iter().any(|e| e.field == "spec.interfaceName"),
            "{errors:?}"
        );
        assert!(admission().check(&object).is_err(), "{name}");
    }
}

/// A huge string where a short one belongs (a 1 MB name, key, source) is refused quickly.
#[test]
fn megabyte_strings_are_refused_quickly() {
    let huge = "a".repeat(1 << 20);
    for spec in [
        json!({"interface": huge}),
        json!({"publicKey": huge}),
        json!({"sources": [huge]}),
        json!({"endpoint": {"address": huge, "port": 1}}),
        json!({"presharedKeySecretRef": {"namespace": "a", "name": "b", "key": huge}}),
    ] {
        let object = peer_object(spec);
        let rust = timed("Rust validation of a 1 MB string", || rust_peer(&object));
        assert!(rust.is_err());
        let schema = timed("admission of a 1 MB string", || admission().check(&object));
        assert!(schema.is_err());
    }
}
