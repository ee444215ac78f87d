#!/usr/bin/env bash
# Builds what the kernel-VM tier boots, from Debian packages only (tests/vm/README.md):
#   - the kernel named in tests/vm/kernel.env: its vmlinux (PVH ELF, booted by QEMU directly)
#     and the modules of WGPIN_VM_MODULES with their dependencies, decompressed, in load order;
#   - an initramfs: busybox (busybox-static), those modules, tests/vm/init, `wg`
#     (wireguard-tools) and the agent binary given with --agent, with their shared libraries;
#     optionally more programs (--extra PATH, to /usr/bin/NAME) and more kernel modules, loaded
#     at boot after those of WGPIN_VM_MODULES (--module NAME, with its dependencies).
# Both are cached under .tools/vm/: the kernel by its package version, the initramfs by a hash
# of everything in it, so a rerun takes well under a second.
#
#   tests/vm/build-image.sh --agent target/debug/wgpin-agent
#   tests/vm/build-image.sh --agent ... --extra /usr/bin/wireguard-go --module tun
#
# An initramfs with extras is named initrd-<release>-x<hash>.cpio.gz and replaces only older
# ones with extras; the plain one (what the tests boot) is left alone, and the other way round.
# Prints `vmlinux=PATH` and `initrd=PATH`. Exits 77 when a Debian package it needs is not
# available (the tests report that as a skip, with this script's message); 1 on any other error.
source "$(dirname "$0")/../../scripts/lib.sh"
source "$WGPIN_ROOT/tests/vm/kernel.env"

agent=""
extras=()
extra_modules=()
usage="usage: $0 --agent PATH [--extra PATH]... [--module NAME]..."
while [ $# -gt 0 ]; do
    case "$1" in
    --agent) agent="$2"; shift 2 ;;
    --extra) extras+=("${2:?$usage}"); shift 2 ;;
    --module) extra_modules+=("${2:?$usage}"); shift 2 ;;
    *) die "unknown argument $1 ($usage)" ;;
    esac
done
[ -n "$agent" ] && [ -x "$agent" ] || die "--agent PATH: the wgpin-agent binary to put in the initramfs"
for extra in "${extras[@]}"; do
    [ -x "$extra" ] && [ -f "$extra" ] || die "--extra $extra: not an executable file"
done

# A package this tier needs is not available: exit 77 (a skip, said loudly, not a failure).
unavailable() {
    printf 'VM-IMAGE-UNAVAILABLE: %s\n' "$*" >&2
    exit 77
}

need_root
for pkg in qemu-system-x86 busybox-static kmod cpio xz-utils zstd; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" &&
        ! apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [^(]'; then
        unavailable "the Debian package $pkg is not installed and apt has no candidate for it"
    fi
done
ensure_vm_tools
command -v wg >/dev/null || ensure_apt wireguard-tools

VM_DIR="$WGPIN_TOOLS/vm"
release="${WGPIN_VM_KERNEL_PACKAGE#linux-image-}"
kernel_dir="$VM_DIR/kernel-$release-$WGPIN_VM_KERNEL_VERSION"
mkdir -p "$VM_DIR"
# One build at a time (tests run in parallel and each may call this).
exec 9>"$VM_DIR/.lock"
flock -w 600 9 || die "another build of the VM image holds $VM_DIR/.lock for over 10 minutes"

scratch=""
cleanup() { [ -z "$scratch" ] || rm -rf "$scratch"; }
trap cleanup EXIT

# vmlinux from a vmlinuz: the first XZ or ZSTD stream that decompresses to an ELF file
# (what the kernel's scripts/extract-vmlinux does). QEMU boots it through its PVH note,
# which skips the decompression that costs 1-3 s in a TCG guest.
extract_vmlinux() {
    local vmlinuz="$1" out="$2" offset
    for magic in '\x28\xb5\x2f\xfd' '\xfd\x37\x7a\x58\x5a\x00'; do
        for offset in $(LC_ALL=C grep -aboP "$magic" "$vmlinuz" | cut -d: -f1); do
            case "$magic" in
            *28*) tail -c +$((offset + 1)) "$vmlinuz" | zstd -dcq >"$out" 2>/dev/null || true ;;
            *) tail -c +$((offset + 1)) "$vmlinuz" | xz -dcq >"$out" 2>/dev/null || true ;;
            esac
            if [ "$(head -c 4 "$out" | od -An -c | tr -d ' ')" = '177ELF' ]; then
                return 0
            fi
        done
    done
    return 1
}

