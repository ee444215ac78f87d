#!/usr/bin/env bash
# Installs everything the demo and the tests need, idempotently (run as root on Debian).
# scripts/demo.sh and scripts/test.sh call it; run it alone to prepare a machine.
#   scripts/setup.sh          what the demo needs
#   scripts/setup.sh --test   plus what the test tiers need
source "$(dirname "$0")/lib.sh"
need_root

ensure_build_deps
ensure_rust
ensure_ebpf_toolchain
# The demo and the tests both run WireGuard (wireguard-go) in network namespaces.
ensure_netns_tools
if [ "${1:-}" = "--test" ]; then
    # Offline validation of the generated CRD manifests against Kubernetes' own schemas.
    ensure_python_tool kubernetes-validate==1.37.0 kubernetes-validate
    # The Helm chart's lint and render checks (scripts/test-chart.sh).
    ensure_helm
    # The Argo CD health checks (Lua) run through a real interpreter (scripts/test-gitops.sh).
    ensure_apt lua5.4
    # The flood test (agent/tests/flood.rs) floods with trafgen, bounded by timeout.
    ensure_apt netsniff-ng coreutils
    # The fault tests detach the fast path's link as an intruder would (bpftool link detach).
    ensure_apt bpftool
    # The kernel-VM tier: QEMU and what builds its image from Debian packages (tests/vm/).
    ensure_vm_tools
fi
