//! The whole loop without a real cluster: `kubectl apply` of a PinnedInterface and a PinnedPeer
//! (server-side apply of YAML, as kubectl does) against the in-memory API server; the operator
//! running its loop; the `wgpin-agent cluster` binary in a gateway network namespace, driving
//! wireguard-go and the real eBPF programs, talking to the API over HTTP. A laptop connects,
//! an attacker with the laptop's key is refused and shows up on the PinnedPeer, the API server
//! goes away and comes back (the agent restarted in between), the pin moves, the peer is
//! deleted. Needs root.

mod support;

use std::time::Duration;

use support::{
    cluster::{Loop, http_get_in, metric_value},
    peer_device, tunnel_datagrams, wait_for, wait_for_device,
};
use wgpin_agent::wireguard::{SecretKey, Uapi};
use wgpin_crds::{
    EnforcementState, PinnedNodeState, PinnedPeer,
    access::{self, Call, Scope},
    k8s_openapi::api::events::v1::Event,
    kube::{
        Api,
        api::{DeleteParams, ListParams},
    },
};

#[test]
fn kubectl_apply_to_enforcement_and_back_with_an_outage_a_moved_pin_and_a_deletion() {
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
    // checked against, and everything on that list was used.
    let requests = server.requests();
    let calls: Vec<Call<'_>> = requests
        .iter()
        .filter(|r| r.over_http)
        .map(|r| Call {
            verb: r.verb,
            group: &r.resource.group,
            resource: r.rbac_resource(),
            scope: match r.namespace {
                None => Scope::Cluster,
                Some(_) => Scope::EventNamespace,
            },
            name: r.name.as_deref(),
        })
        .collect();
    let problems = access::audit(access::AGENT, &calls, "");
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The node's private keys: 0600 on the node, and nowhere else — not in the agent's log,
    // not in its metrics, not in any object in the API.
    let keys_dir = setup.paths.state.join("keys");
    let mut private_keys = Vec::new();
    for entry in std::fs::read_dir(&keys_dir).expect("the node's keys") {
        let path = entry.expect("entry").path();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("metadata").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        private_keys.push(
            std::fs::read_to_string(&path)
                .expect("key")
                .trim()
                .to_string(),
        );
    }
    assert!(
        !private_keys.is_empty(),
        "no key under {}",
        keys_dir.display()
    );
    let scraped = agent
        .metrics_address()
        .map(|address| http_get_in(&lan.gateway_ns, address, "/metrics"))
        .unwrap_or_default();
    let api_objects = serde_json::to_string(&(
        runtime
            .block_on(states.list(&ListParams::default()))
            .expect("states")
            .items,
        runtime
            .block_on(peers.list(&ListParams::default()))
            .expect("peers")
            .items,
        runtime
            .block_on(events.list(&ListParams::default()))
            .expect("events")
            .items,
    ))
    .expect("json");
    for key in &private_keys {
        for (place, text) in [
            ("the agent's log", agent.log()),
            ("the agent's metrics", scraped.clone()),
            ("the API", api_objects.clone()),
        ] {
            assert!(
                !text.contains(key.as_str()),
                "a node private key is in {place}"
            );
        }
    }
    drop(agent);
}