# Downloads the pinned kernel package into $scratch and unpacks the given paths of it (with
# /lib/modules and its modules.dep) under $scratch/root.
unpack_kernel_package() {
    # (`apt-cache show PKG=VERSION` succeeds for a version apt does not know.)
    known() {
        apt-cache madison "$WGPIN_VM_KERNEL_PACKAGE" 2>/dev/null | awk -F' [|] ' '{print $2}' |
            grep -qxF "$WGPIN_VM_KERNEL_VERSION"
    }
    if ! known; then
        apt-get update -qq || true
        known ||
            unavailable "apt knows no $WGPIN_VM_KERNEL_PACKAGE=$WGPIN_VM_KERNEL_VERSION (Debian keeps only the newest build in bookworm-security): pick its successor from \`apt-cache search '^linux-image-6.12.*-amd64\$'\` and change tests/vm/kernel.env"
    fi
    # apt's download sandbox user must be able to write here.
    id _apt >/dev/null 2>&1 && chown _apt "$scratch"
    (cd "$scratch" && apt-get download -q "$WGPIN_VM_KERNEL_PACKAGE=$WGPIN_VM_KERNEL_VERSION" >/dev/null) ||
        unavailable "apt-get download $WGPIN_VM_KERNEL_PACKAGE=$WGPIN_VM_KERNEL_VERSION failed"
    local deb root="$scratch/root"
    deb="$(ls "$scratch"/*.deb)"
    mkdir -p "$root"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$root" "$@" "./lib/modules/$release"
    rm -f "$deb"
    # The package ships no modules.dep: depmod writes it.
    depmod -b "$root" "$release"
}

# Copies module $1 and its dependencies that are not in $2/modules.load yet, decompressed, to
# $2/modules/ and appends their names to $2/modules.load, each after its dependencies.
add_module() {
    local module="$1" out="$2" root="$scratch/root" line path name
    modprobe -d "$root" -S "$release" --show-depends "$module" >"$scratch/deps" ||
        die "module $module is not in $WGPIN_VM_KERNEL_PACKAGE"
    while read -r line; do
        case "$line" in
        insmod\ *) path="$(echo "$line" | awk '{print $2}')" ;;
        *) continue ;; # builtin
        esac
        name="$(basename "$path")"
        name="${name%%.ko*}"
        grep -qx "$name" "$out/modules.load" && continue
        case "$path" in
        *.ko.xz) xz -dc "$path" >"$out/modules/$name.ko" ;;
        *.ko.zst) zstd -dcq "$path" >"$out/modules/$name.ko" ;;
        *.ko.gz) gzip -dc "$path" >"$out/modules/$name.ko" ;;
        *) cp "$path" "$out/modules/$name.ko" ;;
        esac
        echo "$name" >>"$out/modules.load"
    done <"$scratch/deps"
}

build_kernel() {
    step "kernel $WGPIN_VM_KERNEL_PACKAGE $WGPIN_VM_KERNEL_VERSION for the VM tier (once)"
    scratch="$(mktemp -d "$VM_DIR/kernel-build.XXXXXX")"
    unpack_kernel_package "./boot/vmlinuz-$release" "./boot/config-$release"
    local root="$scratch/root" out="$scratch/kernel" module
    mkdir -p "$out/modules"
    extract_vmlinux "$root/boot/vmlinuz-$release" "$out/vmlinux" ||
        die "found no XZ or ZSTD stream in vmlinuz-$release that decompresses to an ELF vmlinux"
    cp "$root/boot/config-$release" "$out/config"
    # Every module of WGPIN_VM_MODULES after its dependencies, each once.
    : >"$out/modules.load"
    for module in $WGPIN_VM_MODULES; do
        add_module "$module" "$out"
    done
    rm -rf "$kernel_dir"
    mv "$out" "$kernel_dir"
    rm -rf "$scratch"
    scratch=""
    printf 'vmlinux %s MB, modules: %s\n' "$(($(stat -c %s "$kernel_dir/vmlinux") / 1048576))" \
        "$(tr '\n' ' ' <"$kernel_dir/modules.load")"
}

[ -f "$kernel_dir/modules.load" ] && [ -f "$kernel_dir/vmlinux" ] || build_kernel

