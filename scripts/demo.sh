#!/usr/bin/env bash
# The main job: a stolen WireGuard key refused, on one machine, without a cluster.
#
# Three network namespaces: a gateway running wgpin-agent in standalone mode with userspace
# WireGuard (wireguard-go), a laptop that owns a peer key pinned to its address, and an
# attacker holding a copy of the same private key at another address. First in Dedicated mode
# (the fast path drops the attacker's packets before WireGuard sees them), then in Shared mode
# with the attacker at an address pinned for another peer (the fast path lets it through, and
# the agent evicts the hijacked session as soon as the endpoint leaves the laptop's pin).
# Everything it creates is removed at the end.
source "$(dirname "$0")/lib.sh"
need_root
"$WGPIN_ROOT/scripts/setup.sh"
cd "$WGPIN_ROOT"

step "building the agent"
cargo build --locked --quiet -p wgpin-agent
agent="$WGPIN_ROOT/target/debug/wgpin-agent"

say() { printf '    %s\n' "$*"; }
ok() { printf '    \033[32m✔\033[0m %s\n' "$*"; }
bad() { printf '    \033[31m✘\033[0m %s\n' "$*"; failed=1; }
failed=0

id="$$"
gw="wgpin-demo-$id-gw"; laptop="wgpin-demo-$id-laptop"; attacker="wgpin-demo-$id-attacker"
work="$(mktemp -d)"; bpffs="/sys/fs/bpf/wgpin-demo-$id"; device="wgdemo$((id % 1000))"
agent_pid=""
peer_pids=()
cleanup() {
    set +e
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
    for pid in "${peer_pids[@]}"; do kill "$pid" 2>/dev/null; done
    # The gateway's wireguard-go processes (started by the agent, detached from it).
    pkill -f "^wireguard-go ${device}" 2>/dev/null
    for ns in "$gw" "$laptop" "$attacker"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$work" "$bpffs"
}
trap cleanup EXIT

step "examples/ as the API server would check them, rendered for a gateway node"
ok "examples/ are valid: $("$agent" render --dir examples --node gw-a --label wgpin.io/gateway=true 2>&1 >/dev/null | tail -1)"

step "three hosts: gateway 192.0.2.1 | laptop 192.0.2.2 (the key's owner) | attacker 192.0.2.130 (a copy of the key)"
for ns in "$gw" "$laptop" "$attacker"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
link() { # gateway-side name, peer namespace, gateway address, peer address
    ip -n "$gw" link add "$1" type veth peer name "$1p" netns "$2"
    ip -n "$gw" addr add "$3" dev "$1"; ip -n "$gw" link set "$1" up
    ip -n "$2" addr add "$4" dev "$1p"; ip -n "$2" link set "$1p" up
}
link "dl$((id % 10000))" "$laptop" 192.0.2.1/25 192.0.2.2/25
link "da$((id % 10000))" "$attacker" 192.0.2.129/25 192.0.2.130/25
underlay=(--underlay "dl$((id % 10000))" --underlay "da$((id % 10000))")

laptop_key="$(wg genkey)"; laptop_pub="$(echo "$laptop_key" | wg pubkey)"
phone_pub="$(wg genkey | wg pubkey)"

manifests() { # mode
    mkdir -p "$work/manifests"
    cat > "$work/manifests/gateway.yaml" <<YAML
apiVersion: wgpin.io/v1alpha1
kind: PinnedInterface
metadata: {name: gateway}
spec:
  nodeSelector: {}
  mode: $1
  interfaceName: $device
  listenPort: 51820
  listenPortEnd: 51829
  addresses: [198.51.100.1/24]
YAML
    cat > "$work/manifests/peers.yaml" <<YAML
apiVersion: wgpin.io/v1alpha1
kind: PinnedPeer
metadata: {name: laptop}
spec:
  interface: gateway
  publicKey: $laptop_pub
  allowedIPs: [198.51.100.2/32]
  sources: [192.0.2.2/32]
  # The gateway may reach the laptop first, and keeps the session warm.
  endpoint: {address: 192.0.2.2, port: 40000}
  persistentKeepaliveSeconds: 5
---
apiVersion: wgpin.io/v1alpha1
kind: PinnedPeer
metadata: {name: phone}
spec:
  interface: gateway
  publicKey: $phone_pub
  allowedIPs: [198.51.100.3/32]
  sources: [192.0.2.130/32]
YAML
}

# The gateway-side WireGuard device that carries the laptop's peer in each mode.
gateway_device() { [ "$1" = Dedicated ] && echo "$device-0" || echo "$device"; }
laptop_endpoint() { wg show "$1" endpoints 2>/dev/null | awk -v k="$laptop_pub" '$1 == k {print $2}'; }
laptop_handshake() { wg show "$1" latest-handshakes 2>/dev/null | awk -v k="$laptop_pub" '$1 == k {print $2}'; }
metric() { # the agent's metric lines matching a pattern
    nsenter --net="/run/netns/$gw" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9475; printf "GET /metrics HTTP/1.0\r\n\r\n" >&3; cat <&3' |
        grep "$1" || true
}

peer_up() { # namespace, device, gateway endpoint, port
    WG_PROCESS_FOREGROUND=1 ip netns exec "$1" wireguard-go -f "$2" >/dev/null 2>&1 &
    peer_pids+=("$!")
    for _ in $(seq 100); do [ -S "/var/run/wireguard/$2.sock" ] && break; sleep 0.05; done
    printf '%s' "$laptop_key" > "$work/key"
    ip netns exec "$1" wg set "$2" private-key "$work/key" listen-port "$4" \
        peer "$gateway_pub" endpoint "$3" allowed-ips 198.51.100.1/32
    ip -n "$1" addr add 198.51.100.2/24 dev "$2"; ip -n "$1" link set "$2" up
}
peer_down() { ip -n "$1" link del "$2" 2>/dev/null; }
send() { ip netns exec "$1" bash -c 'echo hello > /dev/udp/198.51.100.1/7000' 2>/dev/null || true; }

