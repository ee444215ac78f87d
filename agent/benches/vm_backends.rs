//! Kernel-VM backend benchmark (prints figures; asserts nothing about time): the agent's two
//! WireGuard backends side by side in one guest, in one run.
//!
//! In the kernel-VM tier's guest (Debian 6.12, QEMU TCG, one vCPU; tests/vm/README.md), with
//! 1,000 peers in Shared mode (one device, one port; each peer a public key, one allowed /32 and
//! an endpoint), for kernel WireGuard over generic netlink and for wireguard-go over UAPI:
//! - programming the 1,000 peers into a new, empty device (the device key, the port and the
//!   peers in one `Backend::set`), median of the repetitions, the device deleted and created
//!   again between them;
//! - a full read of the same 1,000 (`Backend::get`, what every steady-state reconcile and guard
//!   tick does first), median of all reads;
//! - removing the 1,000 peers in one `Backend::set` (what withdrawing every peer costs), and
//!   deleting the then empty device; once, deleting a device that holds the 1,000 peers;
//! - the ratios netlink/UAPI; and the same UAPI figures on the host (wireguard-go in a network
//!   namespace), whose ratio to the guest's is the TCG slowdown for that code.
//!
//! The measuring code is `agent/examples/program_peers.rs`, included here: this binary copies
//! itself into the guest's initramfs (with wireguard-go and the `tun` module) and runs itself
//! there as `<bench> program-peers ...`. Every read is checked to hold exactly the peers
//! written; a failed step fails the bench. Everything is removed at the end (the VM powered
//! off, its tap and namespaces deleted; on the host the namespace and wireguard-go).
//!
//! Run as root: `cargo bench -p wgpin-agent --bench vm_backends` (scripts/bench-vm.sh).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

#[allow(dead_code)] // its `main` is the example's; this binary has its own
#[path = "../examples/program_peers.rs"]
mod program_peers;
// The test hosts' helpers, shared with the tests.
#[path = "../tests/support/mod.rs"]
mod support;

use support::vm::{KernelCalls, Vm, VmNet, image_with};

const PEERS: usize = 1_000;
/// Devices programmed from empty, per backend.
const REPS: usize = 5;
/// Full reads per repetition.
const READS: usize = 5;
/// The generic-netlink handlers counted in the guest: one `wg_set_device` per SET_DEVICE
/// message, one `wg_get_device_start` per read, one `wg_get_device_dump` per reply message.
const TRACED: [&str; 3] = ["wg_set_device", "wg_get_device_start", "wg_get_device_dump"];

/// The first argument that makes this binary the measuring program.
const GUEST_COMMAND: &str = "program-peers";

/// One `PROGRAM-PEERS` line, parsed.
#[derive(Debug)]
struct Figures {
    line: String,
    set_messages: usize,
    set_bytes: usize,
    remove_messages: usize,
    create: Vec<f64>,
    program: Vec<f64>,
    read: Vec<f64>,
    remove: Vec<f64>,
    delete: Vec<f64>,
    delete_with_peers: Vec<f64>,
}

impl Figures {
    fn parse(output: &str) -> Self {
        let line = output
            .lines()
            .find(|l| l.starts_with(program_peers::TAG))
            .unwrap_or_else(|| panic!("no {} line in:\n{output}", program_peers::TAG))
            .to_string();
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name}= in {line}"))
                .to_string()
        };
        let samples = |name: &str| -> Vec<f64> {
            let mut v: Vec<f64> = field(name)
                .split(',')
                .map(|s| s.parse().unwrap_or_else(|e| panic!("{name}: {s}: {e}")))
                .collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let number = |name: &str| -> usize {
            field(name)
                .parse()
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        assert_eq!(number("peers"), PEERS, "{line}");
        Self {
            set_messages: number("set_messages"),
            set_bytes: number("set_bytes"),
            remove_messages: number("remove_messages"),
            create: samples("create_ms"),
            program: samples("program_ms"),
            read: samples("read_ms"),
            remove: samples("remove_ms"),
            delete_with_peers: samples("delete_with_peers_ms"),
            delete: samples("delete_ms"),
            line,
        }
    }
}

fn median(v: &[f64]) -> f64 {
    v[v.len() / 2]
}

fn range(v: &[f64]) -> String {
    format!("{:.1}–{:.1}", v[0], v[v.len() - 1])
}

/// `program-peers` arguments for one backend.
fn arguments(backend: &str, device: &str, program: &str) -> Vec<String> {
    [
        GUEST_COMMAND,
        "--backend",
        backend,
        "--device",
        device,
        "--peers",
        &PEERS.to_string(),
        "--reps",
        &REPS.to_string(),
        "--reads",
        &READS.to_string(),
        "--program",
        program,
    ]
    .map(String::from)
    .to_vec()
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

/// The host's namespace for the UAPI figures; on drop, the wireguard-go this run started (by
/// its pid) and the namespace go.
struct HostRun {
    ns: String,
    device: String,
    program: String,
}

impl Drop for HostRun {
    fn drop(&mut self) {
        for pid in program_peers::userspace_pids(&self.program, &self.device) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.device));
        support::delete_namespaces(&[&self.ns]);
    }
}

/// wireguard-go on the host, in a namespace of its own, the same code as in the guest.
fn host_uapi(me: &Path, wireguard_go: &Path) -> Figures {
    let id = support::unique_id();
    let run = HostRun {
        ns: format!("wgvb-{id}"),
        device: format!("wgvb{id}"),
        program: wireguard_go.display().to_string(),
    };
    support::add_namespaces(&[&run.ns]);
    let output = Command::new("ip")
        .args(["netns", "exec", &run.ns])
        .arg(me)
        .args(arguments("uapi", &run.device, &run.program))
        .output()
        .expect("ip netns exec");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "program-peers on the host failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Figures::parse(&stdout)
}

