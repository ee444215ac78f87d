#!/usr/bin/env bash
# The main job, on one machine without a cluster: read the example manifests the way the API
# server would (schema, CEL rules, Rust validation), print the state a gateway node would
# enforce, and show that a peer without a pin is refused before it gets anywhere.
#
# Later tiers replace this with the full demo: a stolen WireGuard key refused by the fast path.
source "$(dirname "$0")/lib.sh"
need_root
"$WGPIN_ROOT/scripts/setup.sh"
cd "$WGPIN_ROOT"

step "building the agent"
cargo build --locked --quiet -p wgpin-agent
agent="$WGPIN_ROOT/target/debug/wgpin-agent"

step "examples/ rendered for node gw-a (labelled wgpin.io/gateway=true)"
"$agent" render --dir examples --node gw-a --label wgpin.io/gateway=true

step "a PinnedPeer that could connect from anywhere, without saying so on purpose"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp examples/*.yaml "$work/"
cat > "$work/stolen-laptop.yaml" <<'YAML'
apiVersion: wgpin.io/v1alpha1
kind: PinnedPeer
metadata:
  name: stolen-laptop
spec:
  interface: gateway
  publicKey: gN65BkIKy1eCE9pP1wdc8ROUtkHLF2PfAqYdyYBz6EA=
  allowedIPs: [198.51.100.30/32]
  sources: [0.0.0.0/0]
YAML
sed 's/^/    /' "$work/stolen-laptop.yaml"
if "$agent" render --dir "$work" --node gw-a --label wgpin.io/gateway=true >/dev/null 2>"$work/errors"; then
    die "the unpinned peer was accepted"
fi
sed 's/^/    /' "$work/errors"
grep -q "stolen-laptop.yaml (document 1) PinnedPeer/stolen-laptop" "$work/errors" ||
    die "the refusal did not name the file and object"
printf '\nrefused: the unpinned peer is left out and named with its file and field; the others still render.\n'
