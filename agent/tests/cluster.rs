//! The whole loop without a real cluster: `kubectl apply` of a PinnedInterface and a PinnedPeer
//! (server-side apply of YAML, as kubectl does) against the in-memory API server; the operator
//! running its loop; the `wgpin-agent cluster` binary in a gateway network namespace, driving
//! wireguard-go and the real eBPF programs, talking to the API over HTTP. A laptop connects,
//! an attacker with the laptop's key is refused and shows up on the PinnedPeer, the API server
//! goes away and comes back (the agent restarted in between), the pin moves, the peer is
//! deleted. A second loop gives peers preshared keys from Secrets, which only the agent of the
//! node that serves them reads. Both end by searching every log, API object and metric for
//! every key they made. Needs root.

mod support;

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use support::{
    cluster::{Loop, capture_logs, http_get_in, metric_value},
    peer_device, tunnel_datagrams, wait_for, wait_for_device,
};
use wgpin_agent::wireguard::{DeviceConfig, PeerChange, SecretKey, Uapi};
use wgpin_crds::{
    EnforcementState, PinnedNodeState, PinnedPeer,
    access::{self, Call, Scope},
    k8s_openapi::{
        ByteString,
        api::{core::v1::Secret, events::v1::Event},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    },
    kube::{
        Api,
        api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    },
};
use wgpin_test_apiserver::ApiCall;