/// One backend in the guest; panics with what it printed when it failed.
fn guest(vm: &mut Vm, me: &str, backend: &str, device: &str) -> Figures {
    let script = arguments(backend, device, "wireguard-go").join(" ");
    let output = vm.sh_timeout(
        &format!("/usr/bin/{me} {script}"),
        Duration::from_secs(1800),
    );
    assert_eq!(
        output.status,
        0,
        "program-peers --backend {backend} in the VM failed:\n{}\n{}",
        output.text,
        vm.console_tail()
    );
    Figures::parse(&output.text)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(GUEST_COMMAND) {
        std::process::exit(program_peers::cli(&args[1..]));
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root: sudo scripts/bench-vm.sh"
    );
    let me = std::env::current_exe().expect("this benchmark's path");
    let me_name = me
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a file name")
        .to_string();
    let wireguard_go =
        on_path("wireguard-go").expect("wireguard-go (apt-get install wireguard-go)");

    // The host first, while no VM competes for the CPU.
    let host = host_uapi(&me, &wireguard_go);

    let image = match image_with(&[&me, &wireguard_go], &["tun"]) {
        Ok(image) => image,
        Err(reason) => {
            eprintln!(
                "SKIPPED vm_backends: the kernel VM image cannot be built because a Debian package is unavailable: {reason}"
            );
            return;
        }
    };
    let net = VmNet::new();
    let started = Instant::now();
    let mut vm = Vm::boot(&net, &image);
    let boot = started.elapsed();
    let guest_kernel = vm.ok("uname -r").trim().to_string();

    KernelCalls::start_functions(&mut vm, &TRACED);
    let kernel = guest(&mut vm, &me_name, "kernel", "wgk0");
    KernelCalls::stop(&mut vm);
    let counts = TRACED.map(|f| KernelCalls::count(&mut vm, f));
    let uapi = guest(&mut vm, &me_name, "uapi", "wgu0");
    drop(vm);
    drop(net);

    // Per repetition: a read of the new device, READS + 1 full reads (one untimed, after the
    // link went up), a read after the removal; then a read of the new device and one full read
    // before the delete with peers. An empty device's read is one reply message.
    let full_reads = REPS * (READS + 1) + 1;
    let parts_per_read = counts[2].saturating_sub(2 * REPS + 1) as f64 / full_reads as f64;
    let sets_expected = REPS * (kernel.set_messages + kernel.remove_messages) + kernel.set_messages;

    println!(
        "kernel VM: {guest_kernel}, QEMU TCG, 1 vCPU (boot {:.1} s, image {:.1} s); {PEERS} peers, \
         Shared mode (one device, one port; a key, one allowed /32 and an endpoint each)",
        boot.as_secs_f64(),
        image.build_time.as_secs_f64()
    );
    println!(
        "{REPS} devices programmed from empty per backend, {} full reads each (medians; min–max below)",
        REPS * READS
    );
    println!();
    println!(
        "{:<46} {:>14} {:>14} {:>10} {:>12} {:>10}",
        "measure (ms)", "kernel netlink", "wg-go UAPI", "nl/UAPI", "host UAPI", "TCG ×"
    );
    let row = |name: &str, k: &[f64], u: &[f64], h: &[f64]| {
        let (k, u, h) = (median(k), median(u), median(h));
        println!(
            "{name:<46} {k:>14.1} {u:>14.1} {:>9.2}x {h:>12.1} {:>9.1}x",
            k / u,
            u / h
        );
    };
    row(
        "create the device",
        &kernel.create,
        &uapi.create,
        &host.create,
    );
    row(
        "program 1,000 peers from empty",
        &kernel.program,
        &uapi.program,
        &host.program,
    );
    row(
        "full read of 1,000 peers",
        &kernel.read,
        &uapi.read,
        &host.read,
    );
    row(
        "remove the 1,000 peers",
        &kernel.remove,
        &uapi.remove,
        &host.remove,
    );
    row(
        "delete the (empty) device",
        &kernel.delete,
        &uapi.delete,
        &host.delete,
    );
    row(
        "delete the device with its 1,000 peers (once)",
        &kernel.delete_with_peers,
        &uapi.delete_with_peers,
        &host.delete_with_peers,
    );
    println!();
    for (name, f) in [
        ("kernel netlink", &kernel),
        ("wg-go UAPI", &uapi),
        ("host UAPI", &host),
    ] {
        println!(
            "{name:<16} program {} ms, read {} ms, remove {} ms, create {} ms, delete {} ms",
            range(&f.program),
            range(&f.read),
            range(&f.remove),
            range(&f.create),
            range(&f.delete)
        );
    }
    println!();
    println!(
        "one program: netlink {} SET_DEVICE messages, {} attribute bytes; UAPI one set=1 request \
         of {} bytes. One removal: {} SET_DEVICE messages. Counted in the kernel: {} \
         wg_set_device for {} programs and {REPS} removals ({sets_expected} expected)",
        kernel.set_messages,
        kernel.set_bytes,
        uapi.set_bytes,
        kernel.remove_messages,
        counts[0],
        REPS + 1
    );
    println!(
        "one full read over netlink: {parts_per_read:.1} reply messages (wg_get_device_dump calls; \
         {} dumps started, {} reply messages in all)",
        counts[1], counts[2]
    );
    println!();
    for f in [&kernel, &uapi, &host] {
        println!("{}", f.line);
    }
}
