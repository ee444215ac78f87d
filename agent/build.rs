//! Builds the eBPF programs (agent/bpf) with the nightly toolchain and bpf-linker, and leaves
//! the object in OUT_DIR for `include_bytes_aligned!`. `scripts/setup.sh` installs both.

fn main() -> aya_build::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "wgpin-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/bpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
