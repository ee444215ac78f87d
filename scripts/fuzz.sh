#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz with libFuzzer) for a bounded time, starting from its
# committed corpus (fuzz/corpus/<target>/), and fails on any crash, hang or memory blow-up,
# printing the input that reproduces it. Inputs a run finds are kept in fuzz/work/<target>/
# (ignored by git), so later runs on this machine start from there.
#
#   scripts/fuzz.sh [seconds-per-target]     default 30: five targets, 2.5 minutes of fuzzing
#
# Installs what it needs if missing (cargo-fuzz; nightly, rust-src and bpf-linker, which the
# agent's build uses). The first build takes about 5 minutes on 2 cores, later ones seconds.
# It ends with "fuzz: N passed, M failed" (one per target).
source "$(dirname "$0")/lib.sh"
seconds="${1:-30}"
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 [seconds-per-target]"

ensure_build_deps
ensure_rust
ensure_ebpf_toolchain
ensure_cargo_fuzz

cd "$WGPIN_ROOT/fuzz"
# Coverage instrumentation only: the code under test forbids `unsafe`, so AddressSanitizer would
# find little and cost much. Debug assertions stay on, with them overflow checks.
flags=(--sanitizer none --debug-assertions)
step "building the fuzz targets (nightly, release, instrumented)"
cargo +nightly fuzz build "${flags[@]}" || die "the fuzz targets do not build"

passed=0
failed=0
failures=()
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for target in $(cargo +nightly fuzz list); do
    step "fuzzing $target for ${seconds}s"
    mkdir -p "work/$target" "corpus/$target"
    options=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
    [ -f "dicts/$target.dict" ] && options+=(-dict="dicts/$target.dict")
    start=$SECONDS
    if cargo +nightly fuzz run "${flags[@]}" "$target" "work/$target" "corpus/$target" -- \
        "${options[@]}" >"$log" 2>&1; then
        status=0
    else
        status=$?
    fi
    runs="$(awk '/^stat::number_of_executed_units:/ { print $2 }' "$log")"
    rate="$(awk '/^stat::average_exec_per_sec:/ { print $2 }' "$log")"
    units="$(find "work/$target" "corpus/$target" -type f | wc -l)"
    printf '%s: %s runs in %ss, %s execs/s, corpus %s inputs\n' \
        "$target" "${runs:-?}" "$((SECONDS - start))" "${rate:-?}" "$units"
    if [ "$status" -eq 0 ]; then
        passed=$((passed + 1))
        continue
    fi
    failed=$((failed + 1))
    failures+=("$target")
    # What went wrong, and where libFuzzer put the input.
    grep -E -m 1 -A 3 "panicked at|ERROR: libFuzzer|==[0-9]+== ERROR" "$log" || tail -n 20 "$log"
    artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
    if [ -n "$artifact" ]; then
        printf 'FAILED: %s: reproducer %s\n' "$target" "$artifact"
        printf '  rerun: (cd fuzz && cargo +nightly fuzz run %s %s %s)\n' "${flags[*]}" "$target" "$artifact"
    else
        printf 'FAILED: %s: exit status %s and no reproducer written; the log ends:\n' "$target" "$status"
        tail -n 20 "$log"
    fi
done

printf '\n'
for name in "${failures[@]}"; do printf 'FAILED: fuzz target %s\n' "$name"; done
printf 'fuzz: %d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
