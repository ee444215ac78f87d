#!/usr/bin/env bash
# End-to-end test of wgpin on a real cluster: kind (two nodes in Docker), the chart, and two
# WireGuard peers in containers on the kind network holding the same private key, a laptop at
# its pinned address and an attacker elsewhere. It runs the scenario of agent/tests/cluster.rs
# (which uses an in-memory API server and network namespaces) against a real API server, a real
# kubelet and the real images. tests/e2e/README.md says what it needs and what it checks.
#
#   tests/e2e/kind.sh
#
# Environment:
#   CLUSTER=wgpin-e2e       name of the kind cluster (created here, deleted at the end)
#   KEEP=1                  keep the cluster and the peer containers afterwards, for a look
#   IMAGES_PREBUILT=1       do not build wgpin-operator:e2e and wgpin-agent:e2e, use the local ones
#   WIREGUARD_BACKEND=...   agent.wireguard.backend: auto, kernel or userspace (default: auto when
#                           the kernel has the wireguard module loaded, else userspace)
#   FASTPATH_HOOK=...       agent.hook: auto, xdp or tc (default: auto on Linux 6.6+, else xdp)
#   KIND_NODE_IMAGE=...     kindest/node image for `kind create cluster --image` (Kubernetes 1.31+)
#   HELM_EXTRA_ARGS=...     more arguments for `helm install`, split on spaces
#                           (e.g. "--set agent.privileged=true")
#
# Exit status: 0 when every check passed; 1 when one failed or the run was aborted.

set -euo pipefail

CLUSTER="${CLUSTER:-wgpin-e2e}"
KEEP="${KEEP:-0}"
IMAGES_PREBUILT="${IMAGES_PREBUILT:-0}"
WIREGUARD_BACKEND="${WIREGUARD_BACKEND:-}"
FASTPATH_HOOK="${FASTPATH_HOOK:-}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-}"
HELM_EXTRA_ARGS="${HELM_EXTRA_ARGS:-}"
# kind puts its nodes on this Docker network (kind's own variable; "kind" by default).
NETWORK="${KIND_EXPERIMENTAL_DOCKER_NETWORK:-kind}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CONTEXT="kind-${CLUSTER}"
NAMESPACE=wgpin-system
RELEASE=wgpin
AGENT_METRICS_PORT=9477
IMAGE_TAG=e2e
OPERATOR_REPO=wgpin-operator
AGENT_REPO=wgpin-agent
PEER_IMAGE=wgpin-e2e-peer:latest
LAPTOP=wgpin-e2e-laptop
ATTACKER=wgpin-e2e-attacker
GATEWAY_LABEL_KEY=wgpin.io/gateway
INTERFACE=gateway
PEER=laptop
DEVICE_PREFIX=wgpin0
LISTEN_PORT=51820
LISTEN_PORT_END=51829
GATEWAY_TUNNEL_IP=198.51.100.1
PEER_TUNNEL_IP=198.51.100.2
# Where the peers keep the (shared) private key inside their containers.
PEER_KEY_FILE=/root/wg.key

passed=0
failed=0
failures=()
created_cluster=0
started_peers=0
WORKDIR=""
WORKER=""

# --- output and bookkeeping ---------------------------------------------------------------------

step() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf '    warning: %s\n' "$*" >&2; }
die() {
    printf '\ne2e: error: %s\n' "$*" >&2
    exit 1
}
pass() {
    passed=$((passed + 1))
    printf '  ok    %s\n' "$1"
}
fail() {
    failed=$((failed + 1))
    failures+=("$1")
    printf '  FAIL  %s\n' "$1"
}

# check DESCRIPTION COMMAND [ARG...]: runs COMMAND and counts it as passed when it exits 0.
# Never stops the script: a failed check is counted and the run goes on.
check() {
    local what="$1"
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}

# require DESCRIPTION COMMAND [ARG...]: a check the rest of the run depends on; stops on failure.
require() {
    local before="$failed"
    check "$@"
    [ "$failed" -eq "$before" ] || die "cannot go on after a failed check: $1"
}

# not COMMAND [ARG...]: succeeds when COMMAND fails.
not() { ! "$@"; }

# wait_until SECONDS COMMAND [ARG...]: runs COMMAND every 2 s until it succeeds; fails once
# SECONDS have passed without success.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 2
    done
}

# --- cluster helpers ----------------------------------------------------------------------------

# Every kubectl and helm call names the kind cluster's context (kind makes it the current one
# when it creates the cluster): switching contexts meanwhile cannot point a call elsewhere.
kc() { kubectl --context "$CONTEXT" "$@"; }

# kcw ARG...: kubectl for one write or read, given at most a minute (kc alone is for
# `kubectl wait`, whose own --timeout bounds it).
kcw() { kc --request-timeout=60s "$@"; }

# jp RESOURCE JSONPATH: one field of a cluster-scoped object; empty when it or the object is missing.
jp() { kc --request-timeout=30s get "$1" -o "jsonpath=$2" 2>/dev/null || true; }

