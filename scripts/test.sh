#!/usr/bin/env bash
# Every test tier that runs on this machine. Run as root on Debian; installs what it needs.
# Prints a closing line "summary: N passed, M failed".
source "$(dirname "$0")/lib.sh"
need_root
"$WGPIN_ROOT/scripts/setup.sh" --test
cd "$WGPIN_ROOT"
# The incremental cache would double the build on disk and a one-off run never reuses it.
export CARGO_INCREMENTAL=0
report_disk_space

# Each check counts one, and each test run by the cargo test step one more.
passed=0
failed=0
tests_passed=0
tests_failed=0
failures=()
check() {
    local name="$1"
    shift
    step "$name"
    if "$@"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failures+=("$name")
    fi
}

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
unit_tests() {
    # One build shared by every crate's unit and integration tests.
    cargo test --workspace --locked 2>&1 | tee "$log"
    local status=${PIPESTATUS[0]}
    read -r tests_passed tests_failed < <(awk '/^test result:/ { p += $4; f += $6 } END { print p + 0, f + 0 }' "$log")
    printf 'cargo test: %d passed, %d failed\n' "$tests_passed" "$tests_failed"
    [ "$status" -eq 0 ] && [ "$tests_passed" -gt 0 ]
}

check "format (cargo fmt --check)" cargo fmt --all -- --check
check "lints (cargo clippy --all-targets -D warnings)" cargo clippy --workspace --all-targets --locked -- -D warnings
check "unit and integration tests: API, render, fast path, WireGuard, data plane, standalone (cargo test)" unit_tests
check "fuzzing: packet parser, UAPI and netlink replies, module BTF, manifests through render to the maps, 20 s per target (scripts/fuzz.sh)" \
    "$WGPIN_ROOT/scripts/fuzz.sh" 20
check "chart CRDs match the Rust types (crdgen --check)" cargo run --locked --quiet -p wgpin-crds --bin crdgen -- --check
check "CRD manifests are valid CustomResourceDefinitions for Kubernetes 1.31 and 1.37 (kubernetes-validate)" \
    bash -c 'for v in 1.31.0 1.37.0; do "$0" --strict --quiet -k "$v" charts/wgpin/crds/*.yaml || exit 1; done' \
    "$WGPIN_TOOLS/venv/bin/kubernetes-validate"
check "Helm chart: lint, rendered objects checked and validated for Kubernetes 1.31 and 1.37, bad values refused (scripts/test-chart.sh)" \
    "$WGPIN_ROOT/scripts/test-chart.sh"
check "GitOps: Argo CD health checks (Lua) and example manifests (scripts/test-gitops.sh)" "$WGPIN_ROOT/scripts/test-gitops.sh"
# --workspace: the same feature set as the cargo test step above, so its build is reused.
check "kernel WireGuard in a VM (netlink backend and identity mode)" cargo test --workspace --locked --test vm -- --ignored --nocapture

printf '\n'
for name in "${failures[@]}"; do printf 'FAILED: %s\n' "$name"; done
printf 'summary: %d passed, %d failed\n' "$((passed + tests_passed))" "$((failed + tests_failed))"
[ "$failed" -eq 0 ]
