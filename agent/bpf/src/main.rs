//! wgpin's fast path: UDP to a managed port passes only from a source pinned for that port.
//!
//! One decision ([`decide`]) behind two hooks: XDP on the underlay interfaces, and TC ingress
//! (tcx) where XDP cannot attach. The parser is `wgpin_common::parse`, unit-tested on the host.
//!
//! Verdicts, all in one place:
//! - not UDP, a later fragment, or UDP to a port wgpin does not manage: pass untouched;
//! - UDP to a managed port from a pinned source: pass, counted for the port (and its peer);
//! - UDP to a managed port from any other source: drop, counted, and reported through the
//!   violations ring buffer, at most one event per source per interval;
//! - a packet built to hide its UDP header from the parser: drop, counted.
//!
//! The crate builds for the host too (as an empty binary) so the workspace builds everywhere;
//! the programs exist only for the BPF target.

#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod fast_path;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