# condition RESOURCE TYPE FIELD: a field (status, message, observedGeneration) of a condition.
condition() { jp "$1" "{.status.conditions[?(@.type==\"$2\")].$3}"; }

exists() { kc --request-timeout=30s get "$1" >/dev/null 2>&1; }

# absent RESOURCE: the API server says the object does not exist (an unreachable API server
# does not count as absent).
absent() {
    local found
    found="$(kc --request-timeout=30s get "$1" --ignore-not-found -o name)" && [ -z "$found" ]
}

# kwait ARG...: kubectl wait, without its "condition met" lines.
kwait() { kc wait "$@" >/dev/null; }

# contains TEXT PATTERN: TEXT contains the fixed string PATTERN. Text is matched from a variable,
# never from a pipe: `producer | grep -q` can fail under pipefail when grep exits first.
contains() { grep -qF -- "$2" <<<"$1"; }

# --- cleanup --------------------------------------------------------------------------------------

diagnostics() {
    [ "$created_cluster" = 1 ] || return 0
    step "diagnostics (the run failed)"
    local k=(kubectl --context "$CONTEXT" --request-timeout=20s)
    "${k[@]}" get pinnedinterfaces,pinnedpeers,pinnednodestates -o wide || true
    "${k[@]}" get pinnedpeers -o yaml || true
    "${k[@]}" get pinnednodestates -o yaml || true
    "${k[@]}" -n "$NAMESPACE" get pods -o wide || true
    "${k[@]}" -n "$NAMESPACE" logs -l app.kubernetes.io/component=agent --prefix --tail=200 || true
    "${k[@]}" -n "$NAMESPACE" logs -l app.kubernetes.io/component=operator --prefix --tail=100 || true
    "${k[@]}" -n default get events.events.k8s.io || true
    if [ -n "$WORKER" ]; then
        note "links on $WORKER:"
        docker exec "$WORKER" ip -brief link || true
    fi
    if [ "$started_peers" = 1 ]; then
        local peer
        for peer in "$LAPTOP" "$ATTACKER"; do
            note "wg show on $peer:"
            docker exec "$peer" wg show wg0 endpoints 2>/dev/null || true
            docker exec "$peer" wg show wg0 latest-handshakes 2>/dev/null || true
        done
    fi
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    # A failure gets the cluster's state printed; an interrupt (Ctrl-C: 130, TERM: 143) does not.
    if { [ "$rc" -ne 0 ] || [ "$failed" -gt 0 ]; } && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; then
        diagnostics
    fi
    step "cleanup"
    if [ "$KEEP" = 1 ]; then
        if [ "$created_cluster" = 1 ]; then
            note "KEEP=1: keeping the cluster (kubectl --context $CONTEXT ...)"
            note "  delete it with: kind delete cluster --name $CLUSTER"
        fi
        if [ "$started_peers" = 1 ]; then
            note "KEEP=1: keeping the peer containers (docker exec -it $LAPTOP bash)"
            note "  remove them with: docker rm -f $LAPTOP $ATTACKER"
        fi
    else
        if [ "$started_peers" = 1 ]; then
            note "removing the peer containers"
            docker rm -f "$LAPTOP" "$ATTACKER" >/dev/null 2>&1
        fi
        if [ "$created_cluster" = 1 ]; then
            note "deleting kind cluster $CLUSTER"
            kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || warn "kind delete cluster --name $CLUSTER failed"
        fi
    fi
    if [ -n "$WORKDIR" ]; then
        rm -rf "$WORKDIR"
    fi
    printf '\n'
    if [ "$failed" -gt 0 ]; then
        printf 'failed checks:\n'
        local f
        for f in ${failures[@]+"${failures[@]}"}; do
            printf '  - %s\n' "$f"
        done
    fi
    if [ "$rc" -ne 0 ]; then
        printf 'e2e: %d passed, %d failed (aborted before the end, status %d)\n' "$passed" "$failed" "$rc"
        exit "$rc"
    fi
    printf 'e2e: %d passed, %d failed\n' "$passed" "$failed"
    if [ "$failed" -gt 0 ]; then
        exit 1
    fi
    exit 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. preflight ---------------------------------------------------------------------------------

need() {
    command -v "$1" >/dev/null 2>&1 || die "$1 is not installed: $2"
}

# kernel_at_least VERSION MAJOR MINOR
kernel_at_least() {
    local major minor rest
    major="${1%%.*}"
    rest="${1#*.}"
    minor="${rest%%[!0-9]*}"
    case "$major$minor" in '' | *[!0-9]*) return 1 ;; esac
    [ "$major" -gt "$2" ] || { [ "$major" -eq "$2" ] && [ "$minor" -ge "$3" ]; }
}

