#!/usr/bin/env bash
# Operator benchmark: 10,000 PinnedPeers across 100 nodes, the wgpin-operator binary against the
# in-memory API server over HTTP. Prints start-up time, one change's latency and writes, and the
# operator's memory; asserts no timing. Needs no root and no network namespaces.
source "$(dirname "$0")/lib.sh"
cd "$WGPIN_ROOT"
ensure_rust
step "benchmarking the operator (release build)"
cargo bench --locked -p wgpin-operator --bench scale 2>&1 | grep -v '^warning: wgpin-agent@'