run_mode() { # mode, attacker's story
    local mode="$1" dev
    dev="$(gateway_device "$mode")"
    step "$mode mode"
    manifests "$mode"
    for _ in $(seq 100); do
        [ "$(wg show "$dev" listen-port 2>/dev/null || echo 0)" != 0 ] && [ -n "$(wg show "$dev" peers 2>/dev/null)" ] && break
        sleep 0.1
    done
    gateway_pub="$(wg show "$dev" public-key 2>/dev/null || true)"
    [ -n "$gateway_pub" ] && [ "$gateway_pub" != "(none)" ] || { bad "the agent did not bring up $dev"; return; }
    say "the agent runs $dev on UDP $(wg show "$dev" listen-port), laptop pinned to 192.0.2.2/32, phone to 192.0.2.130/32"

    peer_up "$laptop" "wgl$((id % 10000))" 192.0.2.1:"$(wg show "$dev" listen-port)" 40000
    send "$laptop"
    for _ in $(seq 50); do [ "$(laptop_handshake "$dev")" -gt 0 ] 2>/dev/null && break; send "$laptop"; sleep 0.1; done
    if [ "$(laptop_handshake "$dev")" -gt 0 ] 2>/dev/null && [ "$(laptop_endpoint "$dev")" = "192.0.2.2:40000" ]; then
        ok "the laptop connects: handshake done, endpoint 192.0.2.2:40000"
    else
        bad "the laptop did not connect (endpoint: $(laptop_endpoint "$dev"), handshake: $(laptop_handshake "$dev"))"
    fi

    local mark
    mark=$(wc -l < "$work/agent.log")
    peer_up "$attacker" "wga$((id % 10000))" 192.0.2.129:"$(wg show "$dev" listen-port)" 40001
    say "the attacker uses the stolen key from 192.0.2.130 ..."
    local moved=""
    for _ in $(seq 20); do
        send "$attacker"
        case "$(laptop_endpoint "$dev")" in 192.0.2.130:*) moved=1 ;; esac
        sleep 0.1
    done
    sleep 0.5
    local reported
    reported="$(tail -n +"$((mark + 1))" "$work/agent.log" | grep -m1 'source violation.*192\.0\.2\.130' || true)"
    if [ -n "$reported" ]; then
        ok "reported: $(echo "$reported" | sed 's/^.*WARN [^ ]* //' | cut -c1-160)"
    else
        bad "no violation was reported"
    fi
    case "$mode" in
    Dedicated)
        [ -z "$moved" ] && ok "refused: the fast path dropped every packet, the laptop's endpoint never moved ($(laptop_endpoint "$dev"))" \
            || bad "the endpoint moved to the attacker"
        say "metrics: $(metric 'fastpath_packets_total{interface="gateway",peer="laptop",verdict="dropped"}')"
        ;;
    Shared)
        # 192.0.2.130 is pinned for the phone, so the packets reach WireGuard; the agent sees
        # the laptop's endpoint leave its pin and evicts the session at once.
        case "$(laptop_endpoint "$dev")" in
        192.0.2.130:*) bad "the attacker still holds the session" ;;
        *) ok "evicted: the hijacked session was thrown out (endpoint now '$(laptop_endpoint "$dev")'), the attacker keeps nothing" ;;
        esac
        # The peer came back with its configured endpoint (inside the pin) and keepalive, so
        # the gateway itself starts a new handshake with the rightful laptop.
        local handshake=0
        for _ in $(seq 50); do
            handshake="$(wg show "$dev" latest-handshakes | awk -v k="$laptop_pub" '$1 == k {print $2}')"
            [ "${handshake:-0}" -gt 0 ] && [ "$(laptop_endpoint "$dev")" = "192.0.2.2:40000" ] && break
            sleep 0.1
        done
        [ "${handshake:-0}" -gt 0 ] && ok "the laptop is back: the gateway re-handshook with its pinned endpoint 192.0.2.2:40000" \
            || bad "the laptop did not get its session back"
        ;;
    esac
    peer_down "$laptop" "wgl$((id % 10000))"; peer_down "$attacker" "wga$((id % 10000))"
}

step "starting wgpin-agent in standalone mode on the gateway"
manifests Dedicated
# nsenter, not `ip netns exec`: the latter remounts /sys and would hide the bpffs at /sys/fs/bpf.
nsenter --net="/run/netns/$gw" "$agent" standalone --dir "$work/manifests" --node gateway "${underlay[@]}" \
    --state-dir "$work/state" --bpffs-root "$bpffs" --metrics-addr 127.0.0.1:9475 >"$work/agent.log" 2>&1 &
agent_pid=$!
sleep 1
kill -0 "$agent_pid" 2>/dev/null || { cat "$work/agent.log"; die "the agent did not start"; }
say "$(grep -m1 'fast path on underlay' "$work/agent.log" | sed 's/^.*INFO //' | cut -c1-150)"

started=$SECONDS
run_mode Dedicated
run_mode Shared
step "done in $((SECONDS - started)) s"
if [ "$failed" -ne 0 ]; then
    printf '\nagent log:\n'; sed 's/^/    /' "$work/agent.log" | tail -40
    die "the demo did not go as it should"
fi
printf '    the stolen key got nothing: refused by the fast path (Dedicated), evicted by the agent (Shared).\n'
