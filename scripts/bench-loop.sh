#!/usr/bin/env bash
# Loop benchmark: kubectl apply → PinnedPeer Ready (p50/p99 over 100 changes) and a violation →
# SourceViolation condition, with the operator, the agent binary, wireguard-go and the eBPF fast
# path in network namespaces. Prints figures; asserts no timing. Run as root.
source "$(dirname "$0")/lib.sh"
need_root
"$WGPIN_ROOT/scripts/setup.sh"
cd "$WGPIN_ROOT"
step "benchmarking the whole loop (release build)"
cargo bench --locked -p wgpin-agent --bench convergence 2>&1 | grep -v '^warning: wgpin-agent@'
