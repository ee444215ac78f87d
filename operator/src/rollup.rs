//! Roll-up: the agents' reports (`PinnedNodeState.status`) and the operator's own problems
//! become one `PinnedPeer.status`. Pure.
//!
//! Conditions follow kstatus (Flux's health reads `Reconciling` and `Stalled`; Argo CD uses the
//! Lua checks in `gitops/argocd-health`):
//! `Ready` (True when every selected node enforces the pin), `Reconciling` (nodes still
//! applying), `Stalled` (the user must change something: an invalid or conflicting object, or a
//! node that cannot enforce), plus `Enforced` and `SourceViolation`. The list of nodes is bounded
//! ([`MAX_STATUS_NODES`]): nodes that need attention first, then the rest, counted in
//! `nodeCounts` either way, so a peer on thousands of nodes keeps a small status.

use std::collections::BTreeMap;

use wgpin_crds::{
    EnforcementState, PinnedNodeStateStatus, PinnedPeer, PinnedPeerStatus, ViolationSummary,
    conditions::{
        ENFORCED, READY, RECONCILING, SOURCE_VIOLATION, STALLED, condition, set_condition,
    },
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    kube::ResourceExt,
    peer::{MAX_STATUS_NODES, NodeCounts, PeerNodeStatus},
};

use crate::render::Problem;

/// Everything the roll-up of one peer needs.
pub struct RollUpInput<'a> {
    pub peer: &'a PinnedPeer,
    /// The nodes the peer is rendered on.
    pub nodes: &'a [String],
    /// Each node's `PinnedNodeState.status`, when the agent has written one.
    pub reports: &'a BTreeMap<String, PinnedNodeStateStatus>,
    /// Problems render found with this peer.
    pub problems: &'a [Problem],
    /// The dedicated port render assigned, if any.
    pub dedicated_port: Option<u16>,
    /// The status as it is now: transition times carry over when nothing changed.
    pub previous: Option<&'a PinnedPeerStatus>,
    pub now: Time,
}

fn attention(state: EnforcementState) -> u8 {
    match state {
        EnforcementState::Failed | EnforcementState::Withdrawn => 0,
        EnforcementState::Pending => 1,
        EnforcementState::Enforced => 2,
    }
}