# A --module: kept in $kernel_dir/extra/<module>/ (modules.load lists only what the modules of
# WGPIN_VM_MODULES do not already load). Once per kernel and module: the package is fetched again.
build_extra_module() {
    local module="$1" out
    step "module $module of $WGPIN_VM_KERNEL_PACKAGE for the VM tier (once)"
    scratch="$(mktemp -d "$VM_DIR/module-build.XXXXXX")"
    unpack_kernel_package
    out="$scratch/extra"
    mkdir -p "$out/modules"
    cp "$kernel_dir/modules.load" "$out/modules.load"
    add_module "$module" "$out"
    # Only the new ones.
    tail -n +$(($(wc -l <"$kernel_dir/modules.load") + 1)) "$out/modules.load" >"$out/new.load"
    mv "$out/new.load" "$out/modules.load"
    mkdir -p "$kernel_dir/extra"
    rm -rf "$kernel_dir/extra/$module"
    mv "$out" "$kernel_dir/extra/$module"
    rm -rf "$scratch"
    scratch=""
}
for module in "${extra_modules[@]}"; do
    [ -f "$kernel_dir/extra/$module/modules.load" ] || build_extra_module "$module"
done

# Copies a program and the shared libraries `ldd` names to the same paths under $1.
copy_with_libraries() {
    local root="$1" program="$2" target="$3" lib
    install -D -m 0755 "$program" "$root$target"
    for lib in $(ldd "$program" | awk '/=> \// {print $3} /^\t\/[^ ]+ \(/ {print $1}'); do
        [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
}

busybox="$(command -v busybox)"
wg="$(command -v wg)"
# With extras, the hash also covers their names and contents and the extra modules' names.
flavour=""
[ ${#extras[@]} -eq 0 ] && [ ${#extra_modules[@]} -eq 0 ] || flavour="x"
key="$({
    cat "$agent" "$wg" "$busybox" "$WGPIN_ROOT/tests/vm/init" "$0" "$kernel_dir/modules.load"
    if [ -n "$flavour" ]; then
        printf '%s\n' "${extras[@]##*/}" -- "${extra_modules[@]}"
        for extra in "${extras[@]}"; do cat "$extra"; done
        for module in "${extra_modules[@]}"; do cat "$kernel_dir/extra/$module/modules.load"; done
    fi
} | sha256sum | cut -c1-16)"
initrd="$VM_DIR/initrd-$release-$flavour$key.cpio.gz"
if [ ! -f "$initrd" ]; then
    scratch="$(mktemp -d "$VM_DIR/initrd-build.XXXXXX")"
    root="$scratch/root"
    mkdir -p "$root"/{bin,dev,proc,sys,run,tmp,etc,var/lib,lib/modules,usr/bin}
    ln -s ../run "$root/var/run"
    install -m 0755 "$busybox" "$root/bin/busybox"
    for applet in $("$busybox" --list); do
        [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
    done
    install -m 0755 "$WGPIN_ROOT/tests/vm/init" "$root/init"
    cp "$kernel_dir"/modules/*.ko "$kernel_dir/modules.load" "$root/lib/modules/"
    copy_with_libraries "$root" "$wg" /usr/bin/wg
    # Without debug info: a third of the size, so the guest unpacks it faster.
    strip -o "$scratch/wgpin-agent" "$agent"
    copy_with_libraries "$root" "$scratch/wgpin-agent" /usr/bin/wgpin-agent
    for extra in "${extras[@]}"; do
        name="$(basename "$extra")"
        strip -o "$scratch/$name" "$extra" 2>/dev/null || cp "$extra" "$scratch/$name"
        copy_with_libraries "$root" "$scratch/$name" "/usr/bin/$name"
    done
    # Loaded by init after the others, in the order given.
    for module in "${extra_modules[@]}"; do
        cp "$kernel_dir/extra/$module/modules/"* "$root/lib/modules/" 2>/dev/null || true
        while read -r name; do
            grep -qx "$name" "$root/lib/modules/modules.load" || echo "$name" >>"$root/lib/modules/modules.load"
        done <"$kernel_dir/extra/$module/modules.load"
    done
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -1 >"$initrd.partial"
    mv "$initrd.partial" "$initrd"
    # Older initramfs of this kernel: a VM that booted from one no longer needs the file.
    # (With extras, only older ones with extras; without, only older ones without.)
    if [ -n "$flavour" ]; then
        find "$VM_DIR" -maxdepth 1 -name "initrd-$release-x*.cpio.gz" ! -path "$initrd" -delete
    else
        find "$VM_DIR" -maxdepth 1 -name "initrd-$release-*.cpio.gz" ! -name "initrd-$release-x*" \
            ! -path "$initrd" -delete
    fi
    rm -rf "$scratch"
    scratch=""
fi
printf 'vmlinux=%s\ninitrd=%s\n' "$kernel_dir/vmlinux" "$initrd"
