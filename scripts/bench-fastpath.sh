#!/usr/bin/env bash
# Benchmark of the fast path (figures, not a test): per-packet program cost with
# BPF_PROG_TEST_RUN, then drop rate and allowed throughput on a veth pair between two network
# namespaces for no filter, wgpin's XDP and TC programs and an equivalent nftables ruleset,
# side by side. Prints a table; asserts nothing about timings. docs/benchmarks.md reads it.
#
# Run as root on Debian:  sudo bash scripts/bench-fastpath.sh      (about 5 minutes)
# Knobs (environment, see agent/benches/fastpath.rs): WGPIN_BENCH_SECS (2) and
# WGPIN_BENCH_ROUNDS (3) per traffic variant, WGPIN_BENCH_REPEAT (1000000),
# WGPIN_BENCH_PARTS (ab), WGPIN_BENCH_FILTERS (all), WGPIN_BENCH_DRAIN (0).
# CARGO_TARGET_DIR is honoured as cargo does.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_root

ensure_build_deps
# trafgen (netsniff-ng) generates the traffic, nft holds the comparison ruleset; timeout
# (coreutils) bounds every trafgen run even if the bench dies.
ensure_apt nftables netsniff-ng iproute2 coreutils
ensure_rust
# The agent's build compiles its eBPF programs: nightly, rust-src and bpf-linker.
ensure_ebpf_toolchain

if ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
    step "mounting bpffs on /sys/fs/bpf"
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf
fi

# Every name the bench creates carries this id, so that whatever a kill leaves behind can be
# found and removed here: its namespaces (with their veth pair and nft tables), its bpffs root,
# its work directory and any trafgen still running in its client namespace.
export WGPIN_BENCH_ID="$$"
cleanup() {
    local pid
    for pid in $(ip netns pids "wgpb-$WGPIN_BENCH_ID-c" 2>/dev/null); do
        kill "$pid" 2>/dev/null || true
    done
    ip netns del "wgpb-$WGPIN_BENCH_ID-s" 2>/dev/null || true
    ip netns del "wgpb-$WGPIN_BENCH_ID-c" 2>/dev/null || true
    rm -rf "/sys/fs/bpf/wgpin-bench-$WGPIN_BENCH_ID" "${TMPDIR:-/tmp}/wgpin-bench-$WGPIN_BENCH_ID"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cd "$WGPIN_ROOT"
# aya-build relays the eBPF build's own output as "warning: wgpin-agent@..." lines: noise here.
quiet() { grep -v '^warning: wgpin-agent@' || true; }
step "building the bench (cargo bench --no-run: the release profile, eBPF programs included)"
cargo bench --locked -p wgpin-agent --bench fastpath --no-run 2>&1 | quiet
step "running it: progress first, then the table (about 5 minutes)"
cargo bench --locked -p wgpin-agent --bench fastpath 2>&1 | quiet
