#!/usr/bin/env bash
# Offline checks of gitops/ (the Argo CD and Flux examples and the Argo CD health checks), without
# a cluster, in about a second. scripts/test.sh runs it; alone it needs what
# `scripts/setup.sh --test` installs (lua5.4, the venv with PyYAML, jsonschema and
# kubernetes-validate).
#
#  1. Each gitops/argocd-health/GROUP/KIND/health.lua compiles with luac5.4 and uses no operator
#     newer than Lua 5.1 (Argo CD runs them with gopher-lua, a Lua 5.1).
#  2. Every test in each KIND/health_test.yaml (Argo CD's own test format) runs through its
#     health.lua with lua5.4, in an environment holding only what Argo CD offers, and must give
#     the expected status and message (gitops/tests/health_harness.lua). The inputs are checked
#     first against the CRDs in charts/wgpin/crds, unknown fields refused
#     (gitops/tests/health_cases.py); each kind needs Healthy, Progressing and Degraded cases.
#  3. gitops/argocd/argocd-cm-health.yaml is what gitops/argocd-health/generate-argocd-cm.py
#     makes of the .lua files now.
#  4. The manifests in gitops/argocd and gitops/flux parse, carry what Argo CD and Flux require
#     and what gitops/README.md relies on, name paths that exist, pass chart values that
#     values.schema.json accepts (gitops/tests/check_manifests.py); the core objects among them
#     (Namespace, ConfigMaps) pass kubernetes-validate --strict for Kubernetes 1.31 and 1.37.
# Prints "gitops: N passed, M failed" and exits 1 if any check failed.
source "$(dirname "$0")/lib.sh"
cd "$WGPIN_ROOT"

python="$WGPIN_TOOLS/venv/bin/python"
validate="$WGPIN_TOOLS/venv/bin/kubernetes-validate"
if ! command -v lua5.4 >/dev/null || ! command -v luac5.4 >/dev/null; then
    die "lua5.4 is missing: run scripts/setup.sh --test (Debian package lua5.4)"
fi
[ -x "$validate" ] || die "$validate is missing: run scripts/setup.sh --test"

# WGPIN_GITOPS: a copy of gitops/ to check instead (to see these checks fail on a broken one).
gitops="${WGPIN_GITOPS:-gitops}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

passed=0
failed=0
ok() { passed=$((passed + 1)); printf '  ok    %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf '  FAIL  %s\n' "$*"; }

step "Argo CD health checks compile as Lua 5.1 (luac5.4, no newer operators)"
scripts=("$gitops"/argocd-health/*/*/health.lua)
[ -f "${scripts[0]}" ] || fail "no health.lua under $gitops/argocd-health"
for script in "${scripts[@]}"; do
    [ -f "$script" ] || continue
    if ! luac5.4 -p -l -o /dev/null "$script" >"$work/listing" 2>&1; then
        fail "compiles: $script"
        sed 's/^/        /' "$work/listing"
    # Integer division and the bitwise operators (Lua 5.3+) compile to these opcodes.
    elif grep -E '\s(IDIVK?|BANDK?|BORK?|BXORK?|SHRI?|SHLI?|BNOT)\s' "$work/listing" >"$work/newer"; then
        fail "uses operators gopher-lua (Lua 5.1) does not have: $script"
        sed 's/^/        /' "$work/newer"
    else
        ok "compiles, Lua 5.1 operators only: $script"
    fi
done

step "Argo CD health checks against their tests (lua5.4, inputs checked against the CRDs)"
if "$python" "$gitops/tests/health_cases.py" "$gitops/argocd-health" charts/wgpin/crds "$work/cases.lua" >"$work/cases" 2>&1; then
    ok "test inputs are valid objects and cover Healthy, Progressing and Degraded per kind: $(tail -1 "$work/cases")"
    if lua5.4 "$gitops/tests/health_harness.lua" "$work/cases.lua" >"$work/harness" 2>&1; then
        ok "$(tail -1 "$work/harness")"
    else
        fail "$(tail -1 "$work/harness")"
    fi
    sed -e '$d' -e 's/^/    /' "$work/harness"
else
    fail "test inputs are valid objects and cover Healthy, Progressing and Degraded per kind"
    sed 's/^/      /' "$work/cases"
fi

step "the argocd-cm snippet is generated from the current .lua files"
if "$python" "$gitops/argocd-health/generate-argocd-cm.py" --check >"$work/cm" 2>&1; then
    ok "$(tail -1 "$work/cm")"
else
    fail "$gitops/argocd/argocd-cm-health.yaml is stale"
    sed 's/^/      /' "$work/cm"
fi

step "Argo CD and Flux manifests: required fields, paths, chart values; core objects validated"
if "$python" "$gitops/tests/check_manifests.py" "$WGPIN_ROOT" "$gitops" "$work/core-files" >"$work/manifests" 2>&1; then
    ok "$(tail -1 "$work/manifests")"
    sed -e '$d' -e 's/^/    /' "$work/manifests"
else
    fail "manifests under $gitops/argocd and $gitops/flux"
    sed 's/^/    /' "$work/manifests"
fi
mapfile -t core < <(cat "$work/core-files" 2>/dev/null)
if [ "${#core[@]}" -gt 0 ]; then
    for version in 1.31.0 1.37.0; do
        status=0
        "$validate" --strict --quiet -k "$version" "${core[@]}" >"$work/validate" 2>&1 || status=$?
        if [ "$status" -eq 0 ] && ! grep -q . "$work/validate"; then
            ok "kubernetes-validate --strict, Kubernetes $version: ${core[*]}"
        else
            fail "kubernetes-validate --strict, Kubernetes $version (exit $status)"
            sed 's/^/        /' "$work/validate"
        fi
    done
else
    fail "no core objects (Namespace, ConfigMap) to validate"
fi

printf '\ngitops: %d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
