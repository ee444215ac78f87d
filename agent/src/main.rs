//! `wgpin-agent`: the node agent's command line.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use wgpin_agent::manifests;
use wgpin_crds::PinnedNodeState;
use wgpin_operator::{NodeInfo, PortAssignments, render};

#[derive(Parser)]
#[command(name = "wgpin-agent", version, about = "wgpin node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the manifests in a directory and print the PinnedNodeState this node would
    /// enforce, without changing anything. Exits 1 when an object is invalid or left out.
    Render {
        /// Directory with PinnedInterface and PinnedPeer manifests (read recursively).
        #[arg(long)]
        dir: PathBuf,
        /// This node's name.
        #[arg(long, default_value = "localhost")]
        node: String,
        /// A label of this node, for the interfaces' and peers' node selectors (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE, for example wgpin.io/gateway=true"))?;
    if key.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((key.to_string(), value.to_string()))
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Render { dir, node, labels } => render_command(dir, node, labels),
    }
}

fn render_command(dir: PathBuf, node: String, labels: Vec<(String, String)>) -> ExitCode {
    let (objects, errors) = match manifests::load_dir(&dir) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    for error in &errors {
        eprintln!("error: {error}");
    }
    let this_node = NodeInfo {
        name: node.clone(),
        labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
    };
    let rendered = render(
        &objects.interfaces,
        &objects.peers,
        &[this_node],
        &PortAssignments::new(),
    );
    for problem in &rendered.problems {
        eprintln!("error: {problem}");
    }
    eprintln!(
        "read {} PinnedInterface(s) and {} PinnedPeer(s) from {}; {} invalid, {} left out",
        objects.interfaces.len(),
        objects.peers.len(),
        dir.display(),
        errors.len(),
        rendered.problems.len()
    );
    match rendered.nodes.get(&node) {
        Some(spec) => {
            let state = PinnedNodeState::new(&node, spec.clone());
            match serde_saphyr::to_string(&state) {
                Ok(yaml) => print!("{yaml}"),
                Err(e) => {
                    eprintln!("error: cannot print the rendered state: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        None => eprintln!("node {node:?} runs no interface: no PinnedInterface selects its labels"),
    }
    if errors.is_empty() && rendered.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
