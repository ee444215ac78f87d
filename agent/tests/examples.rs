//! The manifests under `examples/` are what users copy: they must pass the CRD schema, the CEL
//! rules and the Rust validation, and render into the state their comments promise.

use std::{path::PathBuf, process::Command};

use wgpin_agent::manifests::load_dir;
use wgpin_crds::{PinnedNodeState, kube::ResourceExt};
use wgpin_operator::{NodeInfo, PortAssignments, render};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn examples_are_valid_and_render_on_gateway_nodes_only() {
    let (objects, errors) = load_dir(&examples_dir()).expect("examples directory loads");
    assert!(
        errors.is_empty(),
        "examples must be valid:\n{}",
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let peers: Vec<String> = objects.peers.iter().map(ResourceExt::name_any).collect();
    assert_eq!(peers, ["alice-laptop", "branch-office", "ci-runner"]);
    assert_eq!(objects.interfaces.len(), 1);

    let gateway = NodeInfo {
        name: "gw-a".into(),
        labels: [("wgpin.io/gateway".to_string(), "true".to_string())].into(),
    };
    let worker = NodeInfo {
        name: "worker".into(),
        labels: Default::default(),
    };
    let rendered = render(
        &objects.interfaces,
        &objects.peers,
        &[gateway, worker],
        &PortAssignments::new(),
    );
    assert!(rendered.problems.is_empty(), "{:?}", rendered.problems);
    assert!(
        !rendered.nodes.contains_key("worker"),
        "the worker is not labelled as a gateway"
    );

    let interface = &rendered.nodes["gw-a"].interfaces[0];
    assert_eq!(interface.interface_name, "wgpin0");
    let pins: Vec<(&str, Vec<&str>)> = interface
        .peers
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.sources.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        pins,
        [
            ("alice-laptop", vec!["203.0.113.0/25", "2001:db8:100::/48"]),
            ("branch-office", vec!["203.0.113.200/32"]),
            ("ci-runner", vec!["0.0.0.0/0", "::/0"]),
        ]
    );
    let ports: Vec<Option<u16>> = interface.peers.iter().map(|p| p.dedicated_port).collect();
    assert_eq!(ports, [Some(51820), Some(51821), Some(51822)]);
}

#[test]
fn render_command_prints_the_node_state_and_fails_on_invalid_objects() {
    let agent = env!("CARGO_BIN_EXE_wgpin-agent");
    let output = Command::new(agent)
        .args(["render", "--dir"])
        .arg(examples_dir())
        .args(["--node", "gw-a", "--label", "wgpin.io/gateway=true"])
        .output()
        .expect("agent runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let state: PinnedNodeState =
        serde_saphyr::from_slice(&output.stdout).expect("stdout is a PinnedNodeState");
    assert_eq!(state.name_any(), "gw-a");
    assert_eq!(state.spec.interfaces[0].peers.len(), 3);

    // One unpinned peer among valid ones: refused with file, object and field; exit 1.
    let dir = tempfile::tempdir().expect("tempdir");
    for file in ["gateway-interface.yaml", "peers.yaml"] {
        std::fs::copy(examples_dir().join(file), dir.path().join(file)).expect("copy example");
    }
    std::fs::write(
        dir.path().join("stolen.yaml"),
        "apiVersion: wgpin.io/v1alpha1\nkind: PinnedPeer\nmetadata: {name: unpinned}\n\
         spec: {interface: gateway, publicKey: gN65BkIKy1eCE9pP1wdc8ROUtkHLF2PfAqYdyYBz6EA=, allowedIPs: [198.51.100.30/32], sources: [\"::/0\"]}\n",
    )
    .expect("write fixture");
    let output = Command::new(agent)
        .args(["render", "--dir"])
        .arg(dir.path())
        .args(["--node", "gw-a", "--label", "wgpin.io/gateway=true"])
        .output()
        .expect("agent runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stolen.yaml (document 1) PinnedPeer/unpinned"),
        "{stderr}"
    );
    assert!(
        stderr.contains("spec.sources: sources contains a catch-all prefix"),
        "{stderr}"
    );
    let state: PinnedNodeState =
        serde_saphyr::from_slice(&output.stdout).expect("valid objects still render");
    assert!(
        state.spec.interfaces[0]
            .peers
            .iter()
            .all(|p| p.name != "unpinned")
    );

    // Bad usage is explained.
    let output = Command::new(agent)
        .args(["render", "--dir", ".", "--label", "novalue"])
        .output()
        .expect("agent runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not KEY=VALUE"));
}
