#!/usr/bin/env bash
# Benchmark of a spoofed flood at a shared WireGuard port while the pinned peer works (figures,
# not a test): the real `wgpin-agent standalone` with wireguard-go in a gateway namespace, the
# pinned peer "laptop" pinging through its tunnel, trafgen flooding the port from random
# sources; no flood, the generator alone and the flood side by side. Prints tables; asserts
# nothing about timings (agent/tests/flood.rs asserts the properties). docs/benchmarks.md
# reads it.
#
# Run as root on Debian:  sudo bash scripts/bench-flood.sh      (about 3 minutes, plus the build)
# Knobs (environment, see agent/benches/flood.rs): WGPIN_BENCH_SECS (10) per phase,
# WGPIN_BENCH_ROUNDS (2), WGPIN_BENCH_SENDERS (1,<CPUs>), WGPIN_BENCH_PING_MS (10),
# WGPIN_BENCH_GUARD_MS (200). CARGO_TARGET_DIR is honoured as cargo does.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_root

ensure_build_deps
# trafgen (netsniff-ng) floods; timeout (coreutils) bounds every trafgen run even if the bench
# dies; wireguard-go runs both ends of the tunnel.
ensure_apt netsniff-ng coreutils
ensure_netns_tools
ensure_rust
# The agent's build compiles its eBPF programs: nightly, rust-src and bpf-linker.
ensure_ebpf_toolchain

# Every name the bench creates carries this id, so that whatever a kill leaves behind can be
# found and removed here: its three namespaces (with their veth pairs) and the processes in
# them (the agent, both wireguard-go, trafgen), its bpffs root, its work directory and the
# WireGuard UAPI sockets.
export WGPIN_BENCH_ID="$$"
cleanup() {
    local ns pid
    for ns in g l f; do
        for pid in $(ip netns pids "wgfl-$WGPIN_BENCH_ID-$ns" 2>/dev/null); do
            kill "$pid" 2>/dev/null || true
        done
    done
    for ns in g l f; do
        ip netns del "wgfl-$WGPIN_BENCH_ID-$ns" 2>/dev/null || true
    done
    rm -f "/var/run/wireguard/wgf$WGPIN_BENCH_ID.sock" "/var/run/wireguard/wlf$WGPIN_BENCH_ID.sock"
    rm -rf "/sys/fs/bpf/wgpin-flood-$WGPIN_BENCH_ID" "${TMPDIR:-/tmp}/wgpin-flood-$WGPIN_BENCH_ID"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cd "$WGPIN_ROOT"
# aya-build relays the eBPF build's own output as "warning: wgpin-agent@..." lines: noise here.
quiet() { grep -v '^warning: wgpin-agent@' || true; }
step "building the bench (cargo bench --no-run: the release profile, the agent's binary and eBPF programs included)"
cargo bench --locked -p wgpin-agent --bench flood --no-run 2>&1 | quiet
step "running it: progress first, then the tables (about 3 minutes)"
cargo bench --locked -p wgpin-agent --bench flood 2>&1 | quiet