/// The status of one peer.
pub fn roll_up(input: &RollUpInput<'_>) -> PinnedPeerStatus {
    let peer = input.peer;
    let generation = peer.metadata.generation;
    let name = peer.name_any();
    let mut status = input.previous.cloned().unwrap_or_default();
    status.observed_generation = generation;
    status.key_prefix = peer.spec.public_key.get(..8).map(|p| format!("{p}…"));
    status.listen_port = input.dedicated_port;
    let set =
        |status: &mut PinnedPeerStatus, type_: &str, value: bool, reason: &str, message: String| {
            set_condition(
                &mut status.conditions,
                condition(
                    type_,
                    if value { "True" } else { "False" },
                    reason,
                    message,
                    generation,
                    input.now.clone(),
                ),
            );
        };

    if let Some(problem) = input.problems.first() {
        // The object itself is the trouble: nothing runs until the user changes it.
        let message = input
            .problems
            .iter()
            .map(|p| p.message.clone())
            .collect::<Vec<_>>()
            .join("; ");
        let reason = problem.reason.as_str();
        status.node_counts = Some(NodeCounts::default());
        status.nodes.clear();
        set(&mut status, READY, false, reason, message.clone());
        set(&mut status, STALLED, true, reason, message.clone());
        set(&mut status, RECONCILING, false, reason, String::new());
        set(&mut status, ENFORCED, false, reason, message);
        return status;
    }

    let mut nodes: Vec<PeerNodeStatus> = Vec::new();
    let mut violations: Option<ViolationSummary> = None;
    for node in input.nodes {
        let report = input.reports.get(node).and_then(|report| {
            report
                .interfaces
                .iter()
                .filter(|i| i.name == peer.spec.interface)
                .find_map(|i| i.peers.iter().find(|p| p.name == name).map(|p| (i, p)))
        });
        let entry = match report {
            // A report for an older generation of the peer is still pending.
            Some((interface, report))
                if report.observed_generation.is_none()
                    || report.observed_generation >= generation =>
            {
                if let Some(seen) = &report.violations {
                    let total = violations.get_or_insert_with(ViolationSummary::default);
                    total.count += seen.count;
                    let newer = match (&seen.last_time, &total.last_time) {
                        (Some(a), Some(b)) => a.0 > b.0,
                        (Some(_), None) => true,
                        _ => false,
                    };
                    if newer || total.last_source.is_none() {
                        total.last_source = seen.last_source.clone();
                        total.last_time = seen.last_time.clone();
                        total.last_node = Some(node.clone());
                    }
                }
                PeerNodeStatus {
                    node: node.clone(),
                    state: report.state,
                    mode: interface.mode,
                    public_key: interface.public_key.clone(),
                    listen_port: report.listen_port,
                    endpoint: report.endpoint.clone(),
                    last_handshake_time: report.last_handshake_time.clone(),
                    message: report.message.clone(),
                }
            }
            _ => PeerNodeStatus {
                node: node.clone(),
                state: EnforcementState::Pending,
                mode: None,
                public_key: None,
                listen_port: None,
                endpoint: None,
                last_handshake_time: None,
                message: Some("the node's agent has not reported this generation yet".into()),
            },
        };
        nodes.push(entry);
    }

    let count = |wanted: &[EnforcementState]| {
        nodes.iter().filter(|n| wanted.contains(&n.state)).count() as u32
    };
    let counts = NodeCounts {
        selected: nodes.len() as u32,
        enforced: count(&[EnforcementState::Enforced]),
        pending: count(&[EnforcementState::Pending]),
        failed: count(&[EnforcementState::Failed, EnforcementState::Withdrawn]),
    };
    nodes.sort_by(|a, b| (attention(a.state), &a.node).cmp(&(attention(b.state), &b.node)));
    nodes.truncate(MAX_STATUS_NODES);
    status.nodes = nodes;
    status.node_counts = Some(counts);
    status.violations = violations.clone();

    let all = counts.selected > 0 && counts.enforced == counts.selected;
    let summary = format!(
        "{} of {} nodes enforce the pin",
        counts.enforced, counts.selected
    );
    if counts.selected == 0 {
        let message = "no node runs this peer's interface and matches its nodeSelector".to_string();
        set(&mut status, READY, false, "NoNodeSelected", message.clone());
        set(
            &mut status,
            STALLED,
            true,
            "NoNodeSelected",
            message.clone(),
        );
        set(
            &mut status,
            RECONCILING,
            false,
            "NoNodeSelected",
            String::new(),
        );
        set(&mut status, ENFORCED, false, "NoNodeSelected", message);
    } else if counts.failed > 0 {
        let failed: Vec<String> = status
            .nodes
            .iter()
            .filter(|n| {
                matches!(
                    n.state,
                    EnforcementState::Failed | EnforcementState::Withdrawn
                )
            })
            .map(|n| format!("{}: {}", n.node, n.message.clone().unwrap_or_default()))
            .collect();
        let message = format!("{summary}; failing: {}", failed.join("; "));
        set(&mut status, READY, false, "NodesFailing", message.clone());
        set(&mut status, STALLED, true, "NodesFailing", message.clone());
        set(
            &mut status,
            RECONCILING,
            counts.pending > 0,
            "NodesFailing",
            summary.clone(),
        );
        set(&mut status, ENFORCED, false, "NodesFailing", message);
    } else if counts.pending > 0 {
        set(&mut status, READY, false, "Pending", summary.clone());
        set(&mut status, STALLED, false, "Pending", String::new());
        set(&mut status, RECONCILING, true, "Pending", summary.clone());
        set(&mut status, ENFORCED, false, "Pending", summary);
    } else {
        set(&mut status, READY, all, "Enforced", summary.clone());
        set(&mut status, STALLED, false, "Enforced", String::new());
        set(&mut status, RECONCILING, false, "Enforced", String::new());
        set(&mut status, ENFORCED, all, "Enforced", summary);
    }
    match &violations {
        Some(seen) if seen.count > 0 => {
            let message = format!(
                "{} packets from outside the pin; last from {} on node {}",
                seen.count,
                seen.last_source.as_deref().unwrap_or("an unknown source"),
                seen.last_node.as_deref().unwrap_or("?")
            );
            set(
                &mut status,
                SOURCE_VIOLATION,
                true,
                "ViolationsSeen",
                message,
            );
        }
        _ => set(
            &mut status,
            SOURCE_VIOLATION,
            false,
            "NoViolations",
            String::new(),
        ),
    }
    status
}

#[cfg(test)]
mod tests {
    use wgpin_crds::{
        InterfaceStatus, PeerEnforcementStatus, PinnedPeerSpec, ResolvedMode,
        k8s_openapi::jiff::Timestamp,
    };

