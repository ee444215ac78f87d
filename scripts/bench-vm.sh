#!/usr/bin/env bash
# Kernel-VM backend benchmark: 1,000 peers programmed into an empty device and read back, by
# kernel WireGuard over generic netlink and by wireguard-go over UAPI, side by side in one
# QEMU/TCG guest (tests/vm/), plus the same UAPI figures on the host for the TCG slowdown.
# Prints figures and the netlink/UAPI ratios; asserts no timing, fails when a step fails.
# Run as root; installs what it needs through scripts/setup.sh. About 1 minute after the build.
source "$(dirname "$0")/lib.sh"
need_root
"$WGPIN_ROOT/scripts/setup.sh"
ensure_vm_tools
cd "$WGPIN_ROOT"
step "benchmarking the WireGuard backends in the kernel VM (release build)"
cargo bench --locked -p wgpin-agent --bench vm_backends 2>&1 | grep -v '^warning: wgpin-agent@'