#[test]
fn kubectl_apply_to_enforcement_and_back_with_an_outage_a_moved_pin_and_a_deletion() {
    let logs = capture_logs();
    let setup = Loop::start();
    let Loop {
        runtime,
        server,
        client,
        lan,
        device,
        id,
        ..
    } = &setup;
    // kubectl apply: the gateway node, its interface and the laptop's pin.
    let laptop = SecretKey::generate().expect("key");
    let objects = |sources: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: gateway, labels: {{wgpin.io/gateway: \"true\"}}}}\n\
             ---\n\
             apiVersion: wgpin.io/v1alpha1\nkind: PinnedInterface\nmetadata: {{name: gateway}}\n\
             spec: {{nodeSelector: {{matchLabels: {{wgpin.io/gateway: \"true\"}}}}, mode: Dedicated, interfaceName: {device},\n\
                     listenPort: 51820, listenPortEnd: 51829, addresses: [198.51.100.1/24]}}\n\
             ---\n\
             apiVersion: wgpin.io/v1alpha1\nkind: PinnedPeer\nmetadata: {{name: laptop}}\n\
             spec: {{interface: gateway, publicKey: \"{}\", allowedIPs: [198.51.100.2/32], sources: [{sources}]}}\n",
            laptop.public_key()
        )
    };
    setup.apply(&objects("192.0.2.2/32"));
    let mut agent = setup.agent();
    let peer_device_name = format!("{device}-0");
    let uapi = Uapi::default();
    let gateway_key = wait_for_device(&peer_device_name, 1, Duration::from_secs(30));

    // The laptop connects: Ready and Enforced on the gateway, with its endpoint and handshake.
    let _laptop_wg = peer_device(
        &lan.client_ns,
        &format!("wgl{id}"),
        &laptop,
        &gateway_key,
        "192.0.2.1:51820",
        "198.51.100.2",
    );
    assert!(
        tunnel_datagrams(lan, &lan.client_ns, "198.51.100.2") > 0,
        "the pinned laptop gets through"
    );
    let peers: Api<PinnedPeer> = Api::all(client.clone());
    let status = |name: &'static str| {
        runtime
            .block_on(peers.get(name))
            .ok()
            .and_then(|peer| peer.status)
    };
    let is_true = |status: &wgpin_crds::PinnedPeerStatus, type_: &str| {
        status
            .conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    };
    wait_for(
        "the laptop Ready, enforced on the gateway with its endpoint and handshake",
        Duration::from_secs(15),
        || {
            status("laptop").is_some_and(|s| {
                is_true(&s, "Ready")
                    && s.nodes.iter().any(|n| {
                        n.node == "gateway"
                            && n.state == EnforcementState::Enforced
                            && n.endpoint.as_deref() == Some("192.0.2.2:40000")
                            && n.last_handshake_time.is_some()
                            && n.public_key.as_deref() == Some(gateway_key.as_str())
                    })
            })
        },
    );

    // The attacker, with the laptop's key, from its own address: refused, and it shows.
    let _attacker_wg = peer_device(
        &lan.attacker_ns,
        &format!("wga{id}"),
        &laptop,
        &gateway_key,
        "192.0.2.129:51820",
        "198.51.100.2",
    );
    assert_eq!(
        tunnel_datagrams(lan, &lan.attacker_ns, "198.51.100.2"),
        0,
        "the stolen key gets nothing through"
    );
    wait_for(
        "SourceViolation naming the attacker and the node",
        Duration::from_secs(15),
        || {
            status("laptop").is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == "SourceViolation"
                        && c.status == "True"
                        && c.message.contains("192.0.2.130")
                        && c.message.contains("gateway")
                })
            })
        },
    );
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let violation_events = || {
        runtime
            .block_on(events.list(&ListParams::default()))
            .expect("events")
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some("SourceViolation")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("laptop")
            })
            .collect::<Vec<_>>()
    };
    wait_for("a SourceViolation Event", Duration::from_secs(10), || {
        !violation_events().is_empty()
    });
    // The attacker keeps trying; within the minute there is still one Event, with a count.
    assert!(tunnel_datagrams(lan, &lan.attacker_ns, "198.51.100.2") == 0);
    std::thread::sleep(Duration::from_secs(2));
    let written = violation_events();
    assert_eq!(written.len(), 1, "{written:?}");
    let note = written[0].note.clone().unwrap_or_default();
    assert!(
        note.contains("from 192.0.2.130") && note.contains("violation"),
        "{note}"
    );
    let metrics = agent
        .metrics_address()
        .expect("the agent's metrics address");
    let scraped = http_get_in(&lan.gateway_ns, metrics, "/metrics");
    let dropped = metric_value(
        &scraped,
        "wgpin_violation_events_total{interface=\"gateway\",peer=\"laptop\"}",
    );
    assert!(dropped.is_some_and(|v| v > 0.0), "{scraped}");

    // The API server goes away; the agent is even restarted meanwhile. Enforcement goes on:
    // the laptop still gets through, the attacker still does not.
    server.set_unavailable(true);
    agent.kill_9();
    let agent = setup.agent();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        uapi.get(&peer_device_name)
            .is_ok_and(|d| d.peers.len() == 1),
        "a restarted agent without the API keeps the last state:\n{}",
        agent.log()
    );
    wait_for(
        "the laptop through the tunnel during the outage",
        Duration::from_secs(10),
        || tunnel_datagrams(lan, &lan.client_ns, "198.51.100.2") > 0,
    );
    assert_eq!(
        tunnel_datagrams(lan, &lan.attacker_ns, "198.51.100.2"),
        0,
        "still refused during the outage"
    );
    assert!(
        agent
            .log()
            .contains("enforcing the last state received before this start"),
        "{}",
        agent.log()
    );
    // The API server returns: the restarted agent's status gets through.
    server.clear_writes();
    server.set_unavailable(false);
    wait_for(
        "the restarted agent's status after the outage",
        Duration::from_secs(40),
        || {
            server.writes().iter().any(|w| {
                w.resource.plural == "pinnednodestates"
                    && w.name == "gateway"
                    && w.subresource.as_deref() == Some("status")
            })
        },
    );
    let states: Api<PinnedNodeState> = Api::all(client.clone());
    let reported = runtime
        .block_on(states.get("gateway"))
        .expect("state")
        .status
        .expect("status");
    assert!(
        reported
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "{reported:?}"
    );

    // The pin moves to the attacker's address: the old address is refused, the new accepted.
    setup.apply(&objects("192.0.2.130/32"));
    wait_for(
        "the moved pin accepted from the new address",
        Duration::from_secs(30),
        || tunnel_datagrams(lan, &lan.attacker_ns, "198.51.100.2") > 0,
    );
    assert_eq!(
        tunnel_datagrams(lan, &lan.client_ns, "198.51.100.2"),
        0,
        "the old address is refused"
    );

    // Someone unpins one of the fast path's links: the agent withdraws the peer (fail closed),
    // says so on the PinnedPeer, re-attaches and restores it.
    let link = std::fs::read_dir(setup.paths.bpffs.join("links"))
        .expect("links")
        .flatten()
        .next()
        .expect("a link")
        .path();
    std::fs::remove_file(&link).expect("unpin");
    let agent_events = |reason: &'static str| {
        runtime
            .block_on(events.list(&ListParams::default()))
            .expect("events")
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.reporting_controller.as_deref() == Some("wgpin.io/agent")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("laptop")
            })
            .count()
    };
    wait_for(
        "the agent's PeerWithdrawn Event",
        Duration::from_secs(15),
        || agent_events("PeerWithdrawn") == 1,
    );
    wait_for(
        "the agent's PeerRestored Event",
        Duration::from_secs(15),
        || agent_events("PeerRestored") == 1,
    );
    wait_for(
        "the moved pin working again after the restore",
        Duration::from_secs(30),
        || tunnel_datagrams(lan, &lan.attacker_ns, "198.51.100.2") > 0,
    );

    // kubectl delete: the peer leaves WireGuard, then the object goes.
    runtime
        .block_on(peers.delete("laptop", &DeleteParams::default()))
        .expect("delete");
    wait_for(
        "the laptop out of WireGuard",
        Duration::from_secs(15),
        || {
            uapi.get(&peer_device_name)
                .map_or(true, |d| d.peers.is_empty())
        },
    );
    wait_for(
        "the PinnedPeer gone once the agent confirmed",
        Duration::from_secs(15),
        || runtime.block_on(peers.get("laptop")).is_err(),
    );

    // Every call the agent process made is allowed by the access list the chart's RBAC is
    // checked against, and everything on that list was used (but the Secrets rule: no peer here
    // has a preshared key; the preshared-key test audits it).
    let rules: Vec<access::Access> = access::AGENT
        .iter()
        .filter(|rule| rule.resource != "secrets")
        .copied()
        .collect();
    let problems = access::audit(&rules, &agent_calls(&server.requests()), "");
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // No key anywhere it should not be: the node's private keys (0600 in a 0700 directory) and
    // the laptop's (the attacker's copy too) are in no log, no metric and no API object.
    setup.assert_no_key_leaks(
        &agent,
        &logs,
        vec![("the laptop's private key".to_string(), laptop.clone())],
    );
    drop(agent);
}

