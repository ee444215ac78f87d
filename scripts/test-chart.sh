#!/usr/bin/env bash
# Offline checks of the Helm chart charts/wgpin, without a cluster. scripts/test.sh runs it;
# alone it needs what `scripts/setup.sh --test` installs (.tools/bin/helm, kubernetes-validate).
#
#  1. helm lint --strict, with the default values and with each charts/wgpin/ci/*.yaml.
#  2. helm template with the default values and with each ci/*.yaml, for Kubernetes 1.31 and 1.37:
#     - the rendered objects checked against what the chart promises for those values
#       (charts/wgpin/tests/check_rendered.py: objects, command lines, probes, security
#       contexts, host mounts, the exact RBAC table, the ServiceMonitors and alerts);
#     - every object validated by kubernetes-validate (--strict) against that version's schemas.
#       ServiceMonitor and PrometheusRule (monitoring.coreos.com) are custom resources it has no
#       schema for and would only warn about: they are left out of its input (check_rendered.py
#       checks them), and any other warning, such as an unknown kind, fails.
#  3. Kubernetes 1.30 is refused (Chart.yaml kubeVersion: the CRDs need 1.31).
#  4. Every value is documented in values.yaml ("# --" comments), known to values.schema.json,
#     and listed with its default in the chart README's table (charts/wgpin/tests/check_docs.py).
#  5. Each charts/wgpin/tests/bad-values/*.yaml must make helm template fail, with every
#     "# expect: TEXT" line of the file found in the error (the value's path, the allowed values).
# Prints "chart: N passed, M failed" and exits 1 if any check failed.
source "$(dirname "$0")/lib.sh"
cd "$WGPIN_ROOT"

helm="$WGPIN_TOOLS/bin/helm"
python="$WGPIN_TOOLS/venv/bin/python"
validate="$WGPIN_TOOLS/venv/bin/kubernetes-validate"
[ -x "$helm" ] || die "$helm is missing: run scripts/setup.sh --test (ensure_helm)"
[ -x "$validate" ] || die "$validate is missing: run scripts/setup.sh --test"

# WGPIN_CHART: a copy of the chart to check instead (to see these checks fail on a broken one).
chart="${WGPIN_CHART:-charts/wgpin}"
release=wgpin
namespace=wgpin-system
kube_versions=(1.31.0 1.37.0)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Helm's cache, config and data in the scratch directory, not under $HOME.
export HELM_CACHE_HOME="$work/helm/cache" HELM_CONFIG_HOME="$work/helm/config" HELM_DATA_HOME="$work/helm/data"

passed=0
failed=0
ok() { passed=$((passed + 1)); printf '  ok    %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf '  FAIL  %s\n' "$*"; }

value_sets=("")
for f in "$chart"/ci/*.yaml; do value_sets+=("$f"); done
[ "${#value_sets[@]}" -gt 1 ] || die "no values files in $chart/ci/"

step "helm lint --strict"
for values in "${value_sets[@]}"; do
    label="${values:-default values}"
    if "$helm" lint --strict --kube-version "${kube_versions[0]}" "$chart" ${values:+-f "$values"} >"$work/lint" 2>&1; then
        ok "lint: $label"
    else
        fail "lint: $label"
        sed 's/^/        /' "$work/lint"
    fi
done

step "helm template, checked against the values and validated for Kubernetes ${kube_versions[*]}"
to_validate=()
n=0
for values in "${value_sets[@]}"; do
    label="${values:-default values}"
    for version in "${kube_versions[@]}"; do
        n=$((n + 1))
        out="$work/rendered-$n.yaml"
        if ! "$helm" template "$release" "$chart" --namespace "$namespace" --kube-version "$version" \
            ${values:+-f "$values"} >"$out" 2>"$work/err"; then
            fail "template: $label, Kubernetes $version"
            sed 's/^/        /' "$work/err"
            continue
        fi
        if "$python" "$chart/tests/check_rendered.py" "$out" "$release" "$namespace" ${values:+"$values"} >"$work/check" 2>&1; then
            ok "rendered objects match the values: $label, Kubernetes $version"
        else
            fail "rendered objects match the values: $label, Kubernetes $version"
            sed 's/^/      /' "$work/check"
        fi
        [ -f "$out.k8s" ] && to_validate+=("$version" "$out.k8s" "$label")
    done
done

# One kubernetes-validate run per Kubernetes version over all the rendered files (it loads its
# schemas once per process).
for version in "${kube_versions[@]}"; do
    files=()
    labels=()
    for ((i = 0; i < ${#to_validate[@]}; i += 3)); do
        [ "${to_validate[i]}" = "$version" ] || continue
        files+=("${to_validate[i + 1]}")
        labels+=("${to_validate[i + 2]}")
    done
    [ "${#files[@]}" -gt 0 ] || { fail "kubernetes-validate $version: nothing rendered"; continue; }
    status=0
    "$validate" --strict --quiet -k "$version" "${files[@]}" >"$work/validate" 2>&1 || status=$?
    if [ "$status" -eq 0 ] && ! grep -q . "$work/validate"; then
        ok "kubernetes-validate --strict, Kubernetes $version: ${labels[*]}"
    else
        fail "kubernetes-validate --strict, Kubernetes $version (exit $status)"
        sed 's/^/        /' "$work/validate"
    fi
done

step "the chart refuses Kubernetes older than 1.31 (Chart.yaml kubeVersion)"
if "$helm" template "$release" "$chart" --namespace "$namespace" --kube-version 1.30.9 >/dev/null 2>"$work/err"; then
    fail "helm template for Kubernetes 1.30.9 succeeded"
elif grep -q "kubeVersion" "$work/err"; then
    ok "refused for Kubernetes 1.30.9: $(head -1 "$work/err")"
else
    fail "helm template for Kubernetes 1.30.9 failed, but not on kubeVersion"
    sed 's/^/      /' "$work/err"
fi

step "the chart's documentation agrees with values.yaml and values.schema.json"
if "$python" "$chart/tests/check_docs.py" >"$work/docs" 2>&1; then
    ok "every value documented in values.yaml, known to the schema, and in README.md's table ($(sed -n 's/^ *\([0-9]*\) values documented$/\1/p' "$work/docs") values)"
else
    fail "every value documented in values.yaml, known to the schema, and in README.md's table"
    sed 's/^/      /' "$work/docs"
fi

step "bad values are refused with a message naming the value"
bad=0
for values in "$chart"/tests/bad-values/*.yaml; do
    bad=$((bad + 1))
    mapfile -t expected < <(sed -n 's/^# expect: //p' "$values")
    if [ "${#expected[@]}" -eq 0 ]; then
        fail "$values has no '# expect: TEXT' line"
        continue
    fi
    if "$helm" template "$release" "$chart" --namespace "$namespace" --kube-version "${kube_versions[0]}" \
        -f "$values" >/dev/null 2>"$work/err"; then
        fail "refused: $values (helm template accepted it)"
        continue
    fi
    missing=()
    for text in "${expected[@]}"; do
        grep -qF -- "$text" "$work/err" || missing+=("$text")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        ok "refused: $values: $(grep -m1 -E "^- at |^Error: execution error" "$work/err" | sed 's/^- //')"
    else
        fail "refused: $values, but the message lacks: ${missing[*]}"
        sed 's/^/        /' "$work/err"
    fi
done
[ "$bad" -gt 0 ] || fail "no files in $chart/tests/bad-values/"

printf '\nchart: %d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