preflight() {
    step "[1/9] preflight"
    need docker "https://docs.docker.com/engine/install/"
    need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation (v0.24 or newer)"
    need kubectl "https://kubernetes.io/docs/tasks/tools/"
    need helm "https://helm.sh/docs/intro/install/ (Helm 3)"
    docker info >/dev/null 2>&1 || die "docker cannot reach its engine (docker info failed): start Docker, or check DOCKER_HOST and your permissions on the socket"

    case "$WIREGUARD_BACKEND" in '' | auto | kernel | userspace) ;; *)
        die "WIREGUARD_BACKEND=$WIREGUARD_BACKEND: use auto, kernel or userspace" ;;
    esac
    case "$FASTPATH_HOOK" in '' | auto | xdp | tc) ;; *)
        die "FASTPATH_HOOK=$FASTPATH_HOOK: use auto, xdp or tc" ;;
    esac

    local kind_version kind_major kind_minor
    kind_version="$(kind version 2>/dev/null | sed -n 's/^kind v\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')"
    note "kind ${kind_version:-(unknown version)}, $(helm version --short 2>/dev/null || echo 'helm (unknown version)')"
    kind_major="${kind_version%%.*}"
    kind_minor="${kind_version#*.}"
    if [ -n "$kind_version" ] && [ -z "$KIND_NODE_IMAGE" ] &&
        { [ "$kind_major" -eq 0 ] && [ "$kind_minor" -lt 24 ]; }; then
        die "kind v$kind_version creates Kubernetes older than 1.31 by default, and wgpin's CRDs need 1.31+ (CEL IP/CIDR libraries): install kind v0.24 or newer, or set KIND_NODE_IMAGE to a 1.31+ kindest/node image built for your kind release"
    fi
    case "$(helm version --short 2>/dev/null)" in
        v3.*) ;;
        *) warn "this test is written for Helm 3" ;;
    esac

    # kind nodes are containers: they run on the Docker engine's kernel. That kernel needs BPF
    # (bpffs, XDP and TC programs) and either the wireguard module or /dev/net/tun for
    # wireguard-go (the userspace backend).
    local os
    os="$(docker info --format '{{.OSType}}' 2>/dev/null || true)"
    [ "$os" = linux ] || die "the Docker engine runs '${os:-unknown}' containers; kind and wgpin need a Linux engine"
    KERNEL_VERSION="$(docker info --format '{{.KernelVersion}}' 2>/dev/null || true)"
    note "the Docker engine's kernel: ${KERNEL_VERSION:-unknown} (kind nodes share it)"
    if ! kernel_at_least "$KERNEL_VERSION" 0 0; then
        warn "cannot read the kernel version; going on"
    elif ! kernel_at_least "$KERNEL_VERSION" 5 10; then
        die "Linux $KERNEL_VERSION is too old: wgpin needs 5.10 or newer (BPF links for XDP, CAP_BPF)"
    fi
    if [ -z "$FASTPATH_HOOK" ]; then
        # A kind node's eth0 is a veth, where the agent's `auto` hook takes TC, and the agent
        # pins TC programs through tcx links (Linux 6.6). Older kernels get XDP on the veth.
        if kernel_at_least "$KERNEL_VERSION" 6 6; then
            FASTPATH_HOOK=auto
        else
            FASTPATH_HOOK=xdp
            note "Linux older than 6.6 has no tcx: using agent.hook=xdp (auto would take TC on the veth)"
        fi
    fi

    # Host-side checks, when the engine runs on this machine's kernel (not in a VM as Docker
    # Desktop does). The nodes are checked again from the inside once they exist.
    if [ "$(uname -s)" = Linux ] && [ "$(uname -r)" = "$KERNEL_VERSION" ]; then
        grep -qw bpf /proc/filesystems ||
            die "this kernel has no bpf filesystem (CONFIG_BPF_SYSCALL): wgpin's fast path needs BPF, XDP and TC"
        note "bpffs: available in this kernel"
        local modules
        modules="$(lsmod 2>/dev/null || true)"
        if grep -q '^wireguard ' <<<"$modules" || [ -d /sys/module/wireguard ]; then
            note "wireguard: the kernel module is loaded"
        elif modinfo wireguard >/dev/null 2>&1; then
            note "wireguard: the module exists but is not loaded (sudo modprobe wireguard to test the kernel backend); the userspace backend is used otherwise"
        elif [ -c /dev/net/tun ]; then
            note "wireguard: no kernel module; /dev/net/tun is there for wireguard-go (userspace backend)"
        else
            die "neither the wireguard kernel module nor /dev/net/tun is available: the agent needs one of them"
        fi
    else
        note "the Docker engine does not run on this machine's kernel (a VM?): kernel checks happen inside the kind nodes"
    fi

    local clusters
    clusters="$(kind get clusters 2>/dev/null)" || die "kind get clusters failed"
    if grep -qx -- "$CLUSTER" <<<"$clusters"; then
        die "a kind cluster named $CLUSTER exists already: delete it (kind delete cluster --name $CLUSTER) or run with CLUSTER=another-name"
    fi
    if [ "$IMAGES_PREBUILT" = 1 ]; then
        local image
        for image in "$OPERATOR_REPO:$IMAGE_TAG" "$AGENT_REPO:$IMAGE_TAG"; do
            docker image inspect "$image" >/dev/null 2>&1 ||
                die "IMAGES_PREBUILT=1 but there is no local image $image (build it, or run without IMAGES_PREBUILT)"
        done
    fi
    WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/wgpin-e2e.XXXXXX")"
}