/// The calls the agent process made (over HTTP), as RBAC sees them.
fn agent_calls(requests: &[ApiCall]) -> Vec<Call<'_>> {
    requests
        .iter()
        .filter(|r| r.over_http)
        .map(|r| Call {
            verb: r.verb,
            group: &r.resource.group,
            resource: r.rbac_resource(),
            scope: match (&r.namespace, r.resource.plural.as_str()) {
                (None, _) => Scope::Cluster,
                (Some(_), "secrets") => Scope::SecretNamespaces,
                (Some(_), _) => Scope::EventNamespace,
            },
            name: r.name.as_deref(),
        })
        .collect()
}

/// A Secret holding `value` under `presharedKey`, as `kubectl create secret generic` makes it.
fn psk_secret(namespace: &str, name: &str, value: &[u8]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        data: Some([("presharedKey".to_string(), ByteString(value.to_vec()))].into()),
        ..Secret::default()
    }
}

/// `wg genpsk` output for `key`.
fn genpsk(key: &SecretKey) -> Vec<u8> {
    format!("{}\n", STANDARD.encode(key.as_bytes())).into_bytes()
}

/// Two nodes, each with an interface whose peers have preshared keys in Secrets. Only the
/// gateway node runs an agent (the `wgpin-agent cluster` binary): it reads the gateway's
/// Secrets by name, never the branch node's, never a list or a watch; WireGuard gets the keys;
/// a missing or malformed Secret leaves its peer out with a message that says so; an outage and
/// a restart during it keep the keys; a deleted Secret takes its peer out again.
#[test]
fn preshared_keys_come_from_the_nodes_own_secrets_by_name_and_stay_through_an_outage() {
    let logs = capture_logs();
    let setup = Loop::start();
    let Loop {
        runtime,
        server,
        client,
        lan,
        device,
        id,
        ..
    } = &setup;
    let key = || SecretKey::generate().expect("key");
    let (laptop, phone, branch_office) = (key(), key(), key());
    let (laptop_psk, phone_psk, branch_psk, unnamed_psk) = (key(), key(), key(), key());

    // The Secrets: the laptop's, the branch node's peer's, and one that nothing names. The
    // phone's does not exist yet.
    let create = |secret: Secret| {
        let namespace = secret.metadata.namespace.clone().expect("namespace");
        runtime
            .block_on(
                Api::<Secret>::namespaced(client.clone(), &namespace)
                    .create(&PostParams::default(), &secret),
            )
            .expect("create the Secret");
    };
    create(psk_secret("wgpin-psk", "laptop-psk", &genpsk(&laptop_psk)));
    create(psk_secret("wgpin-psk", "unnamed", &genpsk(&unnamed_psk)));
    create(psk_secret(
        "wgpin-psk-branch",
        "branch-psk",
        &genpsk(&branch_psk),
    ));
    setup.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: gateway, labels: {{wgpin.io/gateway: \"true\"}}}}\n\
         ---\n\
         apiVersion: v1\nkind: Node\nmetadata: {{name: branch, labels: {{wgpin.io/branch: \"true\"}}}}\n\
         ---\n\
         apiVersion: wgpin.io/v1alpha1\nkind: PinnedInterface\nmetadata: {{name: gateway}}\n\
         spec: {{nodeSelector: {{matchLabels: {{wgpin.io/gateway: \"true\"}}}}, mode: Shared, interfaceName: {device},\n\
                 listenPort: 51820, addresses: [198.51.100.1/24]}}\n\
         ---\n\
         apiVersion: wgpin.io/v1alpha1\nkind: PinnedInterface\nmetadata: {{name: branch}}\n\
         spec: {{nodeSelector: {{matchLabels: {{wgpin.io/branch: \"true\"}}}}, mode: Shared, interfaceName: wgb{id},\n\
                 listenPort: 51821, addresses: [198.51.101.1/24]}}\n\
         ---\n\
         apiVersion: wgpin.io/v1alpha1\nkind: PinnedPeer\nmetadata: {{name: laptop}}\n\
         spec: {{interface: gateway, publicKey: \"{}\", allowedIPs: [198.51.100.2/32], sources: [192.0.2.2/32],\n\
                 presharedKeySecretRef: {{namespace: wgpin-psk, name: laptop-psk}}}}\n\
         ---\n\
         apiVersion: wgpin.io/v1alpha1\nkind: PinnedPeer\nmetadata: {{name: phone}}\n\
         spec: {{interface: gateway, publicKey: \"{}\", allowedIPs: [198.51.100.3/32], sources: [192.0.2.130/32],\n\
                 presharedKeySecretRef: {{namespace: wgpin-psk, name: phone-psk}}}}\n\
         ---\n\
         apiVersion: wgpin.io/v1alpha1\nkind: PinnedPeer\nmetadata: {{name: branch-office}}\n\
         spec: {{interface: branch, publicKey: \"{}\", allowedIPs: [198.51.101.2/32], sources: [203.0.113.0/24],\n\
                 presharedKeySecretRef: {{namespace: wgpin-psk-branch, name: branch-psk}}}}\n",
        laptop.public_key(),
        phone.public_key(),
        branch_office.public_key(),
    ));
    // The branch node's state names its Secret: it is there to be read, by the wrong agent.
    let states: Api<PinnedNodeState> = Api::all(client.clone());
    wait_for(
        "the branch node's state naming its Secret",
        Duration::from_secs(15),
        || {
            runtime.block_on(states.get("branch")).is_ok_and(|state| {
                state
                    .spec
                    .interfaces
                    .iter()
                    .flat_map(|i| &i.peers)
                    .any(|p| {
                        p.preshared_key_secret_ref
                            .as_ref()
                            .is_some_and(|r| r.name == "branch-psk")
                    })
            })
        },
    );
    let refresh = ["--secret-refresh-interval-ms", "1000"];
    let mut agent = setup.agent_with(&refresh, "debug");

    // The laptop is enforced with its preshared key in WireGuard, and connects with it.
    let uapi = Uapi::default();
    let gateway_key = wait_for_device(device, 1, Duration::from_secs(30));
    let psk_of = |peer: &SecretKey| {
        uapi.get(device)
            .ok()
            .and_then(|d| d.peers.get(&peer.public_key())?.preshared_key.clone())
    };
    assert!(
        psk_of(&laptop) == Some(laptop_psk.clone()),
        "WireGuard holds the laptop's preshared key:\n{}",
        agent.log()
    );
    let laptop_device = format!("wgl{id}");
    let _laptop_wg = peer_device(
        &lan.client_ns,
        &laptop_device,
        &laptop,
        &gateway_key,
        "192.0.2.1:51820",
        "198.51.100.2",
    );
    uapi.set(
        &laptop_device,
        &DeviceConfig::default(),
        &[PeerChange::Upsert {
            public_key: gateway_key.parse().expect("gateway key"),
            update_only: true,
            preshared_key: Some(laptop_psk.clone()),
            endpoint: None,
            persistent_keepalive: None,
            allowed_ips: None,
        }],
    )
    .expect("the laptop's preshared key");
    wait_for(
        "the laptop through the tunnel with its preshared key",
        Duration::from_secs(15),
        || tunnel_datagrams(lan, &lan.client_ns, "198.51.100.2") > 0,
    );

    // The phone's Secret does not exist: not enforced, not in WireGuard, and it says why, on
    // the PinnedPeer and in a PeerNotEnforced Event.
    let peers: Api<PinnedPeer> = Api::all(client.clone());
    let gateway_message = |peer: &'static str| {
        runtime
            .block_on(peers.get(peer))
            .ok()
            .and_then(|p| p.status)
            .and_then(|s| s.nodes.into_iter().find(|n| n.node == "gateway"))
            .filter(|n| n.state == EnforcementState::Failed)
            .and_then(|n| n.message)
    };
    wait_for(
        "the phone not enforced, for want of its Secret",
        Duration::from_secs(15),
        || {
            gateway_message("phone").is_some_and(|m| {
                m.contains("preshared key Secret wgpin-psk/phone-psk does not exist")
            })
        },
    );
    assert_eq!(psk_of(&phone), None, "the phone is not in WireGuard");
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    wait_for(
        "the agent's PeerNotEnforced Event naming the missing Secret",
        Duration::from_secs(15),
        || {
            runtime
                .block_on(events.list(&ListParams::default()))
                .is_ok_and(|list| {
                    list.items.iter().any(|e| {
                        e.reason.as_deref() == Some("PeerNotEnforced")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("phone")
                            && e.note
                                .as_deref()
                                .is_some_and(|n| n.contains("wgpin-psk/phone-psk does not exist"))
                    })
                })
        },
    );

    // A value that is not `wg genpsk` output: still out, and it says that instead.
    create(psk_secret("wgpin-psk", "phone-psk", b"my-password\n"));
    wait_for(
        "the phone not enforced, its Secret malformed",
        Duration::from_secs(15),
        || {
            gateway_message("phone").is_some_and(|m| {
                m.contains("wgpin-psk/phone-psk key \"presharedKey\" does not hold a preshared key")
            })
        },
    );
    assert_eq!(psk_of(&phone), None, "the phone is still not in WireGuard");
    // Fixed: the phone goes in, with its key.
    runtime
        .block_on(
            Api::<Secret>::namespaced(client.clone(), "wgpin-psk").patch(
                "phone-psk",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "data": {"presharedKey": STANDARD.encode(genpsk(&phone_psk))}
                })),
            ),
        )
        .expect("fix the phone's Secret");
    wait_for(
        "the phone in WireGuard with its preshared key",
        Duration::from_secs(15),
        || psk_of(&phone) == Some(phone_psk.clone()),
    );

    // The API server goes away: the keys stay through several refreshes, and through a
    // restart of the agent (it kept them on disk, as it keeps the state).
    // (A read in an outage ends after 5 s: kube's client retries the 503s until then.)
    server.set_unavailable(true);
    wait_for(
        "reads of the Secrets failing during the outage",
        Duration::from_secs(20),
        || {
            agent
                .log()
                .contains("keeping the preshared key read before")
        },
    );
    assert!(
        psk_of(&laptop) == Some(laptop_psk.clone()) && psk_of(&phone) == Some(phone_psk.clone()),
        "the preshared keys stay during the outage:\n{}",
        agent.log()
    );
    agent.kill_9();
    let mut agent = setup.agent_with(&refresh, "debug");
    wait_for(
        "the restarted agent enforcing both peers, without the API server",
        Duration::from_secs(15),
        || {
            agent.metrics_address().is_some_and(|address| {
                let scraped = http_get_in(&lan.gateway_ns, address, "/metrics");
                ["laptop", "phone"].iter().all(|peer| {
                    metric_value(
                        &scraped,
                        &format!("wgpin_peer_enforced{{interface=\"gateway\",peer=\"{peer}\"}}"),
                    ) == Some(1.0)
                })
            })
        },
    );
    assert!(
        psk_of(&laptop) == Some(laptop_psk.clone()) && psk_of(&phone) == Some(phone_psk.clone()),
        "the restarted agent keeps the preshared keys:\n{}",
        agent.log()
    );
    assert!(
        agent
            .log()
            .contains("using the preshared keys read before this start"),
        "{}",
        agent.log()
    );
    wait_for(
        "the laptop through the tunnel during the outage",
        Duration::from_secs(10),
        || tunnel_datagrams(lan, &lan.client_ns, "198.51.100.2") > 0,
    );
    server.set_unavailable(false);

    // The laptop's Secret is deleted: its key is revoked, and the laptop leaves WireGuard.
    runtime
        .block_on(
            Api::<Secret>::namespaced(client.clone(), "wgpin-psk")
                .delete("laptop-psk", &DeleteParams::default()),
        )
        .expect("delete the laptop's Secret");
    wait_for(
        "the laptop out of WireGuard once its Secret is gone",
        Duration::from_secs(15),
        || {
            uapi.get(device)
                .is_ok_and(|d| !d.peers.contains_key(&laptop.public_key()))
        },
    );
    assert_eq!(psk_of(&phone), Some(phone_psk.clone()), "the phone stays");

    // What the agent asked for: the gateway's Secrets by name, nothing else — not the branch
    // node's, not the one nothing names, never a list or a watch.
    let requests = server.requests();
    let secret_calls: Vec<&ApiCall> = requests
        .iter()
        .filter(|r| r.over_http && r.resource.group.is_empty() && r.resource.plural == "secrets")
        .collect();
    for call in &secret_calls {
        assert!(
            call.verb == "get"
                && call.namespace.as_deref() == Some("wgpin-psk")
                && matches!(call.name.as_deref(), Some("laptop-psk" | "phone-psk")),
            "the agent read a Secret its node's state does not name, or not by name: {call:?}"
        );
    }
    for name in ["laptop-psk", "phone-psk"] {
        assert!(
            secret_calls.iter().any(|c| c.name.as_deref() == Some(name)),
            "{name} never read"
        );
    }
    // And all of it allowed by the access list the chart's RBAC is checked against, all of
    // that list used.
    let problems = access::audit(access::AGENT, &agent_calls(&requests), "");
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // No key anywhere it should not be: the node's, the peers' private keys, and every
    // preshared key, the ones in Secrets this node never read included.
    setup.assert_no_key_leaks(
        &agent,
        &logs,
        vec![
            ("the laptop's private key".to_string(), laptop.clone()),
            ("the phone's private key".to_string(), phone.clone()),
            (
                "the branch office's private key".to_string(),
                branch_office.clone(),
            ),
            ("the laptop's preshared key".to_string(), laptop_psk.clone()),
            ("the phone's preshared key".to_string(), phone_psk.clone()),
            ("the branch's preshared key".to_string(), branch_psk.clone()),
            ("an unnamed Secret's key".to_string(), unnamed_psk.clone()),
        ],
    );
    agent.kill_9();
}