    use super::*;
    use crate::render::ProblemReason;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(1_700_000_000 + seconds).expect("timestamp"))
    }

    fn peer(generation: i64) -> PinnedPeer {
        let mut peer = PinnedPeer::new(
            "laptop",
            PinnedPeerSpec {
                interface: "gateway".into(),
                node_selector: None,
                public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
                allowed_ips: vec!["198.51.100.2/32".into()],
                sources: vec!["203.0.113.0/24".into()],
                allow_any_source: false,
                endpoint: None,
                persistent_keepalive_seconds: None,
                preshared_key_secret_ref: None,
            },
        );
        peer.metadata.generation = Some(generation);
        peer
    }

    fn report(
        state: EnforcementState,
        generation: i64,
        violations: Option<(u64, &str, i64)>,
    ) -> PinnedNodeStateStatus {
        PinnedNodeStateStatus {
            observed_generation: Some(1),
            conditions: vec![],
            interfaces: vec![InterfaceStatus {
                name: "gateway".into(),
                mode_fallback: None,
                mode: Some(ResolvedMode::Shared),
                backend: None,
                fast_path: None,
                public_key: Some("node-key".into()),
                peers: vec![PeerEnforcementStatus {
                    name: "laptop".into(),
                    state,
                    observed_generation: Some(generation),
                    listen_port: Some(51820),
                    endpoint: Some("203.0.113.5:40000".into()),
                    last_handshake_time: None,
                    rx_bytes: None,
                    tx_bytes: None,
                    violations: violations.map(|(count, source, time)| ViolationSummary {
                        count,
                        last_source: Some(source.into()),
                        last_node: None,
                        last_time: Some(at(time)),
                    }),
                    message: (state == EnforcementState::Failed).then(|| "port in use".into()),
                }],
            }],
        }
    }

    fn condition_of<'a>(status: &'a PinnedPeerStatus, type_: &str) -> (&'a str, &'a str) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition present");
        (c.status.as_str(), c.reason.as_str())
    }

    fn nodes(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// (what, (node, state, generation reported) per node, expected Ready, Reconciling,
    /// Stalled, counts enforced/pending/failed)
    type Outcome = (
        &'static str,
        Vec<(&'static str, EnforcementState, i64)>,
        &'static str,
        &'static str,
        &'static str,
        (u32, u32, u32),
    );

    #[test]
    fn table_of_outcomes() {
        use EnforcementState::*;
        let cases: Vec<Outcome> = vec![
            (
                "all enforced",
                vec![("a", Enforced, 2), ("b", Enforced, 2)],
                "True",
                "False",
                "False",
                (2, 0, 0),
            ),
            (
                "one still pending",
                vec![("a", Enforced, 2), ("b", Pending, 2)],
                "False",
                "True",
                "False",
                (1, 1, 0),
            ),
            (
                "an old generation is pending",
                vec![("a", Enforced, 2), ("b", Enforced, 1)],
                "False",
                "True",
                "False",
                (1, 1, 0),
            ),
            (
                "one failed",
                vec![("a", Enforced, 2), ("b", Failed, 2)],
                "False",
                "False",
                "True",
                (1, 0, 1),
            ),
            (
                "withdrawn counts as failing",
                vec![("a", Withdrawn, 2)],
                "False",
                "False",
                "True",
                (0, 0, 1),
            ),
        ];
        for (what, node_reports, ready, reconciling, stalled, (enforced, pending, failed)) in cases
        {
            let peer = peer(2);
            let names: Vec<String> = node_reports.iter().map(|(n, _, _)| n.to_string()).collect();
            let reports: BTreeMap<String, PinnedNodeStateStatus> = node_reports
                .iter()
                .map(|(n, s, g)| (n.to_string(), report(*s, *g, None)))
                .collect();
            let status = roll_up(&RollUpInput {
                peer: &peer,
                nodes: &names,
                reports: &reports,
                problems: &[],
                dedicated_port: None,
                previous: None,
                now: at(0),
            });
            assert_eq!(condition_of(&status, READY).0, ready, "{what}");
            assert_eq!(condition_of(&status, RECONCILING).0, reconciling, "{what}");
            assert_eq!(condition_of(&status, STALLED).0, stalled, "{what}");
            let counts = status.node_counts.expect("counts");
            assert_eq!(
                (counts.enforced, counts.pending, counts.failed),
                (enforced, pending, failed),
                "{what}"
            );
            assert!(
                status
                    .conditions
                    .iter()
                    .all(|c| c.observed_generation == Some(2)),
                "{what}"
            );
            assert_eq!(status.key_prefix.as_deref(), Some("xTIBA5rb…"));
        }
    }

    #[test]
    fn a_node_without_a_report_is_pending() {
        let peer = peer(1);
        let status = roll_up(&RollUpInput {
            peer: &peer,
            nodes: &nodes(&["a"]),
            reports: &BTreeMap::new(),
            problems: &[],
            dedicated_port: Some(51821),
            previous: None,
            now: at(0),
        });
        assert_eq!(status.nodes[0].state, EnforcementState::Pending);
        assert_eq!(status.listen_port, Some(51821));
        assert_eq!(condition_of(&status, READY), ("False", "Pending"));
    }

    #[test]
    fn problems_stall_the_peer_with_the_reason() {
        let peer = peer(3);
        let problem = Problem {
            kind: "PinnedPeer",
            name: "laptop".into(),
            reason: ProblemReason::DuplicatePublicKey,
            message: "PinnedPeer \"old\" is older and has the same public key".into(),
        };
        let status = roll_up(&RollUpInput {
            peer: &peer,
            nodes: &[],
            reports: &BTreeMap::new(),
            problems: std::slice::from_ref(&problem),
            dedicated_port: None,
            previous: None,
            now: at(0),
        });
        assert_eq!(
            condition_of(&status, READY),
            ("False", "DuplicatePublicKey")
        );
        assert_eq!(
            condition_of(&status, STALLED),
            ("True", "DuplicatePublicKey")
        );
        assert!(
            status
                .conditions
                .iter()
                .any(|c| c.message.contains("same public key"))
        );
    }

    #[test]
    fn violations_add_up_and_name_the_latest_source_and_node() {
        let peer = peer(1);
        let reports: BTreeMap<String, PinnedNodeStateStatus> = [
            (
                "a".to_string(),
                report(
                    EnforcementState::Enforced,
                    1,
                    Some((5, "192.0.2.9:4000", 10)),
                ),
            ),
            (
                "b".to_string(),
                report(
                    EnforcementState::Enforced,
                    1,
                    Some((2, "192.0.2.77:5000", 20)),
                ),
            ),
        ]
        .into();
        let status = roll_up(&RollUpInput {
            peer: &peer,
            nodes: &nodes(&["a", "b"]),
            reports: &reports,
            problems: &[],
            dedicated_port: None,
            previous: None,
            now: at(30),
        });
        let seen = status.violations.clone().expect("violations");
        assert_eq!(
            (
                seen.count,
                seen.last_source.as_deref(),
                seen.last_node.as_deref()
            ),
            (7, Some("192.0.2.77:5000"), Some("b"))
        );
        let violation = status
            .conditions
            .iter()
            .find(|c| c.type_ == SOURCE_VIOLATION)
            .expect("condition");
        assert_eq!(violation.status, "True");
        assert!(
            violation.message.contains("192.0.2.77:5000") && violation.message.contains("node b"),
            "{}",
            violation.message
        );
    }

    #[test]
    fn many_nodes_keep_a_bounded_list_with_trouble_first_and_stable_transitions() {
        let peer = peer(1);
        let names: Vec<String> = (0..100).map(|i| format!("node-{i:03}")).collect();
        let reports: BTreeMap<String, PinnedNodeStateStatus> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    n.clone(),
                    report(
                        if i == 77 {
                            EnforcementState::Failed
                        } else {
                            EnforcementState::Enforced
                        },
                        1,
                        None,
                    ),
                )
            })
            .collect();
        let input = |previous, now| RollUpInput {
            peer: &peer,
            nodes: &names,
            reports: &reports,
            problems: &[],
            dedicated_port: None,
            previous,
            now,
        };
        let first = roll_up(&input(None, at(0)));
        assert_eq!(first.nodes.len(), MAX_STATUS_NODES);
        assert_eq!(
            first.nodes[0].node, "node-077",
            "the failing node comes first"
        );
        assert_eq!(
            first
                .node_counts
                .map(|c| (c.selected, c.enforced, c.failed)),
            Some((100, 99, 1))
        );
        // The same outcome later writes the same status: nothing to patch.
        let again = roll_up(&input(Some(&first), at(60)));
        assert_eq!(again, first);
    }
}