# --- 2. the cluster -------------------------------------------------------------------------------

bpffs_mounted() { docker exec "$1" awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/mounts; }

create_cluster() {
    step "[2/9] kind cluster $CLUSTER: one control plane, one worker (the gateway)"
    local args=(create cluster --name "$CLUSTER" --config - --wait 180s)
    if [ -n "$KIND_NODE_IMAGE" ]; then
        args+=(--image "$KIND_NODE_IMAGE")
    fi
    created_cluster=1
    kind "${args[@]}" <<'EOF' || die "kind create cluster failed"
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
EOF
    kc wait --for=condition=Ready nodes --all --timeout=180s >/dev/null ||
        die "the nodes did not become Ready"

    local minor
    minor="$(kcw get --raw /version | sed -n 's/.*"minor": *"\([0-9][0-9]*\).*/\1/p' || true)"
    note "Kubernetes 1.${minor:-?}"
    if [ -n "$minor" ] && [ "$minor" -lt 31 ]; then
        die "the cluster runs Kubernetes 1.$minor; wgpin's CRDs need 1.31+: use a newer kind or KIND_NODE_IMAGE"
    fi

    WORKER="$(kcw get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[*].metadata.name}' || true)"
    case "$WORKER" in '' | *' '*) die "expected exactly one worker node, found '$WORKER'" ;; esac
    kcw label node "$WORKER" "$GATEWAY_LABEL_KEY=true" --overwrite >/dev/null ||
        die "cannot label node $WORKER"
    note "gateway node: $WORKER (labelled $GATEWAY_LABEL_KEY=true)"

    # The agent pins its programs, links and maps under /sys/fs/bpf (a hostPath in the chart)
    # and does not mount bpffs itself. On a real node systemd mounts it at boot; a kind node is
    # a container whose /sys is a fresh sysfs without the host's bpffs mount, so mount one
    # inside each node (shared, so the agent's HostToContainer mount sees it).
    local node
    for node in $(kind get nodes --name "$CLUSTER"); do
        if bpffs_mounted "$node"; then
            note "$node: bpffs already mounted at /sys/fs/bpf"
        else
            docker exec "$node" mount -t bpf bpf /sys/fs/bpf ||
                die "cannot mount bpffs in $node (docker exec $node mount -t bpf bpf /sys/fs/bpf)"
            docker exec "$node" mount --make-shared /sys/fs/bpf || warn "$node: cannot make /sys/fs/bpf shared"
            note "$node: mounted bpffs at /sys/fs/bpf"
        fi
    done
    check "bpffs is mounted at /sys/fs/bpf on the gateway node" bpffs_mounted "$WORKER"

    # The node's view of the kernel, authoritative even when the engine runs in a VM.
    docker exec "$WORKER" grep -qw bpf /proc/filesystems ||
        die "the nodes' kernel has no bpf filesystem: wgpin's fast path needs BPF, XDP and TC"
    local kernel_wg=0
    if docker exec "$WORKER" test -d /sys/module/wireguard; then
        kernel_wg=1
    fi
    if [ -z "$WIREGUARD_BACKEND" ]; then
        if [ "$kernel_wg" = 1 ]; then
            WIREGUARD_BACKEND=auto
        else
            WIREGUARD_BACKEND=userspace
        fi
    fi
    if [ "$WIREGUARD_BACKEND" != userspace ] && [ "$kernel_wg" = 0 ]; then
        warn "agent.wireguard.backend=$WIREGUARD_BACKEND but the wireguard module is not loaded: the agent will fail (modprobe wireguard, or WIREGUARD_BACKEND=userspace)"
    fi
    if [ "$WIREGUARD_BACKEND" = userspace ]; then
        docker exec "$WORKER" test -c /dev/net/tun ||
            die "the userspace backend needs /dev/net/tun on the node, and $WORKER has none"
    fi
    note "agent.wireguard.backend=$WIREGUARD_BACKEND, agent.hook=$FASTPATH_HOOK"
}

# --- 3. images ------------------------------------------------------------------------------------

load_image() {
    local image="$1"
    if kind load docker-image --name "$CLUSTER" "$image"; then
        return 0
    fi
    # Docker's containerd image store can make `kind load docker-image` fail ("content digest
    # ... not found"); an archive of the image's own platform works around it (`docker image
    # save --platform` needs Docker 28 or newer; older ones save the image as it is).
    warn "kind load docker-image $image failed; retrying through an image archive"
    local archive="$WORKDIR/image.tar" platform
    platform="$(docker image inspect --format '{{.Os}}/{{.Architecture}}' "$image" 2>/dev/null || true)"
    if ! docker image save --platform "$platform" -o "$archive" "$image" 2>/dev/null; then
        docker image save -o "$archive" "$image" || return 1
    fi
    kind load image-archive --name "$CLUSTER" "$archive" || return 1
    rm -f "$archive"
}

