#!/usr/bin/env bash
# Data-plane benchmark: 1,000 peers programmed from empty, steady-state reconcile, agent memory,
# Shared-mode detection latency. Prints figures and ratios to the targets; asserts no timing.
# Run as root; installs what it needs through scripts/setup.sh.
source "$(dirname "$0")/lib.sh"
need_root
"$WGPIN_ROOT/scripts/setup.sh"
cd "$WGPIN_ROOT"
step "benchmarking the data plane (release build)"
cargo bench --locked -p wgpin-agent --bench dataplane 2>&1 | grep -v '^warning: wgpin-agent@'