build_images() {
    step "[3/9] images"
    if [ "$IMAGES_PREBUILT" = 1 ]; then
        note "IMAGES_PREBUILT=1: using the local $OPERATOR_REPO:$IMAGE_TAG and $AGENT_REPO:$IMAGE_TAG"
    else
        # The Dockerfiles use BuildKit (RUN --mount=type=cache). The agent's first build also
        # compiles bpf-linker against LLVM: expect many minutes.
        note "building $OPERATOR_REPO:$IMAGE_TAG and $AGENT_REPO:$IMAGE_TAG from $ROOT"
        DOCKER_BUILDKIT=1 docker build -f "$ROOT/operator/Dockerfile" -t "$OPERATOR_REPO:$IMAGE_TAG" "$ROOT" ||
            die "building the operator image failed"
        DOCKER_BUILDKIT=1 docker build -f "$ROOT/agent/Dockerfile" -t "$AGENT_REPO:$IMAGE_TAG" "$ROOT" ||
            die "building the agent image failed"
    fi
    load_image "$OPERATOR_REPO:$IMAGE_TAG" || die "cannot load $OPERATOR_REPO:$IMAGE_TAG into the cluster"
    load_image "$AGENT_REPO:$IMAGE_TAG" || die "cannot load $AGENT_REPO:$IMAGE_TAG into the cluster"
}

# --- 4. the chart ---------------------------------------------------------------------------------

install_chart() {
    step "[4/9] helm install $RELEASE (namespace $NAMESPACE)"
    # The agent uses hostNetwork, hostPath volumes and NET_ADMIN/BPF/PERFMON: its namespace must
    # allow privileged pods under Pod Security Admission.
    kcw create namespace "$NAMESPACE" >/dev/null || die "cannot create namespace $NAMESPACE"
    kcw label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=privileged --overwrite >/dev/null ||
        die "cannot label namespace $NAMESPACE"
    local extra=()
    if [ -n "$HELM_EXTRA_ARGS" ]; then
        read -r -a extra <<<"$HELM_EXTRA_ARGS"
    fi
    helm install "$RELEASE" "$ROOT/charts/wgpin" \
        --kube-context "$CONTEXT" \
        --namespace "$NAMESPACE" --create-namespace \
        --set "operator.image.repository=$OPERATOR_REPO" \
        --set "operator.image.tag=$IMAGE_TAG" \
        --set operator.image.pullPolicy=Never \
        --set "agent.image.repository=$AGENT_REPO" \
        --set "agent.image.tag=$IMAGE_TAG" \
        --set agent.image.pullPolicy=Never \
        --set 'agent.underlay={eth0}' \
        --set-string 'agent.nodeSelector.wgpin\.io/gateway=true' \
        --set "agent.hook=$FASTPATH_HOOK" \
        --set "agent.wireguard.backend=$WIREGUARD_BACKEND" \
        ${extra[@]+"${extra[@]}"} \
        --wait --timeout 5m ||
        die "helm install failed (see the pods and logs below)"

    AGENT_POD="$(kcw -n "$NAMESPACE" get pods \
        -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=agent" \
        --field-selector "spec.nodeName=$WORKER" -o jsonpath='{.items[*].metadata.name}' || true)"
    require "an agent pod runs on the gateway node" test -n "$AGENT_POD"
    local agents
    agents="$(kcw -n "$NAMESPACE" get pods -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=agent" \
        -o name | wc -l | tr -d ' ')"
    check "the agent runs only where agent.nodeSelector points (1 pod, found $agents)" test "$agents" = 1
    note "agent pod: $AGENT_POD"
}

# --- 5. the peers ---------------------------------------------------------------------------------

container_ip() {
    docker inspect --format '{{(index .NetworkSettings.Networks "'"$NETWORK"'").IPAddress}}' "$1"
}

start_peers() {
    step "[5/9] peers: $LAPTOP and $ATTACKER on the $NETWORK network"
    note "building $PEER_IMAGE"
    docker build -t "$PEER_IMAGE" - <<'EOF' || die "building the peer image failed"
FROM debian:bookworm-slim
RUN apt-get update && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        wireguard-tools wireguard-go iproute2 iputils-ping && \
    rm -rf /var/lib/apt/lists/*
EOF
    docker rm -f "$LAPTOP" "$ATTACKER" >/dev/null 2>&1 || true
    started_peers=1
    local peer
    for peer in "$LAPTOP" "$ATTACKER"; do
        docker run -d --name "$peer" --hostname "${peer#wgpin-e2e-}" --network "$NETWORK" \
            --cap-add NET_ADMIN --device /dev/net/tun --init \
            "$PEER_IMAGE" sleep infinity >/dev/null ||
            die "cannot start the peer container $peer"
    done
    LAPTOP_IP="$(container_ip "$LAPTOP")"
    ATTACKER_IP="$(container_ip "$ATTACKER")"
    if [ -z "$LAPTOP_IP" ] || [ -z "$ATTACKER_IP" ]; then
        die "the peers have no IPv4 address on the $NETWORK network"
    fi
    note "laptop: $LAPTOP_IP, attacker: $ATTACKER_IP"

    # The laptop's key, generated in the laptop; the attacker gets a copy (a stolen key). It
    # goes from one container to the other through a pipe and is never printed.
    docker exec "$LAPTOP" sh -c "umask 077 && wg genkey > $PEER_KEY_FILE" ||
        die "wg genkey failed in $LAPTOP"
    docker exec "$LAPTOP" cat "$PEER_KEY_FILE" |
        docker exec -i "$ATTACKER" sh -c "umask 077 && cat > $PEER_KEY_FILE" ||
        die "cannot copy the laptop's key to $ATTACKER"
    LAPTOP_PUBLIC_KEY="$(docker exec "$LAPTOP" sh -c "wg pubkey < $PEER_KEY_FILE" || true)"
    local attacker_public_key
    attacker_public_key="$(docker exec "$ATTACKER" sh -c "wg pubkey < $PEER_KEY_FILE" || true)"
    require "the laptop has a key pair" test "${#LAPTOP_PUBLIC_KEY}" -eq 44
    require "the attacker holds the laptop's private key" test "$attacker_public_key" = "$LAPTOP_PUBLIC_KEY"
}

# configure_peer CONTAINER: wg0 with the shared key, pointed at the gateway.
configure_peer() {
    local peer="$1"
    if docker exec "$peer" ip link add wg0 type wireguard 2>/dev/null; then
        note "$peer: kernel WireGuard"
    else
        note "$peer: wireguard-go (no kernel WireGuard here)"
        docker exec -d -e WG_PROCESS_FOREGROUND=1 "$peer" wireguard-go -f wg0 ||
            die "cannot start wireguard-go in $peer"
        wait_until 20 docker exec "$peer" test -S /var/run/wireguard/wg0.sock ||
            die "wireguard-go did not start in $peer"
    fi
    if ! docker exec "$peer" wg set wg0 private-key "$PEER_KEY_FILE" \
        peer "$GATEWAY_PUBLIC_KEY" endpoint "$WORKER_IP:$PEER_PORT" \
        allowed-ips "$GATEWAY_TUNNEL_IP/32" persistent-keepalive 5; then
        die "cannot configure wg0 in $peer"
    fi
    docker exec "$peer" ip address add "$PEER_TUNNEL_IP/24" dev wg0 || die "cannot address wg0 in $peer"
    docker exec "$peer" ip link set wg0 up || die "cannot bring wg0 up in $peer"
}

# Pings through the tunnel: ping exits 0 on any reply, 1 on none, 2 on an error (no route...).
ping_gets_reply() { docker exec "$1" ping -c 3 -W 2 "$GATEWAY_TUNNEL_IP" >/dev/null 2>&1; }
ping_gets_no_reply() {
    local rc=0
    docker exec "$1" ping -c 5 -W 2 "$GATEWAY_TUNNEL_IP" >/dev/null 2>&1 || rc=$?
    [ "$rc" -eq 1 ]
}

latest_handshake() { docker exec "$1" wg show wg0 latest-handshakes | awk 'NR == 1 { print $2 }'; }
no_handshake() { [ "$(latest_handshake "$1")" = 0 ]; }

# --- 6. the pinned laptop -------------------------------------------------------------------------

apply_interface() {
    kcw apply -f - <<EOF
apiVersion: wgpin.io/v1alpha1
kind: PinnedInterface
metadata:
  name: $INTERFACE
spec:
  mode: Dedicated
  nodeSelector:
    matchLabels:
      $GATEWAY_LABEL_KEY: "true"
  interfaceName: $DEVICE_PREFIX
  listenPort: $LISTEN_PORT
  listenPortEnd: $LISTEN_PORT_END
  addresses:
    - $GATEWAY_TUNNEL_IP/24
EOF
}

# apply_peer SOURCE_IP: the laptop's PinnedPeer, pinned to SOURCE_IP/32.
apply_peer() {
    kcw apply -f - <<EOF
apiVersion: wgpin.io/v1alpha1
kind: PinnedPeer
metadata:
  name: $PEER
spec:
  interface: $INTERFACE
  publicKey: "$LAPTOP_PUBLIC_KEY"
  allowedIPs:
    - $PEER_TUNNEL_IP/32
  sources:
    - $1/32
EOF
}

node_state_fast_path_verified() { [ "$(condition "pinnednodestate/$WORKER" FastPathVerified status)" = True ]; }

# The laptop's endpoint as the gateway reports it, with a handshake.
peer_seen_from() {
    local endpoint handshake
    endpoint="$(jp "pinnedpeer/$PEER" '{.status.nodes[0].endpoint}')"
    handshake="$(jp "pinnedpeer/$PEER" '{.status.nodes[0].lastHandshakeTime}')"
    [ "${endpoint%:*}" = "$1" ] && [ -n "$handshake" ]
}

# device_on_worker NAME / device_gone_from_worker NAME: from a successful listing of the
# gateway node's links ("12: wgpin0-0: <POINTOPOINT,...").
worker_links() { docker exec "$WORKER" ip -o link show; }
device_on_worker() {
    local links
    links="$(worker_links)" && contains "$links" ": $1: "
}
device_gone_from_worker() {
    local links
    links="$(worker_links)" && not contains "$links" ": $1: "
}

# node_wg ARG...: `wg` on the gateway node, when the node has it (kind's node images do not).
node_has_wg() { docker exec "$WORKER" sh -c 'command -v wg' >/dev/null 2>&1; }
node_wg_lists_peer() {
    local peers
    peers="$(docker exec "$WORKER" wg show all peers)" && contains "$peers" "$LAPTOP_PUBLIC_KEY"
}
# node_wg_lacks_peer: wg answered, and without the laptop's key.
node_wg_lacks_peer() {
    local peers
    peers="$(docker exec "$WORKER" wg show all peers)" && not contains "$peers" "$LAPTOP_PUBLIC_KEY"
}

port_in_range() {
    case "$1" in '' | *[!0-9]*) return 1 ;; esac
    [ "$1" -ge "$LISTEN_PORT" ] && [ "$1" -le "$LISTEN_PORT_END" ]
}

pinned_laptop() {
    step "[6/9] PinnedInterface $INTERFACE and PinnedPeer $PEER (pinned to the laptop, $LAPTOP_IP/32)"
    apply_interface >/dev/null || die "kubectl apply of the PinnedInterface failed"
    require "the operator rendered PinnedNodeState $WORKER" wait_until 60 exists "pinnednodestate/$WORKER"
    check "the agent's fast path is verified on $WORKER (FastPathVerified)" \
        wait_until 90 node_state_fast_path_verified

    apply_peer "$LAPTOP_IP" >/dev/null || die "kubectl apply of the PinnedPeer failed"
    require "PinnedPeer $PEER becomes Ready" \
        kwait "pinnedpeer/$PEER" --for=condition=Ready --timeout=120s

    GATEWAY_PUBLIC_KEY="$(jp "pinnedpeer/$PEER" '{.status.nodes[0].publicKey}')"
    PEER_PORT="$(jp "pinnedpeer/$PEER" '{.status.listenPort}')"
    WORKER_IP="$(kcw get node "$WORKER" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}' |
        tr ' ' '\n' | grep -E -m1 '^[0-9]+(\.[0-9]+){3}$' || true)"
    note "gateway: $WORKER_IP:$PEER_PORT, public key $GATEWAY_PUBLIC_KEY"
    require "the gateway's public key is published in the status" \
        test "${#GATEWAY_PUBLIC_KEY}" -eq 44
    require "a dedicated port in $LISTEN_PORT-$LISTEN_PORT_END is assigned" port_in_range "$PEER_PORT"
    require "the worker has an InternalIP" test -n "$WORKER_IP"
    check "status.nodes[0] is $WORKER, Enforced, in Dedicated mode" test \
        "$(jp "pinnedpeer/$PEER" '{.status.nodes[0].node} {.status.nodes[0].state} {.status.nodes[0].mode}')" = \
        "$WORKER Enforced Dedicated"
    note "node reports: backend $(jp "pinnednodestate/$WORKER" '{.status.interfaces[0].backend}'), fast path $(jp "pinnednodestate/$WORKER" '{.status.interfaces[0].fastPath}')"

    PEER_DEVICE="$DEVICE_PREFIX-$((PEER_PORT - LISTEN_PORT))"
    check "the per-peer device $PEER_DEVICE exists on $WORKER" device_on_worker "$PEER_DEVICE"
    if node_has_wg; then
        check "wg on $WORKER lists the laptop's key" node_wg_lists_peer
    fi

    configure_peer "$LAPTOP"
    check "the laptop pings $GATEWAY_TUNNEL_IP through the tunnel" wait_until 30 ping_gets_reply "$LAPTOP"
    check "status.nodes[0] shows the laptop's endpoint ($LAPTOP_IP) and a handshake" \
        wait_until 90 peer_seen_from "$LAPTOP_IP"
}

# --- 7. the attacker with the stolen key ----------------------------------------------------------

# violation_events: the notes of the SourceViolation Events about the PinnedPeer, one a line.
violation_events() {
    kc --request-timeout=30s -n default get events.events.k8s.io \
        -o jsonpath='{range .items[?(@.reason=="SourceViolation")]}{.regarding.kind}{"\t"}{.regarding.name}{"\t"}{.note}{"\n"}{end}' 2>/dev/null |
        awk -F '\t' -v peer="$PEER" '$1 == "PinnedPeer" && $2 == peer { print $3 }'
}
violation_event_count() { violation_events | wc -l | tr -d ' '; }
some_violation_event() { [ "$(violation_event_count)" -ge 1 ]; }

# violation_metric: wgpin_violation_events_total of the peer on the gateway's agent, through the
# API server's pod proxy (the agent listens on the node's network, port 9477).
violation_metric() {
    kc --request-timeout=30s get --raw \
        "/api/v1/namespaces/$NAMESPACE/pods/$AGENT_POD:$AGENT_METRICS_PORT/proxy/metrics" 2>/dev/null |
        awk -v peer="peer=\"$PEER\"" \
            'index($0, "wgpin_violation_events_total{") == 1 && index($0, peer) { sum += $NF } END { print sum + 0 }'
}
violation_metric_positive() { awk -v v="$(violation_metric)" 'BEGIN { exit !(v > 0) }'; }

attacker() {
    step "[7/9] the attacker ($ATTACKER_IP) with the laptop's key"
    configure_peer "$ATTACKER"
    check "the attacker's ping gets no reply" ping_gets_no_reply "$ATTACKER"
    check "the attacker's latest handshake stays 0" no_handshake "$ATTACKER"

    check "PinnedPeer $PEER reports SourceViolation" \
        kwait "pinnedpeer/$PEER" --for=condition=SourceViolation --timeout=60s
    local message
    message="$(condition "pinnedpeer/$PEER" SourceViolation message)"
    note "SourceViolation: $message"
    # "<n> packets from outside the pin; last from <address:port> on node <node>"
    check "the SourceViolation message names the attacker's address" \
        contains "$message" "from $ATTACKER_IP:"
    check "the SourceViolation message names the node" contains "$message" "on node $WORKER"

    check "a SourceViolation Event about $PEER is written in namespace default" \
        wait_until 60 some_violation_event
    # At most one per source per peer per minute: the attacker keeps trying, still one Event.
    sleep 5
    local count notes
    count="$(violation_event_count)"
    notes="$(violation_events)"
    note "Events: ${notes:-none}"
    check "exactly one SourceViolation Event (found $count)" test "$count" = 1
    # "<n> violation(s) from <address> [(latest <address:port>)] since the last event ..."
    check "the Event names the attacker's address" contains "$notes" "from $ATTACKER_IP "
    check "wgpin_violation_events_total{peer=\"$PEER\"} > 0 on the gateway's agent" \
        wait_until 30 violation_metric_positive
    note "wgpin_violation_events_total{peer=\"$PEER\"} = $(violation_metric)"

    check "the laptop still gets through" wait_until 20 ping_gets_reply "$LAPTOP"
    check "the laptop's endpoint did not move to the attacker" peer_seen_from "$LAPTOP_IP"
}

# --- 8. the pin moves -----------------------------------------------------------------------------

# peer_current_and_ready OLD_GENERATION: a newer generation, observed by the operator and Ready
# for it (a Ready condition left from the old generation does not count).
peer_current_and_ready() {
    local generation observed ready ready_generation
    IFS='|' read -r generation observed ready ready_generation <<<"$(jp "pinnedpeer/$PEER" \
        '{.metadata.generation}|{.status.observedGeneration}|{.status.conditions[?(@.type=="Ready")].status}|{.status.conditions[?(@.type=="Ready")].observedGeneration}')"
    [ -n "${generation:-}" ] && [ "$generation" != "$1" ] &&
        [ "${observed:-}" = "$generation" ] &&
        [ "${ready:-}" = True ] && [ "${ready_generation:-}" = "$generation" ]
}

move_pin() {
    step "[8/9] the pin moves to the attacker's address ($ATTACKER_IP/32)"
    local generation
    generation="$(jp "pinnedpeer/$PEER" '{.metadata.generation}')"
    apply_peer "$ATTACKER_IP" >/dev/null || die "kubectl apply of the moved PinnedPeer failed"
    check "the operator observed the new generation and the peer is Ready again" \
        wait_until 120 peer_current_and_ready "$generation"
    check "the attacker's address now gets through" wait_until 90 ping_gets_reply "$ATTACKER"
    check "the laptop's address is refused now" ping_gets_no_reply "$LAPTOP"
}

# --- 9. deletion ----------------------------------------------------------------------------------

# node_state_lacks_peer: the gateway's PinnedNodeState (spec and the agent's status) exists and
# no longer names the peer.
node_state_lacks_peer() {
    local names
    exists "pinnednodestate/$WORKER" || return 1
    names=" $(jp "pinnednodestate/$WORKER" '{.spec.interfaces[*].peers[*].name} {.status.interfaces[*].peers[*].name}') "
    not contains "$names" " $PEER "
}

peer_deleted() {
    # `kubectl wait --for=delete` on an object already gone fails in some kubectl versions.
    kc wait "pinnedpeer/$PEER" --for=delete --timeout=60s >/dev/null 2>&1 || absent "pinnedpeer/$PEER"
}

delete_peer() {
    step "[9/9] kubectl delete pinnedpeer $PEER"
    kcw delete "pinnedpeer/$PEER" --wait=false >/dev/null || die "kubectl delete failed"
    check "PinnedPeer $PEER is gone (the agent confirmed, the finalizer was released)" peer_deleted
    check "PinnedNodeState $WORKER no longer lists $PEER" wait_until 30 node_state_lacks_peer
    check "the per-peer device $PEER_DEVICE is gone from $WORKER" \
        wait_until 30 device_gone_from_worker "$PEER_DEVICE"
    if node_has_wg; then
        check "wg on $WORKER no longer lists the laptop's key" node_wg_lacks_peer
    else
        note "skipped: wg show on $WORKER (the node image has no wireguard-tools); the device check above covers it"
    fi
}

# --- main -----------------------------------------------------------------------------------------

preflight
create_cluster
build_images
install_chart
start_peers
pinned_laptop
attacker
move_pin
delete_peer
